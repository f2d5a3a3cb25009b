package event_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/cloudevents/sdk-go/v2/binding"
	"github.com/cloudevents/sdk-go/v2/binding/format"
	cloudevents "github.com/cloudevents/sdk-go/v2/event"
	cehttp "github.com/cloudevents/sdk-go/v2/protocol/http"
	"github.com/cloudevents/sdk-go/v2/types"
	"github.com/nats-io/nats.go"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"

	"github.com/sand-boxer/sandboxer/pkg/event"
)

// fixedTime has nanoseconds and a non-UTC zone, so the round trips prove
// both survive (the zone as the same instant).
var fixedTime = time.Date(2025, 3, 14, 15, 9, 26, 535897932, time.FixedZone("X", 3600))

// readyData is a fully populated payload, used where any realistic body
// will do.
func readyData() event.Ready {
	return event.Ready{
		Ref:          event.Ref{SandboxID: "sbx-01", Consumer: "team-a", Profile: "local", Extension: "local", Host: "localhost"},
		Handle:       event.Handle{SandboxID: "sbx-01", Host: "localhost", Data: map[string]string{"dir": "/srv/ws/sbx-01"}},
		Reachability: event.Reachability{SSH: "dev@localhost:2222", RemoteDir: "/srv/ws/sbx-01", Host: "localhost", Ports: map[string]string{"web": "localhost:8080"}},
		TTLSeconds:   3600,
		ReadyAt:      fixedTime.UTC(),
		ExpiresAt:    fixedTime.UTC().Add(time.Hour),
	}
}

// fullEvent returns an event with every context attribute set, and
// string, integer, boolean and URI extensions.
func fullEvent(t testing.TB) *event.Event {
	t.Helper()
	e, err := event.New(event.TypeReady, "sandboxer/provisioner/local", "sbx-01", "sbx-01.ready", readyData())
	if err != nil {
		t.Fatalf("event.New: %v", err)
	}
	e.SetTime(fixedTime)
	e.SetDataSchema("https://sandboxer.dev/schemas/dev.sandboxer.sandbox.ready.v1.json")
	e.SetExtension("partitionkey", "team-a")
	e.SetExtension("attempt", 3)
	e.SetExtension("replay", true)
	e.SetExtension("origin", *mustURL(t, "https://example.com/a?b=c"))
	return e
}

// sameEvent fails t unless got carries exactly want's attributes,
// extensions (compared in their canonical string form, which is what a
// header can carry) and data.
func sameEvent(t testing.TB, want, got *event.Event) {
	t.Helper()
	if got == nil {
		t.Fatal("got no event")
	}
	checks := []struct{ name, want, got string }{
		{"specversion", want.SpecVersion(), got.SpecVersion()},
		{"id", want.ID(), got.ID()},
		{"source", want.Source(), got.Source()},
		{"type", want.Type(), got.Type()},
		{"subject", want.Subject(), got.Subject()},
		{"dataschema", want.DataSchema(), got.DataSchema()},
		{"datacontenttype", want.DataContentType(), got.DataContentType()},
	}
	for _, c := range checks {
		if c.want != c.got {
			t.Errorf("%s = %q, want %q", c.name, c.got, c.want)
		}
	}
	if !want.Time().Equal(got.Time()) {
		t.Errorf("time = %s, want %s", got.Time().Format(time.RFC3339Nano), want.Time().Format(time.RFC3339Nano))
	}
	if w, g := extStrings(t, want), extStrings(t, got); !reflect.DeepEqual(w, g) {
		t.Errorf("extensions = %v, want %v", g, w)
	}
	if !bytes.Equal(want.Data(), got.Data()) {
		t.Errorf("data = %s, want %s", got.Data(), want.Data())
	}
}

func extStrings(t testing.TB, e *event.Event) map[string]string {
	t.Helper()
	out := map[string]string{}
	for k, v := range e.Extensions() {
		s, err := types.Format(v)
		if err != nil {
			t.Fatalf("formatting extension %s: %v", k, err)
		}
		out[k] = s
	}
	return out
}

