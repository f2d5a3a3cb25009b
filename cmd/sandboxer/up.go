package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/sand-boxer/sandboxer/cmd/sandboxer/internal/memory"
	"github.com/sand-boxer/sandboxer/cmd/sandboxer/internal/telemetry"
	"github.com/sand-boxer/sandboxer/pkg/apikey"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/catalog"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
	"github.com/sand-boxer/sandboxer/services/gateway"
	"github.com/sand-boxer/sandboxer/services/metering"
	"github.com/sand-boxer/sandboxer/services/provisioner"
	"github.com/sand-boxer/sandboxer/services/registry"
)

// upOptions are the flags of `sandboxer up`.
type upOptions struct {
	dataDir       string
	httpAddr      string
	natsListen    string
	extensionsDir string
	profilesDir   string
	pools         []string
	logLevel      string
	natsLogs      bool
	idleRelease   time.Duration
	retention     time.Duration
}

func newUpCmd(g *globals) *cobra.Command {
	o := &upOptions{}
	cmd := &cobra.Command{
		Use:   "up [--data-dir DIR] [--http ADDR] [--nats-listen ADDR]",
		Short: "Run the whole control plane in one process on an embedded NATS server",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o.dataDir = g.dataDir
			return runUp(cmd.Context(), o, cmd.OutOrStdout())
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.httpAddr, "http", "127.0.0.1:8080", "HTTP listen address of the gateway")
	f.StringVar(&o.natsListen, "nats-listen", "", "client listen address of the embedded NATS server, so workers on other machines can join (default: in-process only)")
	f.StringVar(&o.extensionsDir, "extensions", "extensions", "directory of ext.<name>.yaml manifests")
	f.StringVar(&o.profilesDir, "profiles", "profiles", "directory of profile.<slug>.yaml profiles")
	f.StringArrayVar(&o.pools, "extension", nil, "run worker pools only for these extensions (default: every extension whose handler is linked)")
	f.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	f.BoolVar(&o.natsLogs, "nats-logs", false, "show the embedded NATS server's logs")
	idleReleaseFlag(f, &o.idleRelease)
	retentionFlag(f, &o.retention)
	return cmd
}

// retentionFlag adds --retention: how long the record of a sandbox that
// ended is kept.
func retentionFlag(f *pflag.FlagSet, d *time.Duration) {
	f.DurationVar(d, "retention", sandbox.DefaultRetention, "how long the record of a destroyed or rejected sandbox is kept (negative: forever)")
}

// idleReleaseFlag adds --idle-release: how long a process must be quiet
// (no garbage collection) before it gives freed memory back to the
// operating system.
func idleReleaseFlag(f *pflag.FlagSet, d *time.Duration) {
	f.DurationVar(d, "idle-release", 5*time.Second, "give freed memory back to the OS after this long without garbage collection (0: leave it to the Go runtime)")
}

func newLogger(level string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, &exitError{2, fmt.Errorf("--log-level: %w", err)}
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l})), nil
}

// stack is the services of one process, stopped in reverse order.
type stack struct {
	stops []func(context.Context) error
}

func (s *stack) add(stop func(context.Context) error) { s.stops = append(s.stops, stop) }

func (s *stack) shutdown(ctx context.Context, log *slog.Logger) {
	for i := len(s.stops) - 1; i >= 0; i-- {
		if err := s.stops[i](ctx); err != nil && !errors.Is(err, context.Canceled) {
			log.Warn("shutting down", "err", err)
		}
	}
}

func runUp(ctx context.Context, o *upOptions, out io.Writer) error {
	log, err := newLogger(o.logLevel)
	if err != nil {
		return err
	}
	stopTrace, err := telemetry.Setup(ctx, "sandboxer")
	if err != nil {
		return err
	}
	defer func() { _ = stopTrace(context.Background()) }()
	sys, err := startSystem(ctx, systemConfig{
		DataDir: o.dataDir, HTTPAddr: o.httpAddr, NATSListen: o.natsListen, NATSLogs: o.natsLogs,
		ExtensionsDir: o.extensionsDir, ProfilesDir: o.profilesDir, Pools: o.pools,
		Extensions: linkedExtensions(), Logger: log, Retention: o.retention,
	})
	if err != nil {
		return err
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		sys.Shutdown(sctx)
	}()
	go memory.ReleaseWhenIdle(ctx, o.idleRelease)
	natsDesc := "in-process only"
	if u := sys.NATS.ClientURL(); u != "" {
		natsDesc = u
	}
	fmt.Fprintf(out, "sandboxer is up\n  gateway    %s\n  nats       %s\n  data dir   %s\n  api keys   %s (dev), %s (admin)\n  pools      %s\n",
		sys.URL, natsDesc, o.dataDir, keyPath(o.dataDir, "dev"), keyPath(o.dataDir, "admin"), strings.Join(sys.Pools, ", "))
	<-ctx.Done()
	fmt.Fprintln(out, "sandboxer: shutting down")
	return nil
}

