package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/sand-boxer/sandboxer/cmd/sandboxer/internal/catalogfs"
	"github.com/sand-boxer/sandboxer/cmd/sandboxer/internal/memory"
	"github.com/sand-boxer/sandboxer/cmd/sandboxer/internal/telemetry"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/metrics"
	"github.com/sand-boxer/sandboxer/services/metering"
	"github.com/sand-boxer/sandboxer/services/provisioner"
	"github.com/sand-boxer/sandboxer/services/registry"
)

func newServeCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "serve gateway|provisioner|metering|registry",
		Short: "Run one service against an external NATS cluster",
	}
	cmd.AddCommand(serveGateway(), serveProvisioner(), serveMetering(), serveRegistry())
	return cmd
}

// serveRun runs start, waits for ctx, then runs the returned shutdown with
// a deadline.
func serveRun(ctx context.Context, service string, logs logFlags, c *connectFlags, idleRelease time.Duration, start func(ctx context.Context, s *stack, js *svcDeps) error) error {
	log, err := logs.logger()
	if err != nil {
		return err
	}
	stopTrace, err := telemetry.Setup(ctx, "sandboxer-"+service)
	if err != nil {
		return err
	}
	var st stack
	st.add(stopTrace)
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		st.shutdown(sctx, log)
	}()
	nc, js, err := c.connect(ctx, "sandboxer-"+service)
	if err != nil {
		return err
	}
	st.add(func(context.Context) error { return nc.Drain() })
	deps := &svcDeps{js: js, nc: nc, log: log.With("service", service)}
	if err := start(ctx, &st, deps); err != nil {
		return err
	}
	go memory.ReleaseWhenIdle(ctx, idleRelease)
	log.Info("serving", "service", service, "nats", nc.ConnectedUrlRedacted())
	<-ctx.Done()
	return nil
}

func serveGateway() *cobra.Command {
	var (
		c           connectFlags
		mf          metricsFlag
		addr        string
		logs        logFlags
		retention   time.Duration
		idleRelease time.Duration
	)
	cmd := &cobra.Command{
		Use:   "gateway [--http ADDR]",
		Short: "Run the HTTP gateway and the bus intake of sandbox requests",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return serveRun(cmd.Context(), "gateway", logs, &c, idleRelease, func(ctx context.Context, st *stack, d *svcDeps) error {
				mreg, err := mf.start(st, d)
				if err != nil {
					return err
				}
				gw, err := startGateway(ctx, st, d.nc, d.js, d.log, retention, mreg)
				if err != nil {
					return err
				}
				ln, err := net.Listen("tcp", addr)
				if err != nil {
					return fmt.Errorf("listening on %s: %w", addr, err)
				}
				serveHTTP(st, gw, ln, d.log)
				mf.started(st)
				d.log.Info("gateway listening", "addr", ln.Addr().String())
				return nil
			})
		},
	}
	c.add(cmd)
	mf.add(cmd.Flags())
	cmd.Flags().StringVar(&addr, "http", "127.0.0.1:8080", "HTTP listen address")
	retentionFlag(cmd.Flags(), &retention)
	idleReleaseFlag(cmd.Flags(), &idleRelease)
	logs.add(cmd.Flags())
	return cmd
}

func serveProvisioner() *cobra.Command {
	var (
		c           connectFlags
		mf          metricsFlag
		dataDir     string
		pools       []string
		concurrency int
		logs        logFlags
		worker      string
		host        string
		idleRelease time.Duration
	)
	cmd := &cobra.Command{
		Use:   "provisioner --extension ID [--extension ID]... [--concurrency N]",
		Short: "Run worker pools; every worker of an extension shares its durable consumer",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if len(pools) == 0 {
				return &exitError{2, errors.New("at least one --extension is required")}
			}
			return serveRun(cmd.Context(), "provisioner", logs, &c, idleRelease, func(ctx context.Context, st *stack, d *svcDeps) error {
				mreg, err := mf.start(st, d)
				if err != nil {
					return err
				}
				cat, stopCat, err := followCatalog(ctx, d.nc)
				if err != nil {
					return err
				}
				st.add(stopCat)
				p, err := provisioner.New(provisioner.Options{
					JS: d.js, Catalog: cat, Extensions: linkedExtensions(), Pools: pools,
					Concurrency: concurrency, DataDir: filepath.Join(dataDir, "extensions"), WorkerID: worker, Host: host, Logger: d.log,
					Metrics: mreg,
				})
				if err != nil {
					return err
				}
				if err := p.Start(ctx); err != nil {
					return err
				}
				st.add(p.Shutdown)
				mf.started(st)
				return nil
			})
		},
	}
	c.add(cmd)
	mf.add(cmd.Flags())
	extensionsFlag(cmd.Flags(), &pools, "extension to serve")
	dataDirFlag(cmd.Flags(), &dataDir, "data directory: the backends' working data, under extensions/")
	cmd.Flags().IntVar(&concurrency, "concurrency", 0, "commands run at once per extension in this process (default: the manifest's workers.concurrency)")
	cmd.Flags().StringVar(&worker, "worker-id", "", "worker id in events and heartbeats (default host-pid)")
	cmd.Flags().StringVar(&host, "host", "",
		"this worker's placement host: a locality: host backend (ext.local) places its sandboxes here and tears down only what it placed here; one of the manifest's hosts (default localhost)")
	idleReleaseFlag(cmd.Flags(), &idleRelease)
	logs.add(cmd.Flags())
	return cmd
}

