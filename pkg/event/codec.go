package event

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"

	cloudevents "github.com/cloudevents/sdk-go/v2/event"
	"github.com/cloudevents/sdk-go/v2/types"
	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel"
)

// Event is a CloudEvent, as modelled by the CloudEvents Go SDK.
type Event = cloudevents.Event

// Header names of the NATS mapping.
const (
	// HeaderPrefix starts every CloudEvents attribute header in binary mode.
	HeaderPrefix = "ce-"
	// HeaderMsgID is JetStream's de-duplication header.
	HeaderMsgID = "Nats-Msg-Id"
	// HeaderContentType marks structured mode on input.
	HeaderContentType = "content-type"
	// ContentTypeJSON is the datacontenttype of every payload sand-boxer
	// produces.
	ContentTypeJSON = "application/json"
	// ContentTypeStructured is the media type of a structured-mode event.
	ContentTypeStructured = "application/cloudevents+json"
)

// ErrMalformed wraps every decoding error: the message is not a valid
// CloudEvent and retrying it cannot help.
var ErrMalformed = errors.New("malformed event")

// New builds a CloudEvent of type t with JSON data. The id must be
// deterministic for the fact the event records (for lifecycle events,
// "<sandbox>.<state>"), so that two publishers of the same fact produce the
// same Nats-Msg-Id and JetStream keeps one copy.
func New(t Type, source, subject, id string, data any) (*Event, error) {
	e := cloudevents.New(cloudevents.CloudEventsVersionV1)
	e.SetType(string(t))
	e.SetSource(source)
	e.SetSubject(subject)
	e.SetID(id)
	e.SetTime(time.Now().UTC())
	if err := e.SetData(ContentTypeJSON, data); err != nil {
		return nil, fmt.Errorf("encoding %s data: %w", t, err)
	}
	if err := e.Validate(); err != nil {
		return nil, fmt.Errorf("building %s event: %w", t, err)
	}
	return &e, nil
}

// MsgID is the Nats-Msg-Id of e: its source and id, which CloudEvents
// defines as unique together.
func MsgID(e *Event) string { return e.Source() + "#" + e.ID() }

// Encode maps e onto a NATS message for subject in binary content mode:
// every attribute becomes a lower-case, percent-encoded ce-<attribute>
// header, the data is the body, Nats-Msg-Id is set from source and id, and
// the trace context of ctx is injected as traceparent/tracestate.
func Encode(ctx context.Context, subject string, e *Event) (*nats.Msg, error) {
	if err := e.Validate(); err != nil {
		return nil, fmt.Errorf("encoding event for %s: %w", subject, err)
	}
	h := make(nats.Header, 12)
	set := func(name, v string) {
		if v != "" {
			h[HeaderPrefix+name] = []string{percentEncode(v)}
		}
	}
	set("specversion", e.SpecVersion())
	set("id", e.ID())
	set("source", e.Source())
	set("type", e.Type())
	set("subject", e.Subject())
	if t := e.Time(); !t.IsZero() {
		set("time", t.UTC().Format(time.RFC3339Nano))
	}
	set("dataschema", e.DataSchema())
	set("datacontenttype", e.DataContentType())
	for name, v := range e.Extensions() {
		s, err := extensionString(v)
		if err != nil {
			return nil, fmt.Errorf("encoding extension %q: %w", name, err)
		}
		// An empty extension is not an absent one: keep the header.
		h[HeaderPrefix+name] = []string{percentEncode(s)}
	}
	h[HeaderMsgID] = []string{MsgID(e)}
	otel.GetTextMapPropagator().Inject(ctx, HeaderCarrier(h))
	return &nats.Msg{Subject: subject, Header: h, Data: e.Data()}, nil
}

