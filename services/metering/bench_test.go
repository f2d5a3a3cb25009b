package metering_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/credits"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/services/metering"
)

// BenchmarkLedgerFold folds a ledger of 10,000 entries into its balance,
// as a billing consumer rebuilding an account does.
func BenchmarkLedgerFold(b *testing.B) {
	const n = 10_000
	entries := make([]credits.Entry, 0, n)
	var bal, held int64
	for i := range n {
		e := credits.Entry{Key: fmt.Sprintf("dev.sb.s%d.hold", i), Seq: uint64(i + 1), Consumer: "dev"}
		switch i % 4 {
		case 0:
			e.Kind, e.Amount = credits.EntryGrant, 100
		case 1:
			e.Kind, e.Held = credits.EntryHold, 60
		case 2:
			e.Kind, e.Amount, e.Held = credits.EntryDebit, -40, -40
		case 3:
			e.Kind, e.Held = credits.EntryRelease, -20
		}
		bal += e.Amount
		held += e.Held
		e.BalanceAfter, e.HeldAfter = bal, held
		entries = append(entries, e)
	}
	b.ReportAllocs()
	for b.Loop() {
		gb, gh, err := credits.Fold(entries)
		if err != nil || gb != bal || gh != held {
			b.Fatalf("fold: %d %d %v, want %d %d", gb, gh, err, bal, held)
		}
	}
	b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "entries/s")
}

// benchEnv is a bus with one metering instance and a consumer with credit
// for every sandbox the benchmark admits.
func benchEnv(b *testing.B) (*env, *metering.Metering, context.Context) {
	b.Helper()
	e := newEnv(b)
	m := e.start(b, metering.Options{})
	ctx := testCtx(b)
	if _, err := e.client.Grant(ctx, credits.GrantRequest{Consumer: "bench", Amount: 1 << 50, ID: "all"}); err != nil {
		b.Fatal(err)
	}
	return e, m, ctx
}

// awaitProcessed waits until m has handled want lifecycle events in all.
func awaitProcessed(b *testing.B, m *metering.Metering, want uint64) {
	b.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for m.Processed() < want {
		if time.Now().After(deadline) {
			b.Fatalf("%d of %d lifecycle events handled after 2 minutes", m.Processed(), want)
		}
		t := time.NewTimer(200 * time.Microsecond)
		<-t.C
	}
}

// cycle admits sandbox sb, publishes its ready and destroyed events, and
// waits until both are folded into the account.
func cycle(b *testing.B, e *env, m *metering.Metering, ctx context.Context, sb string, done *atomic.Uint64) {
	if _, err := e.client.Hold(ctx, credits.HoldRequest{SandboxID: sb, Consumer: "bench", Profile: profCheap, Extension: extSelf, TTLSeconds: 60}); err != nil {
		b.Error(err)
		return
	}
	r := ref("bench", sb, profCheap)
	now := time.Now().UTC()
	e.publish(b, r, event.StateReady, now, false)
	e.publish(b, r, event.StateDestroyed, now.Add(3*time.Second), false)
	done.Add(2)
}

// BenchmarkHoldSettle is one sandbox's money, end to end against a real
// NATS server: admission over request-reply, then its ready and destroyed
// events through the lifecycle stream, settled and released. Sequential:
// the latency of one cycle.
func BenchmarkHoldSettle(b *testing.B) {
	e, m, ctx := benchEnv(b)
	var sent atomic.Uint64
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		cycle(b, e, m, ctx, fmt.Sprintf("s%d", i), &sent)
		awaitProcessed(b, m, sent.Load())
		i++
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "cycles/s")
}

// BenchmarkHoldSettleParallel is BenchmarkHoldSettle with 64 cycles in
// flight for one consumer: the contention the gateway puts on one account.
func BenchmarkHoldSettleParallel(b *testing.B) {
	e, m, ctx := benchEnv(b)
	var (
		sent atomic.Uint64
		next atomic.Int64
		wg   sync.WaitGroup
	)
	b.ReportAllocs()
	b.ResetTimer()
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := next.Add(1); i <= int64(b.N); i = next.Add(1) {
				cycle(b, e, m, ctx, fmt.Sprintf("p%d", i), &sent)
			}
		}()
	}
	wg.Wait()
	awaitProcessed(b, m, sent.Load())
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "cycles/s")
}

