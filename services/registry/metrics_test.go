package registry_test

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
	"github.com/sand-boxer/sandboxer/services/registry"
)

// TestMetrics: the registry counts the expiries it fired, once per
// sandbox, and its routers count per durable what they handled.
func TestMetrics(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	e := start(t, natstest.Start(t), func(o *registry.Options) { o.Metrics = reg })
	const id = "sbx-ttl-metrics"
	e.publishState(t, workerA, id, event.StateProvisioning, time.Time{})
	e.publishState(t, workerA, id, event.StateReady, time.Now().UTC().Add(-time.Minute))
	e.awaitRecord(t, id, 10*time.Second, inState(event.StateExpired))
	// The fired timer is acknowledged once its outputs are published.
	eventually(t, 10*time.Second, func() (bool, string) {
		s := e.reg.Stats()
		return s.Handled.Load() == 3, "want ready, expired and the timer handled (provisioning is not the durable's)"
	})
	const expected = `
# HELP sandboxer_registry_expiries_fired_total Ready sandboxes the registry expired when their TTL's timer fired (each then gets an expired event and a destroy command).
# TYPE sandboxer_registry_expiries_fired_total counter
sandboxer_registry_expiries_fired_total 1
# HELP sandboxer_bus_messages_handled_total Messages a router handled and acknowledged, by durable consumer.
# TYPE sandboxer_bus_messages_handled_total counter
sandboxer_bus_messages_handled_total{consumer="registry"} 2
sandboxer_bus_messages_handled_total{consumer="registry-timers"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(expected), "sandboxer_registry_expiries_fired_total", "sandboxer_bus_messages_handled_total"); err != nil {
		t.Fatal(err)
	}
}
