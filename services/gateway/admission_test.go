package gateway_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/services/gateway"
)

func TestBackPressure(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{topo: &bus.Topology{CommandsMaxMsgs: 1}})
	ctx := testCtx(t)
	alice := e.client("alice")
	first, err := alice.Create(ctx, api.CreateRequest{Profile: "echo"}, "")
	if err != nil {
		t.Fatal(err)
	}

	r := e.do(t, http.MethodPost, "/v1/sandboxes", "alice", `{"profile":"echo"}`, map[string]string{"Idempotency-Key": "full"})
	if r.Status != http.StatusServiceUnavailable || r.Header.Get("Retry-After") == "" {
		t.Fatalf("create on a full stream: %d, Retry-After %q: %s", r.Status, r.Header.Get("Retry-After"), r.Body)
	}
	id, ok := strings.CutPrefix(r.Problem.Instance, "/v1/sandboxes/")
	if !ok || !event.ValidName(id) {
		t.Fatalf("problem instance %q does not name the sandbox", r.Problem.Instance)
	}
	// The sandbox is not left as requested: it is rejected, and said so.
	rec, _ := e.record(t, id)
	if rec.State != event.StateRejected || rec.Code != gateway.CodeBackPressure {
		t.Fatalf("refused sandbox is %s (%s), want rejected (%s)", rec.State, rec.Code, gateway.CodeBackPressure)
	}
	got, err := alice.Get(ctx, id)
	if err != nil || got.State != event.StateRejected {
		t.Fatalf("get refused sandbox: %+v %v", got, err)
	}
	evs := e.messages(t, event.StreamLifecycle, event.SandboxFilter(id))
	if len(evs) != 2 || evs[0].Event.Type() != string(event.TypeRequested) || evs[1].Event.Type() != string(event.TypeRejected) {
		t.Fatalf("lifecycle of the refused sandbox: %+v", evs)
	}
	if cmds := e.messages(t, event.StreamCommands, event.SubjectCommands); len(cmds) != 1 || !strings.HasSuffix(cmds[0].Subject, first.ID) {
		t.Fatalf("commands: %+v", cmds)
	}

	// A destroy on the full stream is refused the same way.
	_, err = alice.Destroy(ctx, first.ID)
	if p := problemOf(t, err); p.Status != http.StatusServiceUnavailable {
		t.Fatalf("destroy on a full stream: %d", p.Status)
	}

	// The refused request did not happen: once there is room, its key
	// makes a new sandbox.
	stream, err := e.js.Stream(ctx, event.StreamCommands)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Purge(ctx); err != nil {
		t.Fatal(err)
	}
	retry, err := alice.Create(ctx, api.CreateRequest{Profile: "echo"}, "full")
	if err != nil {
		t.Fatal(err)
	}
	if retry.ID == id || retry.State != event.StateRequested {
		t.Fatalf("retry after room: %+v", retry)
	}
}

