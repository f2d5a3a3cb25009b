// Package gateway is the edge of sand-boxer: the HTTP API, and the bus
// intake where tenants ask with request events. It authenticates API keys,
// validates sandbox requests against the catalog, routes and admits them,
// records each requested sandbox with its requested lifecycle event and
// publishes the create and destroy commands. It answers reads from the
// lifecycle stream, the one record of every sandbox (a sandbox's record
// is the fold of its events), and streams lifecycle events as server-sent
// events.
//
// Every check of a request runs before anything is published: a request the
// gateway refuses leaves no command on the bus. After a sandbox is
// requested, the gateway owns none of its state: each transition is a
// lifecycle event published by whoever makes it, guarded by the sandbox's
// last event. The gateway writes the requested event, the rejected event of
// a sandbox whose command it could not publish, and the claim of a
// re-driven destroy attempt.
//
// The package must never import another service or an extension's code:
// it knows extensions only as catalog data.
package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/trace"

	"github.com/sand-boxer/sandboxer/pkg/apikey"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/catalog"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
)

// Source is the CloudEvents source of every event the gateway publishes.
const Source = "/sandboxer/gateway"

// Options wires a gateway. JS, Catalog and Keys are required; every other
// field has the documented default.
type Options struct {
	// JS is the bus. The streams and buckets of bus.Topology must exist.
	// Required.
	JS jetstream.JetStream
	// Catalog is a live copy of the catalog: profiles and extensions.
	// Required.
	Catalog *catalog.Cache
	// Keys checks bearer tokens and serves the key endpoints
	// (/v1/keys), which write the apikeys bucket and list it with direct
	// gets on JS's connection. Required.
	Keys *apikey.Store
	// Resolver decides where a sandbox goes. Default &CapacityResolver{}:
	// the profile's first extension with room under its manifest's
	// capacity, on its least loaded host.
	Resolver Resolver
	// Admitter reserves credit for a sandbox before anything is published.
	// Default nil: every valid request is admitted, without a hold.
	Admitter Admitter
	// Credits answers the credits API (/v1/credits/...). Default nil: those
	// endpoints answer 503.
	Credits Credits
	// Workers lists the live workers of GET /v1/workers; [*workers.Cache]
	// is one. Default nil: that endpoint answers 503.
	Workers Liveness
	// Logger receives operational logs. Default: discard.
	Logger *slog.Logger
	// Now is the clock of request timestamps and the key cache. Default
	// time.Now.
	Now func() time.Time

	// KeyCacheTTL is how long a successful API key lookup is remembered: a
	// key revoked elsewhere keeps working here for at most this long (one
	// revoked through this gateway stops at once, an expired one at its
	// expiry). Default 30s.
	KeyCacheTTL time.Duration
	// KeyCacheSize bounds the remembered keys. Default 10,000.
	KeyCacheSize int
	// KeepAlive is the interval of comments on an idle event stream.
	// Default 15s.
	KeepAlive time.Duration
	// MaxStreamsPerConsumer bounds the event streams
	// (GET /v1/sandboxes/{id}/events) one consumer has open at once; one
	// more is answered 429 until one of them ends. Default 16.
	MaxStreamsPerConsumer int
	// BodyReadTimeout bounds the reading of a request's body: a body not
	// received in full by then is answered 408. Only the body: neither
	// the handling after it nor an event stream is bounded by it.
	// Default 10s.
	BodyReadTimeout time.Duration
	// WriteTimeout bounds the bus writes of one create or destroy request.
	// They run to completion even when the client goes away, so a request
	// is never left half done. Default 10s.
	WriteTimeout time.Duration
	// IdempotencyWait is how long a request waits for a concurrent request
	// with the same Idempotency-Key to record its sandbox before answering
	// 409. Default 5s.
	IdempotencyWait time.Duration
	// RetryAfter is the Retry-After of 503 answers. Default 1s.
	RetryAfter time.Duration
	// NC is the connection the bus intake listens on. Default JS.Conn().
	NC *nats.Conn
	// IntakeConcurrency bounds the request events answered at once.
	// Default 64.
	IntakeConcurrency int
	// Retention is how long a sandbox that ended stays in the gateway's
	// listings and counts; its events, and so its GET, stay for the
	// lifecycle stream's max age. Default [sandbox.DefaultRetention];
	// negative lists every sandbox the stream keeps.
	Retention time.Duration
	// Metrics is where the gateway's Prometheus families are registered
	// (requests, admissions, the bus intake, the pools' queues and the
	// inventory by state). Default nil: none are.
	Metrics prometheus.Registerer
	// Gatherer is what GET /metrics serves: every family of the process
	// when the services share one registry. Default: Metrics, when it is
	// a [prometheus.Gatherer] (a *prometheus.Registry); without one,
	// /metrics answers 404.
	Gatherer prometheus.Gatherer
}

