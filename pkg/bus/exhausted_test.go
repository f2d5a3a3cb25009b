package bus_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
)

// compensations records the calls of an exhausted message's compensation.
type compensations struct {
	mu   sync.Mutex
	errs []error
	at   []uint64 // the message's Delivered at each call
}

func (c *compensations) fn(outs ...bus.Out) bus.ExhaustedFunc {
	return func(ctx context.Context, m *bus.Message, err error) ([]bus.Out, error) {
		c.mu.Lock()
		defer c.mu.Unlock()
		if _, ok := ctx.Deadline(); !ok {
			err = fmt.Errorf("compensation without a deadline: %w", err)
		}
		c.errs = append(c.errs, err)
		c.at = append(c.at, m.Delivered)
		return outs, nil
	}
}

func (c *compensations) get() ([]error, []uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.errs), slices.Clone(c.at)
}

// watchOrder records, in the order the server sent them, the lifecycle
// events, dead letters and acks of the commands durable.
func watchOrder(t *testing.T, h *harness) func() []string {
	t.Helper()
	var (
		mu   sync.Mutex
		seen []string
	)
	nc := h.srv.Conn(t)
	ch := make(chan *nats.Msg, 1024)
	for _, subj := range []string{"$JS.ACK." + event.StreamCommands + ".>", event.SubjectLifecycle, event.SubjectDLQ} {
		if _, err := nc.ChanSubscribe(subj, ch); err != nil {
			t.Fatal(err)
		}
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	stop, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		for {
			select {
			case m := <-ch:
				s := "pub " + m.Subject
				if strings.HasPrefix(m.Subject, "$JS.ACK.") {
					s = "ack " + strings.Fields(string(m.Data) + " ")[0]
				}
				mu.Lock()
				seen = append(seen, s)
				mu.Unlock()
			case <-stop:
				return
			}
		}
	}()
	t.Cleanup(func() { close(stop); <-stopped })
	return func() []string {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(seen)
	}
}

// TestRouterCompensatesExhaustedMessages: on the last allowed delivery of a
// message whose handler keeps failing (an error or a panic), the router
// publishes the compensation the handler registered, then writes the dead
// letter, then terminates the message; never before the last delivery.
func TestRouterCompensatesExhaustedMessages(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name   string
		fail   func() error
		reason string
	}{
		{"an error", func() error { return errors.New("backend down") }, "exhausted 3 deliveries: backend down"},
		{"a panic", func() error { panic("backend exploded") }, "exhausted 3 deliveries: handler panicked: backend exploded"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, testPolicy)
			order := watchOrder(t, h)
			seq := h.publishCreate("sbx-1")
			failed := event.LifecycleSubject("dev", "local", "sbx-1", event.StateReady)
			var comp compensations
			var c calls
			r := h.run(func(ctx context.Context, m *bus.Message) ([]bus.Out, error) {
				c.add(m)
				m.OnExhausted(comp.fn(bus.Out{Subject: failed, Event: readyEvent(t, "sbx-1")}))
				return nil, tc.fail()
			}, 1)
			h.deadLetter(seq, testPolicy.MaxDeliver, tc.reason)
			errs, at := comp.get()
			if len(errs) != 1 || !slices.Equal(at, []uint64{3}) {
				t.Fatalf("compensation called %d times at deliveries %v (%v), want once at the last", len(errs), at, errs)
			}
			var xerr *bus.ExhaustedError
			if !errors.As(errs[0], &xerr) || xerr.Deliveries != 3 || errs[0].Error() != tc.reason {
				t.Errorf("compensation got %v (%T), want an ExhaustedError %q", errs[0], errs[0], tc.reason)
			}
			if d := c.get(); !slices.Equal(d, []uint64{1, 2, 3}) {
				t.Errorf("deliveries %v, want [1 2 3]", d)
			}
			dlq := "pub " + event.DLQSubject(event.StreamCommands, h.consumer)
			await(t, 5*time.Second, "the compensation, the dead letter and the term on the wire", func() (bool, string) {
				s := order()
				return slices.Contains(s, "ack +TERM") && slices.Contains(s, dlq) && slices.Contains(s, "pub "+failed), fmt.Sprint(s)
			})
			s := order()
			if i, j, k := slices.Index(s, "pub "+failed), slices.Index(s, dlq), slices.Index(s, "ack +TERM"); !(i < j && j < k) {
				t.Errorf("wire %v: want the compensation, then the dead letter, then the term", s)
			}
			if n := h.streamMsgs(event.StreamLifecycle); n != 1 {
				t.Errorf("lifecycle stream holds %d events, want the compensation's one", n)
			}
			if r.Stats.Compensated.Load() != 1 || r.Stats.DeadLettered.Load() != 1 {
				t.Errorf("stats compensated %d dead-lettered %d, want 1 and 1", r.Stats.Compensated.Load(), r.Stats.DeadLettered.Load())
			}
		})
	}
}

