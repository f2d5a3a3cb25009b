package gateway_test

import (
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/apikey"
	"github.com/sand-boxer/sandboxer/services/gateway"
)

// TestKeysAPI: an admin key issues a key (its token shown once), lists
// keys without tokens, and revokes one by id, which stops working at once;
// a consumer key may do none of it.
func TestKeysAPI(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	ctx := testCtx(t)
	root := e.client("root")
	issued, err := root.IssueKey(ctx, api.KeyRequest{Consumer: "alice", Scopes: []string{"read"}, ExpiresIn: "1h", Name: "dashboard"})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(issued.Token, "sbx_") || issued.ID == "" || issued.Consumer != "alice" || !slices.Equal(issued.Scopes, []string{"read"}) ||
		issued.ExpiresAt.IsZero() || time.Until(issued.ExpiresAt) > time.Hour || issued.Name != "dashboard" {
		t.Fatalf("issued %+v", issued)
	}
	if strings.Contains(issued.ID, issued.Token) || strings.Contains(issued.Token, issued.ID) {
		t.Fatalf("the id %s is part of the token", issued.ID)
	}
	dash := api.NewClient(e.hs.URL, issued.Token, e.hs.Client())
	if _, err := dash.Profiles(ctx); err != nil {
		t.Fatalf("a read key reads: %v", err)
	}

	// Listed, without tokens.
	r := e.do(t, http.MethodGet, "/v1/keys?consumer=alice", "root", "", nil)
	if r.Status != http.StatusOK || strings.Contains(string(r.Body), issued.Token) || strings.Contains(string(r.Body), `"token"`) {
		t.Fatalf("listing: %d %s", r.Status, r.Body)
	}
	var l api.KeyList
	mustUnmarshal(t, r.Body, &l)
	ids := map[string]api.APIKey{}
	for _, k := range l.Keys {
		if k.Consumer != "alice" {
			t.Fatalf("alice's keys list %+v", k)
		}
		ids[k.ID] = k
	}
	if len(l.Keys) != 2 || ids[issued.ID].Name != "dashboard" {
		t.Fatalf("alice's keys: %+v, want her test key and the dashboard's", l.Keys)
	}
	for _, k := range l.Keys {
		if k.ID != issued.ID && !slices.Equal(k.Scopes, []string{"read", "create", "destroy", "credits"}) {
			t.Fatalf("a consumer key of the first version lists scopes %v", k.Scopes)
		}
	}
	all, err := root.Keys(ctx, "")
	if err != nil || len(all.Keys) != len(consumers)+2 {
		t.Fatalf("every key: %d, %v; want %d", len(all.Keys), err, len(consumers)+2)
	}

	// Consumer keys manage no keys.
	for _, ep := range []struct{ method, path, body string }{
		{http.MethodPost, "/v1/keys", `{"consumer":"alice"}`},
		{http.MethodGet, "/v1/keys", ""},
		{http.MethodDelete, "/v1/keys/" + issued.ID, ""},
	} {
		if r := e.do(t, ep.method, ep.path, "alice", ep.body, nil); r.Status != http.StatusForbidden {
			t.Fatalf("%s %s with a consumer key: %d", ep.method, ep.path, r.Status)
		}
	}

	revoked, err := root.RevokeKey(ctx, issued.ID)
	if err != nil || revoked.ID != issued.ID {
		t.Fatalf("revoking: %+v %v", revoked, err)
	}
	if _, err := dash.Profiles(ctx); api.StatusOf(err) != http.StatusUnauthorized {
		t.Fatalf("a revoked key, at once: %v, want 401", err)
	}
	if _, err := root.RevokeKey(ctx, issued.ID); api.StatusOf(err) != http.StatusNotFound {
		t.Fatalf("revoking again: %v, want 404", err)
	}
	if r := e.do(t, http.MethodDelete, "/v1/keys/no.such", "root", "", nil); r.Status != http.StatusNotFound {
		t.Fatalf("revoking an invalid id: %d", r.Status)
	}
}

// TestKeyRequestValidation: every invalid field at once, as a 422; an
// unknown field names the key request's fields.
func TestKeyRequestValidation(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	r := e.do(t, http.MethodPost, "/v1/keys", "root", `{"consumer":"a.b","scopes":["read","root"],"expires_in":"forever","name":"x"}`, nil)
	if r.Status != http.StatusUnprocessableEntity || !slices.Equal(fields(r.Problem), []string{"consumer", "scopes[1]", "expires_in"}) {
		t.Fatalf("invalid key request: %d %s", r.Status, r.Body)
	}
	for _, body := range []string{`{"consumer":"a","expires_in":"-1h"}`, `{"consumer":"a","expires_in":"876000h"}`, `{"consumer":"a","name":"two\nlines"}`} {
		if r := e.do(t, http.MethodPost, "/v1/keys", "root", body, nil); r.Status != http.StatusUnprocessableEntity {
			t.Fatalf("%s: %d %s", body, r.Status, r.Body)
		}
	}
	r = e.do(t, http.MethodPost, "/v1/keys", "root", `{"consumer":"a","role":"admin"}`, nil)
	if want := "unknown field (known: consumer, scopes, expires_in, name)"; r.Status != http.StatusBadRequest || r.Problem.Errors[0].Detail != want {
		t.Fatalf("unknown field: %d %s", r.Status, r.Body)
	}
	// Defaults: every scope but admin, no expiry.
	r = e.do(t, http.MethodPost, "/v1/keys", "root", `{"consumer":"newcomer"}`, nil)
	var k api.IssuedKey
	mustUnmarshal(t, r.Body, &k)
	if r.Status != http.StatusCreated || r.Header.Get("Location") != "/v1/keys/"+k.ID || !slices.Equal(k.Scopes, []string{"read", "create", "destroy", "credits"}) || !k.ExpiresAt.IsZero() {
		t.Fatalf("a key with defaults: %d %s", r.Status, r.Body)
	}
}