// systemConfig configures the whole control plane in one process.
type systemConfig struct {
	DataDir       string
	HTTPAddr      string // default 127.0.0.1:8080; port 0 picks one
	NATSListen    string // empty: in-process connections only
	NATSLogs      bool
	ExtensionsDir string
	ProfilesDir   string
	Pools         []string // default: every catalog extension whose handler is linked
	Extensions    *extension.Registry
	Topology      bus.Topology
	Logger        *slog.Logger
	// Retention is how long records of ended sandboxes are kept. Zero:
	// the default.
	Retention time.Duration
}

// system is the control plane running in one process.
type system struct {
	NATS  *bus.Embedded
	NC    *nats.Conn
	JS    jetstream.JetStream
	URL   string // the gateway's base URL
	Pools []string
	st    stack
	log   *slog.Logger
}

// startSystem starts an embedded NATS server and all four services on it.
// On error, whatever started is stopped.
func startSystem(ctx context.Context, cfg systemConfig) (_ *system, err error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.HTTPAddr == "" {
		cfg.HTTPAddr = "127.0.0.1:8080"
	}
	log := cfg.Logger
	sys := &system{log: log}
	defer func() {
		if err != nil {
			sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			sys.Shutdown(sctx)
		}
	}()
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("creating data dir: %w", err)
	}
	srv, err := bus.StartEmbedded(bus.EmbeddedOptions{
		DataDir: filepath.Join(cfg.DataDir, "nats"), Listen: cfg.NATSListen, Logs: cfg.NATSLogs,
	})
	if err != nil {
		return nil, err
	}
	sys.NATS = srv
	sys.st.add(func(context.Context) error { srv.Shutdown(); return nil })
	nc, err := srv.Connect("sandboxer-up")
	if err != nil {
		return nil, err
	}
	sys.NC = nc
	sys.st.add(func(context.Context) error { return nc.Drain() })
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("opening jetstream: %w", err)
	}
	sys.JS = js
	if err := cfg.Topology.Ensure(ctx, js); err != nil {
		return nil, err
	}
	if _, err := ensureKeys(ctx, js, cfg.DataDir); err != nil {
		return nil, err
	}
	// Each service gets its own in-process connection, as it would as a
	// process of its own: one service's traffic never queues behind
	// another's in a shared connection.
	connect := func(name string) (*nats.Conn, jetstream.JetStream, error) {
		c, err := srv.Connect("sandboxer-" + name)
		if err != nil {
			return nil, nil, err
		}
		sys.st.add(func(context.Context) error { return c.Drain() })
		j, err := jetstream.New(c)
		if err != nil {
			return nil, nil, fmt.Errorf("opening jetstream: %w", err)
		}
		return c, j, nil
	}

	regNC, regJS, err := connect("registry")
	if err != nil {
		return nil, err
	}
	reg, err := registry.New(registry.Options{
		JS: regJS, NC: regNC, ExtensionsDir: cfg.ExtensionsDir, ProfilesDir: cfg.ProfilesDir,
		Extensions: cfg.Extensions, Logger: log.With("service", "registry"), Retention: cfg.Retention,
	})
	if err != nil {
		return nil, err
	}
	if err := reg.Start(ctx); err != nil {
		return nil, err
	}
	sys.st.add(reg.Shutdown)

	_, metJS, err := connect("metering")
	if err != nil {
		return nil, err
	}
	met, err := metering.New(metering.Options{JS: metJS, Logger: log.With("service", "metering")})
	if err != nil {
		return nil, err
	}
	if err := met.Start(ctx); err != nil {
		return nil, err
	}
	sys.st.add(met.Shutdown)

	cat, err := watchCatalog(ctx, js)
	if err != nil {
		return nil, err
	}
	pools := cfg.Pools
	if len(pools) == 0 {
		for _, m := range reg.Catalog().ExtensionList() {
			if _, err := cfg.Extensions.Lookup(m.Handler); err == nil {
				pools = append(pools, m.Name)
			}
		}
	}
	for _, name := range pools {
		// One provisioner per pool, so a backend that cannot start (a
		// missing SSH key, say) does not keep the others from running.
		_, pJS, err := connect("provisioner-" + name)
		if err != nil {
			return nil, err
		}
		p, err := provisioner.New(provisioner.Options{
			JS: pJS, Catalog: cat, Extensions: cfg.Extensions, Pools: []string{name},
			DataDir: filepath.Join(cfg.DataDir, "extensions"), Logger: log.With("service", "provisioner"),
		})
		if err != nil {
			return nil, err
		}
		if err := p.Start(ctx); err != nil {
			log.Warn("worker pool not started", "extension", name, "err", err)
			continue
		}
		sys.st.add(p.Shutdown)
		sys.Pools = append(sys.Pools, name)
	}

	wc, stopWorkers, err := watchWorkers(ctx, js)
	if err != nil {
		return nil, err
	}
	sys.st.add(stopWorkers)
	gwNC, gwJS, err := connect("gateway")
	if err != nil {
		return nil, err
	}
	mc := metering.NewClient(gwNC)
	gw, err := gateway.New(gateway.Options{
		JS: gwJS, Catalog: cat, Keys: apikey.NewStore(mustKV(ctx, js, bus.BucketAPIKeys)),
		Resolver: &gateway.CapacityResolver{Liveness: wc},
		Admitter: meteringAdmitter{mc}, Credits: meteringCredits{mc}, Logger: log.With("service", "gateway"),
		Retention: cfg.Retention,
	})
	if err != nil {
		return nil, err
	}
	if err := gw.Start(ctx); err != nil {
		return nil, err
	}
	sys.st.add(gw.Shutdown)
	ln, err := net.Listen("tcp", cfg.HTTPAddr)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", cfg.HTTPAddr, err)
	}
	hs := &http.Server{Handler: gw.Handler(), ReadHeaderTimeout: 10 * time.Second}
	// Event streams end when the gateway shuts down, so the server's own
	// shutdown does not wait on them until its deadline.
	hs.RegisterOnShutdown(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = gw.Shutdown(sctx)
	})
	go func() {
		if err := hs.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("http server", "err", err)
		}
	}()
	sys.st.add(hs.Shutdown)
	sys.URL = "http://" + ln.Addr().String()
	return sys, nil
}

