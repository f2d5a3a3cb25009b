package main

import (
	"bufio"
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/sand-boxer/sandboxer/cmd/sandboxer/internal/telemetry"
	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/echo"
	"github.com/sand-boxer/sandboxer/services/provisioner"
)

// The scaling run: one burst of creates on an echo pool whose every
// Provision takes scalingDelay, served by 1, 2 and 4 worker processes of
// scalingConcurrency each, under a pool capacity of scalingMaxInFlight.
// One worker can run 16 at once, four can run the whole capacity: the
// figure is how much of that the bus hands out. The burst is sixteen
// waves of the whole capacity long, so that the ramp at its start and the
// last wave's tail (when some workers idle) weigh little: with 256 creates
// (four waves) the same pool measured 1.77x and 3.17x, with 1024 1.94x and
// 3.58x, in one session on one machine.
const (
	scalingPool        = "echo-scaling"
	scalingBurst       = 1024
	scalingDelay       = 200 * time.Millisecond
	scalingMaxInFlight = 64
	scalingConcurrency = 16
	// scalingTimeout bounds each burst (one worker needs about 13 s).
	scalingTimeout = 2 * time.Minute
)

// scalingWorkers are the pool sizes measured, one burst each.
var scalingWorkers = []int{1, 2, 4}

// scalingManifest is the scaling run's pool: ext.echo with a delay.
var scalingManifest = fmt.Sprintf(`name: %s
handler: echo
description: ext.echo with a provisioning delay, served by worker processes only, for the scaling figure.
capabilities:
  isolation_levels: [process]
  pricing_model: self-hosted
capacity:
  max_in_flight: %d
workers:
  concurrency: %d
config:
  delay: %s
inputs: {}
`, scalingPool, scalingMaxInFlight, scalingConcurrency, scalingDelay)

var scalingProfile = fmt.Sprintf(`slug: %s
extension: %s
ttl:
  default: 1h
  max: 24h
`, scalingPool, scalingPool)

// benchExtensions are the backends of the benchmark's processes: the
// shipped ones and ext.echo.
func benchExtensions() *extension.Registry {
	return extension.NewRegistry(append(builtinExtensions(), echo.Info)...)
}

// benchScaling runs one burst per pool size of scalingWorkers: it starts
// that many worker processes against sys's NATS listener, with
// credentials of the pool's identity issued under dataDir, creates
// scalingBurst sandboxes through the gateway (cfg.InFlight requests at a
// time) and times the first create to the last ready event.
func benchScaling(ctx context.Context, sys *system, cfg benchConfig, dataDir string, res *benchResult, logf func(string, ...any)) error {
	url := sys.NATS.ClientURL()
	if url == "" {
		return errors.New("the bench system has no NATS listener")
	}
	paths, err := ensureCreds(sys.Auth, dataDir, []auth.Identity{{Role: auth.RoleProvisioner, Extension: scalingPool}})
	if err != nil {
		return err
	}
	tok, err := os.ReadFile(keyPath(dataDir, "dev"))
	if err != nil {
		return err
	}
	c := api.NewClient(sys.URL, strings.TrimSpace(string(tok)), &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256}})
	w, err := newWatcher(sys.NC)
	if err != nil {
		return err
	}
	defer w.close()
	cons, err := sys.JS.Consumer(ctx, event.StreamCommands, bus.DurableProvisioner(scalingPool))
	if err != nil {
		return err
	}
	rates := make([]float64, len(scalingWorkers))
	for i, n := range scalingWorkers {
		rate, created, err := scalingRun(ctx, c, w, cons, cfg, url, paths[0], n)
		if err != nil {
			return fmt.Errorf("%d workers: %w", n, err)
		}
		logf("scaling: %d worker(s): %.1f creates to ready per second (every create answered after %s)", n, rate, created.Round(time.Millisecond))
		rates[i] = rate
	}
	res.Scaling1WorkerPerS, res.Scaling2WorkersPerS, res.Scaling4WorkersPerS = rates[0], rates[1], rates[2]
	res.Scaling2x, res.Scaling4x = rates[1]/rates[0], rates[2]/rates[0]
	res.ScalingBurst, res.ScalingDelayMs = scalingBurst, int(scalingDelay.Milliseconds())
	res.ScalingMaxInFlight, res.ScalingConcurrency = scalingMaxInFlight, scalingConcurrency
	return nil
}

