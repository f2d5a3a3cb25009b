package gateway_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/pb33f/libopenapi/datamodel/high/base"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/services/gateway"
	"github.com/sand-boxer/sandboxer/services/gateway/openapi"
)

// TestOpenAPIDocument: the document is a valid OpenAPI 3.1 document, as
// the validator's own check of it (against the OpenAPI 3.1 schema) says,
// and every $ref in it resolves.
func TestOpenAPIDocument(t *testing.T) {
	t.Parallel()
	dc := mustAPIDoc(t)
	if v := dc.doc.GetVersion(); !strings.HasPrefix(v, "3.1.") {
		t.Fatalf("OpenAPI version %q, want 3.1.x", v)
	}
	if ok, errs := dc.v.ValidateDocument(); !ok || len(errs) > 0 {
		t.Fatalf("the document is not valid OpenAPI 3.1:\n\t%s", strings.Join(describe(errs), "\n\t"))
	}
	if errs := dc.doc.GetRolodex().GetCaughtErrors(); len(errs) > 0 {
		t.Fatalf("the document has unresolved references: %v", errs)
	}
	// The document in the repository is the one embedded and served.
	file, err := os.ReadFile("openapi/openapi.json")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(file, openapi.JSON()) {
		t.Fatal("openapi.JSON differs from openapi/openapi.json")
	}
}

// TestOpenAPIServed: GET /v1/openapi.json needs no key and answers the
// repository's document byte for byte, cacheable, with an ETag that a
// conditional request is answered 304 for.
func TestOpenAPIServed(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	want, err := os.ReadFile("openapi/openapi.json")
	if err != nil {
		t.Fatal(err)
	}
	r := e.do(t, http.MethodGet, openapi.Path, "", "", nil)
	if r.Status != http.StatusOK || r.Header.Get("Content-Type") != "application/json" || !bytes.Equal(r.Body, want) {
		t.Fatalf("GET %s: %d %q, %d bytes, want 200 application/json, the %d bytes of openapi/openapi.json",
			openapi.Path, r.Status, r.Header.Get("Content-Type"), len(r.Body), len(want))
	}
	tag := r.Header.Get("ETag")
	if tag == "" || !strings.Contains(r.Header.Get("Cache-Control"), "max-age=") {
		t.Fatalf("GET %s: ETag %q, Cache-Control %q: want it cacheable", openapi.Path, tag, r.Header.Get("Cache-Control"))
	}
	r = e.do(t, http.MethodGet, openapi.Path, "alice", "", map[string]string{"If-None-Match": tag})
	if r.Status != http.StatusNotModified || len(r.Body) != 0 {
		t.Fatalf("conditional GET %s: %d with %d bytes, want 304 without a body", openapi.Path, r.Status, len(r.Body))
	}
	if r := e.do(t, http.MethodPost, openapi.Path, "", "{}", nil); r.Status != http.StatusMethodNotAllowed {
		t.Fatalf("POST %s: %d, want 405", openapi.Path, r.Status)
	}

	// The other routes without a key, as the document describes them
	// (the client follows the console's redirect).
	for path, want := range map[string]int{
		"/healthz": http.StatusOK, "/readyz": http.StatusOK, "/console": http.StatusOK, "/console/console.js": http.StatusOK,
		"/console/console.css": http.StatusOK, "/console/favicon.svg": http.StatusOK, "/console/nope.js": http.StatusNotFound,
		"/v1/nope": http.StatusNotFound,
		"/metrics": http.StatusNotFound, // this env has no registry: a problem
	} {
		resp, err := e.hs.Client().Get(e.hs.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("GET %s: %d, want %d", path, resp.StatusCode, want)
		}
	}
}

