package bus_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/trace"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
)

// calls counts handler invocations and remembers each delivery count.
type calls struct {
	mu        sync.Mutex
	delivered []uint64
}

func (c *calls) add(m *bus.Message) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.delivered = append(c.delivered, m.Delivered)
	return len(c.delivered)
}

func (c *calls) get() []uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]uint64(nil), c.delivered...)
}

func TestRouterAcksOnSuccess(t *testing.T) {
	t.Parallel()
	h := newHarness(t, testPolicy)
	w := h.watchWire()
	seq := h.publishCreate("sbx-1")
	var c calls
	var got atomic.Pointer[bus.Message]
	r := h.run(func(ctx context.Context, m *bus.Message) ([]bus.Out, error) {
		c.add(m)
		got.Store(m)
		return nil, nil
	}, 1)

	await(t, 10*time.Second, "the command to be acked", func() (bool, string) {
		return r.Stats.Handled.Load() == 1 && w.count("ack +ACK") == 1, fmt.Sprint(w.snapshot())
	})
	await(t, 5*time.Second, "the consumer to settle", h.settled)
	if n := h.streamMsgs(event.StreamCommands); n != 0 {
		t.Errorf("commands stream holds %d messages after the ack, want 0 (work queue)", n)
	}
	m := got.Load()
	if m.Event.Type() != string(event.TypeCreate) || m.Event.ID() != "sbx-1.create" || m.Subject != event.CommandSubject("local", event.VerbCreate, "dev", "sbx-1") ||
		m.Delivered != 1 || m.StreamSeq != seq || m.Timestamp.IsZero() || m.Raw() == nil {
		t.Errorf("handler saw %+v", m)
	}
	if d := c.get(); !slices.Equal(d, []uint64{1}) {
		t.Errorf("deliveries %v, want [1]", d)
	}
	if r.Stats.Failed.Load() != 0 || r.Stats.DeadLettered.Load() != 0 {
		t.Errorf("stats failed %d dead-lettered %d", r.Stats.Failed.Load(), r.Stats.DeadLettered.Load())
	}
}

// TestRouterPublishesOutputsBeforeAck watches the router's connection on
// the wire: every output reaches the lifecycle stream before the ack of
// the command that produced it. The first delivery's output cannot be
// published (no stream captures its subject), so that delivery must be
// nak'ed, not acked.
func TestRouterPublishesOutputsBeforeAck(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name string
		outs int
	}{
		{"one output", 1},
		{"several outputs published concurrently", 3},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, testPolicy)
			w := h.watchWire()
			h.publishCreate("sbx-1")
			var c calls
			r := h.run(func(ctx context.Context, m *bus.Message) ([]bus.Out, error) {
				n := c.add(m)
				var outs []bus.Out
				for i := range tc.outs {
					id := fmt.Sprintf("sbx-%d", i+1)
					subj := event.LifecycleSubject("dev", "local", id, event.StateReady)
					if n == 1 && i == tc.outs-1 {
						subj = "nostream.sandboxer.test" // no stream: the publish fails
					}
					outs = append(outs, bus.Out{Subject: subj, Event: readyEvent(t, id)})
				}
				return outs, nil
			}, 1)

			await(t, 10*time.Second, "the second delivery to be acked", func() (bool, string) {
				return w.count("ack +ACK") == 1, fmt.Sprint(w.snapshot())
			})
			await(t, 5*time.Second, "the consumer to settle", h.settled)
			seen := w.snapshot()
			ack := slices.Index(seen, "ack +ACK")
			nak := slices.Index(seen, "ack -NAK")
			if nak < 0 || nak > ack {
				t.Errorf("wire %v: want the failed publish nak'ed before the retry's ack", seen)
			}
			for i := range tc.outs {
				subj := "pub " + event.LifecycleSubject("dev", "local", fmt.Sprintf("sbx-%d", i+1), event.StateReady)
				at := slices.Index(seen[nak+1:], subj)
				if at < 0 || nak+1+at > ack {
					t.Errorf("wire %v: %s not published before the ack", seen, subj)
				}
			}
			if d := c.get(); !slices.Equal(d, []uint64{1, 2}) {
				t.Errorf("deliveries %v, want [1 2]", d)
			}
			// The first delivery's good outputs were published too; the
			// stream's de-duplication keeps one copy of each fact.
			if n := h.streamMsgs(event.StreamLifecycle); n != uint64(tc.outs) {
				t.Errorf("lifecycle stream holds %d events, want %d", n, tc.outs)
			}
			if r.Stats.Handled.Load() != 1 || r.Stats.Failed.Load() != 1 {
				t.Errorf("stats handled %d failed %d, want 1 and 1", r.Stats.Handled.Load(), r.Stats.Failed.Load())
			}
		})
	}
}

