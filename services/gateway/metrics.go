package gateway

import (
	"context"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/metrics"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
)

// Admission outcomes: what became of a create request that passed its
// checks, or that failed them (invalid).
const (
	admitAdmitted     = "admitted"
	admitInvalid      = "invalid"
	admitNoRoute      = "no_route"
	admitInsufficient = "insufficient_credits"
	admitUnavailable  = "unavailable"
	admitBackPressure = "back_pressure"
)

// Intake outcomes: how a request event was answered.
const (
	intakeOK      = "ok"      // the sandbox
	intakeRefused = "refused" // a problem of the request's (4xx)
	intakeFailed  = "failed"  // a problem of the gateway's (5xx)
)

// poolScrapeTimeout bounds the consumer info reads of one scrape.
const poolScrapeTimeout = 2 * time.Second

// gatewayMetrics are the gateway's families. Counters count where the
// gateway decides; the pool and inventory gauges are read on each scrape
// (one consumer info per extension of the catalog; the inventory's
// counts, kept as records change).
type gatewayMetrics struct {
	handler    http.Handler // GET /metrics; nil without a gatherer
	requests   *prometheus.CounterVec
	duration   *prometheus.HistogramVec
	admissions *prometheus.CounterVec
	intake     *prometheus.CounterVec
}

func newGatewayMetrics(g *Gateway, reg prometheus.Registerer, gatherer prometheus.Gatherer) *gatewayMetrics {
	m := &gatewayMetrics{
		requests: metrics.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metrics.Namespace, Subsystem: "gateway", Name: "http_requests_total",
			Help: "HTTP requests the gateway answered, by route (the mux pattern) and status code.",
		}, []string{"route", "code"})),
		duration: metrics.Register(reg, prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: metrics.Namespace, Subsystem: "gateway", Name: "http_request_duration_seconds",
			Help:    "Time the gateway took to answer an HTTP request, by route (an event stream counts until it ends).",
			Buckets: metrics.HandlerBuckets,
		}, []string{"route"})),
		admissions: metrics.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metrics.Namespace, Subsystem: "gateway", Name: "admissions_total",
			Help: "Create requests (HTTP and bus) by outcome: admitted (the command is published), invalid, no_route, insufficient_credits, back_pressure, unavailable.",
		}, []string{"outcome"})),
		intake: metrics.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metrics.Namespace, Subsystem: "gateway", Name: "intake_requests_total",
			Help: "Request events of the bus intake, by verb (create, destroy, get, unknown) and outcome (ok, refused: 4xx, failed: 5xx).",
		}, []string{"verb", "outcome"})),
	}
	// Every outcome is exported from the start, at 0: a rate over a
	// series that appears only with its first count misses that count.
	for _, o := range []string{admitAdmitted, admitInvalid, admitNoRoute, admitInsufficient, admitUnavailable, admitBackPressure} {
		m.admissions.WithLabelValues(o)
	}
	for _, v := range []string{event.VerbCreate, event.VerbDestroy, event.VerbGet} {
		for _, o := range []string{intakeOK, intakeRefused, intakeFailed} {
			m.intake.WithLabelValues(v, o)
		}
	}
	if reg != nil {
		metrics.Register(reg, prometheus.Collector(&poolCollector{g: g}))
		metrics.Register(reg, prometheus.Collector(&inventoryCollector{g: g}))
	}
	if gatherer != nil {
		m.handler = metrics.Handler(gatherer)
	}
	return m
}

// serveMetrics handles GET /metrics: the Gatherer's families, for any
// caller (they name no consumer and no sandbox).
func (g *Gateway) serveMetrics(w http.ResponseWriter, r *http.Request) {
	if g.metrics.handler == nil {
		g.writeProblem(w, r, newProblem(http.StatusNotFound, "metrics are not served by this gateway"))
		return
	}
	g.metrics.handler.ServeHTTP(w, r)
}

// countRequest counts the answer sw gave to r, begun at since.
func (g *Gateway) countRequest(r *http.Request, sw *statusWriter, since time.Time) {
	status := sw.status
	if status == 0 {
		status = http.StatusOK
	}
	g.metrics.request(r, status, since)
}

// request counts one HTTP answer.
func (m *gatewayMetrics) request(r *http.Request, status int, since time.Time) {
	route := r.Pattern
	if route == "" {
		route = "other"
	}
	m.requests.WithLabelValues(route, strconv.Itoa(status)).Inc()
	m.duration.WithLabelValues(route).Observe(time.Since(since).Seconds())
}

func (m *gatewayMetrics) admitted(outcome string) { m.admissions.WithLabelValues(outcome).Inc() }

// countIntake counts the answer r to the request event on subject, by
// the subject's verb and the answer's outcome.
func (g *Gateway) countIntake(subject string, r api.BusReply) {
	verb := "unknown"
	if ref, err := event.ParseRequestSubject(subject); err == nil {
		switch ref.Verb {
		case event.VerbCreate, event.VerbDestroy, event.VerbGet:
			verb = ref.Verb
		}
	}
	outcome := intakeOK
	switch {
	case r.Problem != nil && r.Problem.Status >= 500:
		outcome = intakeFailed
	case r.Problem != nil:
		outcome = intakeRefused
	}
	g.metrics.intake.WithLabelValues(verb, outcome).Inc()
}

