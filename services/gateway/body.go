package gateway

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"mime"
	"net"
	"net/http"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// createBody mirrors api.CreateRequest with raw input and label values,
// so a value of the wrong JSON type is reported under its own key.
type createBody struct {
	Profile string                     `json:"profile"`
	Inputs  map[string]json.RawMessage `json:"inputs"`
	Labels  map[string]json.RawMessage `json:"labels"`
	TTL     string                     `json:"ttl"`
}

// decodeCreate reads the body strictly: one JSON object of at most
// MaxBodyBytes with no unknown fields, whose inputs and labels are
// strings.
func (g *Gateway) decodeCreate(w http.ResponseWriter, r *http.Request) (api.CreateRequest, *api.Problem) {
	var req api.CreateRequest
	var body createBody
	if p := g.decodeBody(w, r, MaxBodyBytes, &body); p != nil {
		return req, p
	}
	req.Profile, req.TTL = body.Profile, body.TTL
	var errs []extension.FieldError
	req.Inputs, errs = stringMap("inputs", body.Inputs, errs)
	req.Labels, errs = stringMap("labels", body.Labels, errs)
	if len(errs) > 0 {
		return req, newProblem(http.StatusBadRequest, "malformed request body", errs...)
	}
	return req, nil
}

// decodeBody decodes a request body of at most limit bytes into v,
// strictly: the content type application/json (or none), no unknown
// fields, exactly one JSON value, read within BodyReadTimeout.
// application/problem+json and other +json types are refused: the body
// of a request is the API's JSON, nothing else.
func (g *Gateway) decodeBody(w http.ResponseWriter, r *http.Request, limit int64, v any) *api.Problem {
	if ct := r.Header.Get("Content-Type"); ct != "" {
		mt, _, err := mime.ParseMediaType(ct)
		if err != nil || mt != "application/json" {
			return newProblem(http.StatusUnsupportedMediaType, fmt.Sprintf("content type %s: want application/json", strconv.Quote(clip(ct))))
		}
	}
	// The body has a deadline of its own, whatever the server's
	// ReadTimeout: a client that sends it slowly holds a connection for
	// at most that long. It is lifted once the body is read in full, so
	// what the handler does next is not cut by it; after a bad body, the
	// connection is closed instead (what is left of the body is not read:
	// the server would wait for it).
	rc := http.NewResponseController(w)
	deadline := rc.SetReadDeadline(time.Now().Add(g.opts.BodyReadTimeout)) == nil
	p := decodeJSON(w, r, limit, v)
	if p != nil {
		w.Header().Set("Connection", "close")
		return p
	}
	if deadline {
		_ = rc.SetReadDeadline(time.Time{})
	}
	return nil
}

// decodeJSON decodes r's body, exactly one JSON value of at most limit
// bytes without unknown fields, into v.
func decodeJSON(w http.ResponseWriter, r *http.Request, limit int64, v any) *api.Problem {
	known := jsonFields(v)
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, limit))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return bodyProblem(err, known...)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		if err != nil {
			if p := bodyProblem(err, known...); p.Status == http.StatusRequestEntityTooLarge || p.Status == http.StatusRequestTimeout {
				return p
			}
		}
		return newProblem(http.StatusBadRequest, "malformed request body",
			extension.FieldError{Field: "body", Detail: "want exactly one JSON object; found more after it"})
	}
	return nil
}

// jsonFields are the JSON names of the fields of the struct v points to,
// in declaration order.
func jsonFields(v any) []string {
	t := reflect.TypeOf(v)
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == nil || t.Kind() != reflect.Struct {
		return nil
	}
	var out []string
	for i := range t.NumField() {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		switch {
		case name == "-" || !f.IsExported():
		case name == "":
			out = append(out, f.Name)
		default:
			out = append(out, name)
		}
	}
	return out
}

