package metering_test

import (
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/credits"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/services/metering"
)

// TestAccrualTicksWhenTheHoldRunsShort: a self-hosted sandbox whose hold
// covers its usage gets one accrual tick, scheduled for the first second
// the lookahead reaches past what the hold covers, and no debit before
// it; that tick debits the usage so far, extends the hold through the
// lookahead and schedules the next tick.
func TestAccrualTicksWhenTheHoldRunsShort(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.start(t, metering.Options{AccrualInterval: time.Second}) // lookahead 2 s
	ctx := testCtx(t)
	const c, sb = "ticking", "sbx-ticking"
	if _, err := e.client.Grant(ctx, credits.GrantRequest{Consumer: c, Amount: 1000, ID: "g"}); err != nil {
		t.Fatal(err)
	}
	// 5 + 1 per second for 6 seconds: 11 held, covering 6 seconds.
	hr, err := e.client.Hold(ctx, credits.HoldRequest{SandboxID: sb, Consumer: c, Profile: profCheap, Extension: extSelf, TTLSeconds: 6})
	if err != nil || hr.Amount != 11 {
		t.Fatalf("hold %+v, %v; want 11 held", hr, err)
	}
	timers, err := e.js.Stream(ctx, event.StreamTimers)
	if err != nil {
		t.Fatal(err)
	}
	scheduledAt := func() time.Time {
		t.Helper()
		m, err := timers.GetLastMsgForSubject(ctx, event.AccrualScheduleSubject(sb))
		if err != nil {
			t.Fatalf("reading the accrual schedule: %v", err)
		}
		at, ok := strings.CutPrefix(m.Header.Get(jetstream.ScheduleHeader), "@at ")
		if !ok {
			t.Fatalf("accrual schedule %q, want one tick (@at)", m.Header.Get(jetstream.ScheduleHeader))
		}
		tm, err := time.Parse(time.RFC3339, at)
		if err != nil {
			t.Fatal(err)
		}
		return tm
	}
	r := ref(c, sb, profCheap)
	t0 := time.Now().UTC().Truncate(time.Second)
	e.publish(t, r, event.StateReady, t0, false)
	e.drained(t)
	// Covered through second 6; at second 5 the 2 s lookahead reaches 7.
	if at := scheduledAt(); !at.Equal(t0.Add(5 * time.Second)) {
		t.Fatalf("first tick at %s, want %s (ready %s)", at, t0.Add(5*time.Second), t0)
	}
	if s := e.snap(t, c); len(s.entries) != 2 {
		t.Fatalf("ledger of a covered sandbox before its tick: %v, want grant and hold only", kinds(s.entries))
	}
	var debit credits.Entry
	waitFor(t, 30*time.Second, "the tick's debit", func() (bool, error) {
		for _, en := range e.entries(t, ctx, c) {
			if en.Kind == credits.EntryDebit {
				debit = en
				return true, nil
			}
		}
		return false, nil
	})
	if debit.At.Before(t0.Add(5*time.Second)) || !strings.HasPrefix(debit.Cause, sb+".accrual@") {
		t.Fatalf("debit %+v: want one caused by the tick due at %s, not before", debit, t0.Add(5*time.Second))
	}
	waitFor(t, 10*time.Second, "the next tick scheduled", func() (bool, error) {
		return scheduledAt().After(t0.Add(5 * time.Second)), nil
	})
	s := e.snap(t, c)
	checkInvariants(t, s)
	var extended bool
	for _, en := range s.entries {
		extended = extended || en.Kind == credits.EntryExtend
	}
	h, ok := s.holds[sb]
	if !ok || !extended || h.Debited+h.Amount < 5+int64(debit.At.Sub(t0)/time.Second)+2 {
		t.Fatalf("after the tick: ledger %v, hold %+v; want it extended to cover the lookahead", kinds(s.entries), h)
	}
	e.publish(t, r, event.StateDestroyed, time.Now().UTC(), false)
	e.drained(t)
	checkInvariants(t, e.snap(t, c))
}

// TestAccrualTickThatNeverSucceedsIsFollowed: a self-hosted sandbox has
// one tick scheduled at a time, each scheduling the next. A tick that
// fails on every delivery (its account cannot be written) is dead-lettered
// and still followed by another an interval later, so accrual resumes once
// the account can be written again.
func TestAccrualTickThatNeverSucceedsIsFollowed(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	m := e.start(t, metering.Options{AccrualInterval: time.Second,
		Policy: bus.ConsumerPolicy{MaxDeliver: 2, Backoff: []time.Duration{50 * time.Millisecond}, AckWait: 2 * time.Second}})
	ctx := testCtx(t)
	const c, sb = "unlucky", "sbx-unlucky"
	if _, err := e.client.Grant(ctx, credits.GrantRequest{Consumer: c, Amount: 1000, ID: "g"}); err != nil {
		t.Fatal(err)
	}
	// Covering 2 seconds: the first tick is due an interval after ready.
	if _, err := e.client.Hold(ctx, credits.HoldRequest{SandboxID: sb, Consumer: c, Profile: profCheap, Extension: extSelf, TTLSeconds: 2}); err != nil {
		t.Fatal(err)
	}
	r := ref(c, sb, profCheap)
	e.publish(t, r, event.StateReady, time.Now().UTC(), false)
	e.drained(t)
	stop := metering.FailCommits(m)
	dlq := event.DLQSubject(event.StreamTimers, metering.ConsumerAccrual)
	waitFor(t, 30*time.Second, "a tick dead-lettered", func() (bool, error) {
		s, err := e.js.Stream(ctx, event.StreamDLQ)
		if err != nil {
			return false, err
		}
		_, err = s.GetLastMsgForSubject(ctx, dlq)
		return err == nil, err
	})
	if debits := countKind(e.entries(t, ctx, c), credits.EntryDebit); debits != 0 {
		t.Fatalf("%d debits while commits fail", debits)
	}
	stop()
	waitFor(t, 30*time.Second, "a tick's debit after commits work again", func() (bool, error) {
		return countKind(e.entries(t, ctx, c), credits.EntryDebit) > 0, nil
	})
	e.publish(t, r, event.StateDestroyed, time.Now().UTC(), false)
	e.drained(t)
	checkInvariants(t, e.snap(t, c))
}

func countKind(es []credits.Entry, k credits.EntryKind) int {
	n := 0
	for _, e := range es {
		if e.Kind == k {
			n++
		}
	}
	return n
}