// Decode reads a CloudEvent from a NATS message, in binary content mode
// (ce-specversion header present) or structured mode (content-type
// application/cloudevents+json, or no ce- headers and a JSON body). It
// returns ctx carrying the remote trace context of the message. Every error
// wraps [ErrMalformed].
func Decode(ctx context.Context, h nats.Header, body []byte) (context.Context, *Event, error) {
	ctx = otel.GetTextMapPropagator().Extract(ctx, HeaderCarrier(h))
	binary := false
	structured := false
	for k, vs := range h {
		lk := strings.ToLower(k)
		if lk == HeaderPrefix+"specversion" {
			binary = true
		}
		if lk == HeaderContentType && len(vs) > 0 && strings.HasPrefix(strings.ToLower(vs[0]), ContentTypeStructured) {
			structured = true
		}
	}
	var (
		e   *Event
		err error
	)
	switch {
	case binary && !structured:
		e, err = decodeBinary(h, body)
	default:
		e, err = decodeStructured(body)
	}
	if err != nil {
		return ctx, nil, err
	}
	return ctx, e, nil
}

func decodeBinary(h nats.Header, body []byte) (*Event, error) {
	e := cloudevents.New(cloudevents.CloudEventsVersionV1)
	var contentType string
	for k, vs := range h {
		lk := strings.ToLower(k)
		if len(vs) == 0 {
			continue
		}
		if lk == HeaderContentType {
			contentType = vs[0]
			continue
		}
		if !strings.HasPrefix(lk, HeaderPrefix) {
			continue
		}
		name := lk[len(HeaderPrefix):]
		v, err := percentDecode(vs[0])
		if err != nil {
			return nil, fmt.Errorf("%w: header %s: %v", ErrMalformed, k, err)
		}
		switch name {
		case "specversion":
			if v != cloudevents.CloudEventsVersionV1 {
				return nil, fmt.Errorf("%w: unsupported specversion %q", ErrMalformed, v)
			}
		case "id":
			e.SetID(v)
		case "source":
			e.SetSource(v)
		case "type":
			e.SetType(v)
		case "subject":
			e.SetSubject(v)
		case "time":
			t, err := time.Parse(time.RFC3339Nano, v)
			if err != nil {
				return nil, fmt.Errorf("%w: ce-time %q: %v", ErrMalformed, v, err)
			}
			e.SetTime(t)
		case "dataschema":
			e.SetDataSchema(v)
		case "datacontenttype":
			e.SetDataContentType(v)
		default:
			if !cloudevents.IsExtensionNameValid(name) {
				return nil, fmt.Errorf("%w: invalid extension attribute name %q", ErrMalformed, name)
			}
			e.SetExtension(name, v)
		}
	}
	if e.DataContentType() == "" && contentType != "" {
		e.SetDataContentType(contentType)
	}
	if len(body) > 0 {
		e.DataEncoded = bytes.Clone(body)
	}
	if err := e.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrMalformed, strings.TrimSpace(err.Error()))
	}
	return &e, nil
}

func decodeStructured(body []byte) (*Event, error) {
	if len(bytes.TrimSpace(body)) == 0 {
		return nil, fmt.Errorf("%w: empty message with no ce- headers", ErrMalformed)
	}
	var e cloudevents.Event
	if err := json.Unmarshal(body, &e); err != nil {
		return nil, fmt.Errorf("%w: structured mode: %v", ErrMalformed, err)
	}
	if err := checkUTF8(&e); err != nil {
		return nil, fmt.Errorf("%w: structured mode: %v", ErrMalformed, err)
	}
	if err := e.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrMalformed, strings.TrimSpace(err.Error()))
	}
	return &e, nil
}

// checkUTF8 rejects attribute and string extension values that are not
// UTF-8, which the SDK's JSON reader lets through and no header can carry.
func checkUTF8(e *Event) error {
	for name, v := range map[string]string{
		"id": e.ID(), "source": e.Source(), "type": e.Type(), "subject": e.Subject(),
		"dataschema": e.DataSchema(), "datacontenttype": e.DataContentType(),
	} {
		if !utf8.ValidString(v) {
			return fmt.Errorf("attribute %s is not UTF-8", name)
		}
	}
	for name, v := range e.Extensions() {
		if s, ok := v.(string); ok && !utf8.ValidString(s) {
			return fmt.Errorf("extension %s is not UTF-8", name)
		}
	}
	return nil
}