// Shutdown stops every service, newest first, then the NATS server.
func (s *system) Shutdown(ctx context.Context) { s.st.shutdown(ctx, s.log) }

func mustKV(ctx context.Context, js jetstream.JetStream, bucket string) jetstream.KeyValue {
	kv, err := js.KeyValue(ctx, bucket)
	if err != nil {
		panic(fmt.Sprintf("bucket %s missing after Topology.Ensure: %v", bucket, err))
	}
	return kv
}

func watchCatalog(ctx context.Context, js jetstream.JetStream) (*catalog.Cache, error) {
	kv, err := js.KeyValue(ctx, bus.BucketCatalog)
	if err != nil {
		return nil, fmt.Errorf("opening catalog bucket: %w", err)
	}
	c, err := catalog.Watch(ctx, kv)
	if err != nil {
		return nil, err
	}
	select {
	case <-c.Ready():
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-time.After(30 * time.Second):
		return nil, errors.New("catalog not readable after 30s")
	}
	return c, nil
}

// ensureKeys makes sure an admin key and a key for consumer dev exist and
// are written, mode 0600, under dataDir/keys. A key file whose key the
// store no longer knows (the bus data was wiped) is replaced.
func ensureKeys(ctx context.Context, js jetstream.JetStream, dataDir string) (string, error) {
	store := apikey.NewStore(mustKV(ctx, js, bus.BucketAPIKeys))
	dir := filepath.Join(dataDir, "keys")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("creating keys dir: %w", err)
	}
	for _, k := range []struct{ who, consumer, role string }{
		{"admin", "admin", apikey.RoleAdmin},
		{"dev", "dev", apikey.RoleConsumer},
	} {
		path := keyPath(dataDir, k.who)
		if b, err := os.ReadFile(path); err == nil {
			if _, err := store.Lookup(ctx, strings.TrimSpace(string(b))); err == nil {
				continue
			}
		}
		tok, err := store.Issue(ctx, k.consumer, k.role, k.who+" key of sandboxer up")
		if err != nil {
			return "", err
		}
		if err := os.WriteFile(path, []byte(tok+"\n"), 0o600); err != nil {
			return "", fmt.Errorf("writing %s key: %w", k.who, err)
		}
	}
	return dir, nil
}

// linkedExtensions lists the backends linked into this binary.
func linkedExtensions() *extension.Registry {
	return extension.NewRegistry(builtinExtensions()...)
}

// connectFlags are the flags of every `serve` verb.
type connectFlags struct {
	url, creds, tlsCA, tlsCert, tlsKey string
	replicas                           int
	idleRelease                        time.Duration
}

func (c *connectFlags) add(cmd *cobra.Command) {
	f := cmd.Flags()
	f.StringVar(&c.url, "nats", envOr("NATS_URL", nats.DefaultURL), "NATS server URL(s), comma-separated (env NATS_URL)")
	f.StringVar(&c.creds, "creds", os.Getenv("NATS_CREDS"), "NATS credentials file (env NATS_CREDS)")
	f.StringVar(&c.tlsCA, "tls-ca", "", "CA certificate to verify the NATS server")
	f.StringVar(&c.tlsCert, "tls-cert", "", "client certificate for NATS")
	f.StringVar(&c.tlsKey, "tls-key", "", "client key for NATS")
	f.IntVar(&c.replicas, "replicas", 1, "replicas of every stream and bucket (3 on a three-node cluster)")
	idleReleaseFlag(f, &c.idleRelease)
}

// connect dials the cluster and ensures the topology.
func (c *connectFlags) connect(ctx context.Context, name string) (*nats.Conn, jetstream.JetStream, error) {
	nc, err := bus.Connect(ctx, bus.ConnConfig{URL: c.url, Name: name, CredsFile: c.creds, TLSCA: c.tlsCA, TLSCert: c.tlsCert, TLSKey: c.tlsKey})
	if err != nil {
		return nil, nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, fmt.Errorf("opening jetstream: %w", err)
	}
	if err := (bus.Topology{Replicas: c.replicas}).Ensure(ctx, js); err != nil {
		nc.Close()
		return nil, nil, err
	}
	return nc, js, nil
}
