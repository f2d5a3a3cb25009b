// Package metering is the metering service: it owns credits (an account
// per consumer with grants, holds and an append-only ledger), prices
// sandboxes, admits them against credit, accrues their usage while they
// run, settles it when they end, and publishes the metering stream billing
// systems subscribe to.
//
// It consumes lifecycle events and its own accrual and hold deadline
// timers, and produces metering events, destroy commands when a
// consumer's credit runs out, and rejected events for holds whose create
// never came. It answers admission and the credits API over NATS
// request-reply as the micro service "sandboxer-metering": the contract
// (types, errors, the client) is pkg/credits ([credits.Client]).
//
// Every piece of state is in the credits bucket, one stream, changed by
// atomic batches each guarded by the revisions it read, and every timer is a schedule on the timers stream, so
// any number of instances run side by side and any of them may restart at
// any time. The package never links extension code: metered backends quote
// through their own provisioner workers over request-reply. It must never
// import another service.
package metering

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/catalog"
	"github.com/sand-boxer/sandboxer/pkg/event"
)

// Names the metering service uses on the bus.
const (
	// Source is the CloudEvents source of every event metering emits.
	Source = "/sandboxer/metering"
	// ConsumerLifecycle is the durable consumer of lifecycle events.
	ConsumerLifecycle = bus.DurableMetering
	// ConsumerAccrual is the durable consumer of fired accrual timers and
	// hold deadlines.
	ConsumerAccrual = bus.DurableMeteringAccrual
	// ServiceName is the micro service answering admission and the
	// credits API.
	ServiceName = "sandboxer-metering"
	// ServiceVersion is the version the micro service announces.
	ServiceVersion = "0.1.0"
)

// Consumers are metering's durable consumers, with delivery policy p, for
// setup to create: the lifecycle events that move money (provisioning,
// destroying and expired are never delivered to metering) and the fired
// accrual ticks and hold deadlines.
func Consumers(p bus.ConsumerPolicy) []bus.ConsumerSpec {
	return []bus.ConsumerSpec{
		{Stream: event.StreamLifecycle, Name: ConsumerLifecycle, Policy: p, Description: "metering: lifecycle events that move money",
			Filters: []string{
				event.StateFilter(event.StateReady), event.StateFilter(event.StateFailed),
				event.StateFilter(event.StateRejected), event.StateFilter(event.StateDestroyed),
			}},
		{Stream: event.StreamTimers, Name: ConsumerAccrual, Filters: []string{event.AccrualFireFilter, event.HoldDeadlineFireFilter}, Policy: p,
			Description: "metering: accrual ticks of running sandboxes and hold deadlines"},
	}
}

// Options configures a [Metering].
type Options struct {
	// JS is the JetStream context. Required. The streams and buckets of
	// [bus.Topology] must exist.
	JS jetstream.JetStream
	// NC is the connection requests are answered and quotes asked on.
	// Default JS.Conn().
	NC *nats.Conn
	// Logger logs. Default discards.
	Logger *slog.Logger
	// AccrualInterval is how often a running sandbox of a metered
	// backend has its usage debited, and how soon, at the earliest, a
	// self-hosted one's next tick is (one ticks when its hold stops
	// covering the Lookahead: accrual.go). At least 1s (the schedule's
	// precision). Default 30s.
	AccrualInterval time.Duration
	// Lookahead is how much running time a hold must cover beyond what
	// was debited; when it cannot be extended that far, a low notice goes
	// out. Default twice AccrualInterval.
	Lookahead time.Duration
	// DefaultHoldDuration is the duration admission holds credit for when
	// a sandbox has no TTL. Default 1h.
	DefaultHoldDuration time.Duration
	// HoldDeadline is how long an admitted hold may wait for its
	// sandbox's lifecycle to start (the create command published and
	// taken by a worker) before the sandbox is rejected and the hold
	// released. At least 1s (the schedule's precision). Default: the
	// profile's provision and ready deadlines plus 5m; negative: no
	// deadline.
	HoldDeadline time.Duration
	// QuoteTimeout bounds a quote request to a metered extension's
	// workers. Default 5s.
	QuoteTimeout time.Duration
	// Concurrency is how many lifecycle events and accrual ticks this
	// instance handles at once, each. Changes to one account made at once
	// share a compare-and-swap, so more handlers mean bigger batches.
	// Default 64.
	Concurrency int
	// Requests is how many requests (admissions, grants, reads) this
	// instance handles at once. Default 256.
	Requests int
	// Policy is the delivery policy of both durable consumers. Zero fields
	// take the [bus.ConsumerPolicy] defaults.
	Policy bus.ConsumerPolicy
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// Metrics is where metering's Prometheus families are registered
	// (events folded, credit granted and debited, notices, its durables'
	// lag, open holds, accounts low on credit, the router's counts).
	// Default nil: none are.
	Metrics prometheus.Registerer
	// MetricsRefresh is how old the open holds and accounts low on credit
	// of a scrape may be: a scrape reads every account document again
	// once they are older. Default 15s.
	MetricsRefresh time.Duration
}

