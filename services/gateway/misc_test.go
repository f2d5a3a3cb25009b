package gateway_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/catalog"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/services/gateway"
)

func TestStaticResolver(t *testing.T) {
	t.Parallel()
	three := &extension.Manifest{Name: "three", Hosts: []string{"a", "b", "c"}}
	none := &extension.Manifest{Name: "none"}
	p := &extension.Profile{Slug: "p", Extension: "three"}
	cases := []struct {
		name  string
		picks []*extension.Manifest
		want  []gateway.Route
	}{
		{"round robin", []*extension.Manifest{three, three, three, three},
			[]gateway.Route{{"three", "a"}, {"three", "b"}, {"three", "c"}, {"three", "a"}}},
		{"default host", []*extension.Manifest{none, none}, []gateway.Route{{"none", "localhost"}, {"none", "localhost"}}},
		{"extensions apart", []*extension.Manifest{three, none, three},
			[]gateway.Route{{"three", "a"}, {"none", "localhost"}, {"three", "b"}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var r gateway.StaticResolver
			for i, m := range tc.picks {
				got, err := r.Resolve(context.Background(), gateway.RouteRequest{SandboxID: "sbx-1", Profile: p, Manifest: m})
				if err != nil || got != tc.want[i] {
					t.Fatalf("pick %d: %+v %v, want %+v", i, got, err, tc.want[i])
				}
			}
		})
	}
	t.Run("no manifest", func(t *testing.T) {
		t.Parallel()
		var r gateway.StaticResolver
		if _, err := r.Resolve(context.Background(), gateway.RouteRequest{Profile: p}); !errors.Is(err, gateway.ErrNoRoute) {
			t.Fatalf("err %v, want ErrNoRoute", err)
		}
	})
	t.Run("concurrent picks spread evenly", func(t *testing.T) {
		t.Parallel()
		var r gateway.StaticResolver
		var mu sync.Mutex
		count := map[string]int{}
		var wg sync.WaitGroup
		for range 30 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				got, _ := r.Resolve(context.Background(), gateway.RouteRequest{Profile: p, Manifest: three})
				mu.Lock()
				count[got.Host]++
				mu.Unlock()
			}()
		}
		wg.Wait()
		if count["a"] != 10 || count["b"] != 10 || count["c"] != 10 {
			t.Fatalf("picks %v, want 10 each", count)
		}
	})
}

func TestListFilters(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	ctx := testCtx(t)
	alice := e.client("alice")
	mk := func(req api.CreateRequest) string {
		t.Helper()
		sb, err := alice.Create(ctx, req, "")
		if err != nil {
			t.Fatal(err)
		}
		return sb.ID
	}
	a := mk(api.CreateRequest{Profile: "echo", Labels: map[string]string{"team": "a", "env": "prod"}})
	b := mk(api.CreateRequest{Profile: "echo", Labels: map[string]string{"team": "a", "env": "dev"}})
	c := mk(api.CreateRequest{Profile: "git", Inputs: map[string]string{"repo": "https://example.com/b.git"}, Labels: map[string]string{"team": "b"}})
	e.advance(t, b, event.StateProvisioning, event.StateReady)

	list := func(f api.ListFilter) []string {
		l, err := alice.List(ctx, f)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, s := range l {
			out = append(out, s.ID)
		}
		return out
	}
	// The listing follows the bucket through its watch.
	await(t, "the listing to see b ready", func() bool { return slices.Equal(list(api.ListFilter{State: "ready"}), []string{b}) })

	cases := []struct {
		name   string
		filter api.ListFilter
		want   []string
	}{
		{"all", api.ListFilter{}, []string{a, b, c}},
		{"state", api.ListFilter{State: "requested"}, []string{a, c}},
		{"profile", api.ListFilter{Profile: "git"}, []string{c}},
		{"label", api.ListFilter{Labels: []string{"team=a"}}, []string{a, b}},
		{"every label must match", api.ListFilter{Labels: []string{"team=a", "env=prod"}}, []string{a}},
		{"profile's label", api.ListFilter{Labels: []string{"tier=test"}}, []string{a, b}},
		{"two values of one key", api.ListFilter{Labels: []string{"team=a", "team=b"}}, nil},
		{"everything", api.ListFilter{State: "ready", Profile: "echo", Labels: []string{"env=dev"}}, []string{b}},
		{"nothing", api.ListFilter{Profile: "nope"}, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			// In id order: time-ordered, but two ids of one millisecond
			// in either order.
			want := slices.Sorted(slices.Values(tc.want))
			if got := list(tc.filter); !slices.Equal(got, want) {
				t.Fatalf("got %v, want %v", got, want)
			}
		})
	}
	for _, bad := range []struct{ query, field string }{{"state=sleeping", "state"}, {"label=team", "label"}, {"label==a", "label"}} {
		r := e.do(t, http.MethodGet, "/v1/sandboxes?"+bad.query, "alice", "", nil)
		if r.Status != http.StatusBadRequest || !slices.Contains(fields(r.Problem), bad.field) {
			t.Fatalf("%s: %d %s", bad.query, r.Status, r.Body)
		}
	}
}

