package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/sand-boxer/sandboxer/cmd/sandboxer/internal/bench"
	"github.com/sand-boxer/sandboxer/cmd/sandboxer/internal/memory"
	"github.com/sand-boxer/sandboxer/cmd/sandboxer/internal/telemetry"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/echo"
	"github.com/sand-boxer/sandboxer/services/provisioner"
)

// newBenchCmd is `sandboxer bench`: the flags, and the figures of
// package bench printed as a table and, with --json, one JSON object.
func newBenchCmd(_ *globals) *cobra.Command {
	var (
		quick, asJSON, require bool
		only                   []string
		cpuProfile             string
		live                   int
		priced                 bool
		scaling                bool
	)
	cmd := &cobra.Command{
		Use:   "bench [--quick] [--json]",
		Short: "Measure the control plane against raw JetStream on an embedded NATS with file storage",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg := bench.Full
			if quick {
				cfg = bench.Quick
			}
			if live > 0 {
				cfg.Live = live
			}
			cfg.Priced = priced
			env, err := benchEnv()
			if err != nil {
				return err
			}
			if cpuProfile != "" {
				f, err := os.Create(cpuProfile)
				if err != nil {
					return err
				}
				defer f.Close()
				if err := pprof.StartCPUProfile(f); err != nil {
					return err
				}
				defer pprof.StopCPUProfile()
			}
			if scaling && !slices.Contains(only, "scaling") {
				if len(only) == 0 {
					only = slices.DeleteFunc(slices.Clone(bench.Phases), func(p string) bool { return p == "scaling" })
				}
				only = append(only, "scaling")
			}
			res, err := bench.Run(cmd.Context(), env, cfg, only, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			bench.Print(cmd.OutOrStdout(), res)
			if asJSON {
				// One line; a target's op reads "<=", not "\u003c=".
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetEscapeHTML(false)
				if err := enc.Encode(res); err != nil {
					return fmt.Errorf("printing the figures: %w", err)
				}
			}
			if missed := res.Missed(); require && len(missed) > 0 {
				names := make([]string, len(missed))
				for i, t := range missed {
					names[i] = t.Name
				}
				return &exitError{1, fmt.Errorf("%d target(s) missed: %s", len(missed), strings.Join(names, ", "))}
			}
			return nil
		},
	}
	cmd.AddCommand(newBenchServeCmd(), newBenchWorkerCmd())
	cmd.Flags().BoolVar(&quick, "quick", false, "short run (under 90 seconds)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the figures as one JSON object on the last line")
	cmd.Flags().BoolVar(&priced, "priced", false, "give the benchmark's profile a price and its consumers credit (default: a free profile)")
	cmd.Flags().IntVar(&live, "live", 0, "live sandboxes for the memory figure (default 10000; the figure is named for 10k)")
	cmd.Flags().StringVar(&cpuProfile, "cpuprofile", "", "write a CPU profile of the whole run (server and client) to this file")
	cmd.Flags().BoolVar(&scaling, "scaling", false, "also run the scaling figure: one burst on a pool of 1, 2 and 4 worker processes")
	cmd.Flags().StringSliceVar(&only, "only", nil, "run only these phases: "+strings.Join(bench.Phases, ", "))
	cmd.Flags().BoolVar(&require, "require-targets", false, "exit 1 when a target is missed (default: report it, exit 0)")
	return cmd
}

// benchEnv is what package bench needs of this binary: the control plane
// as `up` starts it, with ext.echo linked; its keys and credentials; and
// this binary's hidden bench serve and bench worker commands.
func benchEnv() (bench.Env, error) {
	exe, err := os.Executable()
	if err != nil {
		return bench.Env{}, fmt.Errorf("finding this binary: %w", err)
	}
	return bench.Env{
		Start: func(ctx context.Context, c bench.SystemConfig) (*bench.System, error) {
			sys, err := startSystem(ctx, systemConfig{
				DataDir: c.DataDir, HTTPAddr: "127.0.0.1:0", NATSListen: c.NATSListen,
				ExtensionsDir: c.ExtensionsDir, ProfilesDir: c.ProfilesDir, Pools: c.Pools,
				Extensions: benchExtensions(), Logger: c.Logger,
			})
			if err != nil {
				return nil, err
			}
			return &bench.System{NATS: sys.NATS, Auth: sys.Auth, NC: sys.NC, JS: sys.JS, URL: sys.URL, Shutdown: sys.Shutdown}, nil
		},
		DevToken: func(dataDir string) (string, error) {
			b, err := os.ReadFile(keyPath(dataDir, "dev"))
			if err != nil {
				return "", fmt.Errorf("reading the dev key: %w", err)
			}
			return strings.TrimSpace(string(b)), nil
		},
		IssueCreds: ensureCreds,
		Self:       []string{exe, "bench"},
	}, nil
}

