package provisioner_test

import (
	"context"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/catalog"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/echo"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
	"github.com/sand-boxer/sandboxer/pkg/workers"
	"github.com/sand-boxer/sandboxer/services/provisioner"
)

// held is ext.echo whose Provision counts itself in and waits until the
// test lets go.
type held struct {
	*echo.Echo
	in      atomic.Int64 // Provision calls running
	release chan struct{}
}

func (h *held) Provision(ctx context.Context, p extension.Profile, in extension.Inputs, host string) (extension.Handle, error) {
	h.in.Add(1)
	defer h.in.Add(-1)
	select {
	case <-h.release:
	case <-ctx.Done():
		return extension.Handle{}, ctx.Err()
	}
	return h.Echo.Provision(ctx, p, in, host)
}

// startWorker runs a provisioner of pool as worker with concurrency (0:
// the manifest's), on its own connection as its own process would, with
// backend b.
func (e *env) startWorker(t *testing.T, pool, worker string, concurrency int, b extension.Extension) {
	t.Helper()
	nc := e.srv.ConnAs(t, auth.Identity{Role: auth.RoleProvisioner, Extension: pool})
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	cctx, stopCat := context.WithCancel(context.Background())
	t.Cleanup(stopCat)
	cat, err := catalog.Follow(cctx, nc)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-cat.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("catalog not followed")
	}
	p, err := provisioner.New(provisioner.Options{
		JS: js, Catalog: cat, Extensions: extension.NewRegistry(extension.Info{Handler: echo.Handler, New: func() extension.Extension { return b }}),
		Pools: []string{pool}, Concurrency: concurrency, DataDir: e.dataDir, WorkerID: worker,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := p.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = p.Shutdown(ctx)
	})
}

// TestCapacityAndConcurrency: the pool's durable caps commands in flight
// at the manifest's capacity.max_in_flight, across every worker; each
// worker runs its own concurrency (Options.Concurrency, else the
// manifest's workers.concurrency). Two workers of one pool run more than
// one worker's concurrency at once: adding a worker adds throughput.
func TestCapacityAndConcurrency(t *testing.T) {
	t.Parallel()
	if got := provisioner.Consumer(echo.Manifest("any")).Policy.MaxAckPending; got != extension.DefaultMaxInFlight {
		t.Errorf("a manifest without capacity.max_in_flight: MaxAckPending %d, want %d", got, extension.DefaultMaxInFlight)
	}
	m := echo.Manifest("capped")
	m.Capacity.MaxInFlight = 6
	m.Workers = extension.WorkerPolicy{Concurrency: 2, AckWait: extension.Duration(30 * time.Second)}
	e := newEnv(t, m)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// The durable as the earlier version set it up (MaxAckPending =
	// workers.concurrency); setup brings it to the manifest's capacity.
	old := provisioner.Consumer(m)
	old.Policy.MaxAckPending = m.Workers.Concurrency
	for _, spec := range []bus.ConsumerSpec{old, provisioner.Consumer(m)} {
		rep, err := bus.Topology{}.Setup(ctx, e.js, bus.SetupOptions{Consumers: []bus.ConsumerSpec{spec}})
		if err != nil {
			t.Fatal(err)
		}
		if spec.Policy.MaxAckPending == 6 && !slices.ContainsFunc(rep, func(c bus.Change) bool {
			return c.Action == bus.ActionUpdated && strings.Contains(c.Detail, "max_ack_pending 2 -> 6")
		}) {
			t.Errorf("setup over the earlier durable reported %+v, want max_ack_pending 2 -> 6", rep)
		}
	}
	cons, err := e.js.Consumer(ctx, event.StreamCommands, bus.DurableProvisioner("capped"))
	if err != nil {
		t.Fatal(err)
	}
	if got := cons.CachedInfo().Config.MaxAckPending; got != 6 {
		t.Fatalf("durable's MaxAckPending = %d, want capacity.max_in_flight 6", got)
	}

	release := make(chan struct{})
	a := &held{Echo: echo.New(), release: release} // --concurrency 3
	b := &held{Echo: echo.New(), release: release} // the manifest's 2
	e.startWorker(t, "capped", "worker-a", 3, a)
	e.startWorker(t, "capped", "worker-b", 0, b)
	kv, err := e.js.KeyValue(ctx, bus.BucketWorkers)
	if err != nil {
		t.Fatal(err)
	}
	hs, err := workers.List(ctx, kv)
	if err != nil {
		t.Fatal(err)
	}
	beats := map[string]int{}
	for _, h := range hs {
		beats[h.Worker] = h.Concurrency
	}
	if beats["worker-a"] != 3 || beats["worker-b"] != 2 || len(beats) != 2 {
		t.Errorf("heartbeats' concurrency = %v, want worker-a 3 (its option), worker-b 2 (the manifest's)", beats)
	}

	ids := make([]string, 8)
	for i := range ids {
		ids[i] = sandbox.NewID()
		e.publishCreate(t, "capped", ids[i], nil)
	}
	var info *jetstream.ConsumerInfo
	eventually(t, 20*time.Second, func() bool {
		if info, err = cons.Info(ctx); err != nil {
			t.Fatal(err)
		}
		return a.in.Load() == 3 && b.in.Load() == 2 && info.NumAckPending == 6 && info.NumPending == 2
	}, "5 creates in Provision (3 + 2) and the durable at its capacity of 6, 2 pending")
	if ina, inb := a.in.Load(), b.in.Load(); ina != 3 || inb != 2 {
		t.Errorf("in Provision: worker a %d, worker b %d; want 3 and 2, each its concurrency", ina, inb)
	}

	close(release)
	eventually(t, 20*time.Second, func() bool {
		if info, err = cons.Info(ctx); err != nil {
			t.Fatal(err)
		}
		return info.NumAckPending == 0 && info.NumPending == 0
	}, "every create handled")
	for _, id := range ids {
		if n := e.lifecycleCount(t, "capped", id, event.StateReady); n != 1 {
			t.Errorf("sandbox %s: %d ready events, want 1", id, n)
		}
	}
}
