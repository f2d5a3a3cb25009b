package gateway_test

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/workers"
	"github.com/sand-boxer/sandboxer/services/gateway"
)

// TestWorkers reads GET /v1/workers against real heartbeats in the
// workers bucket (written as the provisioners write them) and a real pool
// durable holding commands: two waiting, one taken and not acknowledged.
// The gateway reads both under its own identity, so a permission it lacks
// fails the test.
func TestWorkers(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{
		catalog: func(c *extension.Catalog) {
			c.Extensions["echo"].Capacity = extension.Capacity{MaxSandboxes: 5}
		},
		opts: func(o *gateway.Options) {
			// The gateway's own watch of the bucket, as up wires it.
			o.Workers = watchWorkers(t, o)
		},
	})
	ctx := testCtx(t)

	// The echo pool's durable, as setup declares it; gitecho's is missing.
	e.srv.Setup(t, bus.ConsumerSpec{
		Stream: event.StreamCommands, Name: bus.DurableProvisioner("echo"),
		Filters: []string{event.CommandFilter("echo")}, Policy: bus.ConsumerPolicy{AckWait: time.Minute},
	})
	started := time.Now().UTC().Truncate(time.Second)
	kv, err := e.js.KeyValue(ctx, bus.BucketWorkers)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range []workers.Heartbeat{
		{Extension: "echo", Worker: "w-b", Host: "h2", PID: 202, StartedAt: started, Concurrency: 4, InFlight: 1},
		{Extension: "echo", Worker: "w-a", Host: "h1", PID: 101, StartedAt: started, Concurrency: 8},
		{Extension: "retired", Worker: "w-z", Host: "h9", PID: 9, StartedAt: started, Concurrency: 1},
	} {
		if err := workers.Put(ctx, kv, h); err != nil {
			t.Fatal(err)
		}
	}

	alice := e.client("alice")
	for range 3 {
		if _, err := alice.Create(ctx, api.CreateRequest{Profile: "echo"}, ""); err != nil {
			t.Fatal(err)
		}
	}
	// A worker takes one command and holds it.
	cons, err := e.js.Consumer(ctx, event.StreamCommands, bus.DurableProvisioner("echo"))
	if err != nil {
		t.Fatal(err)
	}
	batch, err := cons.Fetch(1, jetstream.FetchMaxWait(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	taken := 0
	for range batch.Messages() {
		taken++
	}
	if taken != 1 {
		t.Fatalf("took %d commands, want 1 (%v)", taken, batch.Error())
	}

	var list *api.WorkerList
	await(t, "both echo workers listed", func() bool {
		list, err = e.client("bob").Workers(ctx) // any key: bob created nothing
		if err != nil {
			t.Fatal(err)
		}
		p := poolOf(list, "echo")
		return p != nil && len(p.LiveWorkers) == 2
	})
	if got := len(list.Pools); got != 2 {
		t.Fatalf("pools = %+v, want echo and gitecho (the catalog's), not retired", list.Pools)
	}
	if list.Pools[0].Extension != "echo" || list.Pools[1].Extension != "gitecho" {
		t.Errorf("pools in order %s, %s; want echo, gitecho", list.Pools[0].Extension, list.Pools[1].Extension)
	}
	echo := poolOf(list, "echo")
	if echo.Capacity != 5 || echo.Pending != 2 || echo.InFlight != 1 || echo.QueueError != "" {
		t.Errorf("echo pool = capacity %d, pending %d, in flight %d, queue error %q; want 5, 2, 1, none",
			echo.Capacity, echo.Pending, echo.InFlight, echo.QueueError)
	}
	want := []api.Worker{
		{Worker: "w-a", Host: "h1", PID: 101, Concurrency: 8, StartedAt: started},
		{Worker: "w-b", Host: "h2", PID: 202, Concurrency: 4, InFlight: 1, StartedAt: started},
	}
	for i, w := range echo.LiveWorkers {
		if w.SeenAt.IsZero() {
			t.Errorf("worker %s has no seen_at", w.Worker)
		}
		w.SeenAt = time.Time{}
		w.StartedAt = w.StartedAt.UTC()
		if w != want[i] {
			t.Errorf("live worker %d = %+v, want %+v", i, w, want[i])
		}
	}
	git := poolOf(list, "gitecho")
	if git.Capacity != 0 || len(git.LiveWorkers) != 0 || git.Pending != 0 ||
		!strings.Contains(git.QueueError, "provisioner-gitecho") || !strings.Contains(git.QueueError, "setup") {
		t.Errorf("gitecho pool = %+v, want unbounded, no workers, and a queue error naming its missing durable and setup", git)
	}

	// The raw answer: live_workers is a list even when empty.
	r := e.do(t, http.MethodGet, "/v1/workers", "carol", "", nil)
	if r.Status != http.StatusOK || !strings.Contains(string(r.Body), `"live_workers":[]`) {
		t.Errorf("GET /v1/workers = %d %s, want 200 with an empty live_workers list for gitecho", r.Status, r.Body)
	}
	// A worker that stops cleanly leaves the list.
	if err := workers.Delete(ctx, kv, "echo", "w-b"); err != nil {
		t.Fatal(err)
	}
	await(t, "w-b gone", func() bool {
		l, err := alice.Workers(ctx)
		if err != nil {
			t.Fatal(err)
		}
		p := poolOf(l, "echo")
		return p != nil && len(p.LiveWorkers) == 1 && p.LiveWorkers[0].Worker == "w-a"
	})
}

// TestWorkersHostBound: a pool bound to hosts counts every durable of
// its pool (the unplaced one and each host's) and lists each placement
// host with what waits there and its live workers; a host with commands
// and no worker says so in the CLI's table.
func TestWorkersHostBound(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{
		catalog: func(c *extension.Catalog) {
			c.Extensions["echo"].Capabilities.Locality = extension.LocalityHost
		},
		opts: func(o *gateway.Options) { o.Workers = watchWorkers(t, o) },
	})
	ctx := testCtx(t)
	policy := bus.ConsumerPolicy{AckWait: time.Minute}
	e.srv.Setup(t,
		bus.ConsumerSpec{Stream: event.StreamCommands, Name: bus.DurableProvisioner("echo"), Filters: []string{event.UnplacedCommandFilter("echo")}, Policy: policy},
		bus.ConsumerSpec{Stream: event.StreamCommands, Name: bus.DurableProvisionerHost("echo", "h1"), Filters: []string{event.HostCommandFilter("echo", "h1")}, Policy: policy},
	) // h2's durable is missing: setup was not run since h2 was added
	kv, err := e.js.KeyValue(ctx, bus.BucketWorkers)
	if err != nil {
		t.Fatal(err)
	}
	if err := workers.Put(ctx, kv, workers.Heartbeat{Extension: "echo", Worker: "w-2", Host: "h2", PID: 2, StartedAt: time.Now(), Concurrency: 4}); err != nil {
		t.Fatal(err)
	}
	// One unplaced create, and two destroys bound to h1, which has no
	// live worker.
	for _, subject := range []string{
		event.HostCommandSubject("echo", event.VerbCreate, "alice", "sbx-u1", ""),
		event.HostCommandSubject("echo", event.VerbDestroy, "alice", "sbx-a1", "h1"),
		event.HostCommandSubject("echo", event.VerbDestroy, "alice", "sbx-a2", "h1"),
	} {
		if _, err := e.js.Publish(ctx, subject, []byte("{}")); err != nil {
			t.Fatal(err)
		}
	}
	var p *api.WorkerPool
	await(t, "the echo pool with its worker on h2", func() bool {
		l, err := e.client("bob").Workers(ctx)
		if err != nil {
			t.Fatal(err)
		}
		p = poolOf(l, "echo")
		return p != nil && len(p.LiveWorkers) == 1
	})
	if p.Pending != 3 || p.InFlight != 0 || !strings.Contains(p.QueueError, "provisioner-echo@h2") {
		t.Errorf("echo pool: pending %d, in flight %d, queue error %q; want 3 (every durable read), 0, and h2's missing durable named", p.Pending, p.InFlight, p.QueueError)
	}
	if len(p.Hosts) != 2 {
		t.Fatalf("hosts %+v, want h1 and h2, the manifest's", p.Hosts)
	}
	h1, h2 := p.Hosts[0], p.Hosts[1]
	if h1 != (api.WorkerHost{Host: "h1", Pending: 2}) {
		t.Errorf("host h1 = %+v, want 2 pending and no live worker", h1)
	}
	if h2.Host != "h2" || h2.LiveWorkers != 1 || h2.Pending != 0 || !strings.Contains(h2.QueueError, "setup") {
		t.Errorf("host h2 = %+v, want its live worker and a queue error asking for setup", h2)
	}
	// The shared pool of the same catalog has no hosts.
	r := e.do(t, http.MethodGet, "/v1/workers", "carol", "", nil)
	if r.Status != http.StatusOK || strings.Count(string(r.Body), `"hosts"`) != 1 {
		t.Errorf("GET /v1/workers = %d %s, want hosts on the host-bound pool only", r.Status, r.Body)
	}
}

