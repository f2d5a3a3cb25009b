package bus_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
)

// TestRouterHandsBackOnShutdown stops a router while its handlers run and
// more messages wait in its pull buffer. Everything it did not finish must
// reach the next router at once, not after the 60s AckWait.
func TestRouterHandsBackOnShutdown(t *testing.T) {
	t.Parallel()
	// MaxAckPending 7: four messages in handlers and three in the pull
	// buffer, after which the server delivers no more, so none is in
	// flight when the router stops (what the client never saw cannot be
	// handed back; it returns after AckWait).
	policy := bus.ConsumerPolicy{AckWait: 60 * time.Second, MaxDeliver: 5, Backoff: []time.Duration{10 * time.Millisecond}, MaxAckPending: 7}
	h := newHarness(t, policy)
	const n = 12
	for i := range n {
		h.publishCreate(fmt.Sprintf("sbx-%d", i))
	}
	entered := make(chan struct{}, n)
	first := bus.NewRouter(h.js, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- first.Run(ctx, bus.Route{Stream: event.StreamCommands, Consumer: h.consumer, Policy: policy, Concurrency: 4,
			Handler: func(ctx context.Context, m *bus.Message) ([]bus.Out, error) {
				entered <- struct{}{}
				<-ctx.Done() // a long command, interrupted by shutdown
				return nil, ctx.Err()
			}})
	}()
	for range 4 {
		select {
		case <-entered:
		case <-time.After(10 * time.Second):
			t.Fatal("the first router never started handling")
		}
	}
	// Four messages in handlers, more pulled into the buffer.
	await(t, 10*time.Second, "messages waiting in the pull buffer", func() (bool, string) {
		info := h.consumerInfo()
		return info.NumAckPending == 7, fmt.Sprintf("%d pending ack", info.NumAckPending)
	})
	// The server counts a message pending when it sends it; a round trip
	// on the router's connection makes sure the client has read all seven
	// (a PONG follows what the server sent before it), so none is still
	// on the wire when the router stops (seen under load).
	if err := h.js.Conn().Flush(); err != nil {
		t.Fatal(err)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after cancellation")
	}

	var handled atomic.Int64
	h.run(func(ctx context.Context, m *bus.Message) ([]bus.Out, error) {
		handled.Add(1)
		return nil, nil
	}, 4)
	// Well under AckWait: only handed-back messages can arrive this soon.
	await(t, 20*time.Second, "every message at the second router", func() (bool, string) {
		return handled.Load() == n, fmt.Sprintf("%d of %d handled", handled.Load(), n)
	})
}
