// Package bench measures the control plane against raw JetStream, for
// `sandboxer bench`: the floor (a raw two-hop JetStream loop), create to
// ready, full lifecycles, metering's fold, the resident set of a process
// holding 10k live sandboxes, and optionally how a pool scales over worker
// processes. It reports every figure, and the performance targets of
// docs/performance.md as ratios of those figures, met or not.
//
// The package owns the measurements, their figures and targets. What it
// needs of the binary it runs in (starting the control plane, its keys and
// credentials, the hidden child commands) it is given in an [Env]; it
// never imports the binary's main package.
package bench

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/bus/embedded"
	"github.com/sand-boxer/sandboxer/pkg/credits"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
	"github.com/sand-boxer/sandboxer/services/metering"
)

// Env is what a run needs of the binary it runs in. Every field is
// required.
type Env struct {
	// Start starts the control plane in this process on an embedded NATS
	// server, as `sandboxer up` does, with the echo backend linked.
	Start func(ctx context.Context, c SystemConfig) (*System, error)
	// DevToken reads the API key of the dev consumer that the control
	// plane started on dataDir wrote there.
	DevToken func(dataDir string) (string, error)
	// IssueCreds writes credentials files for ids under dataDir, signed
	// by a, and returns their paths in order.
	IssueCreds func(a *auth.Authority, dataDir string, ids []auth.Identity) ([]string, error)
	// Self is the command line of this binary's bench verb. The memory
	// phase runs Self + "serve --dir DIR [--priced] [--heapprofile F]",
	// which starts [StartSystem] and prints "url <gateway URL>"; the
	// scaling phase runs Self + "worker --nats URL --creds FILE
	// --extension [ScalingPool] --concurrency N --worker-id ID", which
	// serves the pool and prints "consuming". Both stop on SIGINT.
	Self []string
}

// check reports a field of e left out.
func (e Env) check() error {
	if e.Start == nil || e.DevToken == nil || e.IssueCreds == nil || len(e.Self) == 0 {
		return errors.New("bench: Env needs Start, DevToken, IssueCreds and Self")
	}
	return nil
}

// SystemConfig is the control plane a run asks [Env.Start] for.
type SystemConfig struct {
	// DataDir holds the authority, keys and the file store.
	DataDir string
	// NATSListen is a NATS listener address ("127.0.0.1:-1": a random
	// port); empty for in-process connections only.
	NATSListen string
	// ExtensionsDir and ProfilesDir hold the benchmark's catalog.
	ExtensionsDir, ProfilesDir string
	// Pools are the extensions this process serves.
	Pools []string
	// Logger is the services' logger.
	Logger *slog.Logger
}

// System is the control plane a run measures.
type System struct {
	// NATS is the embedded server; its counters are the bus figures.
	NATS *embedded.Server
	// Auth is the authority the server trusts.
	Auth *auth.Authority
	// NC and JS are an admin connection.
	NC *nats.Conn
	JS jetstream.JetStream
	// URL is the gateway's base URL.
	URL string
	// Shutdown stops every service and the server.
	Shutdown func(context.Context)
}

// Config sizes a benchmark run.
type Config struct {
	// Mode names the run in its result: quick or full.
	Mode       string
	Sequential int           // sequential samples per latency figure
	InFlight   int           // concurrency of the throughput figures
	Duration   time.Duration // length of each throughput window
	Live       int           // live sandboxes for the memory figure
	Settle     time.Duration // quiet time before the memory figure
	// Priced gives the benchmark's profile a price (a start fee and a
	// per-second rate) and its consumers credit, so every sandbox is
	// admitted with a credit hold and accrues while it runs. Off, the
	// profile is free, as a self-hosted profile without a price is.
	Priced bool
}

// The two sizes of a run: Quick (under 90 seconds) and Full.
var (
	Quick = Config{Mode: "quick", Sequential: 1000, InFlight: 64, Duration: 4 * time.Second, Live: 10_000, Settle: 20 * time.Second}
	Full  = Config{Mode: "full", Sequential: 5000, InFlight: 64, Duration: 15 * time.Second, Live: 10_000, Settle: 30 * time.Second}
)

// Phases are the phases of a run, in the order they run; scaling runs
// only when asked for.
var Phases = []string{"raw", "create", "lifecycle", "metering", "memory", "scaling"}