func mustURL(t testing.TB, s string) *types.URI {
	t.Helper()
	u := types.ParseURI(s)
	if u == nil {
		t.Fatalf("invalid URI %q", s)
	}
	return u
}

func encode(t testing.TB, e *event.Event) *nats.Msg {
	t.Helper()
	msg, err := event.Encode(context.Background(), "sandboxer.evt.local.sbx-01.ready", e)
	if err != nil {
		t.Fatalf("Encode: %v", err)
	}
	return msg
}

func decode(t testing.TB, h nats.Header, body []byte) *event.Event {
	t.Helper()
	_, e, err := event.Decode(context.Background(), h, body)
	if err != nil {
		t.Fatalf("Decode: %v", err)
	}
	return e
}

func TestEncodeBinaryMode(t *testing.T) {
	t.Parallel()
	e := fullEvent(t)
	msg := encode(t, e)

	if msg.Subject != "sandboxer.evt.local.sbx-01.ready" {
		t.Errorf("subject = %q", msg.Subject)
	}
	want := map[string]string{
		"ce-specversion":     "1.0",
		"ce-id":              "sbx-01.ready",
		"ce-source":          "sandboxer/provisioner/local",
		"ce-type":            "dev.sandboxer.sandbox.ready.v1",
		"ce-subject":         "sbx-01",
		"ce-time":            "2025-03-14T14:09:26.535897932Z",
		"ce-dataschema":      "https://sandboxer.dev/schemas/dev.sandboxer.sandbox.ready.v1.json",
		"ce-datacontenttype": "application/json",
		"ce-partitionkey":    "team-a",
		"ce-attempt":         "3",
		"ce-replay":          "true",
		"ce-origin":          "https://example.com/a?b=c",
		"Nats-Msg-Id":        "sandboxer/provisioner/local#sbx-01.ready",
	}
	got := map[string]string{}
	for k, vs := range msg.Header {
		if len(vs) != 1 {
			t.Errorf("header %s has %d values, want 1", k, len(vs))
		}
		got[k] = vs[0]
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("headers:\n got %v\nwant %v", got, want)
	}
	if !bytes.Equal(msg.Data, e.Data()) {
		t.Errorf("body = %s, want the event data %s", msg.Data, e.Data())
	}
	var d event.Ready
	if err := json.Unmarshal(msg.Data, &d); err != nil || !reflect.DeepEqual(d, readyData()) {
		t.Errorf("body decodes to %+v (%v), want %+v", d, err, readyData())
	}
}

func TestEncodeRejectsInvalidEvent(t *testing.T) {
	t.Parallel()
	e := cloudevents.New()
	e.SetSource("s")
	e.SetType("t") // no id
	if _, err := event.Encode(context.Background(), "x", &e); err == nil {
		t.Fatal("Encode of an event without id succeeded")
	}
}

