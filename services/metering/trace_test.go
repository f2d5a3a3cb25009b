package metering_test

import (
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel"

	"github.com/sand-boxer/sandboxer/pkg/credits"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/services/metering"
)

// storedMetering reads back every message of the metering stream.
func (e *env) storedMetering(t *testing.T) []jetstream.Msg {
	t.Helper()
	ctx := testCtx(t)
	c, err := e.js.OrderedConsumer(ctx, event.StreamMetering, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	info, err := c.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var out []jetstream.Msg
	for uint64(len(out)) < info.NumPending {
		m, err := c.Next(jetstream.FetchMaxWait(5 * time.Second))
		if err != nil {
			t.Fatalf("reading metering stream: %v", err)
		}
		out = append(out, m)
	}
	return out
}

// TestEventsJoinTheirCause: every metering event is published in the
// trace of what caused it, through the account's outbox: the hold of an
// admission in the admission's trace (a request), the debits of accrual
// ticks in the trace of the ready event that started the meter (its
// schedule carries it to every tick), the settlement's release and usage
// record in the trace of the destroyed event. An event with no
// traced cause (a grant asked without a trace) still carries a
// traceparent, of a trace of its own.
func TestEventsJoinTheirCause(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.start(t, metering.Options{AccrualInterval: time.Second})
	ctx := testCtx(t)
	const c, sb = "traced", "sbx-traced"
	if _, err := e.client.Grant(ctx, credits.GrantRequest{Consumer: c, Amount: 100_000}); err != nil {
		t.Fatal(err)
	}
	sctx, span := otel.Tracer("test").Start(ctx, "sandbox")
	defer span.End()
	want := span.SpanContext().TraceID().String()
	// Held for 2 seconds: the hold stops covering the lookahead at once,
	// so the first tick debits (a hold covering more ticks later).
	if _, err := e.client.Hold(sctx, credits.HoldRequest{SandboxID: sb, Consumer: c, Profile: profPricey, Extension: extSelf, TTLSeconds: 2}); err != nil {
		t.Fatal(err)
	}
	r := ref(c, sb, profPricey)
	publish := func(s event.State, data any) {
		t.Helper()
		ev, err := event.New(event.LifecycleType(s), "/test", sb, sb+"."+string(s), data)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := e.pub.Publish(sctx, r.LifecycleSubject(s), ev); err != nil {
			t.Fatal(err)
		}
	}
	publish(event.StateReady, event.Ready{Ref: r, Handle: event.Handle{SandboxID: sb, Host: "localhost"},
		Reachability: event.Reachability{Host: "localhost"}, ReadyAt: time.Now().UTC()})
	waitFor(t, 30*time.Second, "a debit of an accrual tick", func() (bool, error) {
		for _, en := range e.entries(t, ctx, c) {
			if en.Kind == credits.EntryDebit && strings.HasPrefix(en.Cause, sb+".accrual") {
				return true, nil
			}
		}
		return false, nil
	})
	publish(event.StateDestroyed, event.Destroyed{Ref: r, Reason: event.ReasonRequested})
	waitFor(t, 30*time.Second, "the usage record", func() (bool, error) {
		u, err := e.client.Usage(ctx, credits.UsageRequest{Consumer: c})
		return err == nil && len(u.Records) == 1, err
	})
	// A balance is answered once every event before it is published.
	if _, err := e.client.Balance(ctx, c); err != nil {
		t.Fatal(err)
	}

	kinds := map[string]int{}
	for _, m := range e.storedMetering(t) {
		tp := m.Headers().Get("traceparent")
		parts := strings.Split(tp, "-")
		if len(parts) != 4 {
			t.Errorf("%s carries traceparent %q", m.Subject(), tp)
			continue
		}
		kind := m.Subject()[strings.LastIndexByte(m.Subject(), '.')+1:]
		if m.Headers().Get("ce-subject") != sb {
			if parts[1] == want {
				t.Errorf("%s of %s is in the sandbox's trace", kind, m.Headers().Get("ce-subject"))
			}
			continue
		}
		kinds[kind]++
		if parts[1] != want {
			t.Errorf("%s of %s (%s) in trace %s, want the sandbox's %s", kind, sb, m.Headers().Get("ce-id"), parts[1], want)
		}
	}
	for _, k := range []credits.Kind{credits.KindReserved, credits.KindDebited, credits.KindReleased, credits.KindUsage} {
		if kinds[string(k)] == 0 {
			t.Errorf("no %s event of %s (got %v)", k, sb, kinds)
		}
	}
}
