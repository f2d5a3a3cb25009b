package api_test

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"os"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pb33f/libopenapi"
	validator "github.com/pb33f/libopenapi-validator"
	"github.com/pb33f/libopenapi-validator/config"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/event"
)

// openapiFile is the gateway's OpenAPI document, which this package's
// client speaks: the gateway embeds and serves this very file.
const openapiFile = "../../services/gateway/openapi/openapi.json"

// validating is a transport that answers every request itself after
// validating it against the OpenAPI document: an empty JSON object, or an
// empty event stream. It records the operations it saw.
type validating struct {
	t *testing.T
	v validator.Validator

	mu  sync.Mutex
	ops []string // "GET /v1/sandboxes?..." of each request
}

func (vt *validating) RoundTrip(req *http.Request) (*http.Response, error) {
	var body []byte
	if req.Body != nil {
		b, err := io.ReadAll(req.Body)
		if err != nil {
			return nil, err
		}
		req.Body.Close()
		body = b
		req = req.Clone(req.Context())
		req.Body = io.NopCloser(bytes.NewReader(b))
	}
	if ok, errs := vt.v.ValidateHttpRequestSync(req); !ok {
		var msgs []string
		for _, e := range errs {
			msg := e.Message + ": " + e.Reason
			for _, f := range e.SchemaValidationErrors {
				msg += "; " + f.Error()
			}
			msgs = append(msgs, msg)
		}
		vt.t.Errorf("%s %s (body %s) does not match the OpenAPI document:\n\t%s", req.Method, req.URL.RequestURI(), body, strings.Join(msgs, "\n\t"))
	}
	vt.mu.Lock()
	vt.ops = append(vt.ops, req.Method+" "+req.URL.RequestURI())
	vt.mu.Unlock()
	resp := &http.Response{StatusCode: http.StatusOK, Header: http.Header{}, Request: req,
		Body: io.NopCloser(strings.NewReader("{}"))}
	resp.Header.Set("Content-Type", "application/json")
	if req.Header.Get("Accept") == "text/event-stream" {
		resp.Header.Set("Content-Type", "text/event-stream")
		resp.Body = http.NoBody
	}
	return resp, nil
}