// Result is every figure of a run; the JSON field names are the
// issue's.
type Result struct {
	RawLoopP50us       float64 `json:"raw_loop_p50_us"`
	RawLoopP99us       float64 `json:"raw_loop_p99_us"`
	RawLoopsPerS       float64 `json:"raw_loops_per_s"`
	CreateReadyP50us   float64 `json:"create_ready_p50_us"`
	CreateReadyP99us   float64 `json:"create_ready_p99_us"`
	LifecyclesPerS     float64 `json:"lifecycles_per_s"`
	MeteringEventsPerS float64 `json:"metering_events_per_s"`
	RSSMB10k           float64 `json:"rss_mb_10k"`
	RSSMBAfterCreate   float64 `json:"rss_mb_10k_after_create"`
	// Messages the server took from its clients (publishes, acks, API
	// requests) per loop, create and lifecycle: the work behind a figure.
	BusMsgsPerRawLoop   float64 `json:"bus_msgs_per_raw_loop,omitempty"`
	BusMsgsPerCreate    float64 `json:"bus_msgs_per_create,omitempty"`
	BusMsgsPerLifecycle float64 `json:"bus_msgs_per_lifecycle,omitempty"`
	// Per lifecycle event folded by metering, the benchmark's own publish
	// of the event included.
	BusMsgsPerMeteringEvent float64 `json:"bus_msgs_per_metering_event,omitempty"`
	// CPU time of the whole benchmark process (server, services and
	// clients) per operation in the throughput windows and the metering
	// fold, in microseconds.
	CPUusPerRawLoop       float64 `json:"cpu_us_per_raw_loop,omitempty"`
	CPUusPerLifecycle     float64 `json:"cpu_us_per_lifecycle,omitempty"`
	CPUusPerMeteringEvent float64 `json:"cpu_us_per_metering_event,omitempty"`
	// The scaling run (--scaling): creates-to-ready per second of one
	// burst on a pool of 1, 2 and 4 worker processes, and the ratios to
	// one worker.
	Scaling1WorkerPerS   float64 `json:"scaling_1_worker_per_s,omitempty"`
	Scaling2WorkersPerS  float64 `json:"scaling_2_workers_per_s,omitempty"`
	Scaling4WorkersPerS  float64 `json:"scaling_4_workers_per_s,omitempty"`
	Scaling2x            float64 `json:"scaling_2x,omitempty"`
	Scaling4x            float64 `json:"scaling_4x,omitempty"`
	ScalingBurst         int     `json:"scaling_burst,omitempty"`
	ScalingDelayMs       int     `json:"scaling_delay_ms,omitempty"`
	ScalingMaxInFlight   int     `json:"scaling_max_in_flight,omitempty"`
	ScalingConcurrency   int     `json:"scaling_worker_concurrency,omitempty"`
	Mode                 string  `json:"mode"`
	GoVersion            string  `json:"go_version"`
	CPUs                 int     `json:"cpus"`
	SequentialSamples    int     `json:"sequential_samples"`
	InFlight             int     `json:"in_flight"`
	ThroughputWindowSecs float64 `json:"throughput_window_s"`
	Priced               bool    `json:"priced"`
	// Targets are the performance targets checked on these figures
	// ([Targets]).
	Targets []Target `json:"targets,omitempty"`
}