func (o Options) withDefaults() Options {
	if o.Resolver == nil {
		o.Resolver = &CapacityResolver{}
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.KeyCacheTTL <= 0 {
		o.KeyCacheTTL = 30 * time.Second
	}
	if o.KeyCacheSize <= 0 {
		o.KeyCacheSize = 10_000
	}
	if o.KeepAlive <= 0 {
		o.KeepAlive = 15 * time.Second
	}
	if o.MaxStreamsPerConsumer <= 0 {
		o.MaxStreamsPerConsumer = 16
	}
	if o.BodyReadTimeout <= 0 {
		o.BodyReadTimeout = 10 * time.Second
	}
	if o.WriteTimeout <= 0 {
		o.WriteTimeout = 10 * time.Second
	}
	if o.Retention == 0 {
		o.Retention = sandbox.DefaultRetention
	}
	if o.IdempotencyWait <= 0 {
		o.IdempotencyWait = 5 * time.Second
	}
	if o.RetryAfter <= 0 {
		o.RetryAfter = time.Second
	}
	if o.NC == nil && o.JS != nil {
		o.NC = o.JS.Conn()
	}
	if o.IntakeConcurrency <= 0 {
		o.IntakeConcurrency = 64
	}
	if g, ok := o.Metrics.(prometheus.Gatherer); ok && o.Gatherer == nil {
		o.Gatherer = g
	}
	return o
}

// Gateway serves the HTTP API. Create it with [New], call [Gateway.Start],
// serve [Gateway.Handler] with an http.Server, and stop it with
// [Gateway.Shutdown].
type Gateway struct {
	opts    Options
	log     *slog.Logger
	pub     *bus.Publisher
	tracer  trace.Tracer
	keys    *keyCache
	store   *apikey.Store // the key endpoints'
	handler http.Handler
	metrics *gatewayMetrics

	state     atomic.Pointer[state] // nil until Start succeeds
	intakeSub *nats.Subscription    // the bus intake, once started

	// bg lives until Shutdown: the inventory watch and every event
	// stream end with it.
	bg     context.Context
	stopBg context.CancelFunc

	mu       sync.Mutex
	started  bool
	shutdown bool
	wg       sync.WaitGroup // the inventory watch and open event streams
	// streams counts the open event streams of each consumer.
	streams map[string]int
}

// state is what Start opens.
type state struct {
	nc        *nats.Conn // reads a sandbox's events by direct get
	idem      jetstream.KeyValue
	lifecycle jetstream.Stream
	inv       *inventory
}

// New checks opts and returns a gateway. It does no I/O: [Gateway.Start]
// opens the buckets.
func New(opts Options) (*Gateway, error) {
	var missing []string
	if opts.JS == nil {
		missing = append(missing, "JS")
	}
	if opts.Catalog == nil {
		missing = append(missing, "Catalog")
	}
	if opts.Keys == nil {
		missing = append(missing, "Keys")
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("creating gateway: missing options %v", missing)
	}
	opts = opts.withDefaults()
	bg, stop := context.WithCancel(context.Background())
	g := &Gateway{
		opts:   opts,
		log:    opts.Logger,
		pub:    bus.NewPublisher(opts.JS),
		tracer: otel.Tracer("github.com/sand-boxer/sandboxer/services/gateway"),
		keys:   newKeyCache(opts.Keys, opts.KeyCacheTTL, opts.KeyCacheSize, opts.Now),
		store:  opts.Keys.WithConn(opts.JS.Conn()),
		bg:     bg,
		stopBg: stop,
	}
	g.metrics = newGatewayMetrics(g, opts.Metrics, opts.Gatherer)
	g.handler = g.routes()
	return g, nil
}

// Start opens the idempotency bucket and the lifecycle stream, and starts
// the fold of the stream that feeds sandbox listings. It returns once the
// listing cache holds every sandbox the stream had, or when ctx ends. The
// watch runs until [Gateway.Shutdown], whatever ctx does afterwards; after
// an error, call Shutdown to stop what Start began. Start runs once.
func (g *Gateway) Start(ctx context.Context) error {
	g.mu.Lock()
	if g.started || g.shutdown {
		g.mu.Unlock()
		return errors.New("starting gateway: already started or shut down")
	}
	g.started = true
	g.mu.Unlock()

	idem, err := g.opts.JS.KeyValue(ctx, bus.BucketIdempotency)
	if err != nil {
		return fmt.Errorf("opening bucket %s: %w", bus.BucketIdempotency, err)
	}
	lc, err := g.opts.JS.Stream(ctx, event.StreamLifecycle)
	if err != nil {
		return fmt.Errorf("opening stream %s: %w", event.StreamLifecycle, err)
	}
	inv := newInventory(g.opts.JS, g.opts.Retention, g.log)
	if !g.track() {
		return errors.New("starting gateway: shut down")
	}
	go func() {
		defer g.wg.Done()
		inv.run(g.bg)
	}()
	select {
	case <-inv.ready:
	case <-ctx.Done():
		return fmt.Errorf("starting gateway: loading sandboxes: %w", ctx.Err())
	}
	g.state.Store(&state{nc: g.opts.JS.Conn(), idem: idem, lifecycle: lc, inv: inv})
	sub, err := g.startIntake(ctx, g.opts.NC)
	if err != nil {
		return err
	}
	g.mu.Lock()
	g.intakeSub = sub
	g.mu.Unlock()
	return nil
}

// Handler returns the HTTP API. It answers 503 until Start has succeeded.
func (g *Gateway) Handler() http.Handler { return g.handler }

// Shutdown ends open event streams and the inventory watch, and waits for
// them until ctx ends. Requests after Shutdown get 503. Event streams end
// only here: http.Server.Shutdown waits for them, so call Shutdown first
// (or from http.Server.RegisterOnShutdown).
func (g *Gateway) Shutdown(ctx context.Context) error {
	g.mu.Lock()
	g.shutdown = true
	sub := g.intakeSub
	g.mu.Unlock()
	if sub != nil {
		// No new requests; those taken are answered before Shutdown
		// returns (or cut short with g.bg).
		_ = sub.Unsubscribe()
	}
	g.stopBg()
	done := make(chan struct{})
	go func() {
		g.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("shutting down gateway: %w", ctx.Err())
	}
}

// track registers a goroutine that Shutdown waits for, and reports false
// once Shutdown has begun.
func (g *Gateway) track() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.shutdown {
		return false
	}
	g.wg.Add(1)
	return true
}