// TestClientRequestsMatchOpenAPI: every request every method of the Client
// sends, with every option it has set, is one the OpenAPI document
// accepts. A method added to the Client without a case here fails the
// test.
func TestClientRequestsMatchOpenAPI(t *testing.T) {
	t.Parallel()
	spec, err := os.ReadFile(openapiFile)
	if err != nil {
		t.Fatal(err)
	}
	doc, err := libopenapi.NewDocument(spec)
	if err != nil {
		t.Fatal(err)
	}
	// Strict: a query parameter, header or member the document does not
	// declare is an error too (the maps of inputs and labels declare
	// their values only).
	v, errs := validator.NewValidator(doc, config.WithFormatAssertions(), config.WithStrictMode(),
		config.WithStrictIgnorePaths("$.body.inputs.*", "$.body.labels.*"))
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	vt := &validating{t: t, v: v}
	c := api.NewClient("http://gateway.test/", "tok-en_1.2~3+/=", &http.Client{Transport: vt})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	since := time.Date(2025, 1, 2, 15, 4, 5, 6, time.FixedZone("CET", 3600))

	calls := map[string]func() error{
		"Create": func() error {
			if _, err := c.Create(ctx, api.CreateRequest{Profile: "echo"}, ""); err != nil {
				return err
			}
			_, err := c.Create(ctx, api.CreateRequest{Profile: "git", Inputs: map[string]string{"repo": "/tmp/r", "depth": "1"},
				Labels: map[string]string{"team": "a", "tier": "x=y"}, TTL: "30m"}, "retry-1 of the nightly run")
			return err
		},
		"Get": func() error { _, err := c.Get(ctx, "sbx-06h32eps8br7h09nre9d6ril70"); return err },
		"List": func() error {
			_, err := c.List(ctx, api.ListFilter{State: "ready", Profile: "echo", Labels: []string{"team=a", "tier=x=y"}, Consumer: "bob"})
			return err
		},
		"ListPage": func() error {
			if _, err := c.ListPage(ctx, api.ListFilter{}, 0, ""); err != nil {
				return err
			}
			_, err := c.ListPage(ctx, api.ListFilter{State: "destroyed", Labels: []string{"a=b"}}, api.MaxPageSize, "sbx-06h32eps8br7h09nre9d6ril70")
			return err
		},
		"Destroy":    func() error { _, err := c.Destroy(ctx, "sbx-1"); return err },
		"Profiles":   func() error { _, err := c.Profiles(ctx); return err },
		"Extensions": func() error { _, err := c.Extensions(ctx); return err },
		"Workers":    func() error { _, err := c.Workers(ctx); return err },
		"Events": func() error {
			if err := c.Events(ctx, "sbx-1", false, func(api.StreamEvent) error { return nil }); err != nil {
				return err
			}
			return c.Events(ctx, "sbx-1", true, func(api.StreamEvent) error { return nil })
		},
		"Wait": func() error {
			// Get, then the events; the canned answers end the stream
			// before any state: that error is expected.
			_, err := c.Wait(ctx, "sbx-1", func(s event.State) bool { return s == event.StateReady }, nil)
			if err != nil && strings.Contains(err.Error(), "stream ended") {
				return nil
			}
			return err
		},
		"CreditBalance": func() error {
			if _, err := c.CreditBalance(ctx, ""); err != nil {
				return err
			}
			_, err := c.CreditBalance(ctx, "team-a")
			return err
		},
		"Grant": func() error {
			if _, err := c.Grant(ctx, api.GrantRequest{Consumer: "dev", Amount: 1000}); err != nil {
				return err
			}
			_, err := c.Grant(ctx, api.GrantRequest{Consumer: "dev", Amount: 5, Priority: 1000, ExpiresAt: since.Add(time.Hour), Promo: true, ID: "welcome"})
			return err
		},
		"Ledger": func() error {
			if _, err := c.Ledger(ctx, api.LedgerQuery{}); err != nil {
				return err
			}
			_, err := c.Ledger(ctx, api.LedgerQuery{Consumer: "dev", Since: since})
			return err
		},
		"Usage": func() error {
			if _, err := c.Usage(ctx, api.UsageQuery{}); err != nil {
				return err
			}
			_, err := c.Usage(ctx, api.UsageQuery{Consumer: "dev", From: since, To: since.Add(24 * time.Hour)})
			return err
		},
		"IssueKey": func() error {
			if _, err := c.IssueKey(ctx, api.KeyRequest{Consumer: "team-a"}); err != nil {
				return err
			}
			_, err := c.IssueKey(ctx, api.KeyRequest{Consumer: "team-a", Scopes: []string{api.ScopeRead, api.ScopeCreate, api.ScopeDestroy, api.ScopeCredits, api.ScopeAdmin},
				ExpiresIn: "720h", Name: "ci"})
			return err
		},
		"Keys": func() error {
			if _, err := c.Keys(ctx, ""); err != nil {
				return err
			}
			_, err := c.Keys(ctx, "team-a")
			return err
		},
		"RevokeKey": func() error { _, err := c.RevokeKey(ctx, "k-1"); return err },
	}

	ct := reflect.TypeFor[*api.Client]()
	var methods []string
	for i := range ct.NumMethod() {
		methods = append(methods, ct.Method(i).Name)
	}
	for _, m := range methods {
		call, ok := calls[m]
		if !ok {
			t.Errorf("Client.%s has no case in this test: add one", m)
			continue
		}
		if err := call(); err != nil {
			t.Errorf("Client.%s: %v", m, err)
		}
	}
	for name := range calls {
		if !slices.Contains(methods, name) {
			t.Errorf("a case for Client.%s, which does not exist", name)
		}
	}
	if len(vt.ops) < len(methods) {
		t.Fatalf("%d requests for %d methods: %v", len(vt.ops), len(methods), vt.ops)
	}
}