// TestKeyScopes: each endpoint needs its scope; admin has every one, and
// sees every consumer's sandboxes.
func TestKeyScopes(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	ctx := testCtx(t)
	key := func(scope apikey.Scope) string {
		t.Helper()
		tok, _, err := e.keys.IssueKey(ctx, apikey.Spec{Consumer: "carol", Scopes: []apikey.Scope{scope}})
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	tokens := map[string]string{
		"read": key(apikey.ScopeRead), "create": key(apikey.ScopeCreate), "destroy": key(apikey.ScopeDestroy),
		"credits": key(apikey.ScopeCredits), "admin": key(apikey.ScopeAdmin),
	}
	sb, err := e.client("carol").Create(ctx, api.CreateRequest{Profile: "echo"}, "")
	if err != nil {
		t.Fatal(err)
	}
	endpoints := []struct {
		method, path, body string
		scope              string
		ok                 int // the status with the scope
	}{
		{http.MethodGet, "/v1/sandboxes", "", "read", http.StatusOK},
		{http.MethodGet, "/v1/sandboxes/" + sb.ID, "", "read", http.StatusOK},
		{http.MethodGet, "/v1/profiles", "", "read", http.StatusOK},
		{http.MethodGet, "/v1/extensions", "", "read", http.StatusOK},
		{http.MethodPost, "/v1/sandboxes", `{"profile":"echo"}`, "create", http.StatusAccepted},
		{http.MethodDelete, "/v1/sandboxes/sbx-doesnotexist", "", "destroy", http.StatusNotFound},
		{http.MethodGet, "/v1/credits/balance", "", "credits", http.StatusServiceUnavailable}, // no credits backend here
		{http.MethodPost, "/v1/credits/grants", `{"consumer":"carol","amount":1}`, "admin", http.StatusServiceUnavailable},
		{http.MethodGet, "/v1/keys", "", "admin", http.StatusOK},
	}
	for _, ep := range endpoints {
		for scope, tok := range tokens {
			r := e.do(t, ep.method, ep.path, "", ep.body, map[string]string{"Authorization": "Bearer " + tok})
			want := http.StatusForbidden
			if scope == ep.scope || scope == "admin" {
				want = ep.ok
			}
			if r.Status != want {
				t.Errorf("%s %s with a %s key: %d, want %d: %s", ep.method, ep.path, scope, r.Status, want, r.Body)
			}
			if want == http.StatusForbidden && !strings.Contains(r.Problem.Detail, "the "+ep.scope+" scope") {
				t.Errorf("%s %s with a %s key: %q does not name the scope it lacks", ep.method, ep.path, scope, r.Problem.Detail)
			}
		}
	}
	// An admin key of a consumer sees every consumer's sandboxes.
	alices, err := e.client("alice").Create(ctx, api.CreateRequest{Profile: "echo"}, "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := api.NewClient(e.hs.URL, tokens["admin"], e.hs.Client()).Get(ctx, alices.ID); err != nil {
		t.Fatalf("an admin-scoped key reads another consumer's sandbox: %v", err)
	}
}

// TestKeyExpiry: a key stops working at its expiry, also when its lookup
// is cached; the refusal says it expired.
func TestKeyExpiry(t *testing.T) {
	t.Parallel()
	var now atomic.Int64
	now.Store(time.Now().UnixNano())
	e := newEnv(t, envConfig{opts: func(o *gateway.Options) {
		o.Now = func() time.Time { return time.Unix(0, now.Load()) }
		o.KeyCacheTTL = 24 * time.Hour // far longer than the key lives
	}})
	ctx := testCtx(t)
	tok, k, err := e.keys.IssueKey(ctx, apikey.Spec{Consumer: "bob", Scopes: []apikey.Scope{apikey.ScopeRead}, ExpiresAt: time.Unix(0, now.Load()).Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	c := api.NewClient(e.hs.URL, tok, e.hs.Client())
	if _, err := c.Profiles(ctx); err != nil {
		t.Fatal(err)
	}
	now.Add(int64(59 * time.Minute))
	if _, err := c.Profiles(ctx); err != nil {
		t.Fatalf("a minute before its expiry: %v", err)
	}
	now.Add(int64(2 * time.Minute))
	_, err = c.Profiles(ctx)
	if p := problemOf(t, err); p.Status != http.StatusUnauthorized || p.Detail != "api key expired" {
		t.Fatalf("after its expiry: %+v", p)
	}
	l, err := e.client("root").Keys(ctx, "bob")
	if err != nil {
		t.Fatal(err)
	}
	var expired []string
	for _, lk := range l.Keys {
		if lk.Expired {
			expired = append(expired, lk.ID)
		}
	}
	if !slices.Equal(expired, []string{k.ID}) {
		b, _ := json.Marshal(l)
		t.Fatalf("bob's keys %s: want %s listed as expired", b, k.ID)
	}
}