// scalingRun is one burst on n worker processes; it returns creates to
// ready per second and how long the creates took to be answered, and
// leaves the pool's durable quiet, its workers stopped.
func scalingRun(ctx context.Context, c *api.Client, w *watcher, cons jetstream.Consumer, cfg benchConfig, url, creds string, n int) (rate float64, created time.Duration, err error) {
	wctx, stop := context.WithCancel(ctx)
	var children []*exec.Cmd
	defer func() {
		stop() // each child gets SIGINT, and is killed after its WaitDelay
		for _, ch := range children {
			_ = ch.Wait()
		}
	}()
	for i := range n {
		ch, err := startBenchWorker(wctx, url, creds, fmt.Sprintf("bench-%d-of-%d", i+1, n))
		if err != nil {
			return 0, 0, err
		}
		children = append(children, ch)
	}
	// Every worker pulls before the burst starts.
	if err := awaitConsumer(ctx, cons, 30*time.Second, func(i *jetstream.ConsumerInfo) bool { return i.NumWaiting >= n }); err != nil {
		return 0, 0, fmt.Errorf("waiting for %d pull requests: %w", n, err)
	}

	bctx, cancel := context.WithTimeout(ctx, scalingTimeout)
	defer cancel()
	readies := make([]chan struct{}, scalingBurst)
	var (
		next  atomic.Int64
		wg    sync.WaitGroup
		errMu sync.Mutex
		first error
	)
	start := time.Now()
	for range min(cfg.InFlight, scalingBurst) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := next.Add(1) - 1; i < scalingBurst; i = next.Add(1) - 1 {
				s, err := c.Create(bctx, api.CreateRequest{Profile: scalingPool}, "")
				if err != nil {
					errMu.Lock()
					first = cmp.Or(first, err)
					errMu.Unlock()
					return
				}
				readies[i] = w.expect(s.ID, event.StateReady)
			}
		}()
	}
	wg.Wait()
	created = time.Since(start)
	if first != nil {
		return 0, 0, first
	}
	for i, ch := range readies {
		select {
		case <-ch:
		case <-bctx.Done():
			return 0, 0, fmt.Errorf("%d of %d sandboxes ready within %s", i, scalingBurst, scalingTimeout)
		}
	}
	rate = float64(scalingBurst) / time.Since(start).Seconds()
	// The last acks land before the workers stop.
	if err := awaitConsumer(ctx, cons, 30*time.Second, func(i *jetstream.ConsumerInfo) bool { return i.NumPending == 0 && i.NumAckPending == 0 }); err != nil {
		return 0, 0, fmt.Errorf("waiting for the pool to be quiet: %w", err)
	}
	return rate, created, nil
}

// awaitConsumer polls cons's info until cond holds, for at most d.
func awaitConsumer(ctx context.Context, cons jetstream.Consumer, d time.Duration, cond func(*jetstream.ConsumerInfo) bool) error {
	deadline := time.Now().Add(d)
	for {
		info, err := cons.Info(ctx)
		if err != nil {
			return err
		}
		if cond(info) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not within %s (pending %d, in flight %d, pulls waiting %d)", d, info.NumPending, info.NumAckPending, info.NumWaiting)
		}
		select {
		case <-time.After(10 * time.Millisecond):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// startBenchWorker starts `sandboxer bench worker` as worker id of the
// scaling pool and returns once it consumes. Cancelling ctx interrupts it
// (it drains and exits); one that does not exit 30 s later is killed.
func startBenchWorker(ctx context.Context, url, creds, id string) (*exec.Cmd, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	ch := exec.CommandContext(ctx, exe, "bench", "worker", "--nats", url, "--creds", creds,
		"--extension", scalingPool, "--concurrency", strconv.Itoa(scalingConcurrency), "--worker-id", id)
	ch.Cancel = func() error { return ch.Process.Signal(os.Interrupt) }
	ch.WaitDelay = 30 * time.Second
	ch.Stderr = os.Stderr
	out, err := ch.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := ch.Start(); err != nil {
		return nil, err
	}
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(out).ReadString('\n')
		line <- strings.TrimSpace(s)
	}()
	fail := func(err error) (*exec.Cmd, error) {
		_ = ch.Process.Kill()
		_ = ch.Wait()
		return nil, fmt.Errorf("worker %s: %w", id, err)
	}
	select {
	case s := <-line:
		if s != "consuming" {
			return fail(fmt.Errorf("said %q before consuming", s))
		}
	case <-time.After(30 * time.Second):
		return fail(errors.New("not consuming after 30s"))
	case <-ctx.Done():
		return fail(ctx.Err())
	}
	return ch, nil
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
	cmd.Flags().StringVar(&pool, "extension", scalingPool, "extension whose pool to serve")
	cmd.Flags().IntVar(&concurrency, "concurrency", 0, "commands this worker runs at once (default: the manifest's workers.concurrency)")
	cmd.Flags().StringVar(&worker, "worker-id", "", "worker id in events and heartbeats (default host-pid)")
	return cmd
}
