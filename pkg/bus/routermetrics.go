package bus

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sand-boxer/sandboxer/pkg/metrics"
)

// RouterMetrics are the Prometheus families of routers, labelled by the
// durable consumer a route reads (registry, metering-accrual,
// provisioner-<extension>...: the design's durables, a bounded set). Every
// router of a process given the same registry counts into the same
// families, so a process running several services exports each family
// once. A nil *RouterMetrics records nothing.
type RouterMetrics struct {
	handled, failed, deadLettered, panics, redelivered *prometheus.CounterVec
	duration                                           *prometheus.HistogramVec
}

// NewRouterMetrics creates the router families in reg, or finds them
// there when another router of the process created them. A nil reg
// returns nil.
func NewRouterMetrics(reg prometheus.Registerer) *RouterMetrics {
	if reg == nil {
		return nil
	}
	return routerFamilies(reg)
}

// routerFamilies creates the families in reg; with a nil reg, in no
// registry.
func routerFamilies(reg prometheus.Registerer) *RouterMetrics {
	counter := func(name, help string) *prometheus.CounterVec {
		return metrics.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metrics.Namespace, Subsystem: "bus", Name: name, Help: help,
		}, []string{"consumer"}))
	}
	return &RouterMetrics{
		handled:      counter("messages_handled_total", "Messages a router handled and acknowledged, by durable consumer."),
		failed:       counter("handler_failures_total", "Deliveries whose handler failed or whose outputs could not be published, by durable consumer: each is retried or dead-lettered."),
		deadLettered: counter("dead_letters_total", "Messages a router copied to the dead-letter stream and terminated, by durable consumer."),
		panics:       counter("handler_panics_total", "Handler panics a router recovered, by durable consumer."),
		redelivered:  counter("redeliveries_total", "Deliveries of a message delivered before (NumDelivered > 1), by durable consumer."),
		duration: metrics.Register(reg, prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: metrics.Namespace, Subsystem: "bus", Name: "handler_duration_seconds",
			Help:    "Time from a delivery's handler starting to its outputs being published, by durable consumer.",
			Buckets: metrics.HandlerBuckets,
		}, []string{"consumer"})),
	}
}

// routeMetrics are one route's series, resolved once per Run. Without
// RouterMetrics they are series of no registry: counting costs the same
// and needs no nil checks.
type routeMetrics struct {
	handled, failed, deadLettered, panics, redelivered prometheus.Counter
	duration                                           prometheus.Observer
}

func (m *RouterMetrics) route(consumer string) *routeMetrics {
	if m == nil {
		m = routerFamilies(nil)
	}
	return &routeMetrics{
		handled: m.handled.WithLabelValues(consumer), failed: m.failed.WithLabelValues(consumer),
		deadLettered: m.deadLettered.WithLabelValues(consumer), panics: m.panics.WithLabelValues(consumer),
		redelivered: m.redelivered.WithLabelValues(consumer), duration: m.duration.WithLabelValues(consumer),
	}
}
