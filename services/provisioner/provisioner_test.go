package provisioner_test

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/goleak"

	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/catalog"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/local"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
	"github.com/sand-boxer/sandboxer/services/provisioner"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// testBus is a test's NATS: one server ([natstest.Start]) or a cluster
// ([natstest.StartCluster]).
type testBus interface {
	ConnAs(tb natstest.TB, id auth.Identity) *nats.Conn
	ConnRefusable(tb natstest.TB, id auth.Identity) (*nats.Conn, *natstest.Violations)
	JetStream(tb natstest.TB) jetstream.JetStream
	Setup(tb natstest.TB, specs ...bus.ConsumerSpec)
}

// env is one test's bus, catalog and workspace root.
type env struct {
	srv     testBus
	js      jetstream.JetStream
	cat     *catalog.Cache
	dataDir string
}

func localManifest(name string, ackWait time.Duration) *extension.Manifest {
	m, ps := extension.LoadManifestFile("../../extensions/ext.local.yaml")
	if len(ps) > 0 {
		panic(ps.Error())
	}
	m.Name = name
	m.Workers.AckWait = extension.Duration(ackWait)
	m.Workers.Backoff = []extension.Duration{extension.Duration(100 * time.Millisecond)}
	m.Workers.MaxDeliver = 4
	return m
}

func newEnv(t *testing.T, manifests ...*extension.Manifest) *env {
	t.Helper()
	return newEnvOn(t, natstest.Start(t), manifests...)
}

