package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/sand-boxer/sandboxer/cmd/sandboxer/internal/catalogfs"
	"github.com/sand-boxer/sandboxer/cmd/sandboxer/internal/memory"
	"github.com/sand-boxer/sandboxer/cmd/sandboxer/internal/telemetry"
	"github.com/sand-boxer/sandboxer/pkg/apikey"
	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/bus/embedded"
	"github.com/sand-boxer/sandboxer/pkg/catalog"
	"github.com/sand-boxer/sandboxer/pkg/credits"
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
	natsTLSCert   string
	natsTLSKey    string
	insecureNATS  bool
	extensionsDir string
	profilesDir   string
	pools         []string
	logs          logFlags
	natsLogs      bool
	idleRelease   time.Duration
	retention     time.Duration

	// extensionsGiven and profilesGiven: --extensions and --profiles
	// were given.
	extensionsGiven, profilesGiven bool
}

func newUpCmd() *cobra.Command {
	o := &upOptions{}
	cmd := &cobra.Command{
		Use:   "up [--data-dir DIR] [--http ADDR] [--nats-listen ADDR]",
		Short: "Run the whole control plane in one process on an embedded NATS server",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o.extensionsGiven, o.profilesGiven = cmd.Flags().Changed("extensions"), cmd.Flags().Changed("profiles")
			return runUp(cmd.Context(), o, cmd.OutOrStdout())
		},
	}
	f := cmd.Flags()
	dataDirFlag(f, &o.dataDir, "data directory: the NATS store, the authority, credentials and API keys")
	f.StringVar(&o.httpAddr, "http", "127.0.0.1:8080", "HTTP listen address of the gateway")
	f.StringVar(&o.natsListen, "nats-listen", "127.0.0.1:4222", "client listen address of the embedded NATS server, for workers, tenants and billing readers with credentials (empty: in-process only)")
	f.StringVar(&o.natsTLSCert, "nats-tls-cert", "", "TLS certificate (PEM) of the NATS listener")
	f.StringVar(&o.natsTLSKey, "nats-tls-key", "", "TLS key (PEM) of the NATS listener")
	f.BoolVar(&o.insecureNATS, "insecure-nats", false, "allow a NATS listener on a non-loopback address without TLS")
	catalogFlags(f, &o.extensionsDir, &o.profilesDir)
	extensionsFlag(f, &o.pools, "run worker pools only for this extension (default: every extension whose handler is linked)")
	o.logs.add(f)
	f.BoolVar(&o.natsLogs, "nats-logs", false, "show the embedded NATS server's logs")
	idleReleaseFlag(f, &o.idleRelease)
	retentionFlag(f, &o.retention)
	return cmd
}

// checkListen refuses a NATS listener on a non-loopback address without
// TLS, unless insecure: credentials and every event would cross the
// network in clear.
func checkListen(addr string, tls, insecure bool) error {
	if addr == "" || tls || insecure {
		return nil
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return &exitError{2, fmt.Errorf("--nats-listen %q: %w", addr, err)}
	}
	if host == "localhost" {
		return nil
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		return nil
	}
	return &exitError{2, fmt.Errorf("--nats-listen %s is not a loopback address: give --nats-tls-cert and --nats-tls-key, or --insecure-nats to send credentials and events in clear", addr)}
}

// catalogFlags adds --extensions and --profiles, the directories of the
// catalog; [catalogDir] says what is read when they are not given.
func catalogFlags(f *pflag.FlagSet, ext, prof *string) {
	f.StringVar(ext, "extensions", "extensions", "directory of ext.<name>.yaml manifests (default: ./extensions, else the ones built in)")
	f.StringVar(prof, "profiles", "profiles", "directory of profile.<slug>.yaml profiles (default: ./profiles, else the ones built in)")
}

// catalogDir is where one part of the catalog is read: dir when its flag
// gave it or when it exists, else the copy of the repository's shipped
// files built into the binary, under embedded of [catalogfs.FS]. So
// sandboxer started outside a clone serves the shipped catalog, and a
// clone's edits or an explicit flag win.
func catalogDir(dir string, given bool, embedded string) extension.CatalogDir {
	if given {
		return extension.CatalogDir{Path: dir}
	}
	if _, err := os.Stat(dir); err == nil {
		return extension.CatalogDir{Path: dir}
	}
	return extension.CatalogDir{FS: catalogfs.FS, Path: embedded}
}

