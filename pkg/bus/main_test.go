package bus_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.uber.org/goleak"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
)

func TestMain(m *testing.M) {
	// Services set these once at start-up; the tests do the same before
	// any test runs. A TracerProvider without processors starts no
	// goroutines.
	otel.SetTextMapPropagator(propagation.TraceContext{})
	otel.SetTracerProvider(sdktrace.NewTracerProvider())
	goleak.VerifyTestMain(m)
}

// testPolicy keeps redelivery fast: the tests await outcomes that take a
// few back-offs.
var testPolicy = bus.ConsumerPolicy{AckWait: time.Second, MaxDeliver: 3, Backoff: []time.Duration{100 * time.Millisecond}}

// await polls cond until it holds or timeout passes, then fails t with
// what it was waiting for and cond's last word.
func await(t testing.TB, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, last := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s (last: %s)", timeout, what, last)
		}
		<-tick.C
	}
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// harness is one real nats-server with the sand-boxer topology and a
// durable commands consumer named after the extension "local".
type harness struct {
	t        *testing.T
	srv      *natstest.Server
	nc       *nats.Conn
	js       jetstream.JetStream
	pub      *bus.Publisher
	policy   bus.ConsumerPolicy
	consumer string
}

func newHarness(t *testing.T, policy bus.ConsumerPolicy) *harness {
	t.Helper()
	srv := natstest.Start(t)
	nc := srv.Conn(t)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{t: t, srv: srv, nc: nc, js: js, pub: bus.NewPublisher(js), policy: policy, consumer: "local"}
	if _, err := bus.EnsureConsumer(testCtx(t), js, event.StreamCommands, h.consumer, event.CommandFilter("local"), policy); err != nil {
		t.Fatal(err)
	}
	return h
}

func createEvent(t testing.TB, sandbox string) *event.Event {
	t.Helper()
	ref := event.Ref{SandboxID: sandbox, Consumer: "team-a", Profile: "local", Extension: "local"}
	e, err := event.New(event.TypeCreate, "sandboxer/test", sandbox, sandbox+".create", event.Create{Ref: ref, RequestedAt: time.Now().UTC()})
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func readyEvent(t testing.TB, sandbox string) *event.Event {
	t.Helper()
	ref := event.Ref{SandboxID: sandbox, Consumer: "team-a", Profile: "local", Extension: "local"}
	e, err := event.New(event.TypeReady, "sandboxer/test", sandbox, sandbox+".ready",
		event.Ready{Ref: ref, Handle: event.Handle{SandboxID: sandbox, Host: "localhost"}, Reachability: event.Reachability{Host: "localhost"}, ReadyAt: time.Now().UTC()})
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// publishCreate publishes a create command for sandbox and returns its
// stream sequence.
func (h *harness) publishCreate(sandbox string) uint64 {
	h.t.Helper()
	ack, err := h.pub.Publish(testCtx(h.t), event.CommandSubject("local", event.VerbCreate, "dev", sandbox), createEvent(h.t, sandbox))
	if err != nil {
		h.t.Fatalf("publishing create: %v", err)
	}
	return ack.Sequence
}

// run runs a router on route until the test ends, and checks it stops.
func (h *harness) run(handler bus.Handler, concurrency int) *bus.Router {
	h.t.Helper()
	r := bus.NewRouter(h.js, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- r.Run(ctx, bus.Route{Stream: event.StreamCommands, Consumer: h.consumer, Policy: h.policy, Concurrency: concurrency, Handler: handler})
	}()
	h.t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				h.t.Errorf("Run returned %v after cancellation, want nil", err)
			}
		case <-time.After(15 * time.Second):
			h.t.Error("Run did not return after cancellation")
		}
	})
	return r
}

// wire records, in the order the server relays them, the router's acks
// (the bodies sent to $JS.ACK subjects of the commands consumer) and the
// lifecycle events published: everything the router's one connection
// sends, so the order between an output and its ack is observable.
type wire struct {
	mu     sync.Mutex
	events []string
}

func (h *harness) watchWire() *wire {
	h.t.Helper()
	w := &wire{}
	record := func(m *nats.Msg) {
		var s string
		switch {
		case strings.HasPrefix(m.Subject, "$JS.ACK."):
			if !strings.Contains(m.Subject, "."+event.StreamCommands+"."+h.consumer+".") {
				return
			}
			s = "ack " + strings.Fields(string(m.Data) + " ")[0]
		case strings.HasPrefix(m.Subject, "sandboxer.evt."):
			s = "pub " + m.Subject
		default:
			return
		}
		w.mu.Lock()
		w.events = append(w.events, s)
		w.mu.Unlock()
	}
	// Both subscriptions feed one channel, which the connection's reader
	// fills in the order the server sent the messages.
	nc := h.srv.Conn(h.t)
	ch := make(chan *nats.Msg, 4096)
	for _, subj := range []string{"$JS.ACK.>", event.SubjectLifecycle} {
		if _, err := nc.ChanSubscribe(subj, ch); err != nil {
			h.t.Fatal(err)
		}
	}
	if err := nc.Flush(); err != nil {
		h.t.Fatal(err)
	}
	stop, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		for {
			select {
			case m := <-ch:
				record(m)
			case <-stop:
				return
			}
		}
	}()
	h.t.Cleanup(func() { close(stop); <-stopped })
	return w
}

func (w *wire) snapshot() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]string(nil), w.events...)
}

func (w *wire) count(s string) int {
	n := 0
	for _, e := range w.snapshot() {
		if e == s {
			n++
		}
	}
	return n
}

func (h *harness) streamMsgs(name string) uint64 {
	h.t.Helper()
	s, err := h.js.Stream(testCtx(h.t), name)
	if err != nil {
		h.t.Fatal(err)
	}
	info, err := s.Info(testCtx(h.t))
	if err != nil {
		h.t.Fatal(err)
	}
	return info.State.Msgs
}

func (h *harness) consumerInfo() *jetstream.ConsumerInfo {
	h.t.Helper()
	c, err := h.js.Consumer(testCtx(h.t), event.StreamCommands, h.consumer)
	if err != nil {
		h.t.Fatal(err)
	}
	info, err := c.Info(testCtx(h.t))
	if err != nil {
		h.t.Fatal(err)
	}
	return info
}

// settled reports whether the consumer has nothing pending or unacked.
func (h *harness) settled() (bool, string) {
	info := h.consumerInfo()
	return info.NumPending == 0 && info.NumAckPending == 0,
		fmt.Sprintf("pending %d, ack pending %d, redelivered %d", info.NumPending, info.NumAckPending, info.NumRedelivered)
}

// streamMessages reads every message stored in stream.
func (h *harness) streamMessages(name string) []*jetstream.RawStreamMsg {
	h.t.Helper()
	ctx := testCtx(h.t)
	s, err := h.js.Stream(ctx, name)
	if err != nil {
		h.t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		h.t.Fatal(err)
	}
	var out []*jetstream.RawStreamMsg
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
		m, err := s.GetMsg(ctx, seq)
		if err != nil {
			continue // deleted
		}
		out = append(out, m)
	}
	return out
}