// TestOpenAPIRoutes: every pattern registered on the gateway's mux has its
// operation in the document, and every operation of the document reaches
// the handler of its own pattern. A method-less pattern of a path that also
// has methods is that path's 405 answer, and "/" the 404 of everything
// else: neither is an operation.
func TestOpenAPIRoutes(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	dc := mustAPIDoc(t)
	mux, patterns := gateway.Routes(e.gw)

	ops := map[string]bool{} // "GET /v1/sandboxes/{id}"
	docPaths := map[string]bool{}
	for path, item := range dc.model.Paths.PathItems.FromOldest() {
		docPaths[path] = true
		for method := range item.GetOperations().FromOldest() {
			ops[strings.ToUpper(method)+" "+path] = true
		}
	}
	hasMethods := map[string]bool{}
	for _, p := range patterns {
		if _, path, ok := strings.Cut(p, " "); ok {
			hasMethods[path] = true
		}
	}
	for _, p := range patterns {
		_, _, withMethod := strings.Cut(p, " ")
		switch {
		case p == "/":
		case withMethod:
			if !ops[p] {
				t.Errorf("route %q has no operation in the document", p)
			}
		case hasMethods[p]:
			if !docPaths[p] {
				t.Errorf("path %q of the routes is not in the document", p)
			}
		default: // a method-less handler of its own, such as the console's: GET and HEAD
			if !ops["GET "+p] {
				t.Errorf("route %q (any method) has no GET operation in the document", p)
			}
		}
	}

	param := regexp.MustCompile(`\{[^}]+\}`)
	for op := range ops {
		method, path, _ := strings.Cut(op, " ")
		req := httptest.NewRequest(method, param.ReplaceAllString(path, "x1"), nil)
		_, pattern := mux.Handler(req)
		switch {
		case pattern == op:
		case pattern == "/" || hasMethods[pattern]:
			t.Errorf("operation %s reaches no handler of its own (pattern %q)", op, pattern)
		case !slices.Contains(patterns, pattern):
			t.Errorf("operation %s reaches pattern %q, which is not registered", op, pattern)
		case method != http.MethodGet || !(pattern == path || strings.HasSuffix(pattern, "/") && strings.HasPrefix(path, pattern)):
			t.Errorf("operation %s is served by pattern %q", op, pattern)
		}
	}
}

// TestOpenAPICheck: the validating transport the tests use catches what it
// is for, so its silence elsewhere means something.
func TestOpenAPICheck(t *testing.T) {
	t.Parallel()
	dc := mustAPIDoc(t)
	const sandbox = `{"id":"sbx-1","state":"requested","consumer":"alice","profile":"echo","extension":"echo",` +
		`"created_at":"2025-01-02T15:04:05Z","updated_at":"2025-01-02T15:04:05Z"}`
	for _, tc := range []struct {
		name, method, path, reqBody string
		reqHeader                   map[string]string
		status                      int
		header                      map[string]string
		body                        string
		want                        string // in a problem reported; "" for none
	}{
		{name: "valid", method: "GET", path: "/v1/sandboxes/sbx-1", status: 200, body: sandbox},
		{name: "unknown member", method: "GET", path: "/v1/sandboxes/sbx-1", status: 200,
			body: strings.Replace(sandbox, `"id"`, `"handle":"x","id"`, 1), want: "handle"},
		{name: "missing member", method: "GET", path: "/v1/sandboxes/sbx-1", status: 200,
			body: strings.Replace(sandbox, `"consumer":"alice",`, "", 1), want: "consumer"},
		{name: "not a time", method: "GET", path: "/v1/sandboxes/sbx-1", status: 200,
			body: strings.Replace(sandbox, `"2025-01-02T15:04:05Z"`, `"yesterday"`, 1), want: "date-time"},
		{name: "unknown state", method: "GET", path: "/v1/sandboxes/sbx-1", status: 200,
			body: strings.Replace(sandbox, `"requested"`, `"sleeping"`, 1), want: "state"},
		{name: "undocumented status", method: "GET", path: "/v1/sandboxes/sbx-1", status: 418,
			body: `{"title":"I'm a teapot","status":418}`, want: "418"},
		{name: "503 without Retry-After", method: "GET", path: "/v1/sandboxes/sbx-1", status: 503,
			body: `{"title":"Service Unavailable","status":503}`, want: "Retry-After"},
		{name: "error not a problem", method: "GET", path: "/v1/sandboxes/sbx-1", status: 404,
			header: map[string]string{"Content-Type": "application/json"}, body: `{"error":"no"}`, want: "content"},
		{name: "refused request served", method: "GET", path: "/v1/sandboxes?limit=5000", status: 200,
			body: `{"sandboxes":[]}`, want: "limit"},
		{name: "refused request refused", method: "GET", path: "/v1/sandboxes?limit=5000", status: 400,
			body: `{"title":"Bad Request","status":400}`},
		{name: "unknown create member served", method: "POST", path: "/v1/sandboxes",
			reqBody: `{"profile":"echo","size":"xl"}`, status: 202, body: sandbox,
			header: map[string]string{"Content-Type": "application/json", "Location": "/v1/sandboxes/sbx-1"}, want: "size"},
		{name: "unknown path not 404", method: "GET", path: "/v1/nope", status: 200, body: `{}`, want: "404"},
		{name: "unknown method without Allow", method: "PUT", path: "/v1/sandboxes", status: 405,
			body: `{"title":"Method Not Allowed","status":405}`, want: "Allow"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var rd io.Reader
			if tc.reqBody != "" {
				rd = strings.NewReader(tc.reqBody)
			}
			req := httptest.NewRequest(tc.method, tc.path, rd)
			req.Header.Set("Authorization", "Bearer test")
			if tc.reqBody != "" {
				req.Header.Set("Content-Type", "application/json")
			}
			for k, v := range tc.reqHeader {
				req.Header.Set(k, v)
			}
			resp := &http.Response{StatusCode: tc.status, Status: http.StatusText(tc.status), Header: http.Header{},
				Body: io.NopCloser(strings.NewReader(tc.body))}
			resp.Header.Set("Content-Type", "application/json")
			if tc.status >= 400 {
				resp.Header.Set("Content-Type", "application/problem+json")
			}
			if tc.status == 401 {
				resp.Header.Set("WWW-Authenticate", `Bearer realm="sandboxer"`)
			}
			for k, v := range tc.header {
				resp.Header.Set(k, v)
			}
			problems, _ := dc.exchange(req, resp)
			got := strings.Join(problems, "\n")
			switch {
			case tc.want == "" && len(problems) > 0:
				t.Fatalf("want no problem, got:\n%s", got)
			case tc.want != "" && !strings.Contains(got, tc.want):
				t.Fatalf("want a problem naming %q, got:\n%s", tc.want, got)
			}
		})
	}
}

