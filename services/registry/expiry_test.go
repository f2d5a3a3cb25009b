package registry_test

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/inventory"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
	"github.com/sand-boxer/sandboxer/services/registry"
)

// TestExpiryAcrossRestart: a sandbox with a 3s TTL becomes ready; the
// server and the registry restart before the deadline; the schedule still
// fires: the record moves to expired, the expired event and a destroy
// command land on their streams, and the destroy (answered here as a
// provisioner would) takes the sandbox to destroyed.
func TestExpiryAcrossRestart(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	e := start(t, srv)
	const id = "sbx-ttl-restart"

	e.publishState(t, workerA, id, event.StateProvisioning, time.Time{})
	e.awaitRecord(t, id, 5*time.Second, inState(event.StateProvisioning))
	expiresAt := time.Now().UTC().Add(3 * time.Second)
	e.publishState(t, workerA, id, event.StateReady, expiresAt)
	e.awaitRecord(t, id, 5*time.Second, inState(event.StateReady))
	var sched *jetstream.RawStreamMsg
	eventually(t, 5*time.Second, func() (bool, string) {
		sched = e.lastMsg(t, event.StreamTimers, event.ExpiryScheduleSubject(id))
		return sched != nil, "no schedule stored"
	})
	if got, want := sched.Header.Get("Nats-Schedule-Target"), event.ExpiryFireSubject(id); got != want {
		t.Errorf("schedule target %q, want %q", got, want)
	}
	if got := sched.Header.Get("Nats-Schedule"); !strings.HasPrefix(got, "@at ") {
		t.Errorf("schedule %q, want @at", got)
	}
	if got := sched.Header.Get("ce-type"); got != string(event.TypeExpiry) {
		t.Errorf("schedule carries ce-type %q, want %s", got, event.TypeExpiry)
	}

	// Restart everything between ready and the deadline.
	t.Logf("schedule stored %s before the deadline", time.Until(expiresAt))
	e.stop(t)
	srv.Shutdown()
	t.Logf("old server stopped %s before the deadline", time.Until(expiresAt))
	srv2 := natstest.StartAt(t, srv.DataDir)
	e2 := start(t, srv2)
	t.Logf("restarted %s before the deadline", time.Until(expiresAt))
	if !time.Now().Before(expiresAt) {
		t.Fatalf("restart ended after the deadline: the test proves nothing")
	}
	if rec, _, err := readRecord(t, e2, id); err != nil || rec.State != event.StateReady {
		t.Fatalf("after restart, before the deadline: record %+v, %v; want ready", rec, err)
	}

	rec := e2.awaitRecord(t, id, 10*time.Second, inState(event.StateExpired))
	expired := transitionAt(rec, event.StateExpired)
	t.Logf("expired %s after the deadline", expired.Sub(expiresAt))
	if expired.Before(expiresAt) {
		t.Errorf("expired at %s, before the deadline %s", expired, expiresAt)
	}
	if rec.Reason != registry.ExpiredReason {
		t.Errorf("expired record reason %q", rec.Reason)
	}

	var destroy *jetstream.RawStreamMsg
	eventually(t, 5*time.Second, func() (bool, string) {
		destroy = e2.lastMsg(t, event.StreamCommands, event.CommandSubject(testExt, event.VerbDestroy, "team-a", id))
		return destroy != nil, "no destroy command"
	})
	_, cmd, err := event.Decode(t.Context(), destroy.Header, destroy.Data)
	if err != nil {
		t.Fatal(err)
	}
	var d event.Destroy
	if err := event.DataAs(cmd, &d); err != nil {
		t.Fatal(err)
	}
	if cmd.Type() != string(event.TypeDestroy) || cmd.Source() != registry.Source || d.Reason != event.ReasonExpired || d.SandboxID != id || d.Extension != testExt {
		t.Errorf("destroy command %s from %s: %+v", cmd.Type(), cmd.Source(), d)
	}
	// The expired event and the destroy command go out together, to two
	// streams: the destroy found, the event may still be on its way.
	var evt *jetstream.RawStreamMsg
	eventually(t, 5*time.Second, func() (bool, string) {
		evt = e2.lastMsg(t, event.StreamLifecycle, event.LifecycleSubject("team-a", testExt, id, event.StateExpired))
		return evt != nil, "no expired event on the lifecycle stream"
	})
	_, xe, err := event.Decode(t.Context(), evt.Header, evt.Data)
	if err != nil {
		t.Fatal(err)
	}
	var x event.Expired
	if err := event.DataAs(xe, &x); err != nil {
		t.Fatal(err)
	}
	if x.Reason != registry.ExpiredReason || xe.ID() != id+".expired" {
		t.Errorf("expired event %s: %+v", xe.ID(), x)
	}

	t.Logf("destroy command checked %s after the deadline", time.Since(expiresAt))
	// The provisioner's answer to the destroy.
	last := e2.publishState(t, workerA, id, event.StateDestroying, time.Time{}) // the registry's last
	e2.awaitRecord(t, id, 5*time.Second, inState(event.StateDestroying))
	e2.publishState(t, workerA, id, event.StateDestroyed, time.Time{})
	rec = e2.awaitRecord(t, id, 5*time.Second, inState(event.StateDestroyed))
	want := []event.State{event.StateProvisioning, event.StateReady, event.StateExpired, event.StateDestroying, event.StateDestroyed}
	if got := states(rec); !slices.Equal(got, want) {
		t.Errorf("history %v, want %v", got, want)
	}
	e2.awaitAcked(t, event.StreamLifecycle, registry.ConsumerInventory, last)
	if m := e2.schedule(t, event.ExpiryScheduleSubject(id)); m != nil {
		t.Errorf("schedule still stored after expiry: seq %d", m.Sequence)
	}
	eventually(t, 5*time.Second, func() (bool, string) {
		m := e2.lastMsg(t, event.StreamTimers, event.ExpiryFireSubject(id))
		return m == nil, "fired timer not consumed"
	})
}

