package gateway_test

import (
	"net/http"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/services/gateway"
)

func TestAuth(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	endpoints := []struct{ method, path, body string }{
		{http.MethodPost, "/v1/sandboxes", `{"profile":"echo"}`},
		{http.MethodGet, "/v1/sandboxes", ""},
		{http.MethodGet, "/v1/sandboxes/sbx-x", ""},
		{http.MethodDelete, "/v1/sandboxes/sbx-x", ""},
		{http.MethodGet, "/v1/sandboxes/sbx-x/events", ""},
		{http.MethodGet, "/v1/profiles", ""},
		{http.MethodGet, "/v1/extensions", ""},
	}
	creds := []struct {
		name, header string
	}{
		{"no token", ""},
		{"unknown token", "Bearer sbx_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"},
		{"not a key", "Bearer hunter2"},
		{"basic scheme", "Basic YWxpY2U6cHc="},
		{"empty bearer", "Bearer "},
	}
	for _, ep := range endpoints {
		for _, c := range creds {
			t.Run(ep.method+" "+ep.path+"/"+c.name, func(t *testing.T) {
				t.Parallel()
				hdr := map[string]string{}
				if c.header != "" {
					hdr["Authorization"] = c.header
				}
				r := e.do(t, ep.method, ep.path, "", ep.body, hdr)
				if r.Status != http.StatusUnauthorized {
					t.Fatalf("status %d, want 401: %s", r.Status, r.Body)
				}
				if r.Header.Get("WWW-Authenticate") == "" {
					t.Fatal("401 without WWW-Authenticate")
				}
			})
		}
	}
	t.Run("health needs no token", func(t *testing.T) {
		t.Parallel()
		if r := e.do(t, http.MethodGet, "/healthz", "", "", nil); r.Status != http.StatusOK {
			t.Fatalf("healthz %d", r.Status)
		}
		if r := e.do(t, http.MethodGet, "/readyz", "", "", nil); r.Status != http.StatusOK {
			t.Fatalf("readyz %d: %s", r.Status, r.Body)
		}
	})
}

func TestOwnership(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	ctx := testCtx(t)
	alice, bob, root := e.client("alice"), e.client("bob"), e.client("root")
	sb, err := alice.Create(ctx, api.CreateRequest{Profile: "echo"}, "")
	if err != nil {
		t.Fatal(err)
	}
	bobs, err := bob.Create(ctx, api.CreateRequest{Profile: "echo"}, "")
	if err != nil {
		t.Fatal(err)
	}
	before := e.lastSeqs(t)

	notFound := func(what string, err error) {
		t.Helper()
		if p := problemOf(t, err); p.Status != http.StatusNotFound {
			t.Fatalf("%s: status %d, want 404", what, p.Status)
		}
	}
	_, err = bob.Get(ctx, sb.ID)
	notFound("bob gets alice's sandbox", err)
	_, err = bob.Get(ctx, "sbx-doesnotexist")
	notFound("bob gets a missing sandbox", err)
	_, err = bob.Destroy(ctx, sb.ID)
	notFound("bob destroys alice's sandbox", err)
	err = bob.Events(ctx, sb.ID, false, func(api.StreamEvent) error { return nil })
	notFound("bob reads alice's events", err)
	// The two 404s cannot be told apart.
	a := e.do(t, http.MethodGet, "/v1/sandboxes/"+sb.ID, "bob", "", nil)
	m := e.do(t, http.MethodGet, "/v1/sandboxes/sbx-doesnotexist", "bob", "", nil)
	if string(a.Body) != string(m.Body) {
		t.Fatalf("another's sandbox answers %s, a missing one %s", a.Body, m.Body)
	}

	ids := func(c *api.Client, f api.ListFilter) []string {
		t.Helper()
		l, err := c.List(ctx, f)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, s := range l {
			out = append(out, s.ID)
		}
		return out
	}
	if got := ids(bob, api.ListFilter{}); !slices.Equal(got, []string{bobs.ID}) {
		t.Fatalf("bob lists %v, want only his %s", got, bobs.ID)
	}
	if got := ids(bob, api.ListFilter{Consumer: "alice"}); len(got) != 0 {
		t.Fatalf("bob lists alice's: %v", got)
	}
	if got, want := ids(root, api.ListFilter{}), slices.Sorted(slices.Values([]string{sb.ID, bobs.ID})); !slices.Equal(got, want) {
		t.Fatalf("admin lists %v, want both", got)
	}
	if got := ids(root, api.ListFilter{Consumer: "alice"}); !slices.Equal(got, []string{sb.ID}) {
		t.Fatalf("admin lists alice's as %v", got)
	}
	if _, err := root.Get(ctx, sb.ID); err != nil {
		t.Fatalf("admin get: %v", err)
	}
	if now := e.lastSeqs(t); now[event.StreamCommands] != before[event.StreamCommands] {
		t.Fatalf("bob's refused destroy published a command")
	}
	// An admin may destroy anyone's sandbox, and the command says who asked.
	if _, err := root.Destroy(ctx, sb.ID); err != nil {
		t.Fatal(err)
	}
	cmds := e.messages(t, event.StreamCommands, event.CommandSubject("echo", event.VerbDestroy, sb.Consumer, sb.ID))
	if len(cmds) != 1 {
		t.Fatalf("%d destroy commands", len(cmds))
	}
	var d event.Destroy
	if err := event.DataAs(cmds[0].Event, &d); err != nil {
		t.Fatal(err)
	}
	if d.RequestedBy != "root" || d.Consumer != "alice" {
		t.Fatalf("destroy %+v", d)
	}
}

func TestKeyCache(t *testing.T) {
	t.Parallel()
	var now atomic.Int64
	now.Store(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	e := newEnv(t, envConfig{opts: func(o *gateway.Options) {
		o.Now = func() time.Time { return time.Unix(0, now.Load()) }
		o.KeyCacheTTL = 30 * time.Second
	}})
	ctx := testCtx(t)
	alice := e.client("alice")
	if _, err := alice.Profiles(ctx); err != nil {
		t.Fatal(err)
	}
	if err := e.keys.Revoke(ctx, e.tokens["alice"]); err != nil {
		t.Fatal(err)
	}
	if _, err := alice.Profiles(ctx); err != nil {
		t.Fatalf("a revoked key stops working only after the cache TTL: %v", err)
	}
	now.Add(int64(31 * time.Second))
	_, err := alice.Profiles(ctx)
	if p := problemOf(t, err); p.Status != http.StatusUnauthorized {
		t.Fatalf("revoked key after the TTL: status %d", p.Status)
	}
	// A key issued now works at once: failures are not cached.
	e.tokens["alice"] = e.issue(t, "alice", "consumer")
	if _, err := e.client("alice").Profiles(ctx); err != nil {
		t.Fatal(err)
	}
}