// Print writes r as a table of figures.
func Print(w io.Writer, r *Result) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "FIGURE\tVALUE\tTARGET")
	target := map[string]string{}
	for _, t := range r.Targets {
		target[t.figure] = t.String()
	}
	// A figure of a phase that did not run (--only) is 0: left out.
	row := func(name string, v float64, unit, target string) {
		if v == 0 {
			return
		}
		fmt.Fprintf(tw, "%s\t%.1f %s\t%s\n", name, v, unit, target)
	}
	row("raw_loop_p50_us", r.RawLoopP50us, "us", "")
	row("raw_loop_p99_us", r.RawLoopP99us, "us", "")
	row("raw_loops_per_s", r.RawLoopsPerS, "/s", "")
	row("create_ready_p50_us", r.CreateReadyP50us, "us", target["create_ready_p50_us"])
	row("create_ready_p99_us", r.CreateReadyP99us, "us", target["create_ready_p99_us"])
	row("lifecycles_per_s", r.LifecyclesPerS, "/s", target["lifecycles_per_s"])
	row("metering_events_per_s", r.MeteringEventsPerS, "/s", target["metering_events_per_s"])
	row("rss_mb_10k", r.RSSMB10k, "MB", target["rss_mb_10k"])
	row("rss_mb_10k_after_create", r.RSSMBAfterCreate, "MB", "(right after the creation burst)")
	row("bus_msgs_per_raw_loop", r.BusMsgsPerRawLoop, "msgs", "(work behind each figure)")
	row("bus_msgs_per_create", r.BusMsgsPerCreate, "msgs", "")
	row("bus_msgs_per_lifecycle", r.BusMsgsPerLifecycle, "msgs", target["bus_msgs_per_lifecycle"])
	row("bus_msgs_per_metering_event", r.BusMsgsPerMeteringEvent, "msgs", "")
	row("cpu_us_per_raw_loop", r.CPUusPerRawLoop, "us", "(process CPU, 64 in flight)")
	row("cpu_us_per_lifecycle", r.CPUusPerLifecycle, "us", "")
	row("cpu_us_per_metering_event", r.CPUusPerMeteringEvent, "us", "")
	if r.Scaling2x > 0 {
		cond := fmt.Sprintf("(%d creates, %d ms each, capacity %d, %d per worker)", r.ScalingBurst, r.ScalingDelayMs, r.ScalingMaxInFlight, r.ScalingConcurrency)
		row("scaling_1_worker_per_s", r.Scaling1WorkerPerS, "/s", cond)
		row("scaling_2_workers_per_s", r.Scaling2WorkersPerS, "/s", "")
		row("scaling_4_workers_per_s", r.Scaling4WorkersPerS, "/s", "")
		fmt.Fprintf(tw, "%s\t%.2f x\t%s\n", "scaling_2x", r.Scaling2x, ">= 1.8")
		fmt.Fprintf(tw, "%s\t%.2f x\t%s\n", "scaling_4x", r.Scaling4x, ">= 3.4")
	}
	_ = tw.Flush()
	if len(r.Targets) > 0 {
		fmt.Fprintf(w, "targets: %d of %d met\n", len(r.Targets)-len(r.Missed()), len(r.Targets))
	}
}

// Run runs the phases only names (every phase but scaling when empty)
// against a control plane Env.Start starts on a file store in a temporary
// directory, and returns their figures; a figure of a phase that did not
// run is 0. Progress goes to logw. A failed exactly-once check of the
// metering phase is an error, never a figure.
func Run(ctx context.Context, env Env, cfg Config, only []string, logw io.Writer) (*Result, error) {
	if err := env.check(); err != nil {
		return nil, err
	}
	// Scaling runs only when asked for: it needs a NATS listener and
	// worker processes.
	want := func(phase string) bool { return (len(only) == 0 && phase != "scaling") || slices.Contains(only, phase) }
	dir, err := os.MkdirTemp("", "sandboxer-bench-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	logf := func(format string, args ...any) { fmt.Fprintf(logw, "bench: "+format+"\n", args...) }
	res := &Result{
		Mode: cfg.Mode, GoVersion: runtime.Version(), CPUs: runtime.NumCPU(),
		SequentialSamples: cfg.Sequential, InFlight: cfg.InFlight, ThroughputWindowSecs: cfg.Duration.Seconds(),
		Priced: cfg.Priced,
	}

	sys, err := StartSystem(ctx, env, dir, cfg.Priced, want("scaling"))
	if err != nil {
		return nil, err
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		sys.Shutdown(sctx)
	}()

	if want("raw") {
		logf("raw JetStream two-hop loop")
		if err := benchRaw(ctx, sys, cfg, res); err != nil {
			return nil, fmt.Errorf("raw loop: %w", err)
		}
	}
	if want("create") || want("lifecycle") {
		tok, err := env.DevToken(filepath.Join(dir, "system"))
		if err != nil {
			return nil, err
		}
		w, err := newWatcher(sys.NC)
		if err != nil {
			return nil, err
		}
		defer w.close()
		c := api.NewClient(sys.URL, tok, &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256}})
		if want("create") {
			logf("create to ready, sequential")
			before := sys.inMsgs()
			n, err := benchCreateReady(ctx, c, w, cfg, res)
			if err != nil {
				return nil, fmt.Errorf("create to ready: %w", err)
			}
			res.BusMsgsPerCreate = float64(sys.inMsgs()-before) / float64(n)
		}
		if want("lifecycle") {
			logf("full lifecycles, %d in flight", cfg.InFlight)
			before := sys.inMsgs()
			n, err := benchLifecycles(ctx, c, w, cfg, res)
			if err != nil {
				return nil, fmt.Errorf("lifecycles: %w", err)
			}
			// Settled lifecycles still being acked when the window
			// closed make this a little high, never low.
			res.BusMsgsPerLifecycle = float64(sys.inMsgs()-before) / float64(n)
		}
	}
	if want("metering") {
		logf("metering: lifecycle events folded into balances")
		if err := benchMetering(ctx, sys, cfg, res); err != nil {
			return nil, fmt.Errorf("metering: %w", err)
		}
	}
	if want("memory") {
		logf("resident set of a separate process holding %d live sandboxes", cfg.Live)
		if err := benchMemory(ctx, env, cfg, filepath.Join(dir, "memory"), res); err != nil {
			return nil, fmt.Errorf("memory: %w", err)
		}
	}
	if want("scaling") {
		logf("scaling: %d creates on a pool of %v worker processes", scalingBurst, scalingWorkers)
		if err := benchScaling(ctx, env, sys, cfg, filepath.Join(dir, "system"), res, logf); err != nil {
			return nil, fmt.Errorf("scaling: %w", err)
		}
	}
	res.Targets = Targets(res)
	return res, nil
}