// TestOpenAPISchemasMatchAPITypes: each schema of the document has exactly
// the JSON members of its Go type, recursively: the same names, required
// exactly when the Go field is never omitted, a date-time for a
// time.Time, arrays, maps and scalars of the Go field's kind, and no
// member beyond them (additionalProperties false).
func TestOpenAPISchemasMatchAPITypes(t *testing.T) {
	t.Parallel()
	dc := mustAPIDoc(t)
	for name, typ := range map[string]reflect.Type{
		"Problem":       reflect.TypeFor[api.Problem](),
		"CreateRequest": reflect.TypeFor[api.CreateRequest](),
		"Sandbox":       reflect.TypeFor[api.Sandbox](),
		"SandboxList":   reflect.TypeFor[api.SandboxList](),
		"ProfileList":   reflect.TypeFor[api.ProfileList](),
		"ExtensionList": reflect.TypeFor[api.ExtensionList](),
		"CreditBalance": reflect.TypeFor[api.CreditBalance](),
		"GrantRequest":  reflect.TypeFor[api.GrantRequest](),
		"GrantResult":   reflect.TypeFor[api.GrantResult](),
		"Ledger":        reflect.TypeFor[api.Ledger](),
		"UsageList":     reflect.TypeFor[api.UsageList](),
		"WorkerList":    reflect.TypeFor[api.WorkerList](),
		"KeyRequest":    reflect.TypeFor[api.KeyRequest](),
		"APIKey":        reflect.TypeFor[api.APIKey](),
		"IssuedKey":     reflect.TypeFor[api.IssuedKey](),
		"KeyList":       reflect.TypeFor[api.KeyList](),
	} {
		sp := dc.model.Components.Schemas.GetOrZero(name)
		if sp == nil {
			t.Errorf("no schema %s", name)
			continue
		}
		compareSchema(t, name, typ, sp.Schema())
	}
}