// TestRouterCompensationIsForExhaustionOnly: a permanent error is
// dead-lettered without compensation (retrying could not have fixed it,
// and the handler registered what giving up after retries means); a
// message that succeeds on its last delivery is acked without it.
func TestRouterCompensationIsForExhaustionOnly(t *testing.T) {
	t.Parallel()
	t.Run("permanent error", func(t *testing.T) {
		t.Parallel()
		h := newHarness(t, testPolicy)
		seq := h.publishCreate("sbx-1")
		var comp compensations
		r := h.run(func(ctx context.Context, m *bus.Message) ([]bus.Out, error) {
			m.OnExhausted(comp.fn())
			return nil, bus.Permanent(errors.New("forged command"))
		}, 1)
		h.deadLetter(seq, 1, "forged command")
		if errs, _ := comp.get(); len(errs) != 0 || r.Stats.Compensated.Load() != 0 {
			t.Errorf("compensation called for a permanent error: %v", errs)
		}
	})
	t.Run("success on the last delivery", func(t *testing.T) {
		t.Parallel()
		h := newHarness(t, testPolicy)
		h.publishCreate("sbx-1")
		var comp compensations
		r := h.run(func(ctx context.Context, m *bus.Message) ([]bus.Out, error) {
			m.OnExhausted(comp.fn())
			if m.Delivered < uint64(testPolicy.MaxDeliver) {
				return nil, errors.New("not yet")
			}
			return nil, nil
		}, 1)
		await(t, 10*time.Second, "the last delivery to be acked", func() (bool, string) {
			return r.Stats.Handled.Load() == 1, fmt.Sprintf("failed %d", r.Stats.Failed.Load())
		})
		await(t, 5*time.Second, "the consumer to settle", h.settled)
		if errs, _ := comp.get(); len(errs) != 0 || h.streamMsgs(event.StreamDLQ) != 0 {
			t.Errorf("compensation called %v, %d dead letters, for a message that succeeded", errs, h.streamMsgs(event.StreamDLQ))
		}
	})
}

// TestRouterDeadLettersWhenCompensationFails: a compensation that fails
// (its outputs cannot be published, or it panics) does not keep the dead
// letter from being written; its reason says the compensation failed.
func TestRouterDeadLettersWhenCompensationFails(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name string
		fn   bus.ExhaustedFunc
		want string
	}{
		{"unpublishable output", func(ctx context.Context, m *bus.Message, err error) ([]bus.Out, error) {
			return []bus.Out{{Subject: "nostream.sandboxer.test", Event: readyEvent(t, "sbx-1")}}, nil
		}, "; compensation failed: publishing nostream.sandboxer.test"},
		{"error", func(ctx context.Context, m *bus.Message, err error) ([]bus.Out, error) {
			return nil, errors.New("cannot read the sandbox's state")
		}, "; compensation failed: cannot read the sandbox's state"},
		{"panic", func(ctx context.Context, m *bus.Message, err error) ([]bus.Out, error) {
			panic("compensation bug")
		}, "; compensation failed: compensation panicked: compensation bug"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, testPolicy)
			seq := h.publishCreate("sbx-1")
			r := h.run(func(ctx context.Context, m *bus.Message) ([]bus.Out, error) {
				m.OnExhausted(tc.fn)
				return nil, errors.New("backend down")
			}, 1)
			h.deadLetter(seq, testPolicy.MaxDeliver, "exhausted 3 deliveries: backend down"+tc.want)
			if r.Stats.Compensated.Load() != 0 || r.Stats.DeadLettered.Load() != 1 {
				t.Errorf("stats compensated %d dead-lettered %d, want 0 and 1", r.Stats.Compensated.Load(), r.Stats.DeadLettered.Load())
			}
		})
	}
}