func TestCatalogLists(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	ctx := testCtx(t)
	alice := e.client("alice")
	pl, err := alice.Profiles(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var slugs []string
	for _, p := range pl.Profiles {
		slugs = append(slugs, p.Slug)
	}
	if !slices.Equal(slugs, []string{"echo", "git", "orphan"}) {
		t.Fatalf("profiles %v", slugs)
	}
	el, err := alice.Extensions(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, m := range el.Extensions {
		names = append(names, m.Name)
	}
	if !slices.Equal(names, []string{"echo", "gitecho"}) {
		t.Fatalf("extensions %v", names)
	}
	if _, ok := el.Extensions[1].Inputs["repo"]; !ok {
		t.Fatal("extension inputs missing from the listing")
	}
}

func TestRouting(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	cases := []struct {
		method, path string
		status       int
		allow        string
	}{
		{http.MethodPut, "/v1/sandboxes", 405, "GET, HEAD, POST"},
		{http.MethodPost, "/v1/sandboxes/sbx-1", 405, "GET, HEAD, DELETE"},
		{http.MethodDelete, "/v1/profiles", 405, "GET, HEAD"},
		{http.MethodGet, "/v2/sandboxes", 404, ""},
		{http.MethodGet, "/v1/sandboxes/sbx-1/logs", 404, ""},
		{http.MethodGet, "/v1/sandboxes/NOT..VALID", 404, ""},
	}
	for _, tc := range cases {
		t.Run(tc.method+" "+tc.path, func(t *testing.T) {
			t.Parallel()
			r := e.do(t, tc.method, tc.path, "alice", "", nil)
			if r.Status != tc.status || r.Header.Get("Allow") != tc.allow {
				t.Fatalf("status %d Allow %q, want %d %q", r.Status, r.Header.Get("Allow"), tc.status, tc.allow)
			}
		})
	}
}

func TestReadiness(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	ctx := testCtx(t)
	// A second gateway on the same bus, not started yet.
	kv, err := e.js.KeyValue(ctx, bus.BucketCatalog)
	if err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	cache, err := catalog.Watch(wctx, kv)
	if err != nil {
		t.Fatal(err)
	}
	gw, err := gateway.New(gateway.Options{JS: e.js, Catalog: cache, Keys: e.keys})
	if err != nil {
		t.Fatal(err)
	}
	get := func(path string) int {
		rec := httptest.NewRecorder()
		gw.Handler().ServeHTTP(rec, httptest.NewRequestWithContext(ctx, http.MethodGet, path, nil))
		return rec.Code
	}
	if code := get("/readyz"); code != http.StatusServiceUnavailable {
		t.Fatalf("readyz before start: %d", code)
	}
	if code := get("/healthz"); code != http.StatusOK {
		t.Fatalf("healthz: %d", code)
	}
	if err := gw.Start(ctx); err != nil {
		t.Fatal(err)
	}
	await(t, "readyz", func() bool { return get("/readyz") == http.StatusOK })
	if err := gw.Start(ctx); err == nil {
		t.Fatal("second Start succeeded")
	}
	if err := gw.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if code := get("/readyz"); code != http.StatusServiceUnavailable {
		t.Fatalf("readyz after shutdown: %d", code)
	}

	if _, err := gateway.New(gateway.Options{}); err == nil || !strings.Contains(err.Error(), "JS") {
		t.Fatalf("New without options: %v", err)
	}
}

func TestTracePropagation(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	const traceID = "4bf92f3577b34da6a3ce929d0e0e4736"
	r := e.do(t, http.MethodPost, "/v1/sandboxes", "alice", `{"profile":"echo"}`,
		map[string]string{"traceparent": "00-" + traceID + "-00f067aa0ba902b7-01"})
	if r.Status != http.StatusAccepted {
		t.Fatalf("status %d", r.Status)
	}
	cmds := e.messages(t, event.StreamCommands, event.SubjectCommands)
	if len(cmds) != 1 {
		t.Fatalf("%d commands", len(cmds))
	}
	tp := cmds[0].Header["traceparent"]
	if len(tp) != 1 || !strings.HasPrefix(tp[0], "00-"+traceID+"-") {
		t.Fatalf("command traceparent %v, want trace %s", tp, traceID)
	}
}