// TestExpiryInThePast: a ready event whose expiry already passed (the
// registry was down) expires at once.
func TestExpiryInThePast(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	e := start(t, srv)
	const id = "sbx-ttl-past"
	e.publishState(t, workerA, id, event.StateProvisioning, time.Time{})
	e.publishState(t, workerA, id, event.StateReady, time.Now().UTC().Add(-time.Minute))
	e.awaitRecord(t, id, 10*time.Second, inState(event.StateExpired))
	eventually(t, 5*time.Second, func() (bool, string) {
		m := e.lastMsg(t, event.StreamCommands, event.CommandSubject(testExt, event.VerbDestroy, "team-a", id))
		return m != nil, "no destroy command"
	})
}

// TestDestroyCancelsSchedule: once a sandbox is past ready, its expiry
// schedule is gone from the timers stream, so nothing fires later. The
// event that moves it past ready cancels it (a worker announces
// destroying before every teardown, so destroyed never follows ready
// directly); destroyed itself is not delivered to the registry.
func TestDestroyCancelsSchedule(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	e := start(t, srv)
	tests := []struct {
		name  string
		after []event.State
	}{
		{"destroying then destroyed", []event.State{event.StateDestroying, event.StateDestroyed}},
		{"destroying only", []event.State{event.StateDestroying}},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			id := fmt.Sprintf("sbx-cancel-%d", i)
			e.publishState(t, workerA, id, event.StateProvisioning, time.Time{})
			e.publishState(t, workerA, id, event.StateReady, time.Now().UTC().Add(time.Hour))
			eventually(t, 5*time.Second, func() (bool, string) {
				return e.schedule(t, event.ExpiryScheduleSubject(id)) != nil, "no schedule stored"
			})
			var last uint64
			for _, s := range tc.after {
				seq := e.publishState(t, workerA, id, s, time.Time{})
				if s != event.StateDestroyed { // not the registry's
					last = seq
				}
			}
			e.awaitRecord(t, id, 5*time.Second, inState(tc.after[len(tc.after)-1]))
			e.awaitAcked(t, event.StreamLifecycle, registry.ConsumerInventory, last)
			if m := e.schedule(t, event.ExpiryScheduleSubject(id)); m != nil {
				t.Errorf("schedule of %s still stored (seq %d)", id, m.Sequence)
			}
		})
	}
}

