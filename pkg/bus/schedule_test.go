package bus_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
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
	timers := scheduleKeptAndCancelled(t, ctx, js)
	if err := bus.CancelSchedule(ctx, js, event.ExpiryScheduleSubject("never-scheduled")); err != nil {
		t.Fatal(err)
	}
	deadline := awaitKeptFired(t, ctx, timers)
	// Its markers gone, nothing is left of the cancelled schedules.
	for {
		got := timerSubjects(t, ctx, timers)
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
// setup`): the schedule still does not fire; its marker stays; setup then
// allows them.
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
	timers := scheduleKeptAndCancelled(t, ctx, js)
	awaitKeptFired(t, ctx, timers)
	if got := timerSubjects(t, ctx, timers); got[event.ExpiryFireSubject("cancelled")] != 0 || got[event.ExpiryScheduleSubject("cancelled")] != 1 {
		t.Fatalf("subjects %v: want the cancelled schedule's marker alone", got)
	}
	// Setup then turns per-message TTLs on, keeping what the stream holds.
	if _, err := (bus.Topology{}).Setup(ctx, js, bus.SetupOptions{}); err != nil {
		t.Fatal(err)
	}
	if info, err := timers.Info(ctx); err != nil || !info.Config.AllowMsgTTL || info.State.Msgs == 0 {
		t.Fatalf("timers stream after setup: %+v, %v; want per-message TTLs allowed and its messages kept", info, err)
	}
}

// scheduleKeptAndCancelled schedules the expiries "kept" and "cancelled"
// for the same second, a few seconds ahead, and cancels the second.
func scheduleKeptAndCancelled(t *testing.T, ctx context.Context, js jetstream.JetStream) jetstream.Stream {
	t.Helper()
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
	s, err := js.Stream(ctx, event.StreamTimers)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// awaitKeptFired waits for the "kept" expiry to fire, by when the
// cancelled one would have too, and returns the deadline it waited with.
func awaitKeptFired(t *testing.T, ctx context.Context, timers jetstream.Stream) time.Time {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for timerSubjects(t, ctx, timers)[event.ExpiryFireSubject("kept")] == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the kept schedule never fired: %v", timerSubjects(t, ctx, timers))
		}
		time.Sleep(50 * time.Millisecond)
	}
	return deadline
}

// timerSubjects counts the timers stream's messages per subject.
func timerSubjects(t *testing.T, ctx context.Context, timers jetstream.Stream) map[string]uint64 {
	t.Helper()
	info, err := timers.Info(ctx, jetstream.WithSubjectFilter(event.SubjectTimers))
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Subjects
}

// TestDeadLetterOfAFiredTimer: a fired timer that its handler refuses is
// dead-lettered like any message, without the headers the server put on
// the fired copy (Nats-Scheduler, Nats-Schedule-Next), which the
// dead-letter stream, taking no schedules, would refuse: the router would
// then keep the message and have it delivered again forever.
func TestDeadLetterOfAFiredTimer(t *testing.T) {
	t.Parallel()
	h := newHarness(t, testPolicy)
	ctx := testCtx(h.t)
	const consumer, id = "test-timers", "sbx-dead-timer"
	if _, err := bus.EnsureConsumer(ctx, h.js, event.StreamTimers, consumer, event.ExpiryFireFilter, testPolicy); err != nil {
		t.Fatal(err)
	}
	e, err := event.New(event.TypeExpiry, "sandboxer/test", id, id+".expiry", event.Expiry{
		Ref: event.Ref{SandboxID: id, Consumer: "team-a", Profile: "local", Extension: "local"}, ExpiresAt: time.Now().UTC(),
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.pub.Publish(ctx, event.ExpiryScheduleSubject(id), e,
		jetstream.WithScheduleAt(time.Now().Add(time.Second)), jetstream.WithScheduleTarget(event.ExpiryFireSubject(id))); err != nil {
		t.Fatal(err)
	}
	r := bus.NewRouter(h.js, nil)
	rctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- r.Run(rctx, bus.Route{Stream: event.StreamTimers, Consumer: consumer, Policy: testPolicy, Concurrency: 1,
			Handler: func(context.Context, *bus.Message) ([]bus.Out, error) {
				return nil, bus.Permanent(errors.New("refused"))
			}})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run returned %v after cancellation", err)
		}
	})
	await(t, 15*time.Second, "the fired timer dead-lettered", func() (bool, string) {
		return r.Stats.DeadLettered.Load() == 1, fmt.Sprintf("%d dead-lettered, %d failed", r.Stats.DeadLettered.Load(), r.Stats.Failed.Load())
	})
	msgs := h.streamMessages(event.StreamDLQ)
	if len(msgs) != 1 {
		t.Fatalf("%d dead letters, want 1", len(msgs))
	}
	m := msgs[0]
	if m.Subject != event.DLQSubject(event.StreamTimers, consumer) || m.Header.Get(bus.HeaderDLQSubject) != event.ExpiryFireSubject(id) ||
		m.Header.Get("ce-id") != id+".expiry" {
		t.Fatalf("dead letter on %s: %v", m.Subject, m.Header)
	}
	for k := range m.Header {
		if strings.HasPrefix(k, "Nats-") && k != "Nats-Msg-Id" {
			t.Errorf("dead letter keeps the server's header %s: %v", k, m.Header[k])
		}
	}
}
