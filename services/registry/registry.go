// Package registry is the registry service: the owner of the catalog
// (extensions and profiles, validated at start-up and published to the
// catalog bucket), of sandbox TTLs (expiry schedules on the timers
// stream), of destroy retries and of the view of live workers. It keeps an
// index of every sandbox folded from the lifecycle stream, in memory, for
// its reconciler; it writes no sandbox record: the lifecycle events are
// the record.
//
// The registry consumes lifecycle events and fired expiry and destroy
// retry timers, and produces the catalog projection, expired events (and
// the destroying events that claim a retried or re-driven destroy
// attempt), destroy commands (on expiry, on a retry after a failed
// teardown, on a re-drive) and, from its reconciler, failed events for
// creates past their deadline. It answers catalog and worker requests over NATS
// request-reply as the micro service "sandboxer-registry".
//
// It must never import another service or an extension's backend code:
// handlers are checked through the [extension.Registry] the binary passes
// in.
package registry

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/catalog"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/inventory"
	"github.com/sand-boxer/sandboxer/pkg/metrics"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
	"github.com/sand-boxer/sandboxer/pkg/workers"
)

// Names the registry uses on the bus.
const (
	// Source is the CloudEvents source of every event the registry emits.
	Source = "/sandboxer/registry"
	// ConsumerInventory is the durable consumer of the lifecycle stream
	// keeping expiry and destroy retry schedules in step with it.
	ConsumerInventory = bus.DurableRegistry
	// ConsumerTimers is the durable consumer of fired expiry and destroy
	// retry timers.
	ConsumerTimers = bus.DurableRegistryTimers
	// ServiceName is the micro service name answering catalog and worker
	// requests.
	ServiceName = "sandboxer-registry"
	// ServiceVersion is the version the micro service announces.
	ServiceVersion = "0.1.0"
)

// Options configures a [Registry].
type Options struct {
	// JS is the JetStream context. Required. The streams and buckets of
	// [bus.Topology] must exist.
	JS jetstream.JetStream
	// NC is the connection the request-reply service listens on. Default
	// JS.Conn().
	NC *nats.Conn
	// ExtensionsDir holds the ext.<name>.yaml manifests. Default
	// "extensions".
	ExtensionsDir string
	// ProfilesDir holds the profile.<slug>.yaml profiles. Default
	// "profiles".
	ProfilesDir string
	// Catalog, when set, is the catalog to serve, already loaded (from
	// files anywhere, such as [extension.LoadCatalogDirs] reads, or built
	// in code): ExtensionsDir and ProfilesDir are not read. It is checked
	// at start like a loaded one, and must not be modified afterwards.
	Catalog *extension.Catalog
	// Extensions are the handlers linked into this binary: every
	// manifest's handler must be one of them. Nil skips that check (a
	// registry running apart from the provisioners).
	Extensions *extension.Registry
	// Logger logs. Default discards.
	Logger *slog.Logger
	// Concurrency is how many lifecycle events this instance projects at
	// once. Default 32.
	Concurrency int
	// Policy is the delivery policy of both durable consumers. Zero
	// fields take the [bus.ConsumerPolicy] defaults.
	Policy bus.ConsumerPolicy
	// Retention is how long a sandbox that ended (destroyed or rejected)
	// stays in the registry's index; its events stay for the lifecycle
	// stream's max age. Default [sandbox.DefaultRetention]; negative keeps
	// every sandbox the stream keeps.
	Retention time.Duration
	// Metrics is where the registry's Prometheus families are registered
	// (expiries fired, destroy retries and re-drives, the router's
	// counts). Default nil: none are.
	Metrics prometheus.Registerer
	// RetryBase is how long after a teardown failed on every delivery of
	// its destroy command the next attempt goes; it doubles with each
	// failed attempt, up to RetryMax. At least 1s (the schedule's
	// precision). Default 30s.
	RetryBase time.Duration
	// RetryMax caps the back-off between destroy attempts. Default 10m.
	RetryMax time.Duration
	// ReconcileInterval is how often the reconciler reads every record
	// for sandboxes past their state's deadline. Default 30s; negative
	// turns it off ([Registry.Reconcile] still runs one round).
	ReconcileInterval time.Duration
	// DeadlineGrace is how long past its state's deadline a sandbox is
	// left to its own path (a worker's failed event, a retry) before the
	// reconciler steps in. Default 1m; negative is none.
	DeadlineGrace time.Duration
}