// TestReadyRacingDestroy: the ready, destroying and destroyed events of
// many sandboxes published back to back, projected concurrently, leave no
// schedule behind whatever the order the registry handles them in.
func TestReadyRacingDestroy(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	e := start(t, srv)
	const n = 20
	var last uint64
	for i := range n {
		id := fmt.Sprintf("sbx-race-%d", i)
		e.publishState(t, workerA, id, event.StateReady, time.Now().UTC().Add(time.Hour))
		last = e.publishState(t, workerA, id, event.StateDestroying, time.Time{})
		e.publishState(t, workerA, id, event.StateDestroyed, time.Time{})
	}
	e.awaitAcked(t, event.StreamLifecycle, registry.ConsumerInventory, last)
	ctx := testCtx(t, 5*time.Second)
	s, err := e.js.Stream(ctx, event.StreamTimers)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(event.ExpiryScheduleSubject("*")))
	if err != nil {
		t.Fatal(err)
	}
	var left []string
	for subj := range info.State.Subjects {
		if e.schedule(t, subj) != nil {
			left = append(left, subj)
		}
	}
	if len(left) != 0 {
		t.Errorf("schedules left behind: %v", left)
	}
	for i := range n {
		id := fmt.Sprintf("sbx-race-%d", i)
		rec := e.awaitRecord(t, id, 5*time.Second, inState(event.StateDestroyed))
		checkOnce(t, rec)
	}
}

// TestLateFire: a timer that fires for a sandbox that is not ready any more
// (or never was known) is acknowledged and produces nothing.
func TestLateFire(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	e := start(t, srv)
	tests := []struct {
		name  string
		id    string
		path  []event.State
		final event.State
	}{
		{"destroyed sandbox", "sbx-late-a", []event.State{event.StateProvisioning, event.StateReady, event.StateDestroying, event.StateDestroyed}, event.StateDestroyed},
		{"destroying sandbox", "sbx-late-b", []event.State{event.StateProvisioning, event.StateReady, event.StateDestroying}, event.StateDestroying},
		{"failed sandbox", "sbx-late-c", []event.State{event.StateProvisioning, event.StateFailed}, event.StateFailed},
		{"unknown sandbox", "sbx-late-d", nil, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			for _, s := range tc.path {
				e.publishState(t, workerA, tc.id, s, time.Time{})
			}
			var before *sandbox.Record
			if tc.final != "" {
				e.awaitRecord(t, tc.id, 5*time.Second, inState(tc.final))
				var err error
				if before, _, err = readRecord(t, e, tc.id); err != nil {
					t.Fatal(err)
				}
			}
			fire, err := event.New(event.TypeExpiry, registry.Source, tc.id, tc.id+".expiry", event.Expiry{
				Ref:       event.Ref{SandboxID: tc.id, Consumer: "team-a", Profile: "echo", Extension: testExt},
				ExpiresAt: time.Now().UTC(),
			})
			if err != nil {
				t.Fatal(err)
			}
			// As the server delivers a fired schedule: no Nats-Msg-Id.
			msg, err := event.Encode(t.Context(), event.ExpiryFireSubject(tc.id), fire)
			if err != nil {
				t.Fatal(err)
			}
			msg.Header.Del(event.HeaderMsgID)
			ack, err := e.js.PublishMsg(testCtx(t, 5*time.Second), msg)
			if err != nil {
				t.Fatal(err)
			}
			e.awaitAcked(t, event.StreamTimers, registry.ConsumerTimers, ack.Sequence)
			if m := e.lastMsg(t, event.StreamLifecycle, event.LifecycleSubject("team-a", testExt, tc.id, event.StateExpired)); m != nil {
				t.Error("a late fire published an expired event")
			}
			if m := e.lastMsg(t, event.StreamCommands, event.CommandSubject(testExt, event.VerbDestroy, "team-a", tc.id)); m != nil {
				t.Error("a late fire published a destroy command")
			}
			after, _, err := readRecord(t, e, tc.id)
			if err != nil {
				t.Fatal(err)
			}
			if (before == nil) != (after == nil) || (after != nil && !slices.Equal(states(after), states(before))) {
				t.Errorf("a late fire changed the record: %+v -> %+v", before, after)
			}
		})
	}
}

// readRecord reads a sandbox's record from its events, nil when it has
// none.
func readRecord(t *testing.T, e *env, id string) (*sandbox.Record, uint64, error) {
	t.Helper()
	rec, err := inventory.Read(testCtx(t, 5*time.Second), e.js.Conn(), event.SandboxFilter(id))
	if err != nil || rec == nil {
		return nil, 0, err
	}
	return rec, rec.Seq, nil
}

// transitionAt is when rec entered s.
func transitionAt(rec *sandbox.Record, s event.State) time.Time {
	for _, tr := range rec.History {
		if tr.State == s {
			return tr.At
		}
	}
	return time.Time{}
}
