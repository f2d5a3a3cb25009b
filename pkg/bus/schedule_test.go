package bus_test

import (
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
)

// TestCancelSchedule schedules two expiries on the timers stream and
// cancels one: only the other fires, and the cancel's marker leaves the
// stream after its TTL. Cancelling a subject with no schedule stores
// nothing that stays either.
func TestCancelSchedule(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	js := srv.JetStream(t)
	ctx := testCtx(t)
	at := time.Now().Add(2 * time.Second).Truncate(time.Second).Add(time.Second)
	for _, id := range []string{"kept", "cancelled"} {
		if _, err := js.Publish(ctx, event.ExpiryScheduleSubject(id), []byte("{}"),
			jetstream.WithScheduleAt(at), jetstream.WithScheduleTarget(event.ExpiryFireSubject(id))); err != nil {
			t.Fatal(err)
		}
	}
	for _, subj := range []string{event.ExpiryScheduleSubject("cancelled"), event.ExpiryScheduleSubject("never-scheduled")} {
		if err := bus.CancelSchedule(ctx, js, subj); err != nil {
			t.Fatal(err)
		}
	}
	s, err := js.Stream(ctx, event.StreamTimers)
	if err != nil {
		t.Fatal(err)
	}
	subjects := func() map[string]uint64 {
		t.Helper()
		info, err := s.Info(ctx, jetstream.WithSubjectFilter(event.SubjectTimers))
		if err != nil {
			t.Fatal(err)
		}
		return info.State.Subjects
	}
	// The kept one fires; by then the cancelled one would have too.
	deadline := time.Now().Add(30 * time.Second)
	for subjects()[event.ExpiryFireSubject("kept")] == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the kept schedule never fired: %v", subjects())
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Its markers gone, nothing is left of the cancelled schedules.
	for {
		got := subjects()
		if got[event.ExpiryFireSubject("cancelled")] != 0 {
			t.Fatalf("the cancelled schedule fired: %v", got)
		}
		if got[event.ExpiryScheduleSubject("cancelled")] == 0 && got[event.ExpiryScheduleSubject("never-scheduled")] == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the cancel markers stayed: %v", got)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestCancelScheduleBeforeSetup cancels a schedule on a timers stream that
// does not allow per-message TTLs yet (services upgraded before `sandboxer
// setup`): the schedule still does not fire; its marker stays.
func TestCancelScheduleBeforeSetup(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	js := srv.JetStream(t)
	ctx := testCtx(t)
	s, err := js.Stream(ctx, event.StreamTimers)
	if err != nil {
		t.Fatal(err)
	}
	cfg := s.CachedInfo().Config
	if !cfg.AllowMsgTTL {
		t.Fatal("the timers stream of this version allows per-message TTLs")
	}
	// A stream cannot stop allowing them: make it anew, as an older
	// version's setup did.
	if err := js.DeleteStream(ctx, event.StreamTimers); err != nil {
		t.Fatal(err)
	}
	cfg.AllowMsgTTL = false
	if _, err := js.CreateStream(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	at := time.Now().Add(2 * time.Second).Truncate(time.Second).Add(time.Second)
	for _, id := range []string{"kept", "cancelled"} {
		if _, err := js.Publish(ctx, event.ExpiryScheduleSubject(id), []byte("{}"),
			jetstream.WithScheduleAt(at), jetstream.WithScheduleTarget(event.ExpiryFireSubject(id))); err != nil {
			t.Fatal(err)
		}
	}
	if err := bus.CancelSchedule(ctx, js, event.ExpiryScheduleSubject("cancelled")); err != nil {
		t.Fatal(err)
	}
	subjects := func() map[string]uint64 {
		t.Helper()
		info, err := s.Info(ctx, jetstream.WithSubjectFilter(event.SubjectTimers))
		if err != nil {
			t.Fatal(err)
		}
		return info.State.Subjects
	}
	deadline := time.Now().Add(30 * time.Second)
	for subjects()[event.ExpiryFireSubject("kept")] == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the kept schedule never fired: %v", subjects())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if got := subjects(); got[event.ExpiryFireSubject("cancelled")] != 0 || got[event.ExpiryScheduleSubject("cancelled")] != 1 {
		t.Fatalf("subjects %v: want the cancelled schedule's marker alone", got)
	}
}
