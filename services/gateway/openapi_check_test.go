package gateway_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/pb33f/libopenapi"
	validator "github.com/pb33f/libopenapi-validator"
	"github.com/pb33f/libopenapi-validator/config"
	liberrors "github.com/pb33f/libopenapi-validator/errors"
	"github.com/pb33f/libopenapi-validator/helpers"
	"github.com/pb33f/libopenapi-validator/schema_validation"
	"github.com/pb33f/libopenapi/datamodel/high/base"
	v3 "github.com/pb33f/libopenapi/datamodel/high/v3"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/services/gateway/openapi"
)

// apiDoc is the OpenAPI document, ready to validate against: built once
// for every test of the package (the validator is safe for concurrent
// use).
var apiDoc = sync.OnceValues(loadAPIDoc)

// docCheck validates requests and responses against the document.
type docCheck struct {
	doc     libopenapi.Document
	model   *v3.Document
	v       validator.Validator
	schemas schema_validation.SchemaValidator
	// problem is the Problem schema, for the answers of paths and methods
	// outside the document; event the data of a server-sent event.
	problem, event *base.Schema
}

func loadAPIDoc() (*docCheck, error) {
	doc, err := libopenapi.NewDocument(openapi.JSON())
	if err != nil {
		return nil, fmt.Errorf("parsing the OpenAPI document: %w", err)
	}
	m, err := doc.BuildV3Model()
	if err != nil {
		return nil, fmt.Errorf("building the OpenAPI model: %w", err)
	}
	// Strict server matching (any host matches the document's relative
	// server "/") also keeps /console and /console/ apart, which the
	// validator's path-only matching takes for one path.
	opts := []config.Option{config.WithFormatAssertions(), config.WithStrictServerMatching()}
	v, errs := validator.NewValidator(doc, opts...)
	if len(errs) > 0 {
		return nil, fmt.Errorf("building the validator: %v", errs)
	}
	dc := &docCheck{doc: doc, model: &m.Model, v: v, schemas: schema_validation.NewSchemaValidator(opts...)}
	for name, dst := range map[string]**base.Schema{"Problem": &dc.problem, "CloudEvent": &dc.event} {
		sp := m.Model.Components.Schemas.GetOrZero(name)
		if sp == nil {
			return nil, fmt.Errorf("the OpenAPI document has no schema %s", name)
		}
		*dst = sp.Schema()
	}
	return dc, nil
}

// mustAPIDoc returns the document's validator, failing t when it cannot
// be built.
func mustAPIDoc(t testing.TB) *docCheck {
	t.Helper()
	dc, err := apiDoc()
	if err != nil {
		t.Fatal(err)
	}
	return dc
}

// checkedTransport wraps base so that every request through it and every
// answer are validated against the OpenAPI document, failing t on any
// mismatch:
//
//   - a request the document accepts must get an answer the document
//     lists for its operation (status, content type, body schema,
//     headers);
//   - a request the document refuses (a test sending a bad request on
//     purpose) must be refused by the gateway with a 4xx: the document
//     never promises less than the gateway accepts;
//   - a path outside the document must be answered 404, a method outside
//     it 405 with Allow, both problems;
//   - an event stream is checked as it is read: every event has an id, an
//     event name equal to its data's type, and data that is a CloudEvent
//     as the document describes it.
//
// Benchmarks measure the gateway, not the validator: for a *testing.B,
// base is returned as it is.
func checkedTransport(t testing.TB, base http.RoundTripper) http.RoundTripper {
	if _, bench := t.(*testing.B); bench {
		return base
	}
	if base == nil {
		base = http.DefaultTransport
	}
	return &docTransport{t: t, base: base, doc: mustAPIDoc(t)}
}

type docTransport struct {
	t    testing.TB
	base http.RoundTripper
	doc  *docCheck
}

func (d *docTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	var body []byte
	if req.Body != nil && req.Body != http.NoBody {
		b, err := io.ReadAll(req.Body)
		req.Body.Close()
		if err != nil {
			return nil, fmt.Errorf("reading the request body to validate it: %w", err)
		}
		body = b
	}
	resp, err := d.base.RoundTrip(withBody(req, body))
	if err != nil {
		return resp, err
	}
	what := req.Method + " " + req.URL.RequestURI()
	problems, refused := d.doc.exchange(withBody(req, body), resp)
	if len(problems) > 0 {
		d.t.Errorf("%s answered %d: does not match the OpenAPI document:\n\t%s", what, resp.StatusCode, strings.Join(problems, "\n\t"))
	}
	if len(refused) > 0 {
		d.t.Logf("%s: refused by the gateway (%d) and by the OpenAPI document: %s", what, resp.StatusCode, strings.Join(refused, "; "))
	}
	if resp.StatusCode == http.StatusOK && isEventStream(resp) {
		resp.Body = &sseCheck{rc: resp.Body, doc: d.doc, report: func(msg string) {
			d.t.Errorf("%s: event stream does not match the OpenAPI document: %s", what, msg)
		}}
	}
	return resp, nil
}

