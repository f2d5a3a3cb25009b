package gateway_test

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/echo"
	"github.com/sand-boxer/sandboxer/pkg/workers"
	"github.com/sand-boxer/sandboxer/services/gateway"
)

// load is a fixed view of live sandboxes: plain data for the resolver's
// rules, which a real inventory feeds in the gateway tests below.
type load struct {
	live     map[string]map[string]int // extension -> host -> live
	failures map[string]int            // extension -> consecutive failures
	has      map[string]bool
}

func (l load) Live(ext string) (int, map[string]int) {
	n := 0
	for _, c := range l.live[ext] {
		n += c
	}
	return n, l.live[ext]
}

func (l load) ConsecutiveFailures(ext string, _ time.Time) int { return l.failures[ext] }
func (l load) Has(id string) bool                              { return l.has[id] }

// liveness lists one worker for each extension it names.
type liveness map[string]bool

func (l liveness) List(ext string) []workers.Heartbeat {
	if l[ext] {
		return []workers.Heartbeat{{Extension: ext, Worker: "w1"}}
	}
	return nil
}

func manifest(name string, max, perHost int, hosts ...string) *extension.Manifest {
	m := echo.Manifest(name)
	m.Hosts = hosts
	m.Capacity = extension.Capacity{MaxSandboxes: max, PerHost: perHost}
	return m
}

func TestCapacityResolverRules(t *testing.T) {
	t.Parallel()
	a := manifest("a", 2, 0, "a1", "a2")
	b := manifest("b", 0, 1, "b1", "b2")
	prof := &extension.Profile{Slug: "p", Candidates: []extension.Candidate{{Extension: "a"}, {Extension: "b"}}}
	cases := []struct {
		name     string
		load     load
		liveness gateway.Liveness
		want     gateway.Route // zero: no route
	}{
		{"empty: first candidate, first host", load{}, nil, gateway.Route{Extension: "a", Host: "a1"}},
		{"least loaded host", load{live: map[string]map[string]int{"a": {"a1": 1}}}, nil, gateway.Route{Extension: "a", Host: "a2"}},
		{"first full: next candidate", load{live: map[string]map[string]int{"a": {"a1": 1, "a2": 1}}}, nil, gateway.Route{Extension: "b", Host: "b1"}},
		{"per-host cap skips a host", load{live: map[string]map[string]int{"a": {"a1": 2}, "b": {"b1": 1}}}, nil, gateway.Route{Extension: "b", Host: "b2"}},
		{"all full: no route", load{live: map[string]map[string]int{"a": {"a1": 2}, "b": {"b1": 1, "b2": 1}}}, nil, gateway.Route{}},
		{"failing first: next", load{failures: map[string]int{"a": 3}}, nil, gateway.Route{Extension: "b", Host: "b1"}},
		{"two failures are not failing", load{failures: map[string]int{"a": 2}}, nil, gateway.Route{Extension: "a", Host: "a1"}},
		{"no live workers: next", load{}, liveness{"b": true}, gateway.Route{Extension: "b", Host: "b1"}},
		{"all failing: first with room", load{live: map[string]map[string]int{"a": {"a1": 2}}}, liveness{}, gateway.Route{Extension: "b", Host: "b1"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			r := &gateway.CapacityResolver{Liveness: tc.liveness}
			got, err := r.Resolve(context.Background(), gateway.RouteRequest{
				SandboxID: "s1", Profile: prof, Manifest: a, Candidates: []*extension.Manifest{a, b}, Load: tc.load,
			})
			if tc.want == (gateway.Route{}) {
				if !errors.Is(err, gateway.ErrNoRoute) {
					t.Fatalf("got %+v, %v; want no route", got, err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}

	t.Run("routes count until the load shows them", func(t *testing.T) {
		t.Parallel()
		r := &gateway.CapacityResolver{}
		l := load{has: map[string]bool{}}
		req := gateway.RouteRequest{Profile: prof, Manifest: a, Candidates: []*extension.Manifest{a, b}, Load: l}
		var got []gateway.Route
		for _, id := range []string{"s1", "s2", "s3"} {
			req.SandboxID = id
			rt, err := r.Resolve(context.Background(), req)
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, rt)
		}
		want := []gateway.Route{{Extension: "a", Host: "a1"}, {Extension: "a", Host: "a2"}, {Extension: "b", Host: "b1"}}
		for i := range want {
			if got[i] != want[i] {
				t.Fatalf("routes %+v, want %+v", got, want)
			}
		}
		// Once the load shows s1 (and counts it nowhere: destroyed), a
		// has room again.
		l.has["s1"] = true
		req.SandboxID = "s4"
		if rt, err := r.Resolve(context.Background(), req); err != nil || rt.Extension != "a" {
			t.Fatalf("after s1 left: %+v, %v", rt, err)
		}
	})
}

// TestRoutedProfile runs a profile with candidates through the gateway:
// its real inventory counts the sandboxes, the first candidate fills, the
// next takes over, and when both are full the sandbox is rejected with
// no_route.
func TestRoutedProfile(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{catalog: func(c *extension.Catalog) {
		small := manifest("small", 1, 0)
		big := manifest("big", 0, 1, "b1", "b2")
		big.Inputs["only_big"] = extension.InputSpec{Type: extension.TypeString}
		c.Extensions[small.Name], c.Extensions[big.Name] = small, big
		c.Profiles["spill"] = &extension.Profile{Slug: "spill",
			Candidates: []extension.Candidate{{Extension: "small"}, {Extension: "big"}}}
	}})
	ctx := testCtx(t)
	alice := e.client("alice")
	var got []string
	for range 3 {
		s, err := alice.Create(ctx, api.CreateRequest{Profile: "spill", Inputs: map[string]string{"delay": "1s"}}, "")
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, s.Extension+"@"+s.Host)
		if s.Inputs["delay"] != "1s" {
			t.Errorf("inputs %v lost on the way", s.Inputs)
		}
	}
	if want := "small@localhost big@b1 big@b2"; strings.Join(got, " ") != want {
		t.Fatalf("placements %v, want %s", got, want)
	}
	r := e.do(t, http.MethodPost, "/v1/sandboxes", "alice", `{"profile":"spill"}`, nil)
	if r.Status != http.StatusServiceUnavailable {
		t.Fatalf("create with every candidate full: %d %s", r.Status, r.Body)
	}
	id := strings.TrimPrefix(r.Problem.Instance, "/v1/sandboxes/")
	rec, _ := e.record(t, id)
	if rec.State != event.StateRejected || rec.Code != gateway.CodeNoRoute || !strings.Contains(rec.Reason, "full") {
		t.Fatalf("sandbox with nowhere to go: %s %s %q", rec.State, rec.Code, rec.Reason)
	}

	// An input only one candidate knows is refused up front, naming the
	// candidate that would not take it.
	r = e.do(t, http.MethodPost, "/v1/sandboxes", "alice", `{"profile":"spill","inputs":{"only_big":"x"}}`, nil)
	if r.Status != http.StatusUnprocessableEntity || !strings.Contains(string(r.Body), "extension small") {
		t.Fatalf("input one candidate lacks: %d %s", r.Status, r.Body)
	}
}

// TestCreditsWithoutBackend: a gateway without a Credits backend answers
// its credits endpoints 503, after authentication.
func TestCreditsWithoutBackend(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	cases := []struct {
		name, method, path, who string
		status                  int
	}{
		{"balance", http.MethodGet, "/v1/credits/balance", "alice", http.StatusServiceUnavailable},
		{"no key", http.MethodGet, "/v1/credits/balance", "", http.StatusUnauthorized},
		{"another's balance", http.MethodGet, "/v1/credits/balance?consumer=bob", "alice", http.StatusForbidden},
		{"grant as consumer", http.MethodPost, "/v1/credits/grants", "alice", http.StatusForbidden},
		{"bad since", http.MethodGet, "/v1/credits/ledger?since=yesterday", "alice", http.StatusBadRequest},
		{"to before from", http.MethodGet, "/v1/credits/usage?from=2025-01-02T00:00:00Z&to=2025-01-01T00:00:00Z", "root", http.StatusBadRequest},
		{"wrong method", http.MethodDelete, "/v1/credits/ledger", "alice", http.StatusMethodNotAllowed},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			body := ""
			if tc.method == http.MethodPost {
				body = `{"consumer":"alice","amount":1}`
			}
			r := e.do(t, tc.method, tc.path, tc.who, body, nil)
			if r.Status != tc.status {
				t.Fatalf("%s %s: %d %s, want %d", tc.method, tc.path, r.Status, r.Body, tc.status)
			}
		})
	}
}