// compareSchema reports where schema s does not describe the JSON of a
// value of type typ.
func compareSchema(t *testing.T, at string, typ reflect.Type, s *base.Schema) {
	t.Helper()
	for typ.Kind() == reflect.Pointer {
		typ = typ.Elem()
	}
	is := func(kind string) bool { return slices.Contains(s.Type, kind) }
	switch {
	case typ == reflect.TypeFor[time.Time]():
		if !is("string") || s.Format != "date-time" {
			t.Errorf("%s: a time, described as %v %q", at, s.Type, s.Format)
		}
	case typ.Implements(reflect.TypeFor[json.Marshaler]()):
		// Its own JSON (a duration string, a backend's config object):
		// what the document says of it is checked against real answers.
	case typ.Kind() == reflect.Struct:
		if !is("object") {
			t.Errorf("%s: an object, described as %v", at, s.Type)
			return
		}
		if s.AdditionalProperties == nil || s.AdditionalProperties.IsA() || s.AdditionalProperties.B {
			t.Errorf("%s: members beyond the Go type's are allowed (want additionalProperties false)", at)
		}
		fields := jsonMembers(typ)
		var names, required []string
		for name, f := range fields {
			names = append(names, name)
			if !f.omitted {
				required = append(required, name)
			}
		}
		var props []string
		if s.Properties != nil {
			for name := range s.Properties.KeysFromOldest() {
				props = append(props, name)
			}
		}
		slices.Sort(names)
		slices.Sort(required)
		slices.Sort(props)
		req := slices.Sorted(slices.Values(s.Required))
		if !slices.Equal(names, props) {
			t.Errorf("%s: members %v, the Go type has %v", at, props, names)
		}
		if !slices.Equal(required, req) {
			t.Errorf("%s: required %v, the Go type never omits %v", at, req, required)
		}
		for name, f := range fields {
			if p := s.Properties.GetOrZero(name); p != nil {
				compareSchema(t, at+"."+name, f.typ, p.Schema())
			}
		}
	case typ.Kind() == reflect.Slice:
		if !is("array") || s.Items == nil || !s.Items.IsA() {
			t.Errorf("%s: an array, described as %v", at, s.Type)
			return
		}
		compareSchema(t, at+"[]", typ.Elem(), s.Items.A.Schema())
	case typ.Kind() == reflect.Map:
		if !is("object") || s.AdditionalProperties == nil || !s.AdditionalProperties.IsA() {
			t.Errorf("%s: a map, described as %v without additionalProperties", at, s.Type)
			return
		}
		compareSchema(t, at+"{}", typ.Elem(), s.AdditionalProperties.A.Schema())
	case typ.Kind() == reflect.String:
		if !is("string") {
			t.Errorf("%s: a string, described as %v", at, s.Type)
		}
	case typ.Kind() == reflect.Bool:
		if !is("boolean") {
			t.Errorf("%s: a boolean, described as %v", at, s.Type)
		}
	case typ.Kind() >= reflect.Int && typ.Kind() <= reflect.Uint64:
		if !is("integer") {
			t.Errorf("%s: an integer, described as %v", at, s.Type)
		}
	default:
		t.Errorf("%s: Go type %s not compared", at, typ)
	}
}

// jsonMember is one member of a struct's JSON.
type jsonMember struct {
	typ     reflect.Type
	omitted bool // omitempty or omitzero: absent when zero
}

// jsonMembers are the members encoding/json writes for a struct type, the
// fields of embedded structs without a name of their own flattened in.
func jsonMembers(typ reflect.Type) map[string]jsonMember {
	out := map[string]jsonMember{}
	for f := range typ.Fields() {
		if !f.IsExported() && !f.Anonymous {
			continue
		}
		tag := f.Tag.Get("json")
		name, opts, _ := strings.Cut(tag, ",")
		if name == "-" {
			continue
		}
		if f.Anonymous && name == "" && f.Type.Kind() == reflect.Struct {
			maps.Copy(out, jsonMembers(f.Type))
			continue
		}
		if name == "" {
			name = f.Name
		}
		omitted := slices.Contains(strings.Split(opts, ","), "omitempty") || slices.Contains(strings.Split(opts, ","), "omitzero")
		out[name] = jsonMember{typ: f.Type, omitted: omitted}
	}
	return out
}

// docCredits answers the credits API with every member of every answer
// set, so that the document's description of each is checked against the
// gateway's real answers (the metering service's live in cmd/sandboxer's
// tests).
type docCredits struct{}

var docTime = time.Date(2025, 1, 2, 15, 4, 5, 123456789, time.UTC)

func (docCredits) Balance(_ context.Context, consumer string) (api.CreditBalance, error) {
	return api.CreditBalance{
		Consumer: consumer, Balance: 1000, Held: 65, Available: 935, Seq: 4,
		Grants: []api.CreditGrant{{ID: "welcome", Amount: 1000, Remaining: 985, Priority: 1, ExpiresAt: docTime.Add(time.Hour),
			Promo: true, GrantedAt: docTime, Expiries: 1}},
		Holds: []api.CreditHold{{Hold: "sbx-1", Sandbox: "sbx-1", Profile: "echo", Extension: "echo", Amount: 65, Debited: 5, ReadyAt: docTime}},
	}, nil
}

