package bus_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
)

// TestRouterMetrics: what a router counts in its Prometheus families, per
// durable consumer, is what happened: one message panics, fails and runs
// out of deliveries (two redeliveries, three failures, one panic, one dead
// letter), another is handled; every handler run is timed. A second
// router of the process shares the families.
func TestRouterMetrics(t *testing.T) {
	t.Parallel()
	h := newHarness(t, testPolicy)
	reg := prometheus.NewRegistry()
	rm := bus.NewRouterMetrics(reg)
	if again := bus.NewRouterMetrics(reg); again == nil {
		t.Fatal("a second router's families on the same registry: nil")
	}
	if bus.NewRouterMetrics(nil) != nil {
		t.Fatal("families without a registry: want nil")
	}
	h.publishCreate("sbx-1")
	h.publishCreate("sbx-2")
	r := bus.NewRouter(h.js, nil)
	r.Metrics = rm
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- r.Run(ctx, bus.Route{Stream: event.StreamCommands, Consumer: h.consumer, Policy: h.policy, Concurrency: 1,
			Handler: func(_ context.Context, m *bus.Message) ([]bus.Out, error) {
				if m.Event.Subject() == "sbx-2" {
					return nil, nil
				}
				if m.Delivered == 1 {
					panic("first delivery")
				}
				return nil, errors.New("backend down")
			}})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})

	counter := func(name string) float64 {
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() != name {
				continue
			}
			for _, m := range mf.GetMetric() {
				if len(m.GetLabel()) == 1 && m.GetLabel()[0].GetName() == "consumer" && m.GetLabel()[0].GetValue() == h.consumer {
					if c := m.GetCounter(); c != nil {
						return c.GetValue()
					}
					return float64(m.GetHistogram().GetSampleCount())
				}
			}
		}
		return 0
	}
	await(t, 15*time.Second, "the first message dead-lettered and the second handled", func() (bool, string) {
		return r.Stats.DeadLettered.Load() == 1 && r.Stats.Handled.Load() == 1, fmt.Sprintf("dead letters %d, handled %d", r.Stats.DeadLettered.Load(), r.Stats.Handled.Load())
	})
	want := map[string]float64{
		"sandboxer_bus_messages_handled_total":   1,
		"sandboxer_bus_handler_failures_total":   3,
		"sandboxer_bus_handler_panics_total":     1,
		"sandboxer_bus_redeliveries_total":       2,
		"sandboxer_bus_dead_letters_total":       1,
		"sandboxer_bus_handler_duration_seconds": 4, // observations: every run of the handler
	}
	for name, v := range want {
		if got := counter(name); got != v {
			t.Errorf("%s{consumer=%q} = %v, want %v", name, h.consumer, got, v)
		}
	}
	if n := testutil.CollectAndCount(reg); n != len(want) {
		t.Errorf("%d series, want %d: one per family for the one consumer", n, len(want))
	}
}