func (o Options) withDefaults() Options {
	if o.NC == nil && o.JS != nil {
		o.NC = o.JS.Conn()
	}
	if o.ExtensionsDir == "" {
		o.ExtensionsDir = "extensions"
	}
	if o.ProfilesDir == "" {
		o.ProfilesDir = "profiles"
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Concurrency <= 0 {
		o.Concurrency = 32
	}
	if o.Retention == 0 {
		o.Retention = sandbox.DefaultRetention
	}
	if o.RetryBase <= 0 {
		o.RetryBase = 30 * time.Second
	}
	o.RetryBase = max(o.RetryBase, time.Second)
	if o.RetryMax <= 0 {
		o.RetryMax = 10 * time.Minute
	}
	o.RetryMax = max(o.RetryMax, o.RetryBase)
	if o.ReconcileInterval == 0 {
		o.ReconcileInterval = 30 * time.Second
	}
	switch {
	case o.DeadlineGrace == 0:
		o.DeadlineGrace = time.Minute
	case o.DeadlineGrace < 0:
		o.DeadlineGrace = 0
	}
	o.Policy = o.Policy.WithDefaults()
	return o
}

// Load reads and checks the catalog in opts.ExtensionsDir and
// opts.ProfilesDir, or checks opts.Catalog when it is set. On any problem
// it returns an error wrapping [extension.Problems] that lists every
// problem found in every file, each as file:line:column: path: message.
func Load(opts Options) (*extension.Catalog, error) {
	opts = opts.withDefaults()
	c, ps := opts.Catalog, extension.Problems(nil)
	if c != nil {
		ps = c.Check(opts.Extensions)
	} else {
		c, ps = extension.LoadCatalog(opts.ExtensionsDir, opts.ProfilesDir, opts.Extensions)
	}
	if len(ps) > 0 {
		return nil, fmt.Errorf("loading catalog: %w", ps)
	}
	return c, nil
}

// Consumers are the registry's durable consumers, with delivery policy p,
// for setup to create: the one of the lifecycle events that move its
// schedules (ready schedules an expiry; expired and destroying, the states
// that follow ready, cancel it, and a failed teardown schedules a retry;
// every other state is never delivered to it) and the one of fired
// expiries and destroy retries. destroyed is not among them: it moves no
// schedule. A sandbox's expiry was cancelled when it left ready, and a
// destroy retry still pending when the sandbox is destroyed (its destroy
// re-driven, and done, before the retry was due) fires to find the
// sandbox ended, and does nothing: one timer for a sandbox whose teardown
// failed, against a delivery and an acknowledgement for every sandbox.
func Consumers(p bus.ConsumerPolicy) []bus.ConsumerSpec {
	return []bus.ConsumerSpec{
		{Stream: event.StreamLifecycle, Name: ConsumerInventory, Policy: p,
			Filters: []string{
				event.StateFilter(event.StateReady), event.StateFilter(event.StateExpired),
				event.StateFilter(event.StateDestroying),
			},
			Description: "registry: keeps expiry and destroy retry schedules in step with the lifecycle events that move them"},
		{Stream: event.StreamTimers, Name: ConsumerTimers, Filters: []string{event.ExpiryFireFilter, event.RetryFireFilter}, Policy: p,
			Description: "registry: fired expiry and destroy retry timers"},
	}
}

// Registry is the registry service. Build it with [New], run it with
// [Registry.Start] and stop it with [Registry.Shutdown].
type Registry struct {
	opts Options
	log  *slog.Logger
	pub  *bus.Publisher

	mu      sync.Mutex
	started bool
	stopped bool

	catalog      *extension.Catalog
	catalogJSON  []byte
	index        index
	follower     *inventory.Follower
	sandboxLocks keyLocks
	workers      *workers.Cache
	svc          micro.Service
	router       *bus.Router
	expiries     prometheus.Counter
	retries      prometheus.Counter
	redrives     *prometheus.CounterVec

	stopWatch  context.CancelFunc // stops the workers cache
	routes     *bus.Group         // the routers, stopped together
	reconciler sync.WaitGroup     // the reconciler, stopped by stopWatch
}

// New checks opts and returns a registry that has not started: it does no
// I/O.
func New(opts Options) (*Registry, error) {
	if opts.JS == nil {
		return nil, errors.New("creating registry: Options.JS is required")
	}
	opts = opts.withDefaults()
	if opts.NC == nil {
		return nil, errors.New("creating registry: no NATS connection")
	}
	expiries := metrics.Register(opts.Metrics, prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: metrics.Namespace, Subsystem: "registry", Name: "expiries_fired_total",
		Help: "Ready sandboxes the registry expired when their TTL's timer fired (each then gets an expired event and a destroy command).",
	}))
	retries := metrics.Register(opts.Metrics, prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: metrics.Namespace, Subsystem: "registry", Name: "destroy_retries_total",
		Help: "Destroy commands the registry sent again when a retry scheduled after a failed teardown fired.",
	}))
	redrives := metrics.Register(opts.Metrics, prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: metrics.Namespace, Subsystem: "registry", Name: "reconciled_total",
		Help: "Sandboxes the registry's reconciler stepped in for, past their state's deadline, by that state: requested and provisioning are failed, failed, expired and destroying get a fresh destroy attempt, ready is expired.",
	}, []string{"state"}))
	return &Registry{opts: opts, log: opts.Logger, pub: bus.NewPublisher(opts.JS), expiries: expiries, retries: retries, redrives: redrives}, nil
}

