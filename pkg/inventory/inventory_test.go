package inventory_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/inventory"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

var ref = event.Ref{SandboxID: "sbx-race", Consumer: "team-a", Profile: "p", Extension: "echo"}

func lifecycle(t *testing.T, r event.Ref, s event.State, id string, data any) *event.Event {
	t.Helper()
	e, err := event.New(event.LifecycleType(s), "/test", r.SandboxID, id, data)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// TestTransitionRace: two writers decide the same transition of one
// sandbox on the same last event, at once; the stream stores exactly one,
// and the other sees the conflict. The sandbox's record then is the
// winner's.
func TestTransitionRace(t *testing.T) {
	s := natstest.Start(t)
	js := s.JetStream(t)
	ctx := testCtx(t)
	pub := bus.NewPublisher(js)
	filter := ref.RefFilter()

	// The first event of a sandbox: two writers of its record.
	race := func(s event.State, seq uint64, mk func(i int) *event.Event) (winner int, seqOut uint64) {
		t.Helper()
		var (
			wg    sync.WaitGroup
			start = make(chan struct{})
			errs  [2]error
			acks  [2]uint64
		)
		for i := range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				e := mk(i)
				<-start
				ack, err := pub.PublishTransition(ctx, ref.LifecycleSubject(s), e, filter, seq)
				errs[i] = err
				if ack != nil {
					acks[i] = ack.Sequence
				}
			}()
		}
		close(start)
		wg.Wait()
		winner = -1
		for i, err := range errs {
			switch {
			case err == nil:
				if winner >= 0 {
					t.Fatalf("%s: both writers were stored", s)
				}
				winner = i
			case !errors.Is(err, bus.ErrConflict):
				t.Fatalf("%s: writer %d: %v, want ErrConflict", s, i, err)
			}
		}
		if winner < 0 {
			t.Fatalf("%s: neither writer was stored: %v", s, errs)
		}
		return winner, acks[winner]
	}
	at := time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)
	labels := []string{"first", "second"}
	w, seq := race(event.StateRequested, 0, func(i int) *event.Event {
		return lifecycle(t, ref, event.StateRequested, ref.SandboxID+".requested."+labels[i],
			event.RequestedOf(event.Create{Ref: ref, Labels: map[string]string{"writer": labels[i]}, RequestedAt: at}, ""))
	})
	// A re-drive: two writers claim destroy attempt 1, decided on the
	// requested event.
	w2, seq2 := race(event.StateDestroying, seq, func(i int) *event.Event {
		return lifecycle(t, ref, event.StateDestroying, ref.SandboxID+".destroying."+labels[i],
			event.Destroying{Ref: ref, Reason: labels[i], Attempt: 1})
	})
	rec, err := inventory.Read(ctx, s.Conn(t), event.SandboxFilter(ref.SandboxID))
	if err != nil {
		t.Fatal(err)
	}
	if rec == nil || rec.Labels["writer"] != labels[w] || rec.Reason != labels[w2] || rec.State != event.StateDestroying ||
		rec.DestroyAttempt != 1 || rec.Seq != seq2 || len(rec.History) != 2 {
		t.Fatalf("record = %+v; want the winners' (%s, %s) at sequence %d", rec, labels[w], labels[w2], seq2)
	}
	// Decided on an event that is no longer the last: refused.
	_, err = pub.PublishTransition(ctx, ref.LifecycleSubject(event.StateDestroyed),
		lifecycle(t, ref, event.StateDestroyed, ref.SandboxID+".destroyed", event.Destroyed{Ref: ref, Reason: "late"}), filter, seq)
	if !errors.Is(err, bus.ErrConflict) {
		t.Fatalf("a transition decided on a stale event: %v, want ErrConflict", err)
	}
}

