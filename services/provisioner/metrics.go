package provisioner

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sand-boxer/sandboxer/pkg/metrics"
)

// Outcomes of a pool's work on one sandbox, as the worker decided them.
const (
	outcomeReady         = "ready"
	outcomeFailed        = "failed_" // + the phase: provision, wait_ready
	outcomeDestroyed     = "destroyed"
	outcomeTeardownError = "teardown_error"
)

// provisionerMetrics are the families of the provisioner's pools,
// labelled by extension (the catalog's, a bounded set). Every provisioner
// of a process given the same registry counts into the same families.
type provisionerMetrics struct {
	provision, ready, teardown *prometheus.HistogramVec
	outcomes                   *prometheus.CounterVec
}

func newProvisionerMetrics(reg prometheus.Registerer) *provisionerMetrics {
	hist := func(name, help string) *prometheus.HistogramVec {
		return metrics.Register(reg, prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: metrics.Namespace, Subsystem: "provisioner", Name: name, Help: help, Buckets: metrics.LifecycleBuckets,
		}, []string{"extension"}))
	}
	return &provisionerMetrics{
		provision: hist("provision_duration_seconds", "Time the backend's Provision took, by extension, whatever its outcome (a call cut short by shutdown is not counted)."),
		ready:     hist("wait_ready_duration_seconds", "Time the backend's WaitReady took, by extension, whatever its outcome (a call cut short by shutdown is not counted)."),
		teardown:  hist("teardown_duration_seconds", "Time the backend's Teardown took, by extension, whatever its outcome (a call cut short by shutdown is not counted)."),
		outcomes: metrics.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metrics.Namespace, Subsystem: "provisioner", Name: "outcomes_total",
			Help: "What a pool's workers made of their commands, by extension and outcome: ready, failed_provision, failed_wait_ready, destroyed, teardown_error (a teardown attempt that failed and is retried).",
		}, []string{"extension", "outcome"})),
	}
}

// poolMetrics are one pool's series.
type poolMetrics struct {
	provision, ready, teardown prometheus.Observer
	outcomes                   *prometheus.CounterVec
}

func (m *provisionerMetrics) pool(extension string) *poolMetrics {
	l := prometheus.Labels{"extension": extension}
	pm := &poolMetrics{
		provision: m.provision.With(l), ready: m.ready.With(l), teardown: m.teardown.With(l),
		outcomes: m.outcomes.MustCurryWith(l),
	}
	// Every outcome is exported from the start, at 0.
	for _, o := range []string{outcomeReady, outcomeFailed + "provision", outcomeFailed + "wait_ready", outcomeDestroyed, outcomeTeardownError} {
		pm.outcomes.WithLabelValues(o)
	}
	return pm
}

// took observes the duration of a backend call begun at start, unless
// ctx, the handler's, ended: a call cut short by shutdown measures
// nothing of the backend.
func took(ctx context.Context, o prometheus.Observer, start time.Time) {
	if ctx.Err() == nil {
		o.Observe(time.Since(start).Seconds())
	}
}

func (m *poolMetrics) outcome(o string) { m.outcomes.WithLabelValues(o).Inc() }