// DataAs decodes the JSON data of e into v, strictly: unknown fields are an
// error wrapping [ErrMalformed].
func DataAs(e *Event, v any) error {
	if ct := e.DataMediaType(); ct != "" && ct != ContentTypeJSON {
		return fmt.Errorf("%w: datacontenttype %q, want %s", ErrMalformed, ct, ContentTypeJSON)
	}
	dec := json.NewDecoder(bytes.NewReader(e.Data()))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: %s data: %v", ErrMalformed, e.Type(), err)
	}
	if dec.More() {
		return fmt.Errorf("%w: %s data: trailing content", ErrMalformed, e.Type())
	}
	return nil
}

// extensionString formats an extension value in its canonical CloudEvents
// string form: every type the CloudEvents type system has (string,
// integer, boolean, binary, URI, URI-reference, timestamp).
func extensionString(v any) (string, error) {
	s, err := types.Format(v)
	if err != nil {
		return "", fmt.Errorf("unsupported extension value: %w", err)
	}
	return s, nil
}

// percentEncode applies the CloudEvents HTTP/NATS binding rule: space,
// double-quote, percent and every byte outside printable ASCII
// (U+0021..U+007E) are percent-encoded as UTF-8 octets.
func percentEncode(s string) string {
	n := 0
	for i := 0; i < len(s); i++ {
		if mustEscape(s[i]) {
			n++
		}
	}
	if n == 0 {
		return s
	}
	const hex = "0123456789ABCDEF"
	b := make([]byte, 0, len(s)+2*n)
	for i := 0; i < len(s); i++ {
		c := s[i]
		if mustEscape(c) {
			b = append(b, '%', hex[c>>4], hex[c&15])
		} else {
			b = append(b, c)
		}
	}
	return string(b)
}

func mustEscape(c byte) bool { return c <= 0x20 || c >= 0x7F || c == '"' || c == '%' }

// percentDecode reverses percentEncode and checks the result is UTF-8.
func percentDecode(s string) (string, error) {
	if strings.IndexByte(s, '%') < 0 {
		if !utf8.ValidString(s) {
			return "", fmt.Errorf("value is not UTF-8")
		}
		return s, nil
	}
	b := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		if s[i] != '%' {
			b = append(b, s[i])
			continue
		}
		if i+2 >= len(s) {
			return "", fmt.Errorf("truncated percent escape in %q", s)
		}
		hi, ok1 := unhex(s[i+1])
		lo, ok2 := unhex(s[i+2])
		if !ok1 || !ok2 {
			return "", fmt.Errorf("invalid percent escape in %q", s)
		}
		b = append(b, hi<<4|lo)
		i += 2
	}
	if !utf8.Valid(b) {
		return "", fmt.Errorf("percent-decoded value is not UTF-8")
	}
	return string(b), nil
}

func unhex(c byte) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	case 'A' <= c && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

// HeaderCarrier adapts nats.Header to OpenTelemetry's TextMapCarrier, with
// the lower-case keys the W3C trace context headers use.
type HeaderCarrier nats.Header

// Get returns the first value of key, matched case-insensitively.
func (c HeaderCarrier) Get(key string) string {
	if v, ok := c[key]; ok && len(v) > 0 {
		return v[0]
	}
	for k, v := range c {
		if strings.EqualFold(k, key) && len(v) > 0 {
			return v[0]
		}
	}
	return ""
}

// Set replaces key with value.
func (c HeaderCarrier) Set(key, value string) { c[strings.ToLower(key)] = []string{value} }

// Keys lists the header names.
func (c HeaderCarrier) Keys() []string {
	keys := make([]string, 0, len(c))
	for k := range c {
		keys = append(keys, k)
	}
	return keys
}
