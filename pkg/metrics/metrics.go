// Package metrics holds what sand-boxer's services share to export
// Prometheus metrics: registration that lets several components of one
// process (the four services of `sandboxer up`, a provisioner per pool)
// share a family, the histogram buckets of the design, and the HTTP
// handler of /metrics, /healthz and /readyz that `sandboxer serve
// --metrics` listens with.
//
// It keeps no state of its own: every collector lives in the registry a
// service's Options pass in. It must never import a service, nor the bus.
package metrics

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Namespace prefixes every family sand-boxer exports.
const Namespace = "sandboxer"

// Buckets of the histograms, in seconds.
var (
	// LifecycleBuckets suit phases of a sandbox's life that take seconds to
	// minutes: provisioning, waiting for readiness, teardown.
	LifecycleBuckets = []float64{0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600}
	// HandlerBuckets suit the handling of one message or request:
	// milliseconds for most, minutes for a provisioner's command.
	HandlerBuckets = []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300}
)

// Register registers c with reg and returns it; when reg already holds a
// collector of the same descriptors (another component of the process
// registered the family first), it returns that one, so both count into
// one family. A nil reg registers nothing and returns c, which then counts
// for nobody. Any other registration error (a family registered with other
// labels or help) is a programmer's error: Register panics.
func Register[C prometheus.Collector](reg prometheus.Registerer, c C) C {
	if reg == nil {
		return c
	}
	err := reg.Register(c)
	if err == nil {
		return c
	}
	var are prometheus.AlreadyRegisteredError
	if errors.As(err, &are) {
		if existing, ok := are.ExistingCollector.(C); ok {
			return existing
		}
	}
	panic("registering metrics: " + err.Error())
}

// Handler serves g's metrics in the Prometheus text exposition format (or
// what the scraper negotiates). A collector that fails is reported by its
// error alongside the metrics the others gathered, rather than failing the
// whole scrape.
func Handler(g prometheus.Gatherer) http.Handler {
	return promhttp.HandlerFor(g, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}

// Readiness reports what keeps a process from being ready: one short
// phrase per reason, none when it is ready. It must answer quickly.
type Readiness func(ctx context.Context) []string

// Mux is the handler of a `serve` process's metrics listener: GET
// /metrics (g's metrics), GET /healthz (200 while the process runs) and
// GET /readyz (200 when ready says nothing is missing, else 503 naming
// what is). Everything else is 404.
func Mux(g prometheus.Gatherer, ready Readiness) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", Handler(g))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		writeStatus(w, http.StatusOK, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if not := ready(r.Context()); len(not) > 0 {
			writeStatus(w, http.StatusServiceUnavailable, "not ready: "+strings.Join(not, "; "))
			return
		}
		writeStatus(w, http.StatusOK, "ready")
	})
	return mux
}

func writeStatus(w http.ResponseWriter, code int, status string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(map[string]string{"status": status})
}