// describeCatalog names where the catalog was read, for the banner.
func describeCatalog(dirs ...extension.CatalogDir) string {
	var out []string
	for _, d := range dirs {
		if d.FS != nil {
			out = append(out, d.Path+" (built in)")
		} else {
			out = append(out, d.Path)
		}
	}
	return strings.Join(out, ", ")
}

// retentionFlag adds --retention: how long a sandbox that ended stays in
// the listings.
func retentionFlag(f *pflag.FlagSet, d *time.Duration) {
	f.DurationVar(d, "retention", sandbox.DefaultRetention, "how long a destroyed or rejected sandbox stays in the listings (its GET answers for the lifecycle stream's max age; negative: listed as long)")
}

// idleReleaseFlag adds --idle-release: how long a process must be quiet
// (no garbage collection) before it gives freed memory back to the
// operating system.
func idleReleaseFlag(f *pflag.FlagSet, d *time.Duration) {
	f.DurationVar(d, "idle-release", 5*time.Second, "give freed memory back to the OS after this long without garbage collection (0: leave it to the Go runtime)")
}

// logFlags are --log-level and --log-format, of up and every serve verb.
type logFlags struct{ level, format string }

func (l *logFlags) add(f *pflag.FlagSet) {
	f.StringVar(&l.level, "log-level", "info", "debug, info, warn or error")
	f.StringVar(&l.format, "log-format", telemetry.LogText, "log lines as text (key=value) or json (one object per line); lines about a traced operation carry trace_id and span_id")
}

