// Command chaos is the chaos suite of the compose cluster (make chaos):
// it runs sandbox lifecycles of a local and a metered profile through both
// gateways at a steady rate while it injects faults one at a time (kill -9
// of every service kind, of the NATS meta leader and of a stream leader, a
// network partition of a node, a provisioner paused beyond its ack wait,
// a rolling restart), then checks that nothing was lost, stuck or leaked,
// that nothing was debited twice, and that every account agrees with its
// ledger and with the metering stream as examples/billing-consumer folds
// it. It prints a table of the faults and the checks (and writes it to a
// file), exits 1 if any failed, and stops by itself within its time bound.
//
// It drives the cluster from the host only: the Docker CLI, the gateways'
// HTTP API, the nodes' monitoring ports and the bus as the admin. It must
// never import a service package.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// maxBound is the hard bound of a run: whatever the flags, the program
// exits within it.
const maxBound = 15 * time.Minute

// config is the command line.
type config struct {
	state, extensions, report, billing string
	gateways, natsURLs, monitors       string
	project, network, busybox          string
	min, max, concurrency              int
	interval, load, settle, bound      time.Duration
	down, recover, partition           time.Duration
	saasCredit                         int64
	only                               string
}

func parseFlags(args []string, stderr io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("chaos", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.state, "state", "deploy/compose/state", "the cluster's state directory (keys/admin.token, creds/admin.creds, creds/billing.creds)")
	fs.StringVar(&c.extensions, "extensions", "extensions", "the catalog's extension manifests (for the local pool's ack wait)")
	fs.StringVar(&c.report, "report", "deploy/compose/build/chaos-report.txt", "where the report is written besides stdout")
	fs.StringVar(&c.billing, "billing-consumer", "deploy/compose/build/billing-consumer", "the examples/billing-consumer binary")
	fs.StringVar(&c.gateways, "gateways", "http://127.0.0.1:8080,http://127.0.0.1:8081", "the gateways, comma-separated")
	fs.StringVar(&c.natsURLs, "nats", "nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224", "the nodes' client URLs")
	fs.StringVar(&c.monitors, "monitors", "n1=http://127.0.0.1:8222,n2=http://127.0.0.1:8223,n3=http://127.0.0.1:8224", "the nodes' monitoring URLs, name=url, comma-separated")
	fs.StringVar(&c.project, "project", "sandboxer", "the compose project")
	fs.StringVar(&c.network, "network", "sandboxer_bus", "the compose network of the nodes")
	fs.StringVar(&c.busybox, "busybox-image", "sandboxer-nats:dev", "an image with /bin/busybox, to list the pools' volumes")
	fs.IntVar(&c.min, "lifecycles", 1000, "lifecycles to run at least (half local, half metered)")
	fs.IntVar(&c.max, "max-lifecycles", 2000, "lifecycles to run at most, while faults are still being injected")
	fs.IntVar(&c.concurrency, "concurrency", 16, "lifecycles at once at most")
	fs.DurationVar(&c.interval, "interval", 250*time.Millisecond, "time between lifecycle starts")
	fs.DurationVar(&c.load, "load", 7*time.Minute, "no lifecycle starts after this")
	fs.DurationVar(&c.settle, "settle", 2*time.Minute, "bound of the wait for every sandbox to end after the load")
	fs.DurationVar(&c.bound, "bound", maxBound, "hard bound of the whole run (at most 15m)")
	fs.DurationVar(&c.down, "down", 5*time.Second, "how long a killed container stays down")
	fs.DurationVar(&c.recover, "recover", 2*time.Minute, "bound of the wait for the cluster to be healthy after a fault")
	fs.DurationVar(&c.partition, "partition", 30*time.Second, "how long a node is cut off")
	fs.Int64Var(&c.saasCredit, "credit", 1_000_000, "credit granted to each consumer before the load")
	fs.StringVar(&c.only, "faults", "", "run only the faults whose name contains one of these comma-separated words (\"none\": none); default every fault")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	switch {
	case c.min < 2 || c.max < c.min:
		return c, errors.New("need 2 <= --lifecycles <= --max-lifecycles")
	case c.concurrency < 1 || c.interval <= 0:
		return c, errors.New("need --concurrency >= 1 and --interval > 0")
	case c.bound <= 0 || c.bound > maxBound:
		return c, fmt.Errorf("--bound must be in (0, %s]", maxBound)
	}
	return c, nil
}

func main() {
	c, err := parseFlags(os.Args[1:], os.Stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "chaos:", err)
		os.Exit(2)
	}
	// The backstop of the bound: a step stuck past every context still ends.
	time.AfterFunc(c.bound, func() {
		fmt.Fprintf(os.Stderr, "chaos: not done within %s: giving up\n", c.bound)
		os.Exit(3)
	})
	ctx, cancel := context.WithTimeout(context.Background(), c.bound-30*time.Second)
	defer cancel()
	failed, err := run(ctx, c, os.Stdout)
	if err != nil {
		fmt.Fprintln(os.Stderr, "chaos:", err)
		os.Exit(1)
	}
	if failed {
		os.Exit(1)
	}
}