func (c docCredits) Grant(ctx context.Context, r api.GrantRequest) (api.GrantResult, error) {
	b, _ := c.Balance(ctx, r.Consumer)
	return api.GrantResult{Grant: b.Grants[0], Duplicate: r.ID == "again", Balance: b}, nil
}

func (docCredits) Ledger(_ context.Context, q api.LedgerQuery) (api.Ledger, error) {
	return api.Ledger{Consumer: q.Consumer, Entries: []api.LedgerEntry{
		{Key: "dev.grant.welcome", Seq: 1, Consumer: q.Consumer, Kind: "grant", Amount: 1000, BalanceAfter: 1000, Grant: "welcome",
			Cause: "grant.welcome", Reason: "paid credit", At: docTime},
		{Key: "dev.sb.sb1.settle", Seq: 3, Consumer: q.Consumer, Kind: "debit", Amount: -15, Held: -15, BalanceAfter: 985, HeldAfter: 50,
			Sandbox: "sb1", Hold: "sb1", Draws: []api.CreditDraw{{Grant: "welcome", Amount: 15}}, Cause: "sb1.destroyed", Reason: "settlement", At: docTime},
	}}, nil
}

func (docCredits) Usage(_ context.Context, q api.UsageQuery) (api.UsageList, error) {
	if q.Consumer == "nobody" {
		return api.UsageList{}, nil // records nil: the gateway answers []
	}
	return api.UsageList{More: true, Records: []api.UsageRecord{{
		Key: "usage.dev.sb1", Consumer: "dev", Sandbox: "sb1", Hold: "sb1", Profile: "saas", Extension: "saas-stub", PricingModel: "metered",
		ReadyAt: docTime, DestroyedAt: docTime.Add(10 * time.Second), Seconds: 10,
		Quote:   api.UsageQuote{Amount: 65, DurationSeconds: 60, Breakdown: []string{"start 5", "60s at 1"}},
		Actual:  api.UsageActual{Source: "meter", Amount: 15, Quantity: 10, Unit: "second", Breakdown: []string{"10s at 1"}},
		Charged: 15, Refunded: 0, Unpaid: 0, Reserved: 65, Reason: "requested", Cause: "sb1.destroyed",
	}}}, nil
}

// TestOpenAPICredits: the credits API's answers, full and empty, are what
// the document says (the validating transport checks each).
func TestOpenAPICredits(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{opts: func(o *gateway.Options) { o.Credits = docCredits{} }})
	ctx := testCtx(t)
	alice, root := e.client("alice"), e.client("root")
	if _, err := alice.CreditBalance(ctx, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := root.CreditBalance(ctx, "alice"); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"", "again"} {
		if _, err := root.Grant(ctx, api.GrantRequest{Consumer: "alice", Amount: 10, Priority: 2, ExpiresAt: time.Now().Add(time.Hour), Promo: true, ID: id}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := alice.Ledger(ctx, api.LedgerQuery{Since: docTime}); err != nil {
		t.Fatal(err)
	}
	for _, consumer := range []string{"", "nobody"} {
		if _, err := root.Usage(ctx, api.UsageQuery{Consumer: consumer, From: docTime, To: docTime.Add(time.Hour)}); err != nil {
			t.Fatal(err)
		}
	}
	// Refusals are problems the document lists.
	if _, err := alice.CreditBalance(ctx, "bob"); api.StatusOf(err) != http.StatusForbidden {
		t.Fatalf("another consumer's balance: %v, want 403", err)
	}
	if _, err := alice.Grant(ctx, api.GrantRequest{Consumer: "alice", Amount: 10}); api.StatusOf(err) != http.StatusForbidden {
		t.Fatalf("a consumer's grant: %v, want 403", err)
	}
	if r := e.do(t, http.MethodGet, "/v1/credits/usage?from=2025-01-02T00:00:00Z&to=2025-01-01T00:00:00Z", "alice", "", nil); r.Status != http.StatusBadRequest {
		t.Fatalf("usage with to before from: %d %s", r.Status, r.Body)
	}
}

// TestOpenAPIMetrics: GET /metrics of a gateway with a registry answers the
// Prometheus text format the document names.
func TestOpenAPIMetrics(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{opts: func(o *gateway.Options) { o.Metrics = prometheus.NewRegistry() }})
	resp, err := e.hs.Client().Get(e.hs.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain; version=0.0.4") {
		t.Fatalf("GET /metrics: %d %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
}
