package metering_test

import (
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sand-boxer/sandboxer/pkg/credits"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/services/metering"
)

// lastOn is the last message on subject in stream, or nil.
func (e *env) lastOn(t *testing.T, stream, subject string) *jetstream.RawStreamMsg {
	t.Helper()
	ctx := testCtx(t)
	s, err := e.js.Stream(ctx, stream)
	if err != nil {
		t.Fatal(err)
	}
	m, err := s.GetLastMsgForSubject(ctx, subject)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// timersIdle waits until metering's timer consumer has nothing pending or
// in flight and no hold deadline of sbs is still scheduled: every
// deadline fired and was handled.
func (e *env) timersIdle(t *testing.T, sbs ...string) {
	t.Helper()
	ctx := testCtx(t)
	waitFor(t, 20*time.Second, "hold deadlines fired and handled", func() (bool, error) {
		for _, sb := range sbs {
			if m := e.lastOn(t, event.StreamTimers, event.HoldDeadlineScheduleSubject(sb)); m != nil && m.Header.Get(jetstream.ScheduleHeader) != "" {
				return false, fmt.Errorf("the deadline of %s is still scheduled", sb)
			}
		}
		c, err := e.js.Consumer(ctx, event.StreamTimers, metering.ConsumerAccrual)
		if err != nil {
			return false, err
		}
		info, err := c.Info(ctx)
		if err != nil {
			return false, err
		}
		return info.NumPending == 0 && info.NumAckPending == 0, fmt.Errorf("%d pending, %d in flight", info.NumPending, info.NumAckPending)
	})
}

// fireDeadline publishes sb's hold deadline straight to its fire
// subject, as a replayed dead letter or a redelivery would bring it.
func (e *env) fireDeadline(t *testing.T, r event.Ref) {
	t.Helper()
	ev, err := event.New(metering.TypeHoldDeadline, metering.Source, r.SandboxID, fmt.Sprintf("%s.hold_deadline.replay.%d", r.SandboxID, time.Now().UnixNano()),
		metering.HoldDeadline{Consumer: r.Consumer, Sandbox: r.SandboxID, Profile: r.Profile, Extension: r.Extension, Deadline: time.Now().UTC()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.pub.Publish(testCtx(t), event.HoldDeadlineFireSubject(r.SandboxID), ev); err != nil {
		t.Fatal(err)
	}
}

// TestHoldDeadline: a hold whose sandbox never started (the gateway died
// between admission and the create command) is released after its
// deadline, through a rejected event (hold_expired) published only if the
// sandbox has no lifecycle event; one whose sandbox started keeps its
// hold; one that became ready has its deadline purged; a deadline
// delivered again changes nothing.
func TestHoldDeadline(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	reg := prometheus.NewRegistry()
	e.start(t, metering.Options{HoldDeadline: time.Second, Metrics: reg})
	ctx := testCtx(t)
	if _, err := e.client.Grant(ctx, credits.GrantRequest{Consumer: "dev", Amount: 1000, ID: "g"}); err != nil {
		t.Fatal(err)
	}
	lost, started, running := ref("dev", "sb-lost", profCheap), ref("dev", "sb-started", profCheap), ref("dev", "sb-running", profCheap)
	for _, r := range []event.Ref{lost, started, running} {
		if _, err := e.client.Hold(ctx, credits.HoldRequest{SandboxID: r.SandboxID, Consumer: "dev", Profile: r.Profile, Extension: r.Extension, TTLSeconds: 60}); err != nil {
			t.Fatal(err)
		}
		if m := e.lastOn(t, event.StreamTimers, event.HoldDeadlineScheduleSubject(r.SandboxID)); m == nil || m.Header.Get("Nats-Schedule-Target") != event.HoldDeadlineFireSubject(r.SandboxID) {
			t.Fatalf("hold of %s: deadline schedule %v", r.SandboxID, m)
		}
	}
	// started's worker announced provisioning (metering does not consume
	// it); running became ready.
	pe, err := event.New(event.TypeProvisioning, "/test", started.SandboxID, started.SandboxID+".provisioning", event.Provisioning{Ref: started, Worker: "w1", Attempt: 1})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.pub.Publish(ctx, started.LifecycleSubject(event.StateProvisioning), pe); err != nil {
		t.Fatal(err)
	}
	e.publish(t, running, event.StateReady, time.Now().UTC(), false)

	var rejected *event.Event
	waitFor(t, 20*time.Second, "the lost sandbox rejected", func() (bool, error) {
		m := e.lastOn(t, event.StreamLifecycle, lost.LifecycleSubject(event.StateRejected))
		if m == nil {
			return false, errors.New("no rejected event")
		}
		_, ev, err := event.Decode(ctx, m.Header, m.Data)
		rejected = ev
		return err == nil, err
	})
	var d event.Rejected
	if err := event.DataAs(rejected, &d); err != nil {
		t.Fatal(err)
	}
	if d.Code != metering.CodeHoldExpired || d.Reason == "" || d.Extension != extSelf || d.Profile != profCheap {
		t.Errorf("rejected event %+v", d)
	}
	e.timersIdle(t, lost.SandboxID, started.SandboxID, running.SandboxID)
	e.drained(t)
	s := e.snap(t, "dev")
	checkInvariants(t, s)
	if _, open := s.holds[lost.SandboxID]; open {
		t.Errorf("the lost sandbox's hold is still open")
	}
	for _, r := range []event.Ref{started, running} {
		if _, open := s.holds[r.SandboxID]; !open {
			t.Errorf("the hold of %s, whose lifecycle started, was closed", r.SandboxID)
		}
		if m := e.lastOn(t, event.StreamLifecycle, r.LifecycleSubject(event.StateRejected)); m != nil {
			t.Errorf("%s was rejected after its lifecycle started", r.SandboxID)
		}
	}
	released := func(s []credits.Entry) int {
		n := 0
		for _, en := range s {
			if en.Kind == credits.EntryRelease && en.Sandbox == lost.SandboxID {
				n++
			}
		}
		return n
	}
	if n := released(s.entries); n != 1 {
		t.Errorf("%d release entries for the lost sandbox, want 1", n)
	}
	if v, ok := value(t, reg, "sandboxer_metering_holds_expired_total"); !ok || v != 1 {
		t.Errorf("holds_expired_total = %v (found %v), want 1", v, ok)
	}
	if !slices.ContainsFunc(e.meteringEvents(t), func(ev *event.Event) bool {
		return ev.Type() == string(credits.KindReleased.Type()) && ev.Subject() == lost.SandboxID
	}) {
		t.Errorf("no released event for the lost sandbox")
	}

	// Delivered again (a replayed dead letter): nothing changes.
	for _, r := range []event.Ref{lost, started, running} {
		e.fireDeadline(t, r)
	}
	e.timersIdle(t)
	e.drained(t)
	s2 := e.snap(t, "dev")
	if len(s2.entries) != len(s.entries) || s2.acct.Held != s.acct.Held || s2.acct.Balance != s.acct.Balance {
		t.Errorf("a replayed deadline changed the account: %v -> %v", kinds(s.entries), kinds(s2.entries))
	}
	for _, r := range []event.Ref{started, running} {
		if m := e.lastOn(t, event.StreamLifecycle, r.LifecycleSubject(event.StateRejected)); m != nil {
			t.Errorf("%s was rejected by a replayed deadline", r.SandboxID)
		}
	}
	validateStream(t, e)
}
