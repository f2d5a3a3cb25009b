// Package provisioner runs the worker pools of sand-boxer: one pool per
// extension, every worker of a pool sharing the extension's durable
// consumer on the commands stream. A worker turns a create command into
// Provision and WaitReady under the profile's deadlines and a ready or
// failed event, and a destroy command into Teardown and a destroyed event.
//
// A backend whose sandboxes live on their worker's machine
// (capabilities.locality: host, ext.local) places each sandbox on the
// host of the worker that made it ([Options.Host]). Its workers share the
// pool's durable for unplaced commands (every create, and a destroy whose
// publisher does not know the host), and each host's workers share that
// host's durable for the commands bound to it: a destroy taken by a
// worker of another host is forwarded there, and waits in the host's
// durable until a worker of that host takes it.
//
// The package links extension code through an [extension.Registry] and
// talks to the rest of the system only through the bus. It must never
// import another service.
package provisioner

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/catalog"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/workers"
)

// Options configures a provisioner process.
type Options struct {
	// JS is the JetStream context. Required.
	JS jetstream.JetStream
	// Catalog is the live catalog the manifests and profiles come from.
	// Required.
	Catalog *catalog.Cache
	// Extensions holds the backend code linked into this binary. Required.
	Extensions *extension.Registry
	// Pools names the extensions this process serves. Required.
	Pools []string
	// Concurrency is how many commands this process runs at once per
	// extension: one worker's share. The pool as a whole runs at most its
	// manifest's capacity.max_in_flight, however many workers share it,
	// so adding a worker adds throughput up to that cap. Default: the
	// manifest's workers.concurrency.
	Concurrency int
	// DataDir is where backends keep local state, one subdirectory per
	// extension. Default: a directory under os.TempDir.
	DataDir string
	// WorkerID names this process in events and heartbeats. Default
	// hostname-pid-random.
	WorkerID string
	// Host is this worker's placement host: for a pool whose backend
	// keeps sandboxes on the worker's machine (capabilities.locality:
	// host), the host its sandboxes are placed on and the one whose
	// bound commands it takes; it must be one of the manifest's hosts,
	// which setup made a durable for. Two workers on one machine with
	// different data directories are two hosts; two workers sharing a
	// data directory are one. A subject token ([event.ValidName]).
	// Default [DefaultHost]. It is the host of the pools' heartbeats;
	// a shared pool's, when unset, is the machine's host name.
	Host string
	// Logger logs. Default: discard.
	Logger *slog.Logger
	// HeartbeatEvery is how often each pool records its liveness in the
	// workers bucket. Default 10s (the bucket forgets a worker after 30s).
	HeartbeatEvery time.Duration
	// CatalogTimeout bounds the wait for a pool's manifest to appear in the
	// catalog at start-up. Default 30s.
	CatalogTimeout time.Duration
	// Metrics is where the pools' Prometheus families are registered
	// (durations of Provision, WaitReady and Teardown, outcomes, the
	// router's counts). Default nil: none are.
	Metrics prometheus.Registerer
	// OrphanInterval is how often each pool whose backend is an
	// [extension.Lister] lists what the backend holds and tears down what
	// no live record owns, announcing each with an orphaned event.
	// Default [DefaultOrphanInterval]; negative: never.
	OrphanInterval time.Duration
	// OrphanGrace is how long something a backend holds may have no
	// lifecycle event of its sandbox before it is an orphan (a create
	// has none until its first event is stored), and how long a claimed
	// orphan waits before it is claimed again. Longer than any profile's
	// provision deadline. Default [DefaultOrphanGrace].
	OrphanGrace time.Duration
}

// DefaultHost is the placement host of a worker that names none: the one
// host of a manifest that lists none ([extension.Manifest.HostList]).
const DefaultHost = "localhost"

// Provisioner is a running set of worker pools.
type Provisioner struct {
	opts    Options
	nc      *nats.Conn
	router  *bus.Router
	metrics *provisionerMetrics
	pub     *bus.Publisher
	workers jetstream.KeyValue
	pools   []*pool
	started time.Time

	routes    *bus.Group         // the pools' routers, stopped together
	stopBeats context.CancelFunc // stops the heartbeat loop
	beats     sync.WaitGroup

	stopOrphans context.CancelFunc // stops the orphan reconcilers
	orphans     sync.WaitGroup
}