func TestRouterRetriesAfterError(t *testing.T) {
	t.Parallel()
	h := newHarness(t, testPolicy)
	w := h.watchWire()
	h.publishCreate("sbx-1")
	var c calls
	r := h.run(func(ctx context.Context, m *bus.Message) ([]bus.Out, error) {
		if c.add(m) == 1 {
			return nil, errors.New("backend busy")
		}
		return nil, nil
	}, 1)
	await(t, 10*time.Second, "the retry to succeed", func() (bool, string) {
		return r.Stats.Handled.Load() == 1, fmt.Sprint(c.get())
	})
	await(t, 5*time.Second, "the consumer to settle", h.settled)
	if d := c.get(); !slices.Equal(d, []uint64{1, 2}) {
		t.Errorf("deliveries %v, want [1 2]", d)
	}
	if seen := w.snapshot(); !slices.Equal(seen, []string{"ack -NAK", "ack +ACK"}) {
		t.Errorf("wire %v, want a nak then an ack", seen)
	}
	if r.Stats.Failed.Load() != 1 || r.Stats.DeadLettered.Load() != 0 {
		t.Errorf("stats failed %d dead-lettered %d", r.Stats.Failed.Load(), r.Stats.DeadLettered.Load())
	}
	if n := h.streamMsgs(event.StreamDLQ); n != 0 {
		t.Errorf("%d dead letters, want none", n)
	}
}

// deadLetter awaits exactly one dead letter and checks its headers.
func (h *harness) deadLetter(origSeq uint64, delivered int, reason string) {
	h.t.Helper()
	// 30s: a compensation whose output has no stream retries that
	// publish as during an election (electionRetry) for up to 10s first.
	await(h.t, 30*time.Second, "a dead letter", func() (bool, string) {
		n := h.streamMsgs(event.StreamDLQ)
		return n == 1, fmt.Sprintf("%d dead letters", n)
	})
	msgs := h.streamMessages(event.StreamDLQ)
	if len(msgs) != 1 {
		h.t.Fatalf("%d dead letters, want 1", len(msgs))
	}
	m := msgs[0]
	if want := event.DLQSubject(event.StreamCommands, h.consumer); m.Subject != want {
		h.t.Errorf("dead letter on %q, want %q", m.Subject, want)
	}
	want := map[string]string{
		bus.HeaderDLQSubject:   event.CommandSubject("local", event.VerbCreate, "dev", "sbx-1"),
		bus.HeaderDLQStream:    event.StreamCommands,
		bus.HeaderDLQConsumer:  h.consumer,
		bus.HeaderDLQStreamSeq: strconv.FormatUint(origSeq, 10),
		bus.HeaderDLQDelivered: strconv.Itoa(delivered),
	}
	for k, v := range want {
		if got := m.Header.Get(k); got != v {
			h.t.Errorf("dead letter header %s = %q, want %q", k, got, v)
		}
	}
	if got := m.Header.Get(bus.HeaderDLQReason); !strings.Contains(got, reason) {
		h.t.Errorf("dead letter reason %q, want it to contain %q", got, reason)
	}
	await(h.t, 5*time.Second, "the original to leave the commands stream", func() (bool, string) {
		n := h.streamMsgs(event.StreamCommands)
		return n == 0, fmt.Sprintf("%d commands", n)
	})
	if ok, last := h.settled(); !ok {
		h.t.Errorf("consumer not settled after dead-lettering: %s", last)
	}
}