// TestWorkersRefusals: a key is needed; only GET; without the Workers
// option the endpoint says it is not served.
func TestWorkersRefusals(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	cases := []struct {
		name, method, consumer string
		status                 int
	}{
		{"no key", http.MethodGet, "", http.StatusUnauthorized},
		{"wrong method", http.MethodPost, "alice", http.StatusMethodNotAllowed},
		{"not served", http.MethodGet, "alice", http.StatusServiceUnavailable},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := e.do(t, tc.method, "/v1/workers", tc.consumer, "", nil)
			if r.Status != tc.status {
				t.Errorf("%s /v1/workers = %d %s, want %d", tc.method, r.Status, r.Body, tc.status)
			}
		})
	}
}

func poolOf(l *api.WorkerList, ext string) *api.WorkerPool {
	for i := range l.Pools {
		if l.Pools[i].Extension == ext {
			return &l.Pools[i]
		}
	}
	return nil
}

// watchWorkers starts a cache of the workers bucket on the gateway's own
// connection, until the test ends.
func watchWorkers(t *testing.T, o *gateway.Options) *workers.Cache {
	t.Helper()
	ctx := testCtx(t)
	kv, err := o.JS.KeyValue(ctx, bus.BucketWorkers)
	if err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithCancel(context.Background())
	c, err := workers.Watch(wctx, kv)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		<-c.Done()
	})
	select {
	case <-c.Ready():
	case <-ctx.Done():
		t.Fatal("workers cache not ready")
	}
	return c
}