// benchMetering admits cfg.Sequential sandboxes through metering, then
// publishes a ready and a destroyed event for each into the lifecycle
// stream as fast as the stream takes them, and times how long metering's
// durable consumer takes to fold them all: settle, release, usage record,
// every entry exactly once. The registry consumes the same events at the
// same time, as it does in service.
func benchMetering(ctx context.Context, sys *System, cfg Config, res *Result) error {
	n := cfg.Sequential * 2
	mc := credits.NewClient(sys.NC)
	ids := make([]string, n)
	for i := range ids {
		ids[i] = sandbox.NewID()
	}
	if err := forEach(n, cfg.InFlight, func(i int) error {
		_, err := mc.Hold(ctx, credits.HoldRequest{SandboxID: ids[i], Consumer: "bench", Profile: "echo", Extension: "echo", TTLSeconds: 3600})
		return err
	}); err != nil {
		return err
	}
	cons, err := sys.JS.Consumer(ctx, event.StreamLifecycle, metering.ConsumerLifecycle)
	if err != nil {
		return err
	}
	caughtUp := func(ci *jetstream.ConsumerInfo) bool { return ci.NumPending == 0 && ci.NumAckPending == 0 }
	// Start from a quiet consumer.
	if err := awaitConsumer(ctx, cons, time.Minute, caughtUp); err != nil {
		return fmt.Errorf("metering consumer never caught up before the run: %w", err)
	}
	start, before, cpu0 := time.Now(), sys.inMsgs(), cpuTime()
	readyAt := start.UTC()
	var futures []jetstream.PubAckFuture
	for _, id := range ids {
		ref := event.Ref{SandboxID: id, Consumer: "bench", Profile: "echo", Extension: "echo", Host: "localhost"}
		for _, e := range []struct {
			s    event.State
			data any
		}{
			{event.StateReady, event.Ready{Ref: ref, Handle: event.Handle{SandboxID: id, Host: "localhost"}, Reachability: event.Reachability{Host: "localhost"}, ReadyAt: readyAt, Hold: id}},
			{event.StateDestroyed, event.Destroyed{Ref: ref, Reason: event.ReasonRequested, ReadyAt: readyAt}},
		} {
			ev, err := event.New(event.LifecycleType(e.s), "/sandboxer/bench", id, id+"."+string(e.s), e.data)
			if err != nil {
				return err
			}
			msg, err := event.Encode(ctx, ref.LifecycleSubject(e.s), ev)
			if err != nil {
				return err
			}
			f, err := sys.JS.PublishMsgAsync(msg)
			if err != nil {
				return err
			}
			futures = append(futures, f)
		}
	}
	for _, f := range futures {
		select {
		case <-f.Ok():
		case err := <-f.Err():
			return err
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if err := awaitConsumer(ctx, cons, 5*time.Minute, caughtUp); err != nil {
		return fmt.Errorf("metering did not fold the events: %w", err)
	}
	res.MeteringEventsPerS = float64(2*n) / time.Since(start).Seconds()
	res.BusMsgsPerMeteringEvent = float64(sys.inMsgs()-before) / float64(2*n)
	res.CPUusPerMeteringEvent = cpuPer(cpuTime()-cpu0, int64(2*n))
	// Exactly once, checked: every sandbox settled to one usage record,
	// and the account's holds all released.
	bal, err := mc.Balance(ctx, "bench")
	if err != nil {
		return err
	}
	if bal.Held != 0 {
		return fmt.Errorf("after settlement %d credits are still held", bal.Held)
	}
	return nil
}

// benchMemory starts the system in a child process, creates cfg.Live
// sandboxes through its gateway, waits until every one is ready, and reads
// the child's resident set from /proc.
func benchMemory(ctx context.Context, env Env, cfg Config, dir string, res *Result) error {
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	args := append(slices.Clone(env.Self[1:]), "serve", "--dir", dir)
	if cfg.Priced {
		args = append(args, "--priced")
	}
	if p := os.Getenv("SANDBOXER_BENCH_HEAPPROFILE"); p != "" {
		args = append(args, "--heapprofile", p)
	}
	child := exec.CommandContext(cctx, env.Self[0], args...)
	child.Cancel = func() error { return child.Process.Signal(os.Interrupt) }
	child.WaitDelay = 30 * time.Second
	child.Stderr = os.Stderr
	out, err := child.StdoutPipe()
	if err != nil {
		return err
	}
	if err := child.Start(); err != nil {
		return err
	}
	defer func() { cancel(); _ = child.Wait() }()
	var url string
	if _, err := fmt.Fscanf(out, "url %s\n", &url); err != nil {
		return fmt.Errorf("reading the child's address: %w", err)
	}
	tok, err := env.DevToken(filepath.Join(dir, "system"))
	if err != nil {
		return err
	}
	c := api.NewClient(url, tok, &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256}})
	if err := forEach(cfg.Live, cfg.InFlight, func(int) error {
		_, err := c.Create(ctx, api.CreateRequest{Profile: "echo"}, "")
		return err
	}); err != nil {
		return err
	}
	// Every sandbox ready: the inventory, as the gateway sees it.
	deadline := time.Now().Add(2 * time.Minute)
	for {
		list, err := c.List(ctx, api.ListFilter{State: string(event.StateReady)})
		if err != nil {
			return err
		}
		if len(list) >= cfg.Live {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d of %d sandboxes ready after 2 minutes", len(list), cfg.Live)
		}
		time.Sleep(500 * time.Millisecond)
	}
	rss, err := residentMB(child.Process.Pid)
	if err != nil {
		return err
	}
	res.RSSMBAfterCreate = rss
	// Holding, not creating: the figure is the resident set once the
	// creation burst has passed (JetStream's block caches expire after
	// 10s idle, the Go runtime returns freed memory over a few seconds).
	// Accrual ticks keep firing meanwhile, as they do in service.
	select {
	case <-time.After(cfg.Settle):
	case <-ctx.Done():
		return ctx.Err()
	}
	if rss, err = residentMB(child.Process.Pid); err != nil {
		return err
	}
	res.RSSMB10k = rss
	return nil
}

