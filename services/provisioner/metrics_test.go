package provisioner_test

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/catalog"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/local"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
	"github.com/sand-boxer/sandboxer/services/provisioner"
)

// TestMetrics: a pool counts what its workers made of their commands and
// times the backend's calls, labelled by extension: a sandbox that
// becomes ready and is destroyed, one whose Provision fails (and whose
// cleanup then runs).
func TestMetrics(t *testing.T) {
	t.Parallel()
	e := newEnv(t, localManifest("local", 5*time.Second))
	reg := prometheus.NewRegistry()
	nc := e.srv.ConnAs(t, auth.Identity{Role: auth.RoleProvisioner, Extension: "local"})
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	m, err := e.cat.Current().Extension("local")
	if err != nil {
		t.Fatal(err)
	}
	e.srv.Setup(t, provisioner.PoolConsumers(m)...)
	cctx, stopCat := context.WithCancel(context.Background())
	t.Cleanup(stopCat)
	cat, err := catalog.Follow(cctx, nc)
	if err != nil {
		t.Fatal(err)
	}
	<-cat.Ready()
	p, err := provisioner.New(provisioner.Options{
		JS: js, Catalog: cat, Extensions: extension.NewRegistry(local.Info), Pools: []string{"local"},
		DataDir: e.dataDir, WorkerID: "w1", Metrics: reg,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := p.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = p.Shutdown(ctx)
	})

	ok, bad := sandbox.NewID(), sandbox.NewID()
	e.publishCreate(t, "local", ok, nil)
	e.awaitEvent(t, ok, event.StateReady)
	e.publishDestroy(t, "local", ok)
	e.awaitEvent(t, ok, event.StateDestroyed)
	e.publishCreate(t, "local", bad, map[string]string{"repo": "/nonexistent/repository"})
	e.awaitEvent(t, bad, event.StateDestroyed)

	// The router acks after it has published what the handler returned:
	// the last destroy is counted once the consumer has nothing in flight.
	eventually(t, 10*time.Second, func() bool { return p.Stats().Handled.Load() == 4 }, "four commands handled")
	outcome := func(o string) float64 {
		return counterValue(t, reg, "sandboxer_provisioner_outcomes_total", "local", o)
	}
	for o, want := range map[string]float64{"ready": 1, "failed_provision": 1, "failed_wait_ready": 0, "destroyed": 2, "teardown_error": 0} {
		if got := outcome(o); got != want {
			t.Errorf("outcome %s = %v, want %v", o, got, want)
		}
	}
	for name, want := range map[string]uint64{
		"sandboxer_provisioner_provision_duration_seconds":  2, // one failed: every call is timed
		"sandboxer_provisioner_wait_ready_duration_seconds": 1,
		"sandboxer_provisioner_teardown_duration_seconds":   2,
		"sandboxer_bus_handler_duration_seconds":            4,
	} {
		if got := histogramCount(t, reg, name); got != want {
			t.Errorf("%s count = %d, want %d", name, got, want)
		}
	}
}

// counterValue is the value of the counter of family name whose label
// values, in label name order, are values.
func counterValue(t *testing.T, reg *prometheus.Registry, name string, values ...string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			match := len(m.GetLabel()) == len(values)
			for i, l := range m.GetLabel() {
				match = match && l.GetValue() == values[i]
			}
			if match {
				return m.GetCounter().GetValue()
			}
		}
	}
	t.Fatalf("no series %s%v", name, values)
	return 0
}

// histogramCount is the count of observations of family name, over its
// series (the router's are per durable: a failed create's destroy goes
// to its host's).
func histogramCount(t *testing.T, reg *prometheus.Registry, name string) uint64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) > 0 {
			var n uint64
			for _, m := range mf.GetMetric() {
				n += m.GetHistogram().GetSampleCount()
			}
			return n
		}
	}
	t.Fatalf("no series of %s", name)
	return 0
}
