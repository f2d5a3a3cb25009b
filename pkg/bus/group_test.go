package bus_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
)

// TestGroupShutdownWaitsThenCancels: Shutdown lets a handler in flight
// finish while its context lasts, and cancels it when that context ends.
func TestGroupShutdownWaitsThenCancels(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name       string
		finishes   bool // the handler returns on its own before Shutdown's deadline
		wantErr    bool
		wantCancel bool
	}{
		{name: "drains", finishes: true},
		{name: "cancels at the deadline", wantErr: true, wantCancel: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, testPolicy)
			entered, release := make(chan struct{}), make(chan struct{})
			cancelled := make(chan bool, 1)
			r := bus.NewRouter(h.js, nil)
			g := r.Start(bus.Route{Stream: event.StreamCommands, Consumer: h.consumer, Policy: h.policy, Concurrency: 1,
				Handler: func(ctx context.Context, m *bus.Message) ([]bus.Out, error) {
					close(entered)
					select {
					case <-release:
						cancelled <- false
						return nil, nil
					case <-ctx.Done():
						cancelled <- true
						return nil, ctx.Err()
					}
				}})
			h.publishCreate("sbx-g")
			select {
			case <-entered:
			case <-time.After(10 * time.Second):
				t.Fatal("handler never ran")
			}
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			if tc.finishes {
				close(release)
			}
			err := g.Shutdown(ctx)
			if (err != nil) != tc.wantErr || (err != nil && !errors.Is(err, context.DeadlineExceeded)) {
				t.Fatalf("Shutdown = %v, want error %v", err, tc.wantErr)
			}
			if got := <-cancelled; got != tc.wantCancel {
				t.Fatalf("handler cancelled = %v, want %v", got, tc.wantCancel)
			}
		})
	}
}
