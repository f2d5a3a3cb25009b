package gateway_test

import (
	"sync/atomic"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/services/gateway"
)

// TestDestroyRedrivesAStuckTeardown: a sandbox destroying whose latest
// attempt failed on every delivery shows the error, and a DELETE sends a
// fresh attempt (its own id) once; a DELETE again finds it under way and
// sends nothing, until that attempt fails too.
func TestDestroyRedrivesAStuckTeardown(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	ctx := testCtx(t)
	alice := e.client("alice")
	sb, err := alice.Create(ctx, api.CreateRequest{Profile: "echo"}, "")
	if err != nil {
		t.Fatal(err)
	}
	e.advance(t, sb.ID, event.StateProvisioning, event.StateReady, event.StateDestroying)
	destroys := func() []stored {
		return e.messages(t, event.StreamCommands, event.CommandSubject("echo", event.VerbDestroy, sb.Consumer, sb.ID))
	}
	// failTeardown announces that attempt n's teardown failed, as a
	// worker does.
	failTeardown := func(n int, msg string) {
		t.Helper()
		rec, seq := e.record(t, sb.ID)
		ev, err := event.New(event.TypeDestroying, "/sandboxer/provisioner", sb.ID, event.TeardownFailedID(sb.ID, n),
			event.Destroying{Ref: rec.Ref(), Reason: event.ReasonRequested, Attempt: n, Error: msg, Deliveries: 5})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := bus.NewPublisher(e.js).PublishTransition(ctx, rec.Ref().LifecycleSubject(event.StateDestroying), ev, rec.Ref().RefFilter(), seq); err != nil {
			t.Fatal(err)
		}
	}

	// Destroying and heard of lately: nothing to re-drive.
	if _, err := alice.Destroy(ctx, sb.ID); err != nil {
		t.Fatal(err)
	}
	if n := len(destroys()); n != 0 {
		t.Fatalf("%d destroy commands for a teardown under way, want none", n)
	}

	failTeardown(0, "backend unreachable")
	got, err := alice.Get(ctx, sb.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.State != event.StateDestroying || got.TeardownError != "backend unreachable" || got.TeardownFailedAt.IsZero() || got.DestroyAttempt != 0 {
		t.Fatalf("GET of a stuck teardown: %+v", got)
	}
	for range 3 {
		got, err = alice.Destroy(ctx, sb.ID)
		if err != nil {
			t.Fatal(err)
		}
	}
	if got.DestroyAttempt != 1 || got.TeardownError != "backend unreachable" {
		t.Errorf("DELETE answered %+v, want attempt 1 under way with the last error", got)
	}
	cmds := destroys()
	if len(cmds) != 1 {
		t.Fatalf("%d destroy commands after three DELETEs of a stuck teardown, want 1", len(cmds))
	}
	var d event.Destroy
	if err := event.DataAs(cmds[0].Event, &d); err != nil {
		t.Fatal(err)
	}
	if cmds[0].Event.ID() != event.DestroyID(sb.ID, 1) || d.Attempt != 1 || d.RequestedBy != "alice" || d.Reason != event.ReasonRequested {
		t.Fatalf("re-driven destroy %s: %+v", cmds[0].Event.ID(), d)
	}
	if rec, _ := e.record(t, sb.ID); rec.DestroyAttempt != 1 || rec.TeardownStuck() {
		t.Errorf("record after the re-drive: attempt %d, stuck %v", rec.DestroyAttempt, rec.TeardownStuck())
	}

	// Attempt 1 fails too: the next DELETE sends attempt 2.
	failTeardown(1, "still unreachable")
	if _, err := alice.Destroy(ctx, sb.ID); err != nil {
		t.Fatal(err)
	}
	cmds = destroys()
	if len(cmds) != 2 || cmds[1].Event.ID() != event.DestroyID(sb.ID, 2) {
		t.Fatalf("destroy commands after attempt 1 failed: %d, want attempt 2's after attempt 1's", len(cmds))
	}
}

// TestDestroyRedrivesASilentTeardown: a sandbox destroying with no news
// of its teardown for longer than the profile's teardown deadline (a
// destroy command lost) is re-driven by a DELETE, once; within the
// deadline it is not.
func TestDestroyRedrivesASilentTeardown(t *testing.T) {
	t.Parallel()
	var clock atomic.Int64
	clock.Store(time.Now().UnixNano())
	e := newEnv(t, envConfig{opts: func(o *gateway.Options) {
		o.Now = func() time.Time { return time.Unix(0, clock.Load()) }
	}})
	ctx := testCtx(t)
	alice := e.client("alice")
	sb, err := alice.Create(ctx, api.CreateRequest{Profile: "echo"}, "")
	if err != nil {
		t.Fatal(err)
	}
	e.advance(t, sb.ID, event.StateProvisioning, event.StateReady, event.StateDestroying)
	destroys := func() []stored {
		return e.messages(t, event.StreamCommands, event.CommandSubject("echo", event.VerbDestroy, sb.Consumer, sb.ID))
	}
	if _, err := alice.Destroy(ctx, sb.ID); err != nil {
		t.Fatal(err)
	}
	if n := len(destroys()); n != 0 {
		t.Fatalf("%d destroy commands within the teardown deadline, want none", n)
	}
	clock.Add(int64(extension.DefaultTeardownDeadline + time.Minute))
	for range 2 {
		if _, err := alice.Destroy(ctx, sb.ID); err != nil {
			t.Fatal(err)
		}
	}
	cmds := destroys()
	if len(cmds) != 1 || cmds[0].Event.ID() != event.DestroyID(sb.ID, 1) {
		t.Fatalf("destroy commands after the teardown deadline: %d, want attempt 1's once", len(cmds))
	}
}