// Start loads and checks the catalog, refusing to start on any problem
// (the error lists them all), publishes it to the catalog bucket, ensures
// that the registry's durable consumers exist, starts answering requests and starts
// projecting. ctx bounds start-up only; the registry runs until
// [Registry.Shutdown]. Start may be called once.
func (r *Registry) Start(ctx context.Context) (err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.started {
		return errors.New("starting registry: already started")
	}
	r.started = true

	cat, err := Load(r.opts)
	if err != nil {
		return fmt.Errorf("starting registry: %w", err)
	}
	r.catalog = cat
	if r.catalogJSON, err = json.Marshal(cat); err != nil {
		return fmt.Errorf("encoding catalog: %w", err)
	}
	js := r.opts.JS
	catKV, err := js.KeyValue(ctx, bus.BucketCatalog)
	if err != nil {
		return fmt.Errorf("opening bucket %s: %w", bus.BucketCatalog, err)
	}
	if err := catalog.Publish(ctx, catKV, cat); err != nil {
		return fmt.Errorf("publishing catalog: %w", err)
	}
	workersKV, err := js.KeyValue(ctx, bus.BucketWorkers)
	if err != nil {
		return fmt.Errorf("opening bucket %s: %w", bus.BucketWorkers, err)
	}
	if _, err = js.Stream(ctx, event.StreamTimers); err != nil { // where its schedules go
		return fmt.Errorf("opening stream %s: %w", event.StreamTimers, err)
	}

	watchCtx, stopWatch := context.WithCancel(context.Background())
	defer func() {
		if err != nil {
			stopWatch()
			if r.workers != nil {
				<-r.workers.Done()
			}
		}
	}()
	if r.workers, err = workers.Watch(watchCtx, workersKV); err != nil {
		return err
	}
	select {
	case <-r.workers.Ready():
	case <-ctx.Done():
		return fmt.Errorf("loading workers: %w", ctx.Err())
	}

	// The index of every sandbox: the fold of the lifecycle stream,
	// caught up before the reconciler reads it.
	f, err := inventory.Follow(watchCtx, js, r.opts.Retention, r.log, r.index.apply)
	if err != nil {
		return err
	}
	r.follower = f
	defer func() {
		if err != nil {
			stopWatch()
			<-f.Done()
		}
	}()
	select {
	case <-f.Ready():
	case <-ctx.Done():
		return fmt.Errorf("folding the lifecycle stream: %w", ctx.Err())
	}

	if r.svc, err = r.serve(); err != nil {
		return err
	}

	r.stopWatch = stopWatch
	r.router = bus.NewRouter(js, r.log)
	r.router.Metrics = bus.NewRouterMetrics(r.opts.Metrics)
	routes := []bus.Route{
		{
			Stream: event.StreamLifecycle, Consumer: ConsumerInventory, Policy: r.opts.Policy,
			Concurrency: r.opts.Concurrency, Handler: r.project,
		},
		{
			Stream: event.StreamTimers, Consumer: ConsumerTimers, Policy: r.opts.Policy,
			Concurrency: 4, Handler: r.onTimer,
		},
	}
	r.routes = r.router.Start(routes...)
	if r.opts.ReconcileInterval > 0 {
		r.reconciler.Add(1)
		go func() {
			defer r.reconciler.Done()
			r.runReconciler(watchCtx)
		}()
	}
	r.log.Info("registry started", "extensions", len(cat.Extensions), "profiles", len(cat.Profiles))
	return nil
}

// Catalog returns the catalog loaded at start, or nil before. Callers must
// not modify it.
func (r *Registry) Catalog() *extension.Catalog {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.catalog
}

// Stats returns the counters of the registry's consume loops, or nil
// before start.
func (r *Registry) Stats() *bus.RouterStats {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.router == nil {
		return nil
	}
	return &r.router.Stats
}

// Shutdown stops answering requests, stops pulling messages and waits for
// the handlers in flight to finish. When ctx ends first, it cancels them
// (their messages are redelivered to another instance), waits for them to
// return and reports ctx's error. Shutdown is safe to call more than once
// and before Start.
func (r *Registry) Shutdown(ctx context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.started || r.stopped || r.routes == nil {
		r.stopped = true
		return nil
	}
	r.stopped = true
	var errs []error
	if err := r.svc.Stop(); err != nil {
		errs = append(errs, fmt.Errorf("stopping request service: %w", err))
	}
	if err := r.routes.Shutdown(ctx); err != nil {
		errs = append(errs, err)
	}
	r.stopWatch()
	<-r.workers.Done()
	<-r.follower.Done()
	r.reconciler.Wait()
	return errors.Join(errs...)
}