// New checks opts and returns a provisioner that has not started.
func New(opts Options) (*Provisioner, error) {
	if opts.JS == nil || opts.Catalog == nil || opts.Extensions == nil {
		return nil, errors.New("provisioner: JS, Catalog and Extensions are required")
	}
	if len(opts.Pools) == 0 {
		return nil, errors.New("provisioner: at least one extension pool is required")
	}
	for _, name := range opts.Pools {
		if err := event.CheckName("extension", name); err != nil {
			return nil, fmt.Errorf("provisioner: %w", err)
		}
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.WorkerID == "" {
		opts.WorkerID = defaultWorkerID()
	}
	if err := event.CheckName("worker id", opts.WorkerID); err != nil {
		return nil, fmt.Errorf("provisioner: %w", err)
	}
	if opts.Host != "" {
		if err := event.CheckName("host", opts.Host); err != nil {
			return nil, fmt.Errorf("provisioner: %w", err)
		}
	}
	if opts.DataDir == "" {
		opts.DataDir = filepath.Join(os.TempDir(), "sandboxer-provisioner")
	}
	if opts.HeartbeatEvery <= 0 {
		opts.HeartbeatEvery = 10 * time.Second
	}
	if opts.CatalogTimeout <= 0 {
		opts.CatalogTimeout = 30 * time.Second
	}
	if opts.OrphanInterval == 0 {
		opts.OrphanInterval = DefaultOrphanInterval
	}
	if opts.OrphanGrace <= 0 {
		opts.OrphanGrace = DefaultOrphanGrace
	}
	p := &Provisioner{
		opts:    opts,
		nc:      opts.JS.Conn(),
		router:  bus.NewRouter(opts.JS, opts.Logger),
		pub:     bus.NewPublisher(opts.JS),
		metrics: newProvisionerMetrics(opts.Metrics),
	}
	p.router.Metrics = bus.NewRouterMetrics(opts.Metrics)
	return p, nil
}

// Stats returns the router's counters.
func (p *Provisioner) Stats() *bus.RouterStats { return &p.router.Stats }

// Start waits for each pool's manifest in the catalog, opens its backend,
// ensures its durable consumer and starts consuming. It returns once every
// pool consumes, or with the first error.
func (p *Provisioner) Start(ctx context.Context) error {
	var err error
	if p.workers, err = p.opts.JS.KeyValue(ctx, bus.BucketWorkers); err != nil {
		return fmt.Errorf("opening workers bucket: %w", err)
	}
	p.started = time.Now().UTC()
	for _, name := range p.opts.Pools {
		pl, err := p.openPool(ctx, name)
		if err != nil {
			p.closePools()
			return err
		}
		p.pools = append(p.pools, pl)
	}
	routes := make([]bus.Route, 0, 2*len(p.pools))
	for _, pl := range p.pools {
		for _, consumer := range pl.consumers() {
			routes = append(routes, bus.Route{
				Stream: event.StreamCommands, Consumer: consumer, Policy: pl.policy,
				Concurrency: pl.concurrency, Handler: pl.handle,
			})
		}
		p.beat(ctx, pl)
		p.opts.Logger.Info("worker pool consuming", "extension", pl.name, "consumer", pl.consumer, "host_consumer", pl.hostConsumer,
			"host", pl.host, "concurrency", pl.concurrency, "worker", p.opts.WorkerID)
	}
	p.routes = p.router.Start(routes...)
	p.startOrphans(ctx)
	beatCtx, stopBeats := context.WithCancel(context.WithoutCancel(ctx))
	p.stopBeats = stopBeats
	p.beats.Add(1)
	go func() {
		defer p.beats.Done()
		t := time.NewTicker(p.opts.HeartbeatEvery)
		defer t.Stop()
		for {
			select {
			case <-beatCtx.Done():
				return
			case <-t.C:
				for _, pl := range p.pools {
					p.beat(beatCtx, pl)
				}
			}
		}
	}()
	return nil
}

// beat records a pool's liveness in the workers bucket, with the host it
// serves: a forwarded destroy finds by it whether its host has a live
// worker.
func (p *Provisioner) beat(ctx context.Context, pl *pool) {
	err := workers.Put(ctx, p.workers, workers.Heartbeat{
		Extension: pl.name, Worker: p.opts.WorkerID, Host: pl.host, PID: os.Getpid(),
		StartedAt: p.started, Concurrency: pl.concurrency, InFlight: int(pl.inFlight.Load()),
	})
	if err != nil && ctx.Err() == nil {
		p.opts.Logger.Warn("recording heartbeat", "extension", pl.name, "err", err)
	}
}

func (p *Provisioner) openPool(ctx context.Context, name string) (*pool, error) {
	wctx, cancel := context.WithTimeout(ctx, p.opts.CatalogTimeout)
	defer cancel()
	m, err := p.opts.Catalog.WaitFor(wctx, name)
	if err != nil {
		return nil, fmt.Errorf("starting pool %s: %w", name, err)
	}
	// The backend's placement host: this worker's, for a backend that
	// keeps sandboxes here; a shared backend's sandboxes have none of it.
	host, envHost := p.opts.Host, p.opts.Host
	switch {
	case host == "" && m.HostBound():
		host, envHost = DefaultHost, DefaultHost
	case host == "":
		host, _ = os.Hostname() // a shared pool's heartbeat says the machine
	}
	if m.HostBound() && !slices.Contains(m.HostList(), host) {
		return nil, fmt.Errorf("starting pool %s: this worker's host %q is not one of the extension's placement hosts %v: start it with --host one of them, or add it to the manifest's hosts and run sandboxer setup",
			name, host, m.HostList())
	}
	spec := Consumer(m)
	policy := spec.Policy
	consumer := spec.Name
	cons, err := p.opts.JS.Consumer(ctx, event.StreamCommands, consumer)
	if err != nil {
		return nil, fmt.Errorf("starting pool %s: its consumer %s (created by `sandboxer setup`): %w", name, consumer, err)
	}
	var hostConsumer string
	if m.HostBound() {
		hostConsumer = HostConsumer(m, host).Name
		if _, err := p.opts.JS.Consumer(ctx, event.StreamCommands, hostConsumer); err != nil {
			return nil, fmt.Errorf("starting pool %s: the consumer %s of host %s (created by `sandboxer setup` for each of the manifest's hosts): %w", name, hostConsumer, host, err)
		}
	}
	ext, err := p.opts.Extensions.Open(ctx, m, extension.Env{
		DataDir: filepath.Join(p.opts.DataDir, name),
		Logger:  p.opts.Logger.With("extension", name),
		Host:    envHost,
	})
	if err != nil {
		return nil, fmt.Errorf("starting pool %s: %w", name, err)
	}
	w := m.Workers.WithDefaults()
	conc := p.opts.Concurrency
	if conc <= 0 {
		conc = w.Concurrency
	}
	// The durable's cap is what the server enforces; say when it is not
	// the manifest's, or when this worker alone could use all of it.
	if have := cons.CachedInfo().Config.MaxAckPending; have != policy.MaxAckPending {
		p.opts.Logger.Warn("pool capacity differs from the manifest's: run sandboxer setup", "extension", name, "consumer", consumer,
			"max_ack_pending", have, "capacity.max_in_flight", policy.MaxAckPending)
	} else if conc > have {
		p.opts.Logger.Warn("worker concurrency exceeds the pool's capacity: it never runs more than capacity.max_in_flight",
			"extension", name, "concurrency", conc, "capacity.max_in_flight", have)
	}
	pl := &pool{
		p: p, name: name, ext: ext, manifest: m, policy: policy.WithDefaults(),
		consumer: consumer, hostConsumer: hostConsumer, host: host, bound: m.HostBound(),
		concurrency: conc, waiting: make(chan struct{}, max(1, conc/2)), metrics: p.metrics.pool(name),
		source: "/sandboxer/provisioner/" + name,
		log:    p.opts.Logger.With("extension", name, "worker", p.opts.WorkerID),
	}
	if metered, ok := ext.(extension.Metered); ok {
		if pl.quotes, err = pl.serveQuotes(metered); err != nil {
			_ = extension.Close(ext)
			return nil, err
		}
	}
	return pl, nil
}

// Consumer is the durable consumer of extension m's pool, for setup to
// create: every worker of the pool shares it, with the delivery policy of
// the manifest's workers section. Its MaxAckPending is the backend's
// capacity.max_in_flight, the cap on commands in flight across every
// worker; a worker's own concurrency is [Options.Concurrency]. It takes
// every command of the extension, or, when the backend is locality:
// host, the unplaced ones only ([event.UnplacedCommandFilter]): those
// bound to a host go to that host's consumer ([HostConsumer]).
func Consumer(m *extension.Manifest) bus.ConsumerSpec {
	if m.HostBound() {
		return consumerSpec(m, bus.DurableProvisioner(m.Name), event.UnplacedCommandFilter(m.Name),
			"provisioner pool of "+m.Name+": its unplaced commands, every worker shares it")
	}
	return consumerSpec(m, bus.DurableProvisioner(m.Name), event.CommandFilter(m.Name),
		"provisioner pool of "+m.Name+": every worker shares it")
}

// HostConsumer is the durable consumer of the commands bound to host in
// a locality: host pool, shared by that host's workers, with the pool's
// delivery policy and capacity (each host's durable holds up to
// capacity.max_in_flight in flight).
func HostConsumer(m *extension.Manifest, host string) bus.ConsumerSpec {
	return consumerSpec(m, bus.DurableProvisionerHost(m.Name, host), event.HostCommandFilter(m.Name, host),
		"provisioner pool of "+m.Name+": the commands bound to host "+host+", its workers share it")
}

func consumerSpec(m *extension.Manifest, name, filter, desc string) bus.ConsumerSpec {
	w := m.Workers.WithDefaults()
	backoff := make([]time.Duration, len(w.Backoff))
	for i, d := range w.Backoff {
		backoff[i] = d.D()
	}
	return bus.ConsumerSpec{
		Stream: event.StreamCommands, Name: name, Filters: []string{filter},
		Policy:      bus.ConsumerPolicy{AckWait: w.AckWait.D(), MaxDeliver: w.MaxDeliver, Backoff: backoff, MaxAckPending: m.Capacity.InFlight()},
		Description: desc,
	}
}

// PoolConsumers are the durable consumers of extension m's pool:
// [Consumer], then for a locality: host backend a [HostConsumer] for each
// of the manifest's hosts. The order matters on a work-queue stream,
// whose consumers may not overlap: setup narrows the pool's durable of an
// earlier version (every command) to the unplaced ones before it creates
// the hosts'.
func PoolConsumers(m *extension.Manifest) []bus.ConsumerSpec {
	out := []bus.ConsumerSpec{Consumer(m)}
	if m.HostBound() {
		for _, h := range m.HostList() {
			out = append(out, HostConsumer(m, h))
		}
	}
	return out
}

// Consumers are the durable consumers of every extension in c.
func Consumers(c *extension.Catalog) []bus.ConsumerSpec {
	var out []bus.ConsumerSpec
	for _, m := range c.ExtensionList() {
		out = append(out, PoolConsumers(m)...)
	}
	return out
}

// Shutdown stops pulling commands and waits for the commands in flight,
// until ctx ends; commands still running then are handed back to the pool
// (nak) and run again by another worker. Then it closes the backends.
func (p *Provisioner) Shutdown(ctx context.Context) error {
	if p.routes == nil {
		p.closePools()
		return nil
	}
	var err error
	if serr := p.routes.Shutdown(ctx); serr != nil {
		err = fmt.Errorf("waiting for commands in flight: %w", serr)
	}
	p.stopBeats()
	p.beats.Wait()
	p.stopOrphans()
	p.orphans.Wait()
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	for _, pl := range p.pools {
		_ = workers.Delete(dctx, p.workers, pl.name, p.opts.WorkerID)
	}
	p.closePools()
	return err
}

func (p *Provisioner) closePools() {
	for _, pl := range p.pools {
		if pl.quotes != nil {
			_ = pl.quotes.Stop()
		}
		if err := extension.Close(pl.ext); err != nil {
			p.opts.Logger.Warn("closing backend", "extension", pl.name, "err", err)
		}
	}
}

func defaultWorkerID() string {
	host, _ := os.Hostname()
	return workers.ID(host, os.Getpid())
}