// logger is the process's logger on standard error, as the flags say.
func (l logFlags) logger() (*slog.Logger, error) {
	if l.format != telemetry.LogText && l.format != telemetry.LogJSON {
		return nil, &exitError{2, fmt.Errorf("--log-format %q: want text or json", l.format)}
	}
	log, err := telemetry.NewLogger(os.Stderr, l.level, l.format)
	if err != nil {
		return nil, &exitError{2, fmt.Errorf("--log-level: %w", err)}
	}
	return log, nil
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
	log, err := o.logs.logger()
	if err != nil {
		return err
	}
	stopTrace, err := telemetry.Setup(ctx, "sandboxer")
	if err != nil {
		return err
	}
	defer func() { _ = stopTrace(context.Background()) }()
	if err := checkListen(o.natsListen, o.natsTLSCert != "", o.insecureNATS); err != nil {
		return err
	}
	ext := catalogDir(o.extensionsDir, o.extensionsGiven, catalogfs.Extensions)
	prof := catalogDir(o.profilesDir, o.profilesGiven, catalogfs.Profiles)
	sys, err := startSystem(ctx, systemConfig{
		DataDir: o.dataDir, HTTPAddr: o.httpAddr, NATSListen: o.natsListen, NATSLogs: o.natsLogs,
		NATSTLSCert: o.natsTLSCert, NATSTLSKey: o.natsTLSKey,
		ExtensionsDir: ext.Path, ExtensionsFS: ext.FS, ProfilesDir: prof.Path, ProfilesFS: prof.FS, Pools: o.pools,
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
		natsDesc = u + " (credentials required)"
	}
	var creds []string
	for _, p := range sys.Creds {
		creds = append(creds, filepath.Base(p))
	}
	fmt.Fprintf(out, "sandboxer is up\n  gateway    %s\n  nats       %s\n  data dir   %s\n  api keys   %s (dev), %s (admin)\n  creds      %s: %s\n  catalog    %s\n  pools      %s\n",
		sys.URL, natsDesc, o.dataDir, keyPath(o.dataDir, "dev"), keyPath(o.dataDir, "admin"),
		credsDir(o.dataDir), strings.Join(creds, ", "), describeCatalog(ext, prof), strings.Join(sys.Pools, ", "))
	<-ctx.Done()
	fmt.Fprintln(out, "sandboxer: shutting down")
	return nil
}

// systemConfig configures the whole control plane in one process.
type systemConfig struct {
	DataDir       string
	HTTPAddr      string // default 127.0.0.1:8080; port 0 picks one
	NATSListen    string // empty: in-process connections only
	NATSTLSCert   string
	NATSTLSKey    string
	NATSLogs      bool
	ExtensionsDir string
	ProfilesDir   string
	// ExtensionsFS and ProfilesFS, when set, are the file systems
	// ExtensionsDir and ProfilesDir are directories of (the built-in
	// catalog's); nil is the operating system's.
	ExtensionsFS fs.FS
	ProfilesFS   fs.FS
	Pools        []string // default: every catalog extension whose handler is linked
	Extensions   *extension.Registry
	Topology     bus.Topology
	Logger       *slog.Logger
	// Retention is how long records of ended sandboxes are kept. Zero:
	// the default.
	Retention time.Duration
}

// system is the control plane running in one process.
type system struct {
	NATS *embedded.Server
	// Auth is the authority the embedded server trusts.
	Auth *auth.Authority
	// NC and JS are the admin's in-process connection: setup, and tests'
	// inspections. No service uses them.
	NC    *nats.Conn
	JS    jetstream.JetStream
	URL   string // the gateway's base URL
	Pools []string
	// Creds are the credentials files written under the data dir.
	Creds []string
	// Metrics is the process's one registry: every service's families,
	// which the gateway serves on /metrics.
	Metrics *prometheus.Registry
	st      stack
	log     *slog.Logger
}

// startSystem starts an embedded NATS server that trusts the data dir's
// authority, sets the bus up as the admin, and starts all four services
// on it, each under its own identity. On error, whatever started is
// stopped.
func startSystem(ctx context.Context, cfg systemConfig) (_ *system, err error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.HTTPAddr == "" {
		cfg.HTTPAddr = "127.0.0.1:8080"
	}
	log := cfg.Logger
	sys := &system{log: log, Metrics: newMetricsRegistry()}
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
	// The catalog first: a bad manifest stops nothing that started.
	cat, ps := extension.LoadCatalogDirs(extension.CatalogDir{FS: cfg.ExtensionsFS, Path: cfg.ExtensionsDir},
		extension.CatalogDir{FS: cfg.ProfilesFS, Path: cfg.ProfilesDir}, cfg.Extensions)
	if len(ps) > 0 {
		return nil, fmt.Errorf("loading catalog: %w", ps)
	}
	a, err := auth.Open(authDir(cfg.DataDir))
	if err != nil {
		return nil, err
	}
	sys.Auth = a
	srv, err := embedded.Start(embedded.Options{
		DataDir: filepath.Join(cfg.DataDir, "nats"), Listen: cfg.NATSListen, Logs: cfg.NATSLogs,
		Auth:    a.ServerConfig(filepath.Join(cfg.DataDir, "nats", "jwt")),
		TLSCert: cfg.NATSTLSCert, TLSKey: cfg.NATSTLSKey,
	})
	if err != nil {
		return nil, err
	}
	sys.NATS = srv
	sys.st.add(func(context.Context) error { srv.Shutdown(); return nil })
	// Each service gets its own in-process connection under its own
	// identity, as it would as a process of its own: one service's
	// traffic never queues behind another's, and each may do only its
	// job.
	connect := func(id auth.Identity) (*nats.Conn, jetstream.JetStream, error) {
		c, j, err := connectAs(srv, a, id, "sandboxer-"+id.UserName())
		if err != nil {
			return nil, nil, err
		}
		sys.st.add(func(context.Context) error { return c.Drain() })
		return c, j, nil
	}
	nc, js, err := connect(auth.Identity{Role: auth.RoleAdmin})
	if err != nil {
		return nil, err
	}
	sys.NC, sys.JS = nc, js

	pools := cfg.Pools
	if len(pools) == 0 {
		for _, m := range cat.ExtensionList() {
			if _, err := cfg.Extensions.Lookup(m.Handler); err == nil {
				pools = append(pools, m.Name)
			}
		}
	}
	rep, err := cfg.Topology.Setup(ctx, js, bus.SetupOptions{Consumers: setupConsumers(cat, []string{auth.DefaultBilling})})
	if err != nil {
		return nil, fmt.Errorf("setting up the bus: %w", err)
	}
	created := 0
	for _, c := range rep {
		switch c.Action {
		case bus.ActionCreated:
			created++
		case bus.ActionUpdated:
			log.Info("bus updated", "kind", c.Kind, "name", c.Name, "detail", c.Detail)
		}
	}
	if created > 0 {
		log.Info("bus set up", "created", created, "of", len(rep))
	}
	if sys.Creds, err = ensureCreds(a, cfg.DataDir, upIdentities(pools)); err != nil {
		return nil, err
	}
	if _, err := ensureKeys(ctx, js, cfg.DataDir); err != nil {
		return nil, err
	}

	regNC, regJS, err := connect(auth.Identity{Role: auth.RoleRegistry})
	if err != nil {
		return nil, err
	}
	reg, err := registry.New(registry.Options{
		JS: regJS, NC: regNC, Catalog: cat, Extensions: cfg.Extensions, Logger: log.With("service", "registry"), Retention: cfg.Retention,
		Metrics: sys.Metrics,
	})
	if err != nil {
		return nil, err
	}
	if err := reg.Start(ctx); err != nil {
		return nil, err
	}
	sys.st.add(reg.Shutdown)

	_, metJS, err := connect(auth.Identity{Role: auth.RoleMetering})
	if err != nil {
		return nil, err
	}
	met, err := metering.New(metering.Options{JS: metJS, Logger: log.With("service", "metering"), Metrics: sys.Metrics})
	if err != nil {
		return nil, err
	}
	if err := met.Start(ctx); err != nil {
		return nil, err
	}
	sys.st.add(met.Shutdown)

	for _, name := range pools {
		// One provisioner per pool, so a backend that cannot start (a
		// missing SSH key, say) does not keep the others from running.
		pNC, pJS, err := connect(auth.Identity{Role: auth.RoleProvisioner, Extension: name})
		if err != nil {
			return nil, err
		}
		pcat, stopCat, err := followCatalog(ctx, pNC)
		if err != nil {
			return nil, err
		}
		sys.st.add(stopCat)
		p, err := provisioner.New(provisioner.Options{
			JS: pJS, Catalog: pcat, Extensions: cfg.Extensions, Pools: []string{name},
			DataDir: filepath.Join(cfg.DataDir, "extensions"), Logger: log.With("service", "provisioner"),
			Metrics: sys.Metrics,
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

	gwNC, gwJS, err := connect(auth.Identity{Role: auth.RoleGateway})
	if err != nil {
		return nil, err
	}
	gw, err := startGateway(ctx, &sys.st, gwNC, gwJS, log.With("service", "gateway"), cfg.Retention, sys.Metrics)
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", cfg.HTTPAddr)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", cfg.HTTPAddr, err)
	}
	serveHTTP(&sys.st, gw, ln, log)
	sys.URL = "http://" + ln.Addr().String()
	return sys, nil
}

// startGateway starts a gateway on its connection: its catalog, worker
// liveness and metering client, and its bus intake.
// Its /metrics serves reg, where its families are registered too.
func startGateway(ctx context.Context, st *stack, nc *nats.Conn, js jetstream.JetStream, log *slog.Logger, retention time.Duration, reg *prometheus.Registry) (*gateway.Gateway, error) {
	cat, err := watchCatalog(ctx, js)
	if err != nil {
		return nil, err
	}
	wc, stopWorkers, err := watchWorkers(ctx, js)
	if err != nil {
		return nil, err
	}
	st.add(stopWorkers)
	keys, err := js.KeyValue(ctx, bus.BucketAPIKeys)
	if err != nil {
		return nil, fmt.Errorf("opening bucket %s: %w", bus.BucketAPIKeys, err)
	}
	// Admission and the credits API ask the metering service, which must
	// be running on the same bus.
	mc := credits.NewClient(nc)
	gw, err := gateway.New(gateway.Options{
		JS: js, Catalog: cat, Keys: apikey.NewStore(keys),
		Resolver: &gateway.CapacityResolver{Liveness: wc}, Workers: wc,
		Admitter: meteringAdmitter{mc}, Credits: meteringCredits{mc}, Logger: log,
		Retention: retention, Metrics: reg,
	})
	if err != nil {
		return nil, err
	}
	if err := gw.Start(ctx); err != nil {
		return nil, err
	}
	st.add(gw.Shutdown)
	return gw, nil
}

// HTTP server limits of the gateway.
const (
	// httpReadHeaderTimeout bounds a request's headers.
	httpReadHeaderTimeout = 10 * time.Second
	// httpReadTimeout bounds reading a whole request, its body included
	// (the gateway gives a body it decodes less: gateway.Options'
	// BodyReadTimeout). Reading only: once the body is read, net/http
	// lifts it, so it never cuts a handler or an event stream.
	httpReadTimeout = 30 * time.Second
	// httpWriteTimeout bounds writing an answer, from the end of the
	// request's headers; an event stream lifts it for itself.
	httpWriteTimeout = time.Minute
	// httpIdleTimeout bounds an idle keep-alive connection.
	httpIdleTimeout = 2 * time.Minute
	// httpMaxHeaderBytes bounds a request's headers.
	httpMaxHeaderBytes = 64 << 10
)

// newHTTPServer is the HTTP server of handler h, with the limits above.
func newHTTPServer(h http.Handler) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: httpReadHeaderTimeout,
		ReadTimeout:       httpReadTimeout,
		WriteTimeout:      httpWriteTimeout,
		IdleTimeout:       httpIdleTimeout,
		MaxHeaderBytes:    httpMaxHeaderBytes,
	}
}