var (
	descPending = prometheus.NewDesc(metrics.Namespace+"_pool_pending_commands",
		"Commands waiting in an extension's pool durables (consumer info NumPending; a host-bound pool's and its hosts'), read at scrape.", []string{"extension"}, nil)
	descInFlight = prometheus.NewDesc(metrics.Namespace+"_pool_in_flight_commands",
		"Commands a worker of the pool holds unacknowledged (consumer info NumAckPending, every durable of the pool), read at scrape.", []string{"extension"}, nil)
	descHostPending = prometheus.NewDesc(metrics.Namespace+"_pool_host_pending_commands",
		"Commands waiting in the durable of one placement host of a host-bound pool (capabilities.locality: host), read at scrape.", []string{"extension", "host"}, nil)
	descHostLiveWorkers = prometheus.NewDesc(metrics.Namespace+"_pool_host_live_workers",
		"Live workers of a host-bound pool on one of its placement hosts.", []string{"extension", "host"}, nil)
	descLiveWorkers = prometheus.NewDesc(metrics.Namespace+"_pool_live_workers",
		"Workers of the pool with a live heartbeat in the workers bucket.", []string{"extension"}, nil)
	descCapacity = prometheus.NewDesc(metrics.Namespace+"_pool_capacity_sandboxes",
		"The manifest's capacity.max_sandboxes of the extension (0: unbounded).", []string{"extension"}, nil)
	descSandboxes = prometheus.NewDesc(metrics.Namespace+"_sandboxes",
		"Sandboxes in the inventory (folded from the lifecycle stream) by state; ended ones until their retention.", []string{"state"}, nil)
	descPastDeadline = prometheus.NewDesc(metrics.Namespace+"_sandboxes_past_deadline",
		"Sandboxes in a transient state for longer than their profile allows it: requested or provisioning past the provision and ready deadlines, failed, expired or destroying past the teardown deadline.",
		[]string{"state"}, nil)
)

// poolCollector reads each extension's pool on scrape: the capacity of
// its manifest, its live workers, and its durable's pending and in-flight
// commands (one consumer info each, within poolScrapeTimeout). A durable
// that cannot be read leaves its two series out of that scrape.
type poolCollector struct{ g *Gateway }

func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descPending
	ch <- descInFlight
	ch <- descHostPending
	ch <- descHostLiveWorkers
	ch <- descLiveWorkers
	ch <- descCapacity
}

func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	g := c.g
	if g.current() == nil {
		return
	}
	ctx, cancel := context.WithTimeout(g.bg, poolScrapeTimeout)
	defer cancel()
	for _, m := range g.opts.Catalog.Current().ExtensionList() {
		ch <- prometheus.MustNewConstMetric(descCapacity, prometheus.GaugeValue, float64(m.Capacity.MaxSandboxes), m.Name)
		if g.opts.Workers != nil {
			ch <- prometheus.MustNewConstMetric(descLiveWorkers, prometheus.GaugeValue, float64(len(g.opts.Workers.List(m.Name))), m.Name)
		}
		d := g.poolDepth(ctx, m)
		for _, h := range d.hosts {
			if g.opts.Workers != nil {
				live := 0
				for _, w := range g.opts.Workers.List(m.Name) {
					if w.Host == h.host {
						live++
					}
				}
				ch <- prometheus.MustNewConstMetric(descHostLiveWorkers, prometheus.GaugeValue, float64(live), m.Name, h.host)
			}
			if h.why == "" {
				ch <- prometheus.MustNewConstMetric(descHostPending, prometheus.GaugeValue, float64(h.pending), m.Name, h.host)
			}
		}
		if d.why != "" {
			continue
		}
		ch <- prometheus.MustNewConstMetric(descPending, prometheus.GaugeValue, float64(d.pending), m.Name)
		ch <- prometheus.MustNewConstMetric(descInFlight, prometheus.GaugeValue, float64(d.inFlight), m.Name)
	}
}

// inventoryCollector reads the gateway's inventory (its fold of the
// lifecycle stream) on scrape: counts by state, kept as records change,
// and the sandboxes of the transient states past their deadline, from the
// few records in such a state. Every gateway folds the whole stream, so
// each instance exports the same values.
type inventoryCollector struct{ g *Gateway }

func (c *inventoryCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descSandboxes
	ch <- descPastDeadline
}

func (c *inventoryCollector) Collect(ch chan<- prometheus.Metric) {
	g := c.g
	st := g.current()
	if st == nil {
		return
	}
	cat := g.opts.Catalog.Current()
	counts, late := st.inv.stateMetrics(g.opts.Now(), func(r *sandbox.Record) time.Duration {
		var d extension.Deadlines
		if p, err := cat.Profile(r.Profile); err == nil {
			d = p.Deadlines
		}
		return sandbox.StateDeadline(r.State, d)
	})
	for _, s := range event.States {
		ch <- prometheus.MustNewConstMetric(descSandboxes, prometheus.GaugeValue, float64(counts[s]), string(s))
	}
	for _, s := range transientStates {
		ch <- prometheus.MustNewConstMetric(descPastDeadline, prometheus.GaugeValue, float64(late[s]), string(s))
	}
}

// transientStates are the states a sandbox leaves by itself within its
// profile's deadlines.
var transientStates = []event.State{event.StateRequested, event.StateProvisioning, event.StateFailed, event.StateExpired, event.StateDestroying}

func transient(s event.State) bool {
	for _, t := range transientStates {
		if s == t {
			return true
		}
	}
	return false
}

// stateMetrics returns the records by state and, of the records in a
// transient state, how many have been in it longer than deadline says, at
// now. It reads only the transient records.
func (v *inventory) stateMetrics(now time.Time, deadline func(*sandbox.Record) time.Duration) (map[event.State]int, map[event.State]int) {
	v.mu.RLock()
	defer v.mu.RUnlock()
	counts := make(map[event.State]int, len(v.byState))
	for s, n := range v.byState {
		counts[s] = n
	}
	late := map[event.State]int{}
	for _, r := range v.transient {
		if now.Sub(r.EnteredState()) > deadline(r) {
			late[r.State]++
		}
	}
	return counts, late
}