func serveMetering() *cobra.Command {
	var (
		c           connectFlags
		logs        logFlags
		mf          metricsFlag
		idleRelease time.Duration
	)
	cmd := &cobra.Command{
		Use:   "metering",
		Short: "Run the metering service",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return serveRun(cmd.Context(), "metering", logs, &c, idleRelease, func(ctx context.Context, st *stack, d *svcDeps) error {
				mreg, err := mf.start(st, d)
				if err != nil {
					return err
				}
				m, err := metering.New(metering.Options{JS: d.js, Logger: d.log, Metrics: mreg})
				if err != nil {
					return err
				}
				if err := m.Start(ctx); err != nil {
					return err
				}
				st.add(m.Shutdown)
				mf.started(st)
				return nil
			})
		},
	}
	c.add(cmd)
	mf.add(cmd.Flags())
	idleReleaseFlag(cmd.Flags(), &idleRelease)
	logs.add(cmd.Flags())
	return cmd
}

func serveRegistry() *cobra.Command {
	var (
		c               connectFlags
		mf              metricsFlag
		extDir, profDir string
		logs            logFlags
		retention       time.Duration
		idleRelease     time.Duration
	)
	cmd := &cobra.Command{
		Use:   "registry [--extensions DIR] [--profiles DIR]",
		Short: "Run the registry: catalog and inventory",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ext := catalogDir(extDir, cmd.Flags().Changed("extensions"), catalogfs.Extensions)
			prof := catalogDir(profDir, cmd.Flags().Changed("profiles"), catalogfs.Profiles)
			reg := linkedExtensions()
			cat, ps := extension.LoadCatalogDirs(ext, prof, reg)
			if len(ps) > 0 {
				return fmt.Errorf("loading catalog: %w", ps)
			}
			return serveRun(cmd.Context(), "registry", logs, &c, idleRelease, func(ctx context.Context, st *stack, d *svcDeps) error {
				d.log.Info("catalog", "from", describeCatalog(ext, prof))
				mreg, err := mf.start(st, d)
				if err != nil {
					return err
				}
				r, err := registry.New(registry.Options{
					JS: d.js, NC: d.nc, Catalog: cat, Extensions: reg, Logger: d.log, Metrics: mreg,
					Retention: retention,
				})
				if err != nil {
					return err
				}
				if err := r.Start(ctx); err != nil {
					return err
				}
				st.add(r.Shutdown)
				mf.started(st)
				return nil
			})
		},
	}
	c.add(cmd)
	mf.add(cmd.Flags())
	catalogFlags(cmd.Flags(), &extDir, &profDir)
	logs.add(cmd.Flags())
	retentionFlag(cmd.Flags(), &retention)
	idleReleaseFlag(cmd.Flags(), &idleRelease)
	return cmd
}

// newMetricsRegistry is the one registry of a process, which its services
// register their families in: with the Go runtime's and the process's.
func newMetricsRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// metricsFlag is --metrics of the serve verbs: a listener with the
// process's /metrics, /healthz (200 while it runs) and /readyz (200 once
// the service started, while its NATS connection is up).
type metricsFlag struct {
	addr  string
	ready atomic.Bool
}

func (m *metricsFlag) add(f *pflag.FlagSet) {
	f.StringVar(&m.addr, "metrics", "", "listen address of /metrics, /healthz and /readyz, such as :9090 (empty: none)")
}

// start returns the process's registry and, with --metrics, serves it
// until the stack stops. Call it before the service starts, so /healthz
// answers while it does.
func (m *metricsFlag) start(st *stack, d *svcDeps) (*prometheus.Registry, error) {
	reg := newMetricsRegistry()
	if m.addr == "" {
		return reg, nil
	}
	ln, err := net.Listen("tcp", m.addr)
	if err != nil {
		return nil, fmt.Errorf("listening on %s (--metrics): %w", m.addr, err)
	}
	hs := newHTTPServer(metrics.Mux(reg, func(context.Context) []string {
		var not []string
		if s := d.nc.Status(); s != nats.CONNECTED {
			not = append(not, "nats "+strings.ToLower(s.String()))
		}
		if !m.ready.Load() {
			not = append(not, "service not started")
		}
		return not
	}))
	go func() {
		if err := hs.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("metrics server", "err", err)
		}
	}()
	st.add(hs.Shutdown)
	d.log.Info("metrics listening", "addr", ln.Addr().String())
	return reg, nil
}

// started marks the service started: /readyz answers 200 from now on,
// until the stack begins to stop it.
func (m *metricsFlag) started(st *stack) {
	m.ready.Store(true)
	st.add(func(context.Context) error { m.ready.Store(false); return nil })
}