func (o Options) withDefaults() Options {
	if o.NC == nil && o.JS != nil {
		o.NC = o.JS.Conn()
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.AccrualInterval <= 0 {
		o.AccrualInterval = 30 * time.Second
	}
	if o.AccrualInterval < time.Second {
		o.AccrualInterval = time.Second
	}
	o.AccrualInterval = o.AccrualInterval.Truncate(time.Second)
	if o.Lookahead <= 0 {
		o.Lookahead = 2 * o.AccrualInterval
	}
	if o.DefaultHoldDuration <= 0 {
		o.DefaultHoldDuration = time.Hour
	}
	if o.HoldDeadline > 0 {
		o.HoldDeadline = max(o.HoldDeadline, time.Second)
	}
	if o.QuoteTimeout <= 0 {
		o.QuoteTimeout = 5 * time.Second
	}
	if o.Concurrency <= 0 {
		o.Concurrency = 64
	}
	if o.Requests <= 0 {
		o.Requests = 256
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.MetricsRefresh <= 0 {
		o.MetricsRefresh = 15 * time.Second
	}
	o.Policy = o.Policy.WithDefaults()
	return o
}

// Metering is the metering service. Build it with [New], run it with
// [Metering.Start] and stop it with [Metering.Shutdown].
type Metering struct {
	opts Options
	log  *slog.Logger

	mu      sync.Mutex
	started bool
	stopped bool

	store     *store
	requests  sync.WaitGroup // request handlers running
	reqSlots  chan struct{}  // bounds them
	pricer    *pricer
	lifecycle jetstream.Stream
	svc       micro.Service
	router    *bus.Router
	metrics   *meteringMetrics

	// processed counts lifecycle events fully handled: their changes
	// durable in the ledger (or found to change nothing).
	processed atomic.Uint64

	stopWatch context.CancelFunc
	routes    *bus.Group // the routers, stopped together
}

// New checks opts and returns a metering service that has not started: it
// does no I/O.
func New(opts Options) (*Metering, error) {
	if opts.JS == nil {
		return nil, errors.New("creating metering: Options.JS is required")
	}
	opts = opts.withDefaults()
	if opts.NC == nil {
		return nil, errors.New("creating metering: no NATS connection")
	}
	return &Metering{opts: opts, log: opts.Logger, reqSlots: make(chan struct{}, opts.Requests),
		metrics: newMeteringMetrics(opts.Metrics, opts.Logger, opts.MetricsRefresh)}, nil
}

// Start opens the buckets, follows the catalog, ensures the durable
// consumers, starts answering requests and starts consuming. ctx bounds
// start-up only; the service runs until [Metering.Shutdown]. Start may be
// called once.
func (m *Metering) Start(ctx context.Context) (err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.started {
		return errors.New("starting metering: already started")
	}
	m.started = true
	js := m.opts.JS
	credits, err := js.KeyValue(ctx, bus.BucketCredits)
	if err != nil {
		return fmt.Errorf("opening bucket %s: %w", bus.BucketCredits, err)
	}
	catKV, err := js.KeyValue(ctx, bus.BucketCatalog)
	if err != nil {
		return fmt.Errorf("opening bucket %s: %w", bus.BucketCatalog, err)
	}
	if m.lifecycle, err = js.Stream(ctx, event.StreamLifecycle); err != nil {
		return fmt.Errorf("opening stream %s: %w", event.StreamLifecycle, err)
	}
	if _, err = js.Stream(ctx, event.StreamTimers); err != nil { // where its schedules go
		return fmt.Errorf("opening stream %s: %w", event.StreamTimers, err)
	}

	watchCtx, stopWatch := context.WithCancel(context.Background())
	defer func() {
		if err != nil {
			stopWatch()
		}
	}()
	cat, err := catalog.Watch(watchCtx, catKV)
	if err != nil {
		return err
	}
	select {
	case <-cat.Ready():
	case <-ctx.Done():
		return fmt.Errorf("loading catalog: %w", ctx.Err())
	}
	m.store = newStore(js, credits, m.log, m.opts.Now, m.metrics)
	m.store.watchReplicas(watchCtx)
	m.metrics.started(js, credits)
	m.pricer = &pricer{cat: cat, nc: m.opts.NC, timeout: m.opts.QuoteTimeout}

	if m.svc, err = m.serve(); err != nil {
		return err
	}
	// Answer from the moment Start returns: the server must know the
	// endpoints' subscriptions.
	fctx, cancel := context.WithTimeout(ctx, 10*time.Second) // FlushWithContext needs a deadline
	defer cancel()
	if err := m.opts.NC.FlushWithContext(fctx); err != nil {
		_ = m.svc.Stop()
		return fmt.Errorf("starting request service: %w", err)
	}

	m.stopWatch = stopWatch
	m.router = bus.NewRouter(js, m.log)
	m.router.Metrics = bus.NewRouterMetrics(m.opts.Metrics)
	routes := []bus.Route{
		{
			Stream: event.StreamLifecycle, Consumer: ConsumerLifecycle, Policy: m.opts.Policy,
			Concurrency: m.opts.Concurrency, Handler: m.countLifecycle,
		},
		{
			Stream: event.StreamTimers, Consumer: ConsumerAccrual, Policy: m.opts.Policy,
			Concurrency: m.opts.Concurrency, Handler: m.onTimer,
		},
	}
	m.routes = m.router.Start(routes...)
	m.log.Info("metering started", "accrual_interval", m.opts.AccrualInterval)
	return nil
}

// Stats returns the counters of the service's consume loops, or nil before
// start.
func (m *Metering) Stats() *bus.RouterStats {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.router == nil {
		return nil
	}
	return &m.router.Stats
}

// Processed returns how many lifecycle events this instance has fully
// handled since it started: each one's ledger entries are written (or it
// was found to change nothing, as a redelivery is), whatever its state.
// It only grows. A benchmark that publishes N lifecycle events reads it
// before, then waits until it has grown by N; with several instances,
// sum theirs.
func (m *Metering) Processed() uint64 { return m.processed.Load() }

// Shutdown stops answering requests, stops pulling messages and waits for
// the handlers in flight. When ctx ends first, it cancels them (their
// messages are redelivered to another instance), waits for them to return
// and reports ctx's error. Shutdown is safe to call more than once and
// before Start.
func (m *Metering) Shutdown(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.started || m.stopped || m.routes == nil {
		m.stopped = true
		return nil
	}
	m.stopped = true
	var errs []error
	if err := m.svc.Stop(); err != nil {
		errs = append(errs, fmt.Errorf("stopping request service: %w", err))
	}
	if err := m.routes.Shutdown(ctx); err != nil {
		errs = append(errs, err)
	}
	reqDone := make(chan struct{})
	go func() { m.requests.Wait(); close(reqDone) }()
	select {
	case <-reqDone:
	case <-ctx.Done():
		errs = append(errs, fmt.Errorf("waiting for requests: %w", ctx.Err()))
	}
	if err := m.store.wait(ctx); err != nil {
		errs = append(errs, err)
	}
	m.stopWatch()
	return errors.Join(errs...)
}