// TestReadAndFollow: a sandbox's record is the fold of its events, read
// by id or by its full reference; the follower folds the stream into
// every record, is ready once it caught up, hears new events, and drops
// a sandbox that ended longer than the retention ago.
func TestReadAndFollow(t *testing.T) {
	s := natstest.Start(t)
	js := s.JetStream(t)
	ctx := testCtx(t)
	pub := bus.NewPublisher(js)
	at := time.Now().UTC()
	publish := func(r event.Ref, st event.State, data any) {
		t.Helper()
		if _, err := pub.Publish(ctx, r.LifecycleSubject(st), lifecycle(t, r, st, r.SandboxID+"."+string(st), data)); err != nil {
			t.Fatal(err)
		}
	}
	a, b := ref, ref
	a.SandboxID, b.SandboxID = "sbx-a", "sbx-b"
	publish(a, event.StateRequested, event.RequestedOf(event.Create{Ref: a, Labels: map[string]string{"k": "v"}, TTLSeconds: 60, RequestedAt: at}, ""))
	publish(a, event.StateProvisioning, event.Provisioning{Ref: a, Worker: "w"})
	publish(a, event.StateReady, event.Ready{Ref: a, Handle: event.Handle{SandboxID: a.SandboxID, Host: "h"}, ReadyAt: at, ExpiresAt: at.Add(time.Minute)})
	// A request refused before it was routed is no sandbox.
	unrouted := event.Ref{SandboxID: "sbx-u", Consumer: "team-a", Profile: "p", Extension: event.Unrouted}
	publish(unrouted, event.StateRejected, event.Rejected{Ref: unrouted, Code: "c", Reason: "r"})

	for _, filter := range []string{a.RefFilter(), event.SandboxFilter(a.SandboxID)} {
		rec, err := inventory.Read(ctx, s.Conn(t), filter)
		if err != nil {
			t.Fatal(err)
		}
		if rec == nil || rec.State != event.StateReady || rec.Labels["k"] != "v" || rec.Handle == nil || rec.Handle.Host != "h" ||
			rec.ExpiresAt.IsZero() || len(rec.History) != 3 || rec.Seq != 3 {
			t.Fatalf("Read(%s) = %+v", filter, rec)
		}
	}
	for _, filter := range []string{event.SandboxFilter("sbx-none"), event.SandboxFilter(unrouted.SandboxID)} {
		if rec, err := inventory.Read(ctx, s.Conn(t), filter); err != nil || rec != nil {
			t.Fatalf("Read(%s) = %+v, %v; want nothing", filter, rec, err)
		}
	}

	var (
		mu     sync.Mutex
		seen   = map[string]*sandbox.Record{}
		gone   = map[string]bool{}
		change = make(chan struct{}, 1)
	)
	fctx, stop := context.WithCancel(ctx)
	defer stop()
	f, err := inventory.Follow(fctx, js, time.Hour, nil, func(c inventory.Change) {
		mu.Lock()
		defer mu.Unlock()
		seen[c.Record.ID] = c.Record
		if c.Gone {
			gone[c.Record.ID] = true
		}
		select {
		case change <- struct{}{}:
		default:
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-f.Ready():
	case <-ctx.Done():
		t.Fatal("follower never caught up")
	}
	mu.Lock()
	if r := seen[a.SandboxID]; r == nil || r.State != event.StateReady || r.Seq != 3 || len(seen) != 1 {
		t.Fatalf("after catching up: %v", seen)
	}
	mu.Unlock()

	// New events: b comes and ends at once, an hour ago (its destroyed
	// event's time): past the retention, it leaves.
	publish(b, event.StateRequested, event.RequestedOf(event.Create{Ref: b, RequestedAt: at}, ""))
	old := lifecycle(t, b, event.StateDestroyed, b.SandboxID+".destroyed", event.Destroyed{Ref: b, Reason: "requested"})
	old.SetTime(at.Add(-2 * time.Hour))
	if _, err := pub.Publish(ctx, b.LifecycleSubject(event.StateDestroyed), old); err != nil {
		t.Fatal(err)
	}
	publish(a, event.StateDestroying, event.Destroying{Ref: a, Reason: "requested"})
	for {
		mu.Lock()
		ok := seen[a.SandboxID].State == event.StateDestroying && gone[b.SandboxID]
		mu.Unlock()
		if ok {
			break
		}
		select {
		case <-change:
		case <-ctx.Done():
			t.Fatalf("follower did not fold the new events: %v, gone %v", seen, gone)
		}
	}
}