// BenchmarkLifecycleEvents is metering_events_per_s: b.N/2 sandboxes of
// one consumer admitted beforehand (not timed), then their ready and
// destroyed events published at once and timed until every one is folded
// into the account. ns/op is per event.
func BenchmarkLifecycleEvents(b *testing.B) {
	e, m, ctx := benchEnv(b)
	n := max(b.N/2, 1)
	var wg sync.WaitGroup
	var next atomic.Int64
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := next.Add(1); i <= int64(n); i = next.Add(1) {
				if _, err := e.client.Hold(ctx, credits.HoldRequest{SandboxID: fmt.Sprintf("e%d", i), Consumer: "bench", Profile: profCheap, Extension: extSelf, TTLSeconds: 60}); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	before := m.Processed()
	now := time.Now().UTC()
	b.ReportAllocs()
	b.ResetTimer()
	// Published asynchronously, as a busy provisioner fleet does: the
	// benchmark measures metering, not one publisher's round trips.
	futures := make([]jetstream.PubAckFuture, 0, 2*n)
	for i := 1; i <= n; i++ {
		r := ref("bench", fmt.Sprintf("e%d", i), profCheap)
		for _, st := range []event.State{event.StateReady, event.StateDestroyed} {
			at := now
			var data any = event.Ready{Ref: r, Handle: event.Handle{SandboxID: r.SandboxID, Host: "localhost"}, Reachability: event.Reachability{Host: "localhost"}, ReadyAt: now}
			if st == event.StateDestroyed {
				at, data = now.Add(2*time.Second), event.Destroyed{Ref: r, Reason: event.ReasonRequested}
			}
			ev, err := event.New(event.LifecycleType(st), "/bench", r.SandboxID, r.SandboxID+"."+string(st), data)
			if err != nil {
				b.Fatal(err)
			}
			ev.SetTime(at)
			msg, err := event.Encode(ctx, r.LifecycleSubject(st), ev)
			if err != nil {
				b.Fatal(err)
			}
			f, err := e.js.PublishMsgAsync(msg)
			if err != nil {
				b.Fatal(err)
			}
			futures = append(futures, f)
		}
	}
	for _, f := range futures {
		select {
		case <-f.Ok():
		case err := <-f.Err():
			b.Fatal(err)
		case <-ctx.Done():
			b.Fatal(ctx.Err())
		}
	}
	awaitProcessed(b, m, before+uint64(2*n))
	b.StopTimer()
	b.ReportMetric(float64(2*n)/b.Elapsed().Seconds(), "events/s")
	s := e.snap(b, "bench")
	checkInvariants(b, s)
}

// BenchmarkHoldWithLive is one admission for a consumer that already has
// live (open) holds: its cost must not grow with them.
func BenchmarkHoldWithLive(b *testing.B) {
	for _, live := range []int{10, 1000} {
		b.Run(fmt.Sprintf("live=%d", live), func(b *testing.B) {
			e, _, ctx := benchEnv(b)
			for i := range live {
				if _, err := e.client.Hold(ctx, credits.HoldRequest{SandboxID: fmt.Sprintf("l%d", i), Consumer: "bench", Profile: profCheap, Extension: extSelf, TTLSeconds: 60}); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if _, err := e.client.Hold(ctx, credits.HoldRequest{SandboxID: fmt.Sprintf("n%d", i), Consumer: "bench", Profile: profCheap, Extension: extSelf, TTLSeconds: 60}); err != nil {
					b.Fatal(err)
				}
				i++
			}
		})
	}
}

// BenchmarkHoldParallel is admission alone with 64 requests in flight for
// one consumer, over request-reply: what the gateway asks of metering
// when 64 clients of one consumer create at once.
func BenchmarkHoldParallel(b *testing.B) {
	e, _, ctx := benchEnv(b)
	var (
		next atomic.Int64
		wg   sync.WaitGroup
	)
	b.ReportAllocs()
	b.ResetTimer()
	for range 64 {
		wg.Go(func() {
			for i := next.Add(1); i <= int64(b.N); i = next.Add(1) {
				if _, err := e.client.Hold(ctx, credits.HoldRequest{SandboxID: fmt.Sprintf("h%d", i), Consumer: "bench", Profile: profCheap, Extension: extSelf, TTLSeconds: 60}); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "admissions/s")
}