func TestBinaryRoundTrip(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name   string
		mutate func(e *event.Event)
	}{
		{"every attribute and typed extensions", func(e *event.Event) {}},
		{"no optional attributes", func(e *event.Event) {
			e.SetSubject("")
			e.SetDataSchema("")
			e.SetTime(time.Time{})
			for k := range e.Extensions() {
				e.SetExtension(k, nil)
			}
		}},
		{"space quote and percent", func(e *event.Event) {
			e.SetSubject(`say "hello world" 100%`)
			e.SetID(`id with "quotes" and 50% off`)
			e.SetExtension("note", ` lead and trail `)
		}},
		{"non-ASCII", func(e *event.Event) {
			e.SetSubject("café ☕ 日本語 🚀")
			e.SetSource("urn:sandboxer:größe")
			e.SetExtension("who", "Zoë")
		}},
		{"control characters", func(e *event.Event) {
			e.SetSubject("tab\there\r\nnew line\x00nul\x7fdel")
		}},
		{"percent escapes in the value are data, not escapes", func(e *event.Event) {
			e.SetSubject("%41%zz%")
			e.SetExtension("enc", "%2520")
		}},
		{"reserved URL characters pass unencoded", func(e *event.Event) {
			e.SetSubject("!#$&'()*+,/:;=?@[]~^`{|}<>\\")
		}},
		{"empty data", func(e *event.Event) { e.DataEncoded = nil }},
		{"non-JSON data", func(e *event.Event) {
			_ = e.SetData("text/plain; charset=utf-8", []byte("plain text \x00 with nul"))
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			e := fullEvent(t)
			c.mutate(e)
			if err := e.Validate(); err != nil {
				t.Fatalf("test event invalid: %v", err)
			}
			msg := encode(t, e)
			for k, vs := range msg.Header {
				if strings.HasPrefix(k, event.HeaderPrefix) {
					checkHeaderSafe(t, k, vs[0])
				}
			}
			sameEvent(t, e, decode(t, msg.Header, msg.Data))
		})
	}
}

// checkHeaderSafe asserts v is what the binding allows on the wire:
// printable ASCII without space or '"', and '%' only as the start of a
// two-digit upper-case hex escape.
func checkHeaderSafe(t *testing.T, k, v string) {
	t.Helper()
	for i := 0; i < len(v); i++ {
		c := v[i]
		switch {
		case c <= 0x20 || c >= 0x7f || c == '"':
			t.Errorf("header %s = %q: unencoded byte %#x at %d", k, v, c, i)
		case c == '%':
			if i+2 >= len(v) || !strings.ContainsRune("0123456789ABCDEF", rune(v[i+1])) || !strings.ContainsRune("0123456789ABCDEF", rune(v[i+2])) {
				t.Errorf("header %s = %q: bad escape at %d", k, v, i)
			}
		}
	}
}

func TestPercentEncoding(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, value, wire string
	}{
		{"plain", "sbx-01", "sbx-01"},
		{"space", "a b", "a%20b"},
		{"double quote", `say "hi"`, "say%20%22hi%22"},
		{"percent", "100%", "100%25"},
		{"percent that looks like an escape", "%41", "%2541"},
		{"two-byte UTF-8", "é", "%C3%A9"},
		{"three-byte UTF-8", "日", "%E6%97%A5"},
		{"four-byte UTF-8", "🚀", "%F0%9F%9A%80"},
		{"tab and DEL", "a\tb\x7f", "a%09b%7F"},
		{"printable punctuation", "~!#$&'()*+,/:;=?@[]", "~!#$&'()*+,/:;=?@[]"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			e := fullEvent(t)
			e.SetSubject(c.value)
			msg := encode(t, e)
			if got := msg.Header.Get("ce-subject"); got != c.wire {
				t.Errorf("ce-subject = %q, want %q", got, c.wire)
			}
			if got := decode(t, msg.Header, msg.Data).Subject(); got != c.value {
				t.Errorf("decoded subject = %q, want %q", got, c.value)
			}
		})
	}
}

func TestPercentDecodingAcceptsLowerCaseHex(t *testing.T) {
	t.Parallel()
	msg := encode(t, fullEvent(t))
	msg.Header["ce-subject"] = []string{"caf%c3%a9%20%e2%98%95"}
	if got := decode(t, msg.Header, msg.Data).Subject(); got != "café ☕" {
		t.Errorf("subject = %q, want %q", got, "café ☕")
	}
}