// newClusterEnv is newEnv on a three-node cluster, every stream and bucket
// at three replicas.
func newClusterEnv(t *testing.T, manifests ...*extension.Manifest) *env {
	t.Helper()
	c := natstest.StartCluster(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := (bus.Topology{Replicas: 3}).Setup(ctx, c.JetStream(t), bus.SetupOptions{}); err != nil {
		t.Fatal(err)
	}
	return newEnvOn(t, c, manifests...)
}

func newEnvOn(t *testing.T, srv testBus, manifests ...*extension.Manifest) *env {
	t.Helper()
	js := srv.JetStream(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	c := &extension.Catalog{Extensions: map[string]*extension.Manifest{}, Profiles: map[string]*extension.Profile{}}
	for _, m := range manifests {
		c.Extensions[m.Name] = m
		c.Profiles[m.Name] = &extension.Profile{Slug: m.Name, Extension: m.Name,
			Deadlines: extension.Deadlines{Provision: extension.Duration(20 * time.Second), Ready: extension.Duration(5 * time.Second)}}
	}
	kv, err := js.KeyValue(ctx, bus.BucketCatalog)
	if err != nil {
		t.Fatal(err)
	}
	if err := catalog.Publish(ctx, kv, c); err != nil {
		t.Fatal(err)
	}
	cache, err := catalog.Watch(ctx, kv)
	if err != nil {
		t.Fatal(err)
	}
	<-cache.Ready()
	return &env{srv: srv, js: js, cat: cache, dataDir: t.TempDir()}
}

// start runs a provisioner on its own connection, as a separate process
// would, and returns it with that connection.
func (e *env) start(t *testing.T, reg *extension.Registry, pool string, worker string) (*provisioner.Provisioner, *nats.Conn) {
	t.Helper()
	return e.startOn(t, reg, pool, worker, "", e.dataDir)
}

// startOn is start for a worker of placement host host ("": the default)
// keeping its backends' data in dataDir, with the host's own identity.
func (e *env) startOn(t *testing.T, reg *extension.Registry, pool, worker, host, dataDir string) (*provisioner.Provisioner, *nats.Conn) {
	t.Helper()
	nc := e.srv.ConnAs(t, auth.Identity{Role: auth.RoleProvisioner, Extension: pool, Host: host})
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	m, err := e.cat.Current().Extension(pool)
	if err != nil {
		t.Fatal(err)
	}
	e.srv.Setup(t, provisioner.PoolConsumers(m)...)
	// The worker's own view of the catalog, as a worker process has it.
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
		JS: js, Catalog: cat, Extensions: reg, Pools: []string{pool},
		DataDir: dataDir, WorkerID: worker, Host: host,
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
	return p, nc
}

func (e *env) publishCreate(t *testing.T, ext, id string, inputs map[string]string) event.Create {
	t.Helper()
	return e.publishCreateAfter(t, ext, id, inputs, 0)
}

// publishRecord stores the sandbox's requested event, its record, as the
// gateway does before its create command, and returns its sequence.
func (e *env) publishRecord(t *testing.T, ext, id string) uint64 {
	t.Helper()
	ref := event.Ref{SandboxID: id, Consumer: "dev", Profile: ext, Extension: ext, Host: "localhost"}
	ev, err := event.New(event.TypeRequested, "/test", id, id+".requested", event.Requested{Ref: ref, RequestedAt: time.Now().UTC()})
	if err != nil {
		t.Fatal(err)
	}
	ack, err := bus.NewPublisher(e.js).PublishTransition(context.Background(), ref.LifecycleSubject(event.StateRequested), ev, ref.RefFilter(), 0)
	if err != nil {
		t.Fatal(err)
	}
	return ack.Sequence
}

// publishCreateAfter publishes the create command of a sandbox whose
// requested event is of sequence recordSeq (0: none).
func (e *env) publishCreateAfter(t *testing.T, ext, id string, inputs map[string]string, recordSeq uint64) event.Create {
	t.Helper()
	c := event.Create{Ref: event.Ref{SandboxID: id, Consumer: "dev", Profile: ext, Extension: ext, Host: "localhost"},
		Inputs: inputs, RequestedAt: time.Now().UTC(), RecordSeq: recordSeq}
	ev, err := event.New(event.TypeCreate, "/test", id, id+".create", c)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bus.NewPublisher(e.js).Publish(context.Background(), c.Ref.CommandSubject(event.VerbCreate), ev); err != nil {
		t.Fatal(err)
	}
	return c
}

func (e *env) publishDestroy(t *testing.T, ext, id string) {
	t.Helper()
	d := event.Destroy{Ref: event.Ref{SandboxID: id, Consumer: "dev", Profile: ext, Extension: ext, Host: "localhost"},
		Reason: event.ReasonRequested, RequestedAt: time.Now().UTC()}
	ev, err := event.New(event.TypeDestroy, "/test", id, id+".destroy", d)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bus.NewPublisher(e.js).Publish(context.Background(), d.Ref.CommandSubject(event.VerbDestroy), ev); err != nil {
		t.Fatal(err)
	}
}

// awaitEvent reads the sandbox's lifecycle events until one in state s
// arrives, and returns every event seen up to it.
func (e *env) awaitEvent(t *testing.T, id string, s event.State) []*event.Event {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := e.js.OrderedConsumer(ctx, event.StreamLifecycle, jetstream.OrderedConsumerConfig{FilterSubjects: []string{event.SandboxFilter(id)}})
	if err != nil {
		t.Fatal(err)
	}
	var seen []*event.Event
	for {
		msg, err := c.Next(jetstream.FetchContext(ctx))
		if err != nil {
			t.Fatalf("waiting for %s of %s: %v (seen %d events)", s, id, err, len(seen))
		}
		_, ev, err := event.Decode(ctx, msg.Headers(), msg.Data())
		if err != nil {
			t.Fatal(err)
		}
		seen = append(seen, ev)
		if st, _ := event.StateOf(event.Type(ev.Type())); st == s {
			return seen
		}
	}
}

// lifecycleCount counts the sandbox's events in state s on the stream.
func (e *env) lifecycleCount(t *testing.T, ext, id string, s event.State) uint64 {
	t.Helper()
	st, err := e.js.Stream(context.Background(), event.StreamLifecycle)
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(context.Background(), jetstream.WithSubjectFilter(event.LifecycleSubject("dev", ext, id, s)))
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Subjects[event.LifecycleSubject("dev", ext, id, s)]
}

func TestCreateReadyDestroy(t *testing.T) {
	t.Parallel()
	e := newEnv(t, localManifest("local", 5*time.Second))
	reg := extension.NewRegistry(local.Info)
	e.start(t, reg, "local", "w1")
	id := sandbox.NewID()
	e.publishCreate(t, "local", id, nil)
	seen := e.awaitEvent(t, id, event.StateReady)
	if got := []string{seen[0].Type(), seen[len(seen)-1].Type()}; got[0] != string(event.TypeProvisioning) || got[1] != string(event.TypeReady) {
		t.Fatalf("events = %v, want provisioning then ready", got)
	}
	var ready event.Ready
	if err := event.DataAs(seen[len(seen)-1], &ready); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(ready.Reachability.RemoteDir); err != nil {
		t.Fatalf("ready names remote_dir %q that does not exist: %v", ready.Reachability.RemoteDir, err)
	}
	if ready.Reachability.Host != "localhost" || ready.Handle.SandboxID != id {
		t.Fatalf("ready = %+v", ready)
	}

	e.publishDestroy(t, "local", id)
	seen = e.awaitEvent(t, id, event.StateDestroyed)
	var destroyed event.Destroyed
	if err := event.DataAs(seen[len(seen)-1], &destroyed); err != nil {
		t.Fatal(err)
	}
	if len(destroyed.Cleanup.Removed) == 0 {
		t.Fatalf("destroyed reports nothing removed: %+v", destroyed)
	}
	if _, err := os.Stat(ready.Reachability.RemoteDir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("workspace %s still there after destroyed: %v", ready.Reachability.RemoteDir, err)
	}
}

func TestFailedProvisionEmitsFailedAndCleansUp(t *testing.T) {
	t.Parallel()
	e := newEnv(t, localManifest("local", 5*time.Second))
	e.start(t, extension.NewRegistry(local.Info), "local", "w1")
	id := sandbox.NewID()
	e.publishCreate(t, "local", id, map[string]string{"repo": "/nonexistent/repository"})
	seen := e.awaitEvent(t, id, event.StateFailed)
	var f event.Failed
	if err := event.DataAs(seen[len(seen)-1], &f); err != nil {
		t.Fatal(err)
	}
	if f.Phase != "provision" || f.Reason == "" {
		t.Fatalf("failed = %+v, want phase provision with a reason", f)
	}
	// The failure queues a destroy; it runs teardown and ends destroyed.
	e.awaitEvent(t, id, event.StateDestroyed)
	if n := e.lifecycleCount(t, "local", id, event.StateReady); n != 0 {
		t.Fatalf("%d ready events for a failed sandbox", n)
	}
}

func TestInvalidInputsFailBeforeProvision(t *testing.T) {
	t.Parallel()
	e := newEnv(t, localManifest("local", 5*time.Second))
	e.start(t, extension.NewRegistry(local.Info), "local", "w1")
	id := sandbox.NewID()
	// A command that skipped the gateway's validation.
	e.publishCreate(t, "local", id, map[string]string{"repo": "--upload-pack=touch /tmp/pwned"})
	seen := e.awaitEvent(t, id, event.StateFailed)
	for _, ev := range seen {
		if ev.Type() == string(event.TypeProvisioning) {
			t.Fatal("provisioning started for invalid inputs")
		}
	}
}

func TestMalformedCommandIsDeadLettered(t *testing.T) {
	t.Parallel()
	e := newEnv(t, localManifest("local", 5*time.Second))
	p, _ := e.start(t, extension.NewRegistry(local.Info), "local", "w1")
	ctx := context.Background()
	if _, err := e.js.Publish(ctx, event.CommandSubject("local", event.VerbCreate, "dev", "sbx-bad"), []byte("not an event")); err != nil {
		t.Fatal(err)
	}
	dlq, err := e.js.OrderedConsumer(ctx, event.StreamDLQ, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	fctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	msg, err := dlq.Next(jetstream.FetchContext(fctx))
	if err != nil {
		t.Fatalf("no dead letter: %v", err)
	}
	if msg.Headers().Get(bus.HeaderDLQReason) == "" || msg.Subject() != event.DLQSubject(event.StreamCommands, "provisioner-local") {
		t.Fatalf("dead letter %s headers %v", msg.Subject(), msg.Headers())
	}
	// The router counts the dead letter once the publish is acked.
	eventually(t, 10*time.Second, func() bool { return p.Stats().DeadLettered.Load() == 1 }, "router counts one dead letter")
	cons, err := e.js.Consumer(ctx, event.StreamCommands, "provisioner-local")
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, func() bool {
		info, err := cons.Info(ctx)
		return err == nil && info.NumAckPending == 0 && info.NumPending == 0
	}, "poison command is terminated, not redelivered")
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, d time.Duration, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %s: %s did not happen", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// gated wraps ext.local so a test can hold Provision until it lets go.
type gated struct {
	*local.Local
	entered chan string
	release chan struct{}
}

func (g *gated) Provision(ctx context.Context, p extension.Profile, in extension.Inputs, host string) (extension.Handle, error) {
	g.entered <- in.SandboxID()
	select {
	case <-g.release:
	case <-ctx.Done():
		return extension.Handle{}, ctx.Err()
	}
	return g.Local.Provision(ctx, p, in, host)
}

// TestWorkerKilledMidProvision kills a worker while Provision runs: its
// connection drops without an ack or nak, as when the process dies. The
// command comes back to another worker after AckWait, which finishes it:
// one ready event, one workspace.
func TestWorkerKilledMidProvision(t *testing.T) {
	t.Parallel()
	e := newEnv(t, localManifest("local", 2*time.Second))
	g := &gated{entered: make(chan string, 1), release: make(chan struct{})}
	var once sync.Once
	regA := extension.NewRegistry(extension.Info{Handler: local.Handler, New: func() extension.Extension {
		var ext extension.Extension
		once.Do(func() { g.Local = new(local.Local); ext = g })
		return ext
	}})
	_, ncA := e.start(t, regA, "local", "worker-a")
	id := sandbox.NewID()
	e.publishCreate(t, "local", id, nil)
	select {
	case got := <-g.entered:
		if got != id {
			t.Fatalf("worker a got %s", got)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("worker a never started provisioning")
	}
	ncA.Close() // the process dies: no ack, no nak, no heartbeat

	e.start(t, extension.NewRegistry(local.Info), "local", "worker-b")
	seen := e.awaitEvent(t, id, event.StateReady)
	var ready event.Ready
	if err := event.DataAs(seen[len(seen)-1], &ready); err != nil {
		t.Fatal(err)
	}
	var prov event.Provisioning
	for _, ev := range seen {
		if ev.Type() == string(event.TypeProvisioning) {
			if err := event.DataAs(ev, &prov); err != nil {
				t.Fatal(err)
			}
		}
	}
	close(g.release) // worker a's handler may now run on; its connection is gone
	if n := e.lifecycleCount(t, "local", id, event.StateReady); n != 1 {
		t.Fatalf("%d ready events, want exactly 1", n)
	}
	entries, err := os.ReadDir(fmt.Sprintf("%s/local/workspaces", e.dataDir))
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Name() != id {
		names := []string{}
		for _, en := range entries {
			names = append(names, en.Name())
		}
		t.Fatalf("workspaces = %v, want exactly [%s]", names, id)
	}
}

// TestDestroyNeedsNoInventory destroys a ready sandbox with no registry
// running and no requested event (a command from before the record was
// the lifecycle stream): the worker reads the handle from the sandbox's
// ready event, on its own backend's subjects, and removes the workspace.
func TestDestroyNeedsNoInventory(t *testing.T) {
	t.Parallel()
	e := newEnv(t, localManifest("local", 5*time.Second))
	e.start(t, extension.NewRegistry(local.Info), "local", "w1")
	id := sandbox.NewID()
	e.publishCreate(t, "local", id, nil)
	seen := e.awaitEvent(t, id, event.StateReady)
	var ready event.Ready
	if err := event.DataAs(seen[len(seen)-1], &ready); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(ready.Reachability.RemoteDir); err != nil {
		t.Fatalf("workspace of a ready sandbox: %v", err)
	}
	e.publishDestroy(t, "local", id)
	e.awaitEvent(t, id, event.StateDestroyed)
	if _, err := os.Stat(ready.Reachability.RemoteDir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("workspace %s still there: %v", ready.Reachability.RemoteDir, err)
	}
}

// replayCreate publishes create c again as an event of id eventID (the
// commands stream drops a second one of an id within its duplicate
// window) and waits until a worker handled it: the work queue removes a
// command once acked.
func (e *env) replayCreate(t *testing.T, c event.Create, eventID string) {
	t.Helper()
	ev, err := event.New(event.TypeCreate, "/test/replay", c.SandboxID, eventID, c)
	if err != nil {
		t.Fatal(err)
	}
	ack, err := bus.NewPublisher(e.js).Publish(context.Background(), c.Ref.CommandSubject(event.VerbCreate), ev)
	if err != nil || ack.Duplicate {
		t.Fatalf("replaying the create: %+v %v", ack, err)
	}
	cmds, err := e.js.Stream(context.Background(), event.StreamCommands)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := cmds.GetMsg(context.Background(), ack.Sequence); errors.Is(err, jetstream.ErrMsgNotFound) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the replayed create was never acknowledged")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestReplayedCreateAfterDestroy delivers a sandbox's create command again
// after the sandbox was destroyed (a replay from the dead-letter stream,
// past the duplicate window): the worker announces nothing, provisions
// nothing, and acks it.
func TestReplayedCreateAfterDestroy(t *testing.T) {
	t.Parallel()
	e := newEnv(t, localManifest("local", 5*time.Second))
	// A short duplicate window, so the replay's announcement is not
	// dropped as a duplicate of the first one and only the guard keeps it
	// out.
	const window = 200 * time.Millisecond
	if _, err := (bus.Topology{Duplicates: window}).Setup(context.Background(), e.js, bus.SetupOptions{}); err != nil {
		t.Fatal(err)
	}
	e.start(t, extension.NewRegistry(local.Info), "local", "w1")
	id := sandbox.NewID()
	c := e.publishCreate(t, "local", id, nil)
	seen := e.awaitEvent(t, id, event.StateReady)
	var ready event.Ready
	if err := event.DataAs(seen[len(seen)-1], &ready); err != nil {
		t.Fatal(err)
	}
	e.publishDestroy(t, "local", id)
	e.awaitEvent(t, id, event.StateDestroyed)
	time.Sleep(2 * window) // the clock is the condition: the window must pass

	e.replayCreate(t, c, id+".create")
	if n := e.lifecycleCount(t, "local", id, event.StateProvisioning); n != 1 {
		t.Fatalf("%d provisioning events, want the first one only", n)
	}
	if _, err := os.Stat(ready.Reachability.RemoteDir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("workspace of the destroyed sandbox came back: %v", err)
	}
}

// TestReplayedCreateWithinDuplicateWindow publishes a sandbox's create a
// second time (another event id, so the commands stream takes it) while
// the sandbox is ready: the replay's guarded announcement of provisioning
// is refused, so the worker reads the sandbox, finds the create done and
// makes nothing. One server checks the guard first and refuses it; a
// cluster's stream leader looks for a duplicate first and acks it as one
// (the first announcement had the same event id), which proves nothing
// and counts as refused too.
func TestReplayedCreateWithinDuplicateWindow(t *testing.T) {
	t.Parallel()
	t.Run("one server", func(t *testing.T) {
		t.Parallel()
		testReplayedCreateWithinDuplicateWindow(t, newEnv(t, localManifest("local", 5*time.Second)))
	})
	t.Run("cluster", func(t *testing.T) {
		t.Parallel()
		testReplayedCreateWithinDuplicateWindow(t, newClusterEnv(t, localManifest("local", 5*time.Second)))
	})
}

func testReplayedCreateWithinDuplicateWindow(t *testing.T, e *env) {
	cnt := &counted{Local: new(local.Local)}
	e.start(t, extension.NewRegistry(extension.Info{Handler: local.Handler, New: func() extension.Extension { return cnt }}), "local", "w1")
	id := sandbox.NewID()
	c := e.publishCreate(t, "local", id, nil)
	e.awaitEvent(t, id, event.StateReady)

	e.replayCreate(t, c, id+".create-again")
	if n := e.lifecycleCount(t, "local", id, event.StateReady); n != 1 {
		t.Fatalf("%d ready events, want the first one only", n)
	}
	if n := cnt.provisions.Load(); n != 1 {
		t.Fatalf("Provision called %d times, want once", n)
	}
}

// counted wraps ext.local and counts its Provision calls.
type counted struct {
	*local.Local
	provisions atomic.Int64
}

func (c *counted) Provision(ctx context.Context, p extension.Profile, in extension.Inputs, host string) (extension.Handle, error) {
	c.provisions.Add(1)
	return c.Local.Provision(ctx, p, in, host)
}

// TestDestroyBeforeItsCreateRuns hands a worker the destroy of a sandbox
// whose create has not run (queued behind others, after a fault): the
// destroy waits for nothing, its destroying event is the sandbox's first,
// and the create, when it comes, finds the sandbox past provisioning and
// makes nothing.
func TestDestroyBeforeItsCreateRuns(t *testing.T) {
	t.Parallel()
	for _, recorded := range []bool{false, true} {
		t.Run(fmt.Sprintf("recorded=%v", recorded), func(t *testing.T) {
			t.Parallel()
			destroyBeforeCreate(t, recorded)
		})
	}
}

// destroyBeforeCreate is TestDestroyBeforeItsCreateRuns for a sandbox
// with its requested event (recorded) or with no event at all (a command
// from before the record was the lifecycle stream).
func destroyBeforeCreate(t *testing.T, recorded bool) {
	e := newEnv(t, localManifest("local", 5*time.Second))
	e.start(t, extension.NewRegistry(local.Info), "local", "w1")
	id := sandbox.NewID()
	var seq uint64
	first := event.StateDestroying
	if recorded {
		seq, first = e.publishRecord(t, "local", id), event.StateRequested
	}
	e.publishDestroy(t, "local", id)
	// Awaited within awaitEvent's 30 s: a destroy that waited for the
	// create (ack wait × deliveries + the profile's deadlines) would not
	// end in time.
	seen := e.awaitEvent(t, id, event.StateDestroyed)
	if st, _ := event.StateOf(event.Type(seen[0].Type())); st != first {
		t.Fatalf("first event of %s is %s, want %s", id, seen[0].Type(), first)
	}
	if st, _ := event.StateOf(event.Type(seen[len(seen)-2].Type())); st != event.StateDestroying {
		t.Fatalf("event before destroyed of %s is %s, want destroying", id, seen[len(seen)-2].Type())
	}
	e.publishCreateAfter(t, "local", id, nil, seq)
	cmds, err := e.js.Stream(context.Background(), event.StreamCommands)
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 20*time.Second, func() bool {
		info, err := cmds.Info(context.Background())
		return err == nil && info.State.Msgs == 0 // the create was handled and acked
	}, "the create after the destroy acknowledged")
	for _, s := range []event.State{event.StateProvisioning, event.StateReady} {
		if n := e.lifecycleCount(t, "local", id, s); n != 0 {
			t.Fatalf("%d %s events for a sandbox destroyed before its create ran", n, s)
		}
	}
	err = filepath.WalkDir(e.dataDir, func(path string, _ fs.DirEntry, err error) error {
		if err == nil && strings.Contains(filepath.Base(path), id) {
			return fmt.Errorf("%s made for a sandbox destroyed before its create ran", path)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestCreateAfterItsRecord: a create whose command names its requested
// event's sequence announces provisioning guarded by exactly that event,
// at once, and the sandbox gets ready.
func TestCreateAfterItsRecord(t *testing.T) {
	t.Parallel()
	e := newEnv(t, localManifest("local", 5*time.Second))
	e.start(t, extension.NewRegistry(local.Info), "local", "w1")
	id := sandbox.NewID()
	seq := e.publishRecord(t, "local", id)
	e.publishCreateAfter(t, "local", id, nil, seq)
	seen := e.awaitEvent(t, id, event.StateReady)
	var got []string
	for _, ev := range seen {
		got = append(got, ev.Type())
	}
	want := []string{string(event.TypeRequested), string(event.TypeProvisioning), string(event.TypeReady)}
	if !slices.Equal(got, want) {
		t.Fatalf("events %v, want %v", got, want)
	}
	s, err := e.js.Stream(context.Background(), event.StreamLifecycle)
	if err != nil {
		t.Fatal(err)
	}
	m, err := s.GetLastMsgForSubject(context.Background(), event.LifecycleSubject("dev", "local", id, event.StateProvisioning))
	if err != nil {
		t.Fatal(err)
	}
	if h := m.Header.Get(jetstream.ExpectedLastSubjSeqHeader); h != strconv.FormatUint(seq, 10) {
		t.Fatalf("provisioning guarded by sequence %q, want its record's %d", h, seq)
	}
}