func TestRouterPermanentErrorDeadLetters(t *testing.T) {
	t.Parallel()
	h := newHarness(t, testPolicy)
	w := h.watchWire()
	seq := h.publishCreate("sbx-1")
	var c calls
	r := h.run(func(ctx context.Context, m *bus.Message) ([]bus.Out, error) {
		c.add(m)
		return nil, bus.Permanent(fmt.Errorf("validating inputs: %w", errors.New("repo: scheme not allowed")))
	}, 1)
	h.deadLetter(seq, 1, "validating inputs: repo: scheme not allowed")
	msgs := h.streamMessages(event.StreamDLQ)
	var data event.Create
	if err := json.Unmarshal(msgs[0].Data, &data); err != nil || data.SandboxID != "sbx-1" {
		t.Errorf("dead letter body %s is not the original command (%v)", msgs[0].Data, err)
	}
	if msgs[0].Header.Get("ce-id") != "sbx-1.create" || msgs[0].Header.Get("ce-type") != string(event.TypeCreate) {
		t.Errorf("dead letter lost the original headers: %v", msgs[0].Header)
	}
	if d := c.get(); !slices.Equal(d, []uint64{1}) {
		t.Errorf("deliveries %v, want one: a permanent error is not retried", d)
	}
	if seen := w.snapshot(); !slices.Equal(seen, []string{"ack +TERM"}) {
		t.Errorf("wire %v, want one term", seen)
	}
	if r.Stats.DeadLettered.Load() != 1 {
		t.Errorf("dead-lettered %d", r.Stats.DeadLettered.Load())
	}
}

func TestRouterMaxDeliverDeadLetters(t *testing.T) {
	t.Parallel()
	h := newHarness(t, testPolicy)
	seq := h.publishCreate("sbx-1")
	var c calls
	r := h.run(func(ctx context.Context, m *bus.Message) ([]bus.Out, error) {
		c.add(m)
		return nil, errors.New("backend down")
	}, 1)
	h.deadLetter(seq, testPolicy.MaxDeliver, "exhausted 3 deliveries: backend down")
	if d := c.get(); !slices.Equal(d, []uint64{1, 2, 3}) {
		t.Errorf("deliveries %v, want [1 2 3]", d)
	}
	if r.Stats.Failed.Load() != 3 || r.Stats.DeadLettered.Load() != 1 {
		t.Errorf("stats failed %d dead-lettered %d", r.Stats.Failed.Load(), r.Stats.DeadLettered.Load())
	}
}

func TestRouterRecoversPanics(t *testing.T) {
	t.Parallel()
	h := newHarness(t, testPolicy)
	seq := h.publishCreate("sbx-1")
	var c calls
	r := h.run(func(ctx context.Context, m *bus.Message) ([]bus.Out, error) {
		c.add(m)
		var nilMap map[string]int
		nilMap["boom"]++ // a real runtime panic
		return nil, nil
	}, 1)
	h.deadLetter(seq, testPolicy.MaxDeliver, "handler panicked: assignment to entry in nil map")
	if d := c.get(); !slices.Equal(d, []uint64{1, 2, 3}) {
		t.Errorf("deliveries %v, want [1 2 3]: a panic is retried", d)
	}
	if r.Stats.Panics.Load() != 3 {
		t.Errorf("panics %d, want 3", r.Stats.Panics.Load())
	}
	// The router is still consuming after the panics.
	h.publishCreate("sbx-2")
	await(t, 10*time.Second, "a later message to be handled", func() (bool, string) {
		n := len(c.get())
		return n == 4, fmt.Sprintf("%d calls", n)
	})
}