func TestMsgID(t *testing.T) {
	t.Parallel()
	a := fullEvent(t)
	b := fullEvent(t)
	b.SetTime(fixedTime.Add(time.Hour)) // a second publisher of the same fact
	if event.MsgID(a) != "sandboxer/provisioner/local#sbx-01.ready" {
		t.Errorf("MsgID = %q", event.MsgID(a))
	}
	if event.MsgID(a) != event.MsgID(b) {
		t.Errorf("same source and id give different ids: %q, %q", event.MsgID(a), event.MsgID(b))
	}
	if got := encode(t, b).Header.Get(event.HeaderMsgID); got != event.MsgID(a) {
		t.Errorf("%s = %q, want %q", event.HeaderMsgID, got, event.MsgID(a))
	}
	c := fullEvent(t)
	c.SetID("sbx-01.destroyed")
	if event.MsgID(c) == event.MsgID(a) {
		t.Errorf("different ids share Nats-Msg-Id %q", event.MsgID(c))
	}
}

func TestDecodeStructuredMode(t *testing.T) {
	t.Parallel()
	e := fullEvent(t)
	structured, err := format.JSON.Marshal(e)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name   string
		header nats.Header
	}{
		{"content-type", nats.Header{"content-type": {event.ContentTypeStructured}}},
		{"content-type with charset", nats.Header{"Content-Type": {"application/cloudevents+json; charset=UTF-8"}}},
		{"no header at all", nil},
		{"only unrelated headers", nats.Header{"Nats-Msg-Id": {"x"}, "traceparent": {"junk"}}},
		{"structured content-type wins over ce- headers", nats.Header{
			"content-type":   {event.ContentTypeStructured},
			"ce-specversion": {"1.0"}, "ce-id": {"other"}, "ce-source": {"other"}, "ce-type": {"other"},
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			sameEvent(t, e, decode(t, c.header, structured))
		})
	}
}

func TestDecodeStructuredBase64Data(t *testing.T) {
	t.Parallel()
	body := `{"specversion":"1.0","id":"b64","source":"test","type":"t.v1","datacontenttype":"application/octet-stream","data_base64":"AAEC/w=="}`
	e := decode(t, nil, []byte(body))
	if !bytes.Equal(e.Data(), []byte{0, 1, 2, 255}) {
		t.Errorf("data = %v, want [0 1 2 255]", e.Data())
	}
}

func TestDecodeBinaryContentTypeFallback(t *testing.T) {
	t.Parallel()
	h := nats.Header{
		"ce-specversion": {"1.0"}, "ce-id": {"1"}, "ce-source": {"s"}, "ce-type": {"t.v1"},
		"Content-Type": {"application/json"},
	}
	e := decode(t, h, []byte(`{"a":1}`))
	if e.DataContentType() != "application/json" {
		t.Errorf("datacontenttype = %q, want the content-type header", e.DataContentType())
	}
	h["ce-datacontenttype"] = []string{"text/plain"}
	if e := decode(t, h, []byte("x")); e.DataContentType() != "text/plain" {
		t.Errorf("datacontenttype = %q, want ce-datacontenttype to win", e.DataContentType())
	}
}

func TestDecodeHeaderNamesAreCaseInsensitive(t *testing.T) {
	t.Parallel()
	h := nats.Header{
		"Ce-Specversion": {"1.0"}, "CE-ID": {"1"}, "ce-Source": {"s"}, "Ce-Type": {"t.v1"}, "Ce-Myext": {"v"},
	}
	e := decode(t, h, nil)
	if e.ID() != "1" || e.Source() != "s" || e.Type() != "t.v1" {
		t.Errorf("decoded %s", e)
	}
	if v, _ := e.Extensions()["myext"].(string); v != "v" {
		t.Errorf("extension myext = %v, want v", e.Extensions()["myext"])
	}
}