func TestRefusals(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	admitted := map[string]gateway.AdmitRequest{}
	e := newEnv(t, envConfig{opts: func(o *gateway.Options) {
		static := &gateway.StaticResolver{}
		o.Resolver = gateway.ResolverFunc(func(ctx context.Context, req gateway.RouteRequest) (gateway.Route, error) {
			switch req.Consumer {
			case "noroute":
				return gateway.Route{}, fmt.Errorf("all hosts drained: %w", gateway.ErrNoRoute)
			case "badroute":
				return gateway.Route{Extension: "echo", Host: "h1; rm -rf /"}, nil
			}
			return static.Resolve(ctx, req)
		})
		o.Admitter = gateway.AdmitterFunc(func(_ context.Context, req gateway.AdmitRequest) (string, error) {
			switch req.Consumer {
			case "nocredit":
				return "", fmt.Errorf("balance 0 < quote 60: %w", gateway.ErrInsufficientCredits)
			case "badadmit":
				return "", errors.New("metering unreachable")
			}
			mu.Lock()
			defer mu.Unlock()
			admitted[req.SandboxID] = req
			return "hold-" + req.SandboxID, nil
		})
	}})
	ctx := testCtx(t)

	// Admitted: the hold travels in the command and the record.
	sb, err := e.client("alice").Create(ctx, api.CreateRequest{Profile: "echo", TTL: "90m"}, "")
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	ar, ok := admitted[sb.ID]
	mu.Unlock()
	if !ok || ar.Consumer != "alice" || ar.Profile.Slug != "echo" || ar.Route != (gateway.Route{Extension: "echo", Host: "h1"}) || ar.TTL.Minutes() != 90 {
		t.Fatalf("admit request %+v", ar)
	}
	cmds := e.messages(t, event.StreamCommands, event.CommandSubject("echo", event.VerbCreate, sb.Consumer, sb.ID))
	var c event.Create
	if len(cmds) != 1 || event.DataAs(cmds[0].Event, &c) != nil || c.Hold != "hold-"+sb.ID {
		t.Fatalf("create command %+v hold %q", cmds, c.Hold)
	}
	if rec, _ := e.record(t, sb.ID); rec.Hold != "hold-"+sb.ID {
		t.Fatalf("record hold %q", rec.Hold)
	}

	cases := []struct {
		consumer string
		status   int
		code     string // of the rejected event and record; "" for none
	}{
		{"nocredit", http.StatusPaymentRequired, gateway.CodeInsufficientCredits},
		{"noroute", http.StatusServiceUnavailable, gateway.CodeNoRoute},
		{"badroute", http.StatusServiceUnavailable, ""},
		{"badadmit", http.StatusServiceUnavailable, ""},
	}
	for _, tc := range cases {
		t.Run(tc.consumer, func(t *testing.T) {
			before := e.lastSeqs(t)
			r := e.do(t, http.MethodPost, "/v1/sandboxes", tc.consumer, `{"profile":"echo"}`, nil)
			if r.Status != tc.status {
				t.Fatalf("status %d, want %d: %s", r.Status, tc.status, r.Body)
			}
			after := e.lastSeqs(t)
			if after[event.StreamCommands] != before[event.StreamCommands] {
				t.Fatal("a refused request published a command")
			}
			if tc.code == "" {
				for name, seq := range after {
					if seq != before[name] {
						t.Fatalf("stream %s moved on a refusal without rejection", name)
					}
				}
				return
			}
			id := strings.TrimPrefix(r.Problem.Instance, "/v1/sandboxes/")
			evs := e.messages(t, event.StreamLifecycle, event.SandboxFilter(id))
			if len(evs) != 1 {
				t.Fatalf("%d lifecycle events for %q, want the rejection", len(evs), id)
			}
			var rj event.Rejected
			if err := event.DataAs(evs[0].Event, &rj); err != nil {
				t.Fatal(err)
			}
			if evs[0].Subject != event.LifecycleSubject(tc.consumer, "echo", id, event.StateRejected) || rj.Code != tc.code || rj.Consumer != tc.consumer {
				t.Fatalf("rejection on %s: %+v", evs[0].Subject, rj)
			}
			got, err := e.client(tc.consumer).Get(ctx, id)
			if err != nil || got.State != event.StateRejected || got.Code != tc.code {
				t.Fatalf("rejected sandbox reads %+v, %v", got, err)
			}
		})
	}
}

// TestRejectedRecordRetention: a sandbox the gateway rejected is listed
// for the retention, then no more; its GET still answers from its events,
// which the lifecycle stream keeps for its max age.
func TestRejectedRecordRetention(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{opts: func(o *gateway.Options) {
		o.Retention = time.Second
		o.Admitter = gateway.AdmitterFunc(func(context.Context, gateway.AdmitRequest) (string, error) {
			return "", fmt.Errorf("balance 0: %w", gateway.ErrInsufficientCredits)
		})
	}})
	ctx := testCtx(t)
	alice := e.client("alice")
	_, err := alice.Create(ctx, api.CreateRequest{Profile: "echo"}, "")
	p := problemOf(t, err)
	id, ok := strings.CutPrefix(p.Instance, "/v1/sandboxes/")
	if p.Status != http.StatusPaymentRequired || !ok {
		t.Fatalf("create without credit: %d %q", p.Status, p.Instance)
	}
	if rec, _ := e.record(t, id); rec.State != event.StateRejected {
		t.Fatalf("record is %s, want rejected", rec.State)
	}
	await(t, "the rejected record removed from the listing", func() bool {
		list, err := alice.List(ctx, api.ListFilter{})
		return err == nil && len(list) == 0
	})
	if got, err := alice.Get(ctx, id); err != nil || got.State != event.StateRejected {
		t.Fatalf("GET of the unlisted sandbox: %+v, %v; want it rejected", got, err)
	}
}