func TestRouterDeadLettersMalformedMessages(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name   string
		header nats.Header
		body   string
		reason string
	}{
		{"not an event", nil, "not json", "malformed event"},
		{"binary without type", nats.Header{"ce-specversion": {"1.0"}, "ce-id": {"1"}, "ce-source": {"s"}}, "{}", "type"},
		{"bad percent escape", nats.Header{"ce-specversion": {"1.0"}, "ce-id": {"1%zz"}, "ce-source": {"s"}, "ce-type": {"t"}}, "{}", "percent"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, testPolicy)
			ack, err := h.js.PublishMsg(testCtx(t), &nats.Msg{Subject: event.CommandSubject("local", event.VerbCreate, "dev", "sbx-1"), Header: tc.header, Data: []byte(tc.body)})
			if err != nil {
				t.Fatal(err)
			}
			var c calls
			r := h.run(func(ctx context.Context, m *bus.Message) ([]bus.Out, error) {
				c.add(m)
				return nil, nil
			}, 1)
			h.deadLetter(ack.Sequence, 1, tc.reason)
			if n := len(c.get()); n != 0 {
				t.Errorf("handler called %d times for a malformed message", n)
			}
			if msgs := h.streamMessages(event.StreamDLQ); string(msgs[0].Data) != tc.body {
				t.Errorf("dead letter body %q, want the original %q", msgs[0].Data, tc.body)
			}
			if r.Stats.DeadLettered.Load() != 1 {
				t.Errorf("dead-lettered %d", r.Stats.DeadLettered.Load())
			}
		})
	}
}