func TestDecodeMalformed(t *testing.T) {
	t.Parallel()
	bin := func(kv ...string) nats.Header {
		h := nats.Header{"ce-specversion": {"1.0"}, "ce-id": {"1"}, "ce-source": {"s"}, "ce-type": {"t.v1"}}
		for i := 0; i+1 < len(kv); i += 2 {
			if kv[i+1] == "<delete>" {
				delete(h, kv[i])
				continue
			}
			h[kv[i]] = []string{kv[i+1]}
		}
		return h
	}
	structuredCT := nats.Header{"content-type": {event.ContentTypeStructured}}
	cases := []struct {
		name   string
		header nats.Header
		body   string
	}{
		{"empty message", nil, ""},
		{"whitespace body without headers", nil, " \n\t "},
		{"header-less non-JSON", nil, "hello"},
		{"header-less JSON array", nil, `[1,2]`},
		{"header-less JSON without required attributes", nil, `{"a":1}`},
		{"structured missing id", structuredCT, `{"specversion":"1.0","source":"s","type":"t"}`},
		{"structured missing source", structuredCT, `{"specversion":"1.0","id":"1","type":"t"}`},
		{"structured unknown specversion", structuredCT, `{"specversion":"2.0","id":"1","source":"s","type":"t"}`},
		{"structured truncated JSON", structuredCT, `{"specversion":"1.0","id":"1"`},
		{"structured content-type with binary body", structuredCT, "\x00\x01"},
		{"structured bad time", structuredCT, `{"specversion":"1.0","id":"1","source":"s","type":"t","time":"yesterday"}`},
		{"binary unsupported specversion", bin("ce-specversion", "0.3"), ""},
		{"binary missing id", bin("ce-id", "<delete>"), ""},
		{"binary empty id", bin("ce-id", ""), ""},
		{"binary missing source", bin("ce-source", "<delete>"), ""},
		{"binary missing type", bin("ce-type", "<delete>"), ""},
		{"binary invalid percent escape", bin("ce-subject", "a%zzb"), ""},
		{"binary truncated percent escape", bin("ce-subject", "abc%4"), ""},
		{"binary lone percent", bin("ce-subject", "%"), ""},
		{"binary percent-decoded non-UTF-8", bin("ce-subject", "%FF%FE"), ""},
		{"binary bad time", bin("ce-time", "2025-13-40T99:00:00Z"), ""},
		{"binary time without zone", bin("ce-time", "2025-01-01T00:00:00"), ""},
		{"binary invalid extension name", bin("ce-bad-name", "x"), ""},
		{"binary empty extension name", bin("ce-", "x"), ""},
		{"binary bad dataschema", bin("ce-dataschema", "%3A%2F%2F"), ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			_, e, err := event.Decode(context.Background(), c.header, []byte(c.body))
			if !errors.Is(err, event.ErrMalformed) {
				t.Fatalf("Decode error = %v, want one wrapping ErrMalformed", err)
			}
			if e != nil {
				t.Errorf("Decode returned an event with its error: %s", e)
			}
		})
	}
}