// TestFailingCandidate: a candidate whose last sandboxes all failed is
// passed over, as the gateway's inventory sees them, until one succeeds.
func TestFailingCandidate(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{catalog: func(c *extension.Catalog) {
		c.Extensions["flaky"], c.Extensions["steady"] = manifest("flaky", 0, 0), manifest("steady", 0, 0)
		c.Profiles["spill"] = &extension.Profile{Slug: "spill",
			Candidates: []extension.Candidate{{Extension: "flaky"}, {Extension: "steady"}}}
	}})
	ctx := testCtx(t)
	alice := e.client("alice")
	create := func() *api.Sandbox {
		t.Helper()
		s, err := alice.Create(ctx, api.CreateRequest{Profile: "spill"}, "")
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	// seen waits until the gateway's listing (its inventory) shows n
	// sandboxes in state st.
	seen := func(st event.State, n int) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			list, err := alice.List(ctx, api.ListFilter{State: string(st), Profile: "spill"})
			if err != nil {
				t.Fatal(err)
			}
			if len(list) == n {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("listing shows %d %s sandboxes, want %d", len(list), st, n)
			}
			timer := time.NewTimer(20 * time.Millisecond)
			<-timer.C
		}
	}
	var flaky []*api.Sandbox
	for range 4 {
		s := create()
		if s.Extension != "flaky" {
			t.Fatalf("sandbox went to %s before any failure", s.Extension)
		}
		flaky = append(flaky, s)
	}
	for _, s := range flaky[:3] {
		e.advance(t, s.ID, event.StateProvisioning, event.StateFailed)
	}
	seen(event.StateFailed, 3)
	if s := create(); s.Extension != "steady" {
		t.Fatalf("after 3 failures on flaky, a sandbox went to %s", s.Extension)
	}
	// The sandbox placed on flaky before the failures becomes ready: the
	// latest outcome is a success, so flaky is healthy again.
	e.advance(t, flaky[3].ID, event.StateProvisioning, event.StateReady)
	seen(event.StateReady, 1)
	if s := create(); s.Extension != "flaky" {
		t.Fatalf("after a success on flaky, a sandbox went to %s", s.Extension)
	}
}