// openStream counts an event stream of consumer, and reports false when
// the consumer has MaxStreamsPerConsumer open already. Each true is
// undone by one closeStream.
func (g *Gateway) openStream(consumer string) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.streams[consumer] >= g.opts.MaxStreamsPerConsumer {
		return false
	}
	if g.streams == nil {
		g.streams = map[string]int{}
	}
	g.streams[consumer]++
	return true
}

// closeStream uncounts an event stream of consumer.
func (g *Gateway) closeStream(consumer string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.streams[consumer]--; g.streams[consumer] <= 0 {
		delete(g.streams, consumer)
	}
}

// current returns what Start opened, or nil before Start and after
// Shutdown.
func (g *Gateway) current() *state {
	if g.bg.Err() != nil {
		return nil
	}
	return g.state.Load()
}

func (g *Gateway) healthz(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

// readyz answers 200 when the bus is connected and the catalog and the
// sandbox listing are loaded.
func (g *Gateway) readyz(w http.ResponseWriter, r *http.Request) {
	var not []string
	st := g.current()
	if st == nil {
		not = append(not, "gateway not started")
	} else if !st.inv.isReady() {
		not = append(not, "sandbox listing not loaded")
	}
	if nc := g.opts.JS.Conn(); nc == nil || nc.Status() != nats.CONNECTED {
		not = append(not, "nats not connected")
	}
	select {
	case <-g.opts.Catalog.Ready():
	default:
		not = append(not, "catalog not loaded")
	}
	if len(not) > 0 {
		p := newProblem(http.StatusServiceUnavailable, fmt.Sprintf("not ready: %v", not))
		g.writeProblem(w, r, p)
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ready"})
}