// residentMB reads VmRSS of pid from /proc, in MB.
func residentMB(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			var kb float64
			if _, err := fmt.Sscan(f[1], &kb); err != nil {
				return 0, err
			}
			return kb / 1024, nil
		}
	}
	return 0, errors.New("no VmRSS in /proc status")
}

const benchManifest = `name: echo
handler: echo
description: No-op backend for benchmarks.
capabilities:
  isolation_levels: [process]
  pricing_model: self-hosted
capacity:
  max_in_flight: 128
workers:
  concurrency: 128
inputs: {}
`

const benchProfile = `slug: echo
extension: echo
ttl:
  default: 1h
  max: 24h
`

// benchPrice is the price of the profile in a priced run.
const benchPrice = `price:
  start: 1
  per_second: 1
`

// benchConsumers are the consumers a priced run grants credit to, enough
// for any run: the API's dev key, and the metering phase's consumer.
var benchConsumers = []string{"dev", "bench"}

// StartSystem runs the control plane with the echo backend (Env.Start) on
// a file store under dir; priced gives the profile a price and the
// consumers credit. scaling adds the scaling run's pool, which no worker
// of this process serves, and a NATS listener on a random loopback port
// for its worker processes. The caller shuts the system down.
func StartSystem(ctx context.Context, env Env, dir string, priced, scaling bool) (*System, error) {
	if err := env.check(); err != nil {
		return nil, err
	}
	ext, prof := filepath.Join(dir, "extensions"), filepath.Join(dir, "profiles")
	profile := benchProfile
	if priced {
		profile += benchPrice
	}
	files := []struct{ dir, name, body string }{
		{ext, "ext.echo.yaml", benchManifest},
		{prof, "profile.echo.yaml", profile},
	}
	listen := ""
	if scaling {
		files = append(files, struct{ dir, name, body string }{ext, "ext." + ScalingPool + ".yaml", scalingManifest},
			struct{ dir, name, body string }{prof, "profile." + ScalingPool + ".yaml", scalingProfile})
		listen = "127.0.0.1:-1"
	}
	for _, f := range files {
		if err := os.MkdirAll(f.dir, 0o755); err != nil {
			return nil, err
		}
		if err := os.WriteFile(filepath.Join(f.dir, f.name), []byte(f.body), 0o644); err != nil {
			return nil, err
		}
	}
	sys, err := env.Start(ctx, SystemConfig{
		DataDir: filepath.Join(dir, "system"), NATSListen: listen,
		ExtensionsDir: ext, ProfilesDir: prof, Pools: []string{"echo"},
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil || !priced {
		return sys, err
	}
	mc := credits.NewClient(sys.NC)
	for _, c := range benchConsumers {
		if _, err := mc.Grant(ctx, credits.GrantRequest{Consumer: c, Amount: 1 << 50, ID: "bench"}); err != nil {
			sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			sys.Shutdown(sctx)
			return nil, err
		}
	}
	return sys, nil
}

// percentiles returns p50 and p99 of ds in microseconds.
func percentiles(ds []time.Duration) (float64, float64) {
	slices.Sort(ds)
	at := func(q float64) float64 {
		i := int(q * float64(len(ds)-1))
		return float64(ds[i].Nanoseconds()) / 1e3
	}
	return at(0.50), at(0.99)
}

// benchRaw measures the floor: publish with ack to one stream, a durable
// pull consumer receives and double-acks it and publishes a reply with ack
// to a second stream, a second consumer receives it.
func benchRaw(ctx context.Context, sys *System, cfg Config, res *Result) error {
	js := sys.JS
	for _, s := range []string{"BENCH_IN", "BENCH_OUT"} {
		subj := "bench." + strings.ToLower(strings.TrimPrefix(s, "BENCH_"))
		if _, err := js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{Name: s, Subjects: []string{subj}, Storage: jetstream.FileStorage}); err != nil {
			return err
		}
		defer func() { _ = js.DeleteStream(context.Background(), s) }()
	}
	in, err := js.CreateOrUpdateConsumer(ctx, "BENCH_IN", jetstream.ConsumerConfig{Durable: "worker", AckPolicy: jetstream.AckExplicitPolicy, MaxAckPending: 1024})
	if err != nil {
		return err
	}
	out, err := js.CreateOrUpdateConsumer(ctx, "BENCH_OUT", jetstream.ConsumerConfig{Durable: "client", AckPolicy: jetstream.AckExplicitPolicy, MaxAckPending: 1024})
	if err != nil {
		return err
	}
	wcc, err := in.Consume(func(m jetstream.Msg) {
		_ = m.DoubleAck(ctx)
		_, _ = js.Publish(ctx, "bench.out", m.Data())
	}, jetstream.PullMaxMessages(256))
	if err != nil {
		return err
	}
	defer wcc.Stop()
	var waiters sync.Map // id -> chan struct{}
	ccc, err := out.Consume(func(m jetstream.Msg) {
		_ = m.Ack()
		if ch, ok := waiters.LoadAndDelete(string(m.Data())); ok {
			close(ch.(chan struct{}))
		}
	}, jetstream.PullMaxMessages(256))
	if err != nil {
		return err
	}
	defer ccc.Stop()
	var seq atomic.Int64
	loop := func() (time.Duration, error) {
		id := fmt.Sprint(seq.Add(1))
		ch := make(chan struct{})
		waiters.Store(id, ch)
		t0 := time.Now()
		if _, err := js.Publish(ctx, "bench.in", []byte(id)); err != nil {
			return 0, err
		}
		select {
		case <-ch:
			return time.Since(t0), nil
		case <-time.After(10 * time.Second):
			return 0, errors.New("loop reply lost")
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	for range 100 { // warm up
		if _, err := loop(); err != nil {
			return err
		}
	}
	ds := make([]time.Duration, 0, cfg.Sequential)
	before := sys.inMsgs()
	for range cfg.Sequential {
		d, err := loop()
		if err != nil {
			return err
		}
		ds = append(ds, d)
	}
	res.BusMsgsPerRawLoop = float64(sys.inMsgs()-before) / float64(cfg.Sequential)
	res.RawLoopP50us, res.RawLoopP99us = percentiles(ds)
	n, count, cpu, err := throughput(ctx, cfg, func() error { _, err := loop(); return err })
	if err != nil {
		return err
	}
	res.RawLoopsPerS = n
	res.CPUusPerRawLoop = cpuPer(cpu, count)
	return nil
}

// throughput runs op from cfg.InFlight goroutines for cfg.Duration and
// returns completed operations per second.
func throughput(ctx context.Context, cfg Config, op func() error) (rate float64, count int64, cpu time.Duration, err error) {
	var (
		done   atomic.Int64
		wg     sync.WaitGroup
		errMu  sync.Mutex
		first  error
		stopAt = time.Now().Add(cfg.Duration)
	)
	start, cpu0 := time.Now(), cpuTime()
	for range cfg.InFlight {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(stopAt) && ctx.Err() == nil {
				if err := op(); err != nil {
					errMu.Lock()
					if first == nil {
						first = err
					}
					errMu.Unlock()
					return
				}
				done.Add(1)
			}
		}()
	}
	wg.Wait()
	if first != nil {
		return 0, 0, 0, first
	}
	return float64(done.Load()) / time.Since(start).Seconds(), done.Load(), cpuTime() - cpu0, nil
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

// forEach runs op(i) for every i in [0, n), inFlight at a time, and
// returns the first error; a worker that meets one stops, the others go
// on.
func forEach(n, inFlight int, op func(i int) error) error {
	var (
		next  atomic.Int64
		wg    sync.WaitGroup
		errMu sync.Mutex
		first error
	)
	for range min(inFlight, n) {
		wg.Go(func() {
			for i := next.Add(1) - 1; i < int64(n); i = next.Add(1) - 1 {
				if err := op(int(i)); err != nil {
					errMu.Lock()
					first = cmp.Or(first, err)
					errMu.Unlock()
					return
				}
			}
		})
	}
	wg.Wait()
	return first
}

// watcher sees lifecycle events as any client of the bus does: a core NATS
// subscription on the lifecycle subjects, which JetStream delivers to as it
// stores.
type watcher struct {
	subs    []*nats.Subscription
	mu      sync.Mutex
	waiting map[string]chan struct{} // "<sandbox>.<state>"
	seen    map[string]bool          // arrived before anyone waited
}

func newWatcher(nc *nats.Conn) (*watcher, error) {
	w := &watcher{waiting: map[string]chan struct{}{}, seen: map[string]bool{}}
	onLifecycle := func(m *nats.Msg) {
		if ref, err := event.ParseLifecycleSubject(m.Subject); err == nil {
			w.arrived(ref.Sandbox + "." + string(ref.State))
		}
	}
	onUsage := func(m *nats.Msg) {
		if id := m.Header.Get("ce-subject"); id != "" {
			w.arrived(id + ".settled")
		}
	}
	for _, s := range []struct {
		subject string
		cb      nats.MsgHandler
	}{
		{event.StateFilter(event.StateReady), onLifecycle},
		{event.StateFilter(event.StateDestroyed), onLifecycle},
		{event.MeteringSubject("*", "usage"), onUsage},
	} {
		sub, err := nc.Subscribe(s.subject, s.cb)
		if err != nil {
			w.close()
			return nil, err
		}
		_ = sub.SetPendingLimits(-1, -1)
		w.subs = append(w.subs, sub)
	}
	return w, nil
}

// arrived wakes whoever waits for key, or remembers it for them.
func (w *watcher) arrived(key string) {
	w.mu.Lock()
	ch, ok := w.waiting[key]
	if ok {
		delete(w.waiting, key)
	} else {
		w.seen[key] = true
	}
	w.mu.Unlock()
	if ok {
		close(ch)
	}
}

func (w *watcher) close() {
	for _, s := range w.subs {
		_ = s.Unsubscribe()
	}
}

// expect registers interest in a sandbox's state before the event can
// arrive.
func (w *watcher) expect(id string, s event.State) chan struct{} {
	return w.expectKey(id + "." + string(s))
}

// expectSettled registers interest in a sandbox's usage record: metering
// has settled it.
func (w *watcher) expectSettled(id string) chan struct{} { return w.expectKey(id + ".settled") }

func (w *watcher) expectKey(key string) chan struct{} {
	ch := make(chan struct{})
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.seen[key] {
		delete(w.seen, key)
		close(ch)
		return ch
	}
	w.waiting[key] = ch
	return ch
}

func await(ctx context.Context, ch chan struct{}, what string) error {
	select {
	case <-ch:
		return nil
	case <-time.After(30 * time.Second):
		return fmt.Errorf("%s not seen within 30s", what)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// createAndReady creates a sandbox over HTTP and waits for its ready event.
// The id is only known from the answer, and the event may beat it: the
// watcher keeps ready and destroyed events nobody waited for yet.
func createAndReady(ctx context.Context, c *api.Client, w *watcher) (string, time.Duration, error) {
	t0 := time.Now()
	s, err := c.Create(ctx, api.CreateRequest{Profile: "echo"}, "")
	if err != nil {
		return "", 0, err
	}
	if err := await(ctx, w.expect(s.ID, event.StateReady), s.ID+" ready"); err != nil {
		return "", 0, err
	}
	return s.ID, time.Since(t0), nil
}

// benchCreateReady returns how many sandboxes it created.
func benchCreateReady(ctx context.Context, c *api.Client, w *watcher, cfg Config, res *Result) (int, error) {
	n := cfg.Sequential / 2
	const warm = 50
	for range warm {
		if _, _, err := createAndReady(ctx, c, w); err != nil {
			return 0, err
		}
	}
	ds := make([]time.Duration, 0, n)
	for range n {
		_, d, err := createAndReady(ctx, c, w)
		if err != nil {
			return 0, err
		}
		ds = append(ds, d)
	}
	res.CreateReadyP50us, res.CreateReadyP99us = percentiles(ds)
	return warm + n, nil
}

// cpuTime is the CPU time (user and system) this process has used.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// cpuPer is cpu per operation in microseconds.
func cpuPer(cpu time.Duration, ops int64) float64 {
	if ops == 0 {
		return 0
	}
	return float64(cpu.Microseconds()) / float64(ops)
}

// inMsgs is how many messages the embedded server has taken from its
// clients so far.
func (s *System) inMsgs() int64 {
	v, err := s.NATS.NATS().Varz(nil)
	if err != nil {
		return 0
	}
	return v.InMsgs
}

// benchLifecycles returns how many lifecycles it completed.
func benchLifecycles(ctx context.Context, c *api.Client, w *watcher, cfg Config, res *Result) (int64, error) {
	n, count, cpu, err := throughput(ctx, cfg, func() error {
		id, _, err := createAndReady(ctx, c, w)
		if err != nil {
			return err
		}
		destroyed, settled := w.expect(id, event.StateDestroyed), w.expectSettled(id)
		if _, err := c.Destroy(ctx, id); err != nil {
			return err
		}
		if err := await(ctx, destroyed, id+" destroyed"); err != nil {
			return err
		}
		return await(ctx, settled, id+" settled by metering")
	})
	if err != nil {
		return 0, err
	}
	res.LifecyclesPerS = n
	res.CPUusPerLifecycle = cpuPer(cpu, count)
	return count, nil
}