// TestRouterHeartbeatsLongHandlers runs a handler for well over AckWait:
// the router's InProgress heartbeats keep the server from redelivering,
// so it runs exactly once.
func TestRouterHeartbeatsLongHandlers(t *testing.T) {
	t.Parallel()
	h := newHarness(t, testPolicy)
	w := h.watchWire()
	h.publishCreate("sbx-1")
	var c calls
	work := 2*testPolicy.AckWait + testPolicy.AckWait/2
	r := h.run(func(ctx context.Context, m *bus.Message) ([]bus.Out, error) {
		c.add(m)
		select { // the work itself: a slow backend
		case <-time.After(work):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		return nil, nil
	}, 1)
	await(t, 10*time.Second, "the long handler to finish", func() (bool, string) {
		return r.Stats.Handled.Load() == 1, fmt.Sprint(w.snapshot())
	})
	await(t, 5*time.Second, "the consumer to settle", h.settled)
	if d := c.get(); !slices.Equal(d, []uint64{1}) {
		t.Errorf("deliveries %v, want exactly one", d)
	}
	if info := h.consumerInfo(); info.NumRedelivered != 0 || info.Delivered.Consumer != 1 {
		t.Errorf("consumer delivered %d, redelivered %d; want 1 and 0", info.Delivered.Consumer, info.NumRedelivered)
	}
	if n := w.count("ack +WPI"); n < 3 {
		t.Errorf("%d heartbeats in %s with AckWait %s, want at least 3", n, work, testPolicy.AckWait)
	}
}

// TestRouterConcurrency runs Concurrency handlers at once: three messages
// meet at a barrier that only opens when all three are in flight.
func TestRouterConcurrency(t *testing.T) {
	t.Parallel()
	h := newHarness(t, testPolicy)
	for i := range 3 {
		h.publishCreate(fmt.Sprintf("sbx-%d", i))
	}
	var inFlight, peak atomic.Int32
	all := make(chan struct{})
	var once sync.Once
	r := h.run(func(ctx context.Context, m *bus.Message) ([]bus.Out, error) {
		n := inFlight.Add(1)
		defer inFlight.Add(-1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		if n == 3 {
			once.Do(func() { close(all) })
		}
		select {
		case <-all:
			return nil, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}, 3)
	await(t, 10*time.Second, "three handlers to run at once", func() (bool, string) {
		return r.Stats.Handled.Load() == 3, fmt.Sprintf("handled %d, peak %d", r.Stats.Handled.Load(), peak.Load())
	})
	if peak.Load() != 3 {
		t.Errorf("peak concurrency %d, want 3", peak.Load())
	}
}

// TestRouterShutdownHandsWorkOver cancels a router while its handler is
// in flight: Run waits for the handler, the message is nak'ed at once and
// a second router (another instance) finishes it.
func TestRouterShutdownHandsWorkOver(t *testing.T) {
	t.Parallel()
	h := newHarness(t, bus.ConsumerPolicy{AckWait: 30 * time.Second, MaxDeliver: 3, Backoff: []time.Duration{time.Minute}})
	h.publishCreate("sbx-1")
	started := make(chan struct{})
	first := bus.NewRouter(h.js, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- first.Run(ctx, bus.Route{Stream: event.StreamCommands, Consumer: h.consumer, Policy: h.policy, Handler: func(ctx context.Context, m *bus.Message) ([]bus.Out, error) {
			close(started)
			<-ctx.Done()
			return nil, ctx.Err()
		}})
	}()
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("first router never got the message")
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run = %v, want nil on cancellation", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after cancellation")
	}
	if first.Stats.Failed.Load() != 1 || first.Stats.DeadLettered.Load() != 0 {
		t.Errorf("first router failed %d dead-lettered %d", first.Stats.Failed.Load(), first.Stats.DeadLettered.Load())
	}

	// Not waiting for AckWait (30s) nor the back-off (1m): the nak was
	// immediate.
	var c calls
	second := h.run(func(ctx context.Context, m *bus.Message) ([]bus.Out, error) {
		c.add(m)
		return nil, nil
	}, 1)
	await(t, 10*time.Second, "the second instance to finish the work", func() (bool, string) {
		return second.Stats.Handled.Load() == 1, fmt.Sprint(c.get())
	})
	if d := c.get(); !slices.Equal(d, []uint64{2}) {
		t.Errorf("second router saw deliveries %v, want [2]", d)
	}
}

// TestRouterPropagatesTrace checks the handler's context continues the
// publisher's trace, through a real server.
func TestRouterPropagatesTrace(t *testing.T) {
	t.Parallel()
	h := newHarness(t, testPolicy)
	ctx, span := otel.Tracer("test").Start(testCtx(t), "request")
	defer span.End()
	if _, err := h.pub.Publish(ctx, event.CommandSubject("local", event.VerbCreate, "dev", "sbx-1"), createEvent(t, "sbx-1")); err != nil {
		t.Fatal(err)
	}
	got := make(chan trace.SpanContext, 1)
	h.run(func(ctx context.Context, m *bus.Message) ([]bus.Out, error) {
		got <- trace.SpanContextFromContext(ctx)
		return nil, nil
	}, 1)
	select {
	case sc := <-got:
		if sc.TraceID() != span.SpanContext().TraceID() {
			t.Errorf("handler trace %s, want the publisher's %s", sc.TraceID(), span.SpanContext().TraceID())
		}
		if sc.SpanID() == span.SpanContext().SpanID() || !sc.IsValid() {
			t.Errorf("handler span %s should be the router's own child span", sc.SpanID())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("handler never ran")
	}
}

func TestRouterRunErrors(t *testing.T) {
	t.Parallel()
	h := newHarness(t, testPolicy)
	r := bus.NewRouter(h.js, nil)
	cases := []struct {
		name  string
		route bus.Route
		want  string
	}{
		{"nil handler", bus.Route{Stream: event.StreamCommands, Consumer: h.consumer}, "nil handler"},
		{"unknown consumer", bus.Route{Stream: event.StreamCommands, Consumer: "nobody", Handler: func(context.Context, *bus.Message) ([]bus.Out, error) { return nil, nil }}, "looking up consumer"},
		{"unknown stream", bus.Route{Stream: "NOPE", Consumer: h.consumer, Handler: func(context.Context, *bus.Message) ([]bus.Out, error) { return nil, nil }}, "looking up consumer"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := r.Run(testCtx(t), tc.route)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Run = %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

func TestPermanent(t *testing.T) {
	t.Parallel()
	base := errors.New("bad input")
	cases := []struct {
		name string
		err  error
		want bool
	}{
		{"nil stays nil", bus.Permanent(nil), false},
		{"plain error", base, false},
		{"permanent", bus.Permanent(base), true},
		{"wrapped permanent", fmt.Errorf("handling: %w", bus.Permanent(base)), true},
		{"malformed event", fmt.Errorf("decoding: %w", event.ErrMalformed), true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := bus.IsPermanent(tc.err); got != tc.want {
				t.Errorf("IsPermanent(%v) = %v, want %v", tc.err, got, tc.want)
			}
		})
	}
	if bus.Permanent(nil) != nil {
		t.Error("Permanent(nil) != nil")
	}
	p := bus.Permanent(base)
	if !errors.Is(p, base) || p.Error() != "bad input" {
		t.Errorf("Permanent hides its cause: %v", p)
	}
}