func TestDataAs(t *testing.T) {
	t.Parallel()
	mk := func(ct string, body string) *event.Event {
		e := cloudevents.New()
		e.SetID("1")
		e.SetSource("s")
		e.SetType(string(event.TypeDestroying))
		e.SetDataContentType(ct)
		e.DataEncoded = []byte(body)
		return &e
	}
	cases := []struct {
		name    string
		e       *event.Event
		want    event.Destroying
		wantErr bool
	}{
		{"valid", mk("application/json", `{"sandbox_id":"s1","consumer":"c","profile":"p","extension":"x","reason":"requested"}`),
			event.Destroying{Ref: event.Ref{SandboxID: "s1", Consumer: "c", Profile: "p", Extension: "x"}, Reason: "requested"}, false},
		{"json with parameters", mk("application/json; charset=utf-8", `{"sandbox_id":"s1","consumer":"c","profile":"p","extension":"x","reason":"r"}`),
			event.Destroying{Ref: event.Ref{SandboxID: "s1", Consumer: "c", Profile: "p", Extension: "x"}, Reason: "r"}, false},
		{"no content type means JSON", mk("", `{"reason":"r"}`), event.Destroying{Reason: "r"}, false},
		{"unknown field", mk("application/json", `{"reason":"r","surprise":1}`), event.Destroying{}, true},
		{"trailing content", mk("application/json", `{"reason":"r"} {"reason":"s"}`), event.Destroying{}, true},
		{"wrong type", mk("application/json", `{"reason":7}`), event.Destroying{}, true},
		{"not JSON", mk("application/json", `reason=r`), event.Destroying{}, true},
		{"empty", mk("application/json", ``), event.Destroying{}, true},
		{"other media type", mk("text/plain", `{"reason":"r"}`), event.Destroying{}, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			var got event.Destroying
			err := event.DataAs(c.e, &got)
			if c.wantErr {
				if !errors.Is(err, event.ErrMalformed) {
					t.Fatalf("DataAs error = %v, want ErrMalformed", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("DataAs: %v", err)
			}
			if !reflect.DeepEqual(got, c.want) {
				t.Errorf("DataAs = %+v, want %+v", got, c.want)
			}
		})
	}
}

func TestNew(t *testing.T) {
	t.Parallel()
	before := time.Now().UTC()
	e, err := event.New(event.TypeCreate, "gateway", "sbx-1", "sbx-1.create", event.Create{Ref: event.Ref{SandboxID: "sbx-1"}})
	if err != nil {
		t.Fatal(err)
	}
	if e.SpecVersion() != "1.0" || e.DataContentType() != event.ContentTypeJSON || e.Time().Before(before) || e.Time().Location() != time.UTC {
		t.Errorf("New gave %s", e)
	}
	var c event.Create
	if err := event.DataAs(e, &c); err != nil || c.SandboxID != "sbx-1" {
		t.Errorf("data = %+v (%v)", c, err)
	}

	cases := []struct {
		name             string
		source, id       string
		data             any
		wantErrSubstring string
	}{
		{"unencodable data", "gateway", "1", make(chan int), "encoding"},
		{"empty id", "gateway", "", event.Create{}, "id"},
		{"empty source", "", "1", event.Create{}, "source"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			_, err := event.New(event.TypeCreate, c.source, "", c.id, c.data)
			if err == nil || !strings.Contains(err.Error(), c.wantErrSubstring) {
				t.Fatalf("New error = %v, want one mentioning %q", err, c.wantErrSubstring)
			}
		})
	}
}

// TestTracePropagation proves the trace context of the publisher's span
// reaches the handler: Encode injects W3C traceparent/tracestate from a
// real SDK span, and Decode returns a context whose remote span context is
// that span's.
func TestTracePropagation(t *testing.T) {
	t.Parallel()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.AlwaysSample()))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })

	state, err := trace.ParseTraceState("vendor=abc,other=1")
	if err != nil {
		t.Fatal(err)
	}
	parent := trace.NewSpanContext(trace.SpanContextConfig{
		TraceID:    trace.TraceID{0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36},
		SpanID:     trace.SpanID{0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7},
		TraceFlags: trace.FlagsSampled,
		TraceState: state,
		Remote:     true,
	})
	ctx, span := tp.Tracer("test").Start(trace.ContextWithRemoteSpanContext(context.Background(), parent), "publish")
	defer span.End()
	sc := span.SpanContext()
	if !sc.IsValid() || sc.TraceID() != parent.TraceID() {
		t.Fatalf("SDK span context %v is not a child of %v", sc, parent)
	}

	msg, err := event.Encode(ctx, "sandboxer.evt.local.sbx-01.ready", fullEvent(t))
	if err != nil {
		t.Fatal(err)
	}
	wantTP := fmt.Sprintf("00-%s-%s-01", sc.TraceID(), sc.SpanID())
	if got := msg.Header.Get("traceparent"); got != wantTP {
		t.Errorf("traceparent = %q, want %q", got, wantTP)
	}
	if got := msg.Header.Get("tracestate"); got != "vendor=abc,other=1" {
		t.Errorf("tracestate = %q", got)
	}
	for k := range msg.Header {
		if strings.HasPrefix(k, "ce-trace") {
			t.Errorf("trace context leaked into a CloudEvents attribute header %s", k)
		}
	}

	dctx, e, err := event.Decode(context.Background(), msg.Header, msg.Data)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := e.Extensions()["traceparent"]; ok {
		t.Error("traceparent became a CloudEvents extension")
	}
	got := trace.SpanContextFromContext(dctx)
	if !got.IsRemote() || got.TraceID() != sc.TraceID() || got.SpanID() != sc.SpanID() || !got.IsSampled() || got.TraceState().String() != "vendor=abc,other=1" {
		t.Errorf("decoded span context %+v, want remote %s/%s sampled with the trace state", got, sc.TraceID(), sc.SpanID())
	}

	// A handler's span continues the publisher's trace.
	_, child := tp.Tracer("test").Start(dctx, "process")
	defer child.End()
	if child.SpanContext().TraceID() != sc.TraceID() {
		t.Errorf("handler span trace %s, want %s", child.SpanContext().TraceID(), sc.TraceID())
	}

	// Without a span, nothing is injected and Decode yields no span context.
	plain := encode(t, fullEvent(t))
	if plain.Header.Get("traceparent") != "" {
		t.Errorf("traceparent %q injected without a span", plain.Header.Get("traceparent"))
	}
	if dctx, _, _ := event.Decode(context.Background(), plain.Header, plain.Data); trace.SpanContextFromContext(dctx).IsValid() {
		t.Error("Decode of a message without traceparent produced a span context")
	}
}