// withBody is a copy of req with body as its body.
func withBody(req *http.Request, body []byte) *http.Request {
	r := req.Clone(req.Context())
	if body == nil {
		r.Body = http.NoBody
		return r
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
	r.ContentLength = int64(len(body))
	return r
}

func isEventStream(resp *http.Response) bool {
	return strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream")
}

// exchange validates a request and its answer, and returns what does not
// match. An event stream's body is left unread (the caller checks it as
// it is read); any other body is read and put back.
func (dc *docCheck) exchange(req *http.Request, resp *http.Response) (out, refused []string) {
	vreq := req
	if req.Method == http.MethodHead { // a GET operation answers HEAD too, without a body
		vreq = withBody(req, nil)
		vreq.Method = http.MethodGet
	}
	_, reqErrs := dc.v.ValidateHttpRequestSync(vreq)
	switch {
	case hasError(reqErrs, helpers.PathValidation, helpers.ValidationMissing):
		return dc.outside(resp, http.StatusNotFound), nil
	case hasError(reqErrs, "", helpers.ValidationMissingOperation):
		out = dc.outside(resp, http.StatusMethodNotAllowed)
		if resp.Header.Get("Allow") == "" {
			out = append(out, "a 405 without Allow")
		}
		return out, nil
	case len(reqErrs) > 0 && (resp.StatusCode < 400 || resp.StatusCode >= 500):
		// The document refuses what the gateway served.
		out = append(out, "the request does not match the document, yet the gateway answered "+resp.Status)
		out = append(out, describe(reqErrs)...)
	case len(reqErrs) > 0:
		refused = describe(reqErrs) // a bad request on purpose, refused by both
	}

	vresp := *resp
	if isEventStream(resp) || req.Method == http.MethodHead {
		vresp.Body = http.NoBody // the body is checked as it is read, or there is none
	} else {
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		resp.Body = io.NopCloser(bytes.NewReader(b))
		if err != nil {
			return append(out, "reading the answer: "+err.Error()), refused
		}
		vresp.Body = io.NopCloser(bytes.NewReader(b))
	}
	if req.Method == http.MethodHead {
		return out, refused // the status and headers of a body that is not there: nothing the validator checks apart
	}
	if _, respErrs := dc.v.ValidateHttpResponse(vreq, &vresp); len(respErrs) > 0 {
		out = append(out, describe(respErrs)...)
	}
	return out, refused
}

// outside checks the answer to a path or method the document does not
// have: status want, as a problem.
func (dc *docCheck) outside(resp *http.Response, want int) []string {
	var out []string
	if resp.StatusCode != want {
		out = append(out, fmt.Sprintf("not in the document, yet answered %s (want %d)", resp.Status, want))
	}
	if ct := resp.Header.Get("Content-Type"); ct != api.ContentTypeProblem {
		return append(out, fmt.Sprintf("content type %q, want %s", ct, api.ContentTypeProblem))
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	resp.Body = io.NopCloser(bytes.NewReader(b))
	if err != nil {
		return append(out, "reading the answer: "+err.Error())
	}
	if _, errs := dc.schemas.ValidateSchemaBytes(dc.problem, b); len(errs) > 0 {
		out = append(out, describe(errs)...)
	}
	return out
}

func hasError(errs []*liberrors.ValidationError, typ, subtype string) bool {
	for _, e := range errs {
		if (typ == "" || e.ValidationType == typ) && e.ValidationSubType == subtype {
			return true
		}
	}
	return false
}

// describe renders validation errors, with each schema failure's place.
func describe(errs []*liberrors.ValidationError) []string {
	var out []string
	for _, e := range errs {
		s := e.Message
		if e.Reason != "" && e.Reason != e.Message {
			s += ": " + e.Reason
		}
		for _, f := range e.SchemaValidationErrors {
			s += "; " + f.Error()
		}
		out = append(out, s)
	}
	return out
}

// sseCheck reads an event stream through, checking each event as it
// passes: an id, an event name, and data that is a CloudEvent of that
// type. Problems go to report; the reader sees the stream unchanged.
type sseCheck struct {
	rc     io.ReadCloser
	doc    *docCheck
	report func(string)

	mu      sync.Mutex
	partial []byte // the start of a line not ended yet
	id      string
	name    string
	data    []string
}

func (s *sseCheck) Read(p []byte) (int, error) {
	n, err := s.rc.Read(p)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.partial = append(s.partial, p[:n]...)
	for {
		i := bytes.IndexByte(s.partial, '\n')
		if i < 0 {
			break
		}
		s.line(string(s.partial[:i]))
		s.partial = s.partial[i+1:]
	}
	if err == io.EOF && (len(s.partial) > 0 || s.id != "" || s.name != "" || len(s.data) > 0) {
		s.report("the stream ended within an event")
	}
	return n, err
}

func (s *sseCheck) Close() error { return s.rc.Close() }

// line takes one line of the stream (WHATWG HTML, 9.2.6).
func (s *sseCheck) line(l string) {
	l = strings.TrimSuffix(l, "\r")
	field, value, _ := strings.Cut(l, ":")
	value = strings.TrimPrefix(value, " ")
	switch {
	case l == "":
		if s.id != "" || s.name != "" || len(s.data) > 0 {
			s.event()
		}
	case field == "": // a comment: the keep-alive
	case field == "id":
		s.id = value
	case field == "event":
		s.name = value
	case field == "data":
		s.data = append(s.data, value)
	default:
		s.report(fmt.Sprintf("unexpected line %q", l))
	}
}

// event checks the event just ended.
func (s *sseCheck) event() {
	defer func() { s.id, s.name, s.data = "", "", nil }()
	if s.id == "" || strings.Trim(s.id, "0123456789") != "" {
		s.report(fmt.Sprintf("event id %q: want the lifecycle stream sequence", s.id))
	}
	data := strings.Join(s.data, "\n")
	if _, errs := s.doc.schemas.ValidateSchemaBytes(s.doc.event, []byte(data)); len(errs) > 0 {
		s.report(fmt.Sprintf("event %s: data is not a CloudEvent as the document says: %s", s.id, strings.Join(describe(errs), "; ")))
		return
	}
	var ce struct {
		Type string `json:"type"`
	}
	if err := json.Unmarshal([]byte(data), &ce); err != nil || ce.Type != s.name {
		s.report(fmt.Sprintf("event %s: name %q is not its data's type %q (%v)", s.id, s.name, ce.Type, err))
	}
}
