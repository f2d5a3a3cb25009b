package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
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
	// ScalingPool is the scaling run's extension, which only worker
	// processes serve.
	ScalingPool        = "echo-scaling"
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
`, ScalingPool, scalingMaxInFlight, scalingConcurrency, scalingDelay)

var scalingProfile = fmt.Sprintf(`slug: %s
extension: %s
ttl:
  default: 1h
  max: 24h
`, ScalingPool, ScalingPool)

// benchScaling runs one burst per pool size of scalingWorkers: it starts
// that many worker processes against sys's NATS listener, with
// credentials of the pool's identity issued under dataDir, creates
// scalingBurst sandboxes through the gateway (cfg.InFlight requests at a
// time) and times the first create to the last ready event.
func benchScaling(ctx context.Context, env Env, sys *System, cfg Config, dataDir string, res *Result, logf func(string, ...any)) error {
	url := sys.NATS.ClientURL()
	if url == "" {
		return errors.New("the bench system has no NATS listener")
	}
	paths, err := env.IssueCreds(sys.Auth, dataDir, []auth.Identity{{Role: auth.RoleProvisioner, Extension: ScalingPool}})
	if err != nil {
		return err
	}
	tok, err := env.DevToken(dataDir)
	if err != nil {
		return err
	}
	c := api.NewClient(sys.URL, tok, &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256}})
	w, err := newWatcher(sys.NC)
	if err != nil {
		return err
	}
	defer w.close()
	cons, err := sys.JS.Consumer(ctx, event.StreamCommands, bus.DurableProvisioner(ScalingPool))
	if err != nil {
		return err
	}
	rates := make([]float64, len(scalingWorkers))
	for i, n := range scalingWorkers {
		rate, created, err := scalingRun(ctx, env, c, w, cons, cfg, url, paths[0], n)
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
func scalingRun(ctx context.Context, env Env, c *api.Client, w *watcher, cons jetstream.Consumer, cfg Config, url, creds string, n int) (rate float64, created time.Duration, err error) {
	wctx, stop := context.WithCancel(ctx)
	var children []*exec.Cmd
	defer func() {
		stop() // each child gets SIGINT, and is killed after its WaitDelay
		for _, ch := range children {
			_ = ch.Wait()
		}
	}()
	for i := range n {
		ch, err := startBenchWorker(wctx, env, url, creds, fmt.Sprintf("bench-%d-of-%d", i+1, n))
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
	start := time.Now()
	err = forEach(scalingBurst, cfg.InFlight, func(i int) error {
		s, err := c.Create(bctx, api.CreateRequest{Profile: ScalingPool}, "")
		if err != nil {
			return err
		}
		readies[i] = w.expect(s.ID, event.StateReady)
		return nil
	})
	created = time.Since(start)
	if err != nil {
		return 0, 0, err
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

// startBenchWorker starts `sandboxer bench worker` (Env.Self) as worker id
// of the scaling pool and returns once it consumes. Cancelling ctx
// interrupts it (it drains and exits); one that does not exit 30 s later
// is killed.
func startBenchWorker(ctx context.Context, env Env, url, creds, id string) (*exec.Cmd, error) {
	args := append(slices.Clone(env.Self[1:]), "worker", "--nats", url, "--creds", creds,
		"--extension", ScalingPool, "--concurrency", strconv.Itoa(scalingConcurrency), "--worker-id", id)
	ch := exec.CommandContext(ctx, env.Self[0], args...)
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