// TestCloudEventsSDKReadsEncode reads what Encode writes with the
// CloudEvents SDK's own binary-mode reader (its HTTP binding, which shares
// the ce- header mapping except that datacontenttype travels as
// Content-Type), as an independent check of the mapping.
func TestCloudEventsSDKReadsEncode(t *testing.T) {
	t.Parallel()
	e := fullEvent(t) // ASCII-safe values: the HTTP binding does not percent-decode
	msg := encode(t, e)
	hh := http.Header{}
	for k, vs := range msg.Header {
		switch {
		case k == "ce-datacontenttype":
			hh.Set("Content-Type", vs[0])
		case strings.HasPrefix(k, event.HeaderPrefix):
			hh.Set(k, vs[0])
		}
	}
	got, err := binding.ToEvent(context.Background(), cehttp.NewMessage(hh, io.NopCloser(bytes.NewReader(msg.Data))))
	if err != nil {
		t.Fatalf("SDK could not read the message: %v", err)
	}
	sameEvent(t, e, got)
}

// TestDecodeReadsCloudEventsSDK decodes what the SDK writes, in binary mode
// (its canonical Ce-Id header names, Content-Type for the media type) and
// in structured mode.
func TestDecodeReadsCloudEventsSDK(t *testing.T) {
	t.Parallel()
	e := fullEvent(t)
	req, err := http.NewRequest(http.MethodPost, "http://localhost/", nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := cehttp.WriteRequest(context.Background(), binding.ToMessage(e), req); err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(req.Body)
	if err != nil {
		t.Fatal(err)
	}
	h := nats.Header{}
	for k, vs := range req.Header {
		h[k] = vs
	}
	sameEvent(t, e, decode(t, h, body))

	sreq, err := http.NewRequest(http.MethodPost, "http://localhost/", nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := cehttp.WriteRequest(binding.WithForceStructured(context.Background()), binding.ToMessage(e), sreq); err != nil {
		t.Fatal(err)
	}
	sbody, err := io.ReadAll(sreq.Body)
	if err != nil {
		t.Fatal(err)
	}
	sameEvent(t, e, decode(t, nats.Header{"Content-Type": sreq.Header.Values("Content-Type")}, sbody))
}

func BenchmarkEncode(b *testing.B) {
	e := fullEvent(b)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := event.Encode(ctx, "sandboxer.evt.local.sbx-01.ready", e); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDecode(b *testing.B) {
	msg := encode(b, fullEvent(b))
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, _, err := event.Decode(ctx, msg.Header, msg.Data); err != nil {
			b.Fatal(err)
		}
	}
}