// run is the whole suite; it reports whether a check failed.
func run(ctx context.Context, c config, stdout io.Writer) (bool, error) {
	start := time.Now()
	logf := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "chaos %s %s\n", formatWhen(time.Since(start)), fmt.Sprintf(format, args...))
	}
	ackWait, err := ackWaitOf(filepath.Join(c.extensions, "ext.local.yaml"))
	if err != nil {
		return false, err
	}
	cl, closeBus, err := connect(ctx, c)
	if err != nil {
		return false, err
	}
	defer closeBus()
	const workers = 2
	logf("waiting for a healthy cluster")
	if _, err := cl.AwaitHealthy(ctx, c.recover, workers); err != nil {
		return false, fmt.Errorf("the cluster is not healthy before the run: %w", err)
	}

	// Two consumers of this run, credit granted first.
	runID := strconv.FormatInt(time.Now().Unix(), 36)
	hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	urls := strings.Split(c.gateways, ",")
	profiles := []ProfileLoad{{Profile: "local", TTL: "30m"}, {Profile: "saas", TTL: "5m"}}
	var consumers []string
	for i := range profiles {
		p := &profiles[i]
		p.Consumer = fmt.Sprintf("chaos-%s-%s", runID, p.Profile)
		consumers = append(consumers, p.Consumer)
		key, err := cl.Admin.IssueKey(ctx, api.KeyRequest{Consumer: p.Consumer, Name: "make chaos"})
		if err != nil {
			return false, fmt.Errorf("issuing a key for %s: %w", p.Consumer, err)
		}
		if _, err := cl.Admin.Grant(ctx, api.GrantRequest{Consumer: p.Consumer, Amount: c.saasCredit, ID: "chaos-" + runID}); err != nil {
			return false, fmt.Errorf("granting credit to %s: %w", p.Consumer, err)
		}
		p.GW = NewGateways(urls, key.Token, hc)
	}
	label := "chaos-run=" + runID
	logf("run %s: consumers %s; local ack wait %s", runID, strings.Join(consumers, ", "), ackWait)

	done := make(chan struct{})
	load := &Load{
		Profiles: profiles, Interval: c.interval, Concurrency: c.concurrency, Min: c.min, Max: c.max, Done: done,
		Until: time.Now().Add(c.load), WaitReady: 2 * time.Minute, WaitGone: 2 * time.Minute,
		Labels: map[string]string{"chaos-run": runID},
	}
	sched := &Schedule{Cluster: cl, Load: load, Start: start, Recover: c.recover, Workers: workers, Quiet: 10 * time.Second, Log: logf}
	services := []string{"gateway-1", "gateway-2", "registry", "metering", "provisioner-local", "provisioner-saas-stub"}
	faults := []Fault{
		KillService(cl, "gateway-1", c.down),
		KillService(cl, "registry", c.down),
		KillService(cl, "metering", c.down),
		KillService(cl, "provisioner-local", c.down),
		KillService(cl, "provisioner-saas-stub", c.down),
		KillNode(cl, "kill -9 NATS meta leader", cl.AnyMetaLeader, c.recover),
		KillNode(cl, "kill -9 leader of "+event.StreamCommands, func(ctx context.Context) (string, error) {
			return cl.StreamLeader(ctx, event.StreamCommands)
		}, c.recover),
		Partition(cl, func(ctx context.Context) (string, error) { return cl.StreamLeader(ctx, event.StreamLifecycle) }, c.partition),
		Pause(cl, "provisioner-local", ackWait+10*time.Second),
		RollingRestart(cl, services, c.recover, workers),
	}
	faults = selectFaults(faults, c.only)
	var faultRows []Row
	go func() {
		defer close(done)
		faultRows = sched.Run(ctx, faults)
	}()
	// A lifecycle still waiting this long after the last start is left to
	// the settle.
	lctx, lcancel := context.WithDeadline(ctx, load.Until.Add(3*time.Minute))
	runs := load.Run(lctx)
	lcancel()
	<-done
	logf("load done: %d lifecycles", len(runs))
	for _, l := range runs {
		if l.Err != "" {
			logf("lifecycle %d (%s, %s) gave up at %s: %s", l.N, l.Profile, l.ID, formatWhen(l.End.Sub(start)), l.Err)
		}
	}

	checker := &Checker{
		Cluster: cl, Start: start, Consumers: consumers, Label: label, Settle: c.settle, Busybox: c.busybox,
		LocalDir:        "/var/lib/sandboxer/extensions/local/workspaces",
		SessionDir:      "/var/lib/sandboxer/extensions/saas-stub/saas-stub/live",
		BillingConsumer: []string{c.billing, "--nats", c.natsURLs, "--creds", filepath.Join(c.state, "creds", "billing.creds")},
		Log:             logf,
	}
	rep := &Report{Faults: faultRows, Checks: checker.Run(ctx, runs)}
	rep.Summary = summarize(runs, time.Since(start))
	if err := rep.Write(stdout); err != nil {
		return true, err
	}
	if c.report != "" {
		if err := os.MkdirAll(filepath.Dir(c.report), 0o755); err != nil {
			return true, fmt.Errorf("writing the report: %w", err)
		}
		f, err := os.Create(c.report)
		if err != nil {
			return true, fmt.Errorf("writing the report: %w", err)
		}
		werr := rep.Write(f)
		if err := errors.Join(werr, f.Close()); err != nil {
			return true, fmt.Errorf("writing the report: %w", err)
		}
	}
	return rep.Failed(), nil
}