// benchExtensions are the backends of the benchmark's processes: the
// shipped ones and ext.echo.
func benchExtensions() *extension.Registry {
	return extension.NewRegistry(append(builtinExtensions(), echo.Info)...)
}

// newBenchServeCmd is the process whose memory the benchmark measures:
// the whole system, as `sandboxer up` runs it, with the echo backend.
func newBenchServeCmd() *cobra.Command {
	var (
		dir, heapProfile string
		idleRelease      time.Duration
		priced           bool
	)
	cmd := &cobra.Command{
		Use:    "serve --dir DIR",
		Short:  "run the benchmark's system in this process (used by bench)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			env, err := benchEnv()
			if err != nil {
				return err
			}
			sys, err := bench.StartSystem(cmd.Context(), env, dir, priced, false)
			if err != nil {
				return err
			}
			go memory.ReleaseWhenIdle(cmd.Context(), idleRelease) // as `up` does
			fmt.Fprintf(cmd.OutOrStdout(), "url %s\n", sys.URL)
			<-cmd.Context().Done()
			if heapProfile != "" {
				if f, err := os.Create(heapProfile); err == nil {
					_ = pprof.WriteHeapProfile(f)
					_ = f.Close()
				}
			}
			sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			sys.Shutdown(sctx)
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "data directory")
	cmd.Flags().StringVar(&heapProfile, "heapprofile", "", "write a heap profile here on exit")
	idleReleaseFlag(cmd.Flags(), &idleRelease)
	cmd.Flags().BoolVar(&priced, "priced", false, "give the profile a price and the consumers credit")
	return cmd
}

// newBenchWorkerCmd is one worker process of the scaling run: a
// provisioner of one pool, linked with ext.echo, which `serve
// provisioner` is not. It prints "consuming" once it is.
func newBenchWorkerCmd() *cobra.Command {
	var (
		c           connectFlags
		pool        string
		concurrency int
		worker      string
	)
	cmd := &cobra.Command{
		Use:    "worker --nats URL --creds FILE --extension ID [--concurrency N]",
		Short:  "run one worker of the benchmark's echo pool (used by bench --scaling)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			logs := logFlags{level: "warn", format: telemetry.LogText}
			return serveRun(cmd.Context(), "bench-worker", logs, &c, 0, func(ctx context.Context, st *stack, d *svcDeps) error {
				cat, stopCat, err := followCatalog(ctx, d.nc)
				if err != nil {
					return err
				}
				st.add(stopCat)
				p, err := provisioner.New(provisioner.Options{
					JS: d.js, Catalog: cat, Extensions: benchExtensions(), Pools: []string{pool},
					Concurrency: concurrency, WorkerID: worker, Logger: d.log,
					DataDir: filepath.Join(os.TempDir(), "sandboxer-bench-worker"),
				})
				if err != nil {
					return err
				}
				if err := p.Start(ctx); err != nil {
					return err
				}
				st.add(p.Shutdown)
				fmt.Fprintln(cmd.OutOrStdout(), "consuming")
				return nil
			})
		},
	}
	c.add(cmd)
	cmd.Flags().StringVar(&pool, "extension", bench.ScalingPool, "extension whose pool to serve")
	cmd.Flags().IntVar(&concurrency, "concurrency", 0, "commands this worker runs at once (default: the manifest's workers.concurrency)")
	cmd.Flags().StringVar(&worker, "worker-id", "", "worker id in events and heartbeats (default host-pid)")
	return cmd
}