// stringMap converts raw JSON values that must be strings, adding an error
// per value that is not.
func stringMap(field string, raw map[string]json.RawMessage, errs []extension.FieldError) (map[string]string, []extension.FieldError) {
	if raw == nil {
		return nil, errs
	}
	out := make(map[string]string, len(raw))
	for _, k := range slices.Sorted(maps.Keys(raw)) {
		var s string
		if string(raw[k]) == "null" || json.Unmarshal(raw[k], &s) != nil {
			errs = append(errs, extension.FieldError{Field: field + "." + extension.SafeField(k), Detail: "want a JSON string, got " + jsonKindOf(raw[k])})
			continue
		}
		out[k] = s
	}
	return out, errs
}

// jsonKindOf names the kind of a JSON value by its first byte.
func jsonKindOf(v json.RawMessage) string {
	if len(v) == 0 {
		return "nothing"
	}
	switch v[0] {
	case '{':
		return "object"
	case '[':
		return "array"
	case 't', 'f':
		return "boolean"
	case 'n':
		return "null"
	case '"':
		return "string"
	}
	return "number"
}

// bodyProblem describes a JSON decoding error, naming the field where it
// can; an unknown field's problem lists known, the fields of the body
// being decoded (those of a create request when none are given: the bus
// intake's).
func bodyProblem(err error, known ...string) *api.Problem {
	var (
		tooLarge *http.MaxBytesError
		syntax   *json.SyntaxError
		typ      *json.UnmarshalTypeError
		netErr   net.Error
	)
	bad := func(field, detail string) *api.Problem {
		return newProblem(http.StatusBadRequest, "malformed request body", extension.FieldError{Field: field, Detail: detail})
	}
	if len(known) == 0 {
		known = jsonFields(&createBody{})
	}
	switch {
	case errors.As(err, &tooLarge):
		return newProblem(http.StatusRequestEntityTooLarge, "request body too large",
			extension.FieldError{Field: "body", Detail: fmt.Sprintf("larger than %d bytes", tooLarge.Limit)})
	case errors.As(err, &netErr) && netErr.Timeout():
		return newProblem(http.StatusRequestTimeout, "request body not received in time")
	case errors.Is(err, io.EOF):
		return bad("body", "empty: want a JSON object")
	case errors.Is(err, io.ErrUnexpectedEOF):
		return bad("body", "truncated JSON")
	case errors.As(err, &syntax):
		return bad("body", fmt.Sprintf("malformed JSON at byte %d: %v", syntax.Offset, syntax))
	case errors.As(err, &typ):
		field := typ.Field
		if field == "" {
			field = "body"
		}
		return bad(field, fmt.Sprintf("want a JSON %s, got %s", jsonKind(typ.Type.Kind().String()), typ.Value))
	}
	if name, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
		if s, uerr := strconv.Unquote(name); uerr == nil {
			name = s
		}
		return bad(extension.SafeField(name), "unknown field (known: "+strings.Join(known, ", ")+")")
	}
	return bad("body", err.Error())
}

func jsonKind(goKind string) string {
	switch goKind {
	case "map", "struct":
		return "object"
	case "slice", "array":
		return "array"
	}
	return goKind
}

// idempotencyKey reads the optional Idempotency-Key header: at most
// MaxIdempotencyKey printable ASCII characters.
func idempotencyKey(h http.Header) (string, *api.Problem) {
	vs := h.Values(api.HeaderIdempotencyKey)
	if len(vs) == 0 {
		return "", nil
	}
	bad := func(detail string) (string, *api.Problem) {
		return "", newProblem(http.StatusBadRequest, "invalid Idempotency-Key header",
			extension.FieldError{Field: "header." + api.HeaderIdempotencyKey, Detail: detail})
	}
	if len(vs) > 1 {
		return bad("give it once")
	}
	k := vs[0]
	if k == "" || len(k) > MaxIdempotencyKey {
		return bad(fmt.Sprintf("want 1 to %d characters", MaxIdempotencyKey))
	}
	for i := 0; i < len(k); i++ {
		if k[i] < 0x20 || k[i] > 0x7e {
			return bad("want printable ASCII characters")
		}
	}
	return k, nil
}
