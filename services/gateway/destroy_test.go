package gateway_test

import (
	"net/http"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/services/gateway"
)

func TestDestroy(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	ctx := testCtx(t)
	alice := e.client("alice")
	sb, err := alice.Create(ctx, api.CreateRequest{Profile: "echo"}, "")
	if err != nil {
		t.Fatal(err)
	}
	destroys := func() []stored {
		return e.messages(t, event.StreamCommands, event.CommandSubject("echo", event.VerbDestroy, sb.Consumer, sb.ID))
	}

	got, err := alice.Destroy(ctx, sb.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != sb.ID || got.State != event.StateRequested {
		t.Fatalf("destroy answered %+v", got)
	}
	cmds := destroys()
	if len(cmds) != 1 {
		t.Fatalf("%d destroy commands, want 1", len(cmds))
	}
	ev := cmds[0].Event
	var d event.Destroy
	if err := event.DataAs(ev, &d); err != nil {
		t.Fatal(err)
	}
	if ev.Type() != string(event.TypeDestroy) || ev.ID() != sb.ID+".destroy" || ev.Subject() != sb.ID ||
		d.SandboxID != sb.ID || d.Reason != event.ReasonRequested || d.RequestedBy != "alice" || d.Extension != "echo" || d.Host != sb.Host {
		t.Fatalf("destroy command %s %s: %+v", ev.Type(), ev.ID(), d)
	}

	// Asking again before anything happened publishes the same command,
	// which the stream keeps once.
	if _, err := alice.Destroy(ctx, sb.ID); err != nil {
		t.Fatal(err)
	}
	if n := len(destroys()); n != 1 {
		t.Fatalf("%d destroy commands after a repeated destroy, want 1", n)
	}

	// Once destroyed, a destroy is a no-op 202 with the current state.
	e.advance(t, sb.ID, event.StateProvisioning, event.StateReady, event.StateDestroying, event.StateDestroyed)
	before := e.lastSeqs(t)
	got, err = alice.Destroy(ctx, sb.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.State != event.StateDestroyed {
		t.Fatalf("destroy of a destroyed sandbox answered state %s", got.State)
	}
	if now := e.lastSeqs(t); now[event.StreamCommands] != before[event.StreamCommands] {
		t.Fatal("destroying a destroyed sandbox published a command")
	}
}

func TestDestroyNoCommandWhenOnItsWay(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	ctx := testCtx(t)
	alice := e.client("alice")
	cases := []struct {
		name   string
		states []event.State
	}{
		{"destroying", []event.State{event.StateProvisioning, event.StateReady, event.StateDestroying}},
		{"destroyed", []event.State{event.StateProvisioning, event.StateReady, event.StateDestroying, event.StateDestroyed}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			sb, err := alice.Create(ctx, api.CreateRequest{Profile: "echo"}, "")
			if err != nil {
				t.Fatal(err)
			}
			e.advance(t, sb.ID, tc.states...)
			r := e.do(t, http.MethodDelete, "/v1/sandboxes/"+sb.ID, "alice", "", nil)
			if r.Status != http.StatusAccepted {
				t.Fatalf("status %d", r.Status)
			}
			var got api.Sandbox
			mustUnmarshal(t, r.Body, &got)
			if want := tc.states[len(tc.states)-1]; got.State != want {
				t.Fatalf("state %s, want %s", got.State, want)
			}
			if n := len(e.messages(t, event.StreamCommands, event.CommandSubject("echo", event.VerbDestroy, sb.Consumer, sb.ID))); n != 0 {
				t.Fatalf("%d destroy commands, want none", n)
			}
		})
	}
}

func TestIdempotency(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	ctx := testCtx(t)
	alice, bob := e.client("alice"), e.client("bob")
	req := api.CreateRequest{Profile: "echo", Labels: map[string]string{"run": "1"}}

	first, err := alice.Create(ctx, req, "key-1")
	if err != nil {
		t.Fatal(err)
	}
	again, err := alice.Create(ctx, req, "key-1")
	if err != nil {
		t.Fatal(err)
	}
	if again.ID != first.ID {
		t.Fatalf("same key gave %s then %s", first.ID, again.ID)
	}
	creates := func() int { return len(e.messages(t, event.StreamCommands, "sandboxer.cmd.*.create.*.*")) }
	if n := creates(); n != 1 {
		t.Fatalf("%d create commands, want 1", n)
	}

	other := req
	other.TTL = "10m"
	_, err = alice.Create(ctx, other, "key-1")
	if p := problemOf(t, err); p.Status != http.StatusUnprocessableEntity || p.Detail != "idempotency key reused with a different request" {
		t.Fatalf("reused key with another body: %d %q", p.Status, p.Detail)
	}

	// Keys belong to their consumer.
	bobs, err := bob.Create(ctx, req, "key-1")
	if err != nil {
		t.Fatal(err)
	}
	if bobs.ID == first.ID {
		t.Fatal("bob's key-1 returned alice's sandbox")
	}

	// Concurrent requests with one key make one sandbox.
	const n = 8
	var wg sync.WaitGroup
	ids := make([]string, n)
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sb, err := alice.Create(ctx, api.CreateRequest{Profile: "echo"}, "burst")
			errs[i] = err
			if err == nil {
				ids[i] = sb.ID
			}
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
	}
	if uniq := slices.Compact(slices.Sorted(slices.Values(ids))); len(uniq) != 1 {
		t.Fatalf("one key made sandboxes %v", ids)
	}
	if n := creates(); n != 3 {
		t.Fatalf("%d create commands, want 3 (alice's two keys, bob's one)", n)
	}
}

// TestIdempotencyAbandoned: a key claimed by a request that never
// recorded its sandbox (its gateway died, or its release was lost in a
// partition) is answered 409 while it may still be in progress, and taken
// over once it is older than twice WriteTimeout: the retry makes one
// sandbox, and repeating it returns that one.
func TestIdempotencyAbandoned(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{opts: func(o *gateway.Options) {
		o.WriteTimeout = time.Second
		o.IdempotencyWait = 100 * time.Millisecond
	}})
	ctx := testCtx(t)
	req := api.CreateRequest{Profile: "echo"}
	kv, err := e.js.KeyValue(ctx, bus.BucketIdempotency)
	if err != nil {
		t.Fatal(err)
	}
	key, val := gateway.IdempotencyEntry("alice", "lost", "sbx-neverrecorded", req)
	if _, err := kv.Create(ctx, key, val); err != nil {
		t.Fatal(err)
	}
	alice := e.client("alice")
	if _, err := alice.Create(ctx, req, "lost"); problemOf(t, err).Status != http.StatusConflict {
		t.Fatalf("a fresh claim with no record: %v, want 409 in progress", err)
	}
	var id string
	await(t, "the abandoned key taken over", func() bool {
		sb, err := alice.Create(ctx, req, "lost")
		if err != nil {
			if p := problemOf(t, err); p.Status != http.StatusConflict {
				t.Fatalf("retry: %v", err)
			}
			return false
		}
		id = sb.ID
		return true
	})
	if id == "sbx-neverrecorded" {
		t.Fatal("the retry answered the sandbox that was never recorded")
	}
	again, err := alice.Create(ctx, req, "lost")
	if err != nil || again.ID != id {
		t.Fatalf("repeat after the takeover: %+v %v, want %s", again, err, id)
	}
	if n := len(e.messages(t, event.StreamCommands, "sandboxer.cmd.*.create.alice.*")); n != 1 {
		t.Fatalf("%d create commands, want 1", n)
	}
}