// serveHTTP serves the gateway's API on ln until the stack stops.
func serveHTTP(st *stack, gw *gateway.Gateway, ln net.Listener, log *slog.Logger) {
	hs := newHTTPServer(gw.Handler())
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
	st.add(hs.Shutdown)
}

// Shutdown stops every service, newest first, then the NATS server.
func (s *system) Shutdown(ctx context.Context) { s.st.shutdown(ctx, s.log) }

// followCatalog starts a worker's view of the catalog, which needs no
// consumer ([catalog.Follow]); the returned stop ends it.
func followCatalog(ctx context.Context, nc *nats.Conn) (*catalog.Cache, func(context.Context) error, error) {
	fctx, cancel := context.WithCancel(context.Background())
	c, err := catalog.Follow(fctx, nc)
	if err != nil {
		cancel()
		return nil, nil, err
	}
	stop := func(context.Context) error { cancel(); return nil }
	select {
	case <-c.Ready():
	case <-ctx.Done():
		cancel()
		return nil, nil, ctx.Err()
	case <-time.After(30 * time.Second):
		cancel()
		return nil, nil, errors.New("catalog not readable after 30s")
	}
	return c, stop, nil
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
	kv, err := js.KeyValue(ctx, bus.BucketAPIKeys)
	if err != nil {
		return "", fmt.Errorf("opening bucket %s: %w", bus.BucketAPIKeys, err)
	}
	store := apikey.NewStore(kv)
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

// connectFlags are the flags of every verb that talks to a NATS cluster.
type connectFlags struct {
	url, creds, tlsCA, tlsCert, tlsKey string
}

func (c *connectFlags) add(cmd *cobra.Command) {
	f := cmd.Flags()
	f.StringVar(&c.url, "nats", envOr("NATS_URL", nats.DefaultURL), "NATS server URL(s), comma-separated (env NATS_URL)")
	f.StringVar(&c.creds, "creds", os.Getenv("NATS_CREDS"), "NATS credentials file of this process's identity (env NATS_CREDS)")
	f.StringVar(&c.tlsCA, "tls-ca", "", "CA certificate to verify the NATS server")
	f.StringVar(&c.tlsCert, "tls-cert", "", "client certificate for NATS")
	f.StringVar(&c.tlsKey, "tls-key", "", "client key for NATS")
}

// connect dials the cluster with the credentials of --creds. It declares
// nothing: `sandboxer setup` does.
func (c *connectFlags) connect(ctx context.Context, name string) (*nats.Conn, jetstream.JetStream, error) {
	opts, err := readCreds(c.creds)
	if err != nil {
		return nil, nil, err
	}
	nc, err := bus.Connect(ctx, bus.ConnConfig{URL: c.url, Name: name, Options: opts, TLSCA: c.tlsCA, TLSCert: c.tlsCert, TLSKey: c.tlsKey})
	if err != nil {
		return nil, nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, fmt.Errorf("opening jetstream: %w", err)
	}
	return nc, js, nil
}