// selectFaults keeps the faults whose name contains one of the
// comma-separated words of only; an empty only keeps them all.
func selectFaults(faults []Fault, only string) []Fault {
	if only == "" {
		return faults
	}
	var out []Fault
	for _, f := range faults {
		for _, w := range strings.Split(only, ",") {
			if w != "" && strings.Contains(f.Name, w) {
				out = append(out, f)
				break
			}
		}
	}
	return out
}

// summarize counts the lifecycles per profile: started, accepted, ready,
// ended (ready and then destroyed with no client error), and the client
// errors by step.
func summarize(runs []*Lifecycle, wall time.Duration) []string {
	type counts struct{ started, accepted, ready, ended, failovers int }
	by := map[string]*counts{}
	errs := map[string]int{}
	var order []string
	for _, l := range runs {
		k := by[l.Profile]
		if k == nil {
			k = &counts{}
			by[l.Profile] = k
			order = append(order, l.Profile)
		}
		k.started++
		k.failovers += l.Failovers
		if l.Accepted() {
			k.accepted++
		}
		if l.Ready {
			k.ready++
		}
		if l.Ready && l.Last.Terminal() && l.Err == "" {
			k.ended++
		}
		if l.Err != "" {
			step, _, _ := strings.Cut(l.Err, ":")
			errs[l.Profile+" "+step]++
		}
	}
	var out []string
	for _, p := range order {
		k := by[p]
		out = append(out, fmt.Sprintf("profile %-6s %4d lifecycles: %d accepted, %d ready, %d ready then destroyed cleanly, %d failovers to the other gateway",
			p, k.started, k.accepted, k.ready, k.ended, k.failovers))
	}
	for _, k := range slices.Sorted(maps.Keys(errs)) {
		out = append(out, fmt.Sprintf("client gave up: %s: %d", k, errs[k]))
	}
	out = append(out, fmt.Sprintf("wall time %s", wall.Round(time.Second)))
	return out
}

// connect reads the admin's key and credentials and returns the cluster
// as the suite drives it, and what closes its bus connection.
func connect(ctx context.Context, c config) (*Cluster, func(), error) {
	token, err := os.ReadFile(filepath.Join(c.state, "keys", "admin.token"))
	if err != nil {
		return nil, nil, fmt.Errorf("reading the admin key: %w", err)
	}
	creds, err := os.ReadFile(filepath.Join(c.state, "creds", "admin.creds"))
	if err != nil {
		return nil, nil, fmt.Errorf("reading the admin credentials: %w", err)
	}
	opts, err := auth.ConnectOptions(creds)
	if err != nil {
		return nil, nil, err
	}
	nc, err := bus.Connect(ctx, bus.ConnConfig{URL: c.natsURLs, Name: "chaos", Options: opts})
	if err != nil {
		return nil, nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, fmt.Errorf("jetstream: %w", err)
	}
	monitors := map[string]string{}
	for _, kv := range strings.Split(c.monitors, ",") {
		name, url, ok := strings.Cut(kv, "=")
		if !ok {
			nc.Close()
			return nil, nil, fmt.Errorf("--monitors: %q is not name=url", kv)
		}
		monitors[name] = url
	}
	hc := &http.Client{Timeout: 10 * time.Second}
	urls := strings.Split(c.gateways, ",")
	cl := &Cluster{
		Project: c.project, Network: c.network, Monitors: monitors, Gateways: urls,
		Admin: api.NewClient(urls[0], strings.TrimSpace(string(token)), hc), JS: js, hc: hc, Busybox: c.busybox,
	}
	return cl, func() { drain(nc) }, nil
}

func drain(nc *nats.Conn) { _ = nc.Drain() }

// ackWaitOf is the ack wait of the manifest at path (its default if unset).
func ackWaitOf(path string) (time.Duration, error) {
	m, ps := extension.LoadManifestFile(path)
	if err := ps.Err(); err != nil {
		return 0, fmt.Errorf("reading %s: %w", path, err)
	}
	return m.Workers.WithDefaults().AckWait.D(), nil
}
