package provisioner_test

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/local"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
	"github.com/sand-boxer/sandboxer/services/provisioner"
)

// hostsManifest is ext.local (locality: host) with two placement hosts.
func hostsManifest() *extension.Manifest {
	m := localManifest("local", 5*time.Second)
	m.Hosts = []string{"host-a", "host-b"}
	return m
}

// workspacesOf lists what a data directory's ext.local holds: workspaces and
// partial attempts.
func workspacesOf(t *testing.T, dataDir string) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(dataDir, "local", "workspaces"))
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

// last decodes the data of the last event of seen, which must be of type
// typ.
func last[T any](t *testing.T, seen []*event.Event, typ event.Type) T {
	t.Helper()
	var v T
	e := seen[len(seen)-1]
	if e.Type() != string(typ) {
		t.Fatalf("last event %s, want %s", e.Type(), typ)
	}
	if err := event.DataAs(e, &v); err != nil {
		t.Fatal(err)
	}
	return v
}

// TestHostBoundTeardown runs two ext.local workers on different data
// directories, two placement hosts, and a burst of creates and destroys
// published unplaced, as the gateway and the registry publish them: some
// destroys right behind their create, racing it. Whichever worker takes a
// destroy, the sandbox is torn down on the host it was placed on: every
// teardown of a sandbox that was made removed something (none found the
// workspace already gone), and both directories end empty. A racing
// destroy that a worker took before any worker took its create ends the
// sandbox with nothing made: no provisioning, no ready.
func TestHostBoundTeardown(t *testing.T) {
	t.Parallel()
	e := newEnv(t, hostsManifest())
	reg := extension.NewRegistry(local.Info)
	dirs := map[string]string{"host-a": t.TempDir(), "host-b": t.TempDir()}
	e.startOn(t, reg, "local", "wa", "host-a", dirs["host-a"])
	e.startOn(t, reg, "local", "wb", "host-b", dirs["host-b"])

	const burst = 24
	ids := make([]string, burst)
	for i := range ids {
		ids[i] = sandbox.NewID()
		e.publishCreate(t, "local", ids[i], nil)
		if i%3 == 0 {
			e.publishDestroy(t, "local", ids[i])
		}
	}
	placed := map[string]int{}
	unmade := map[string]bool{}
	for i, id := range ids {
		var seen []*event.Event
		if i%3 == 0 {
			// Racing its create: it ends one way or the other.
			seen = e.awaitEvent(t, id, event.StateDestroyed)
		} else {
			seen = e.awaitEvent(t, id, event.StateReady)
		}
		var ready *event.Ready
		for _, ev := range seen {
			if ev.Type() == string(event.TypeReady) {
				ready = new(event.Ready)
				if err := event.DataAs(ev, ready); err != nil {
					t.Fatal(err)
				}
			}
		}
		if ready == nil {
			if st, _ := event.StateOf(event.Type(seen[0].Type())); st != event.StateDestroying {
				t.Fatalf("sandbox %s destroyed without being ready, and its first event is %s, not destroying", id, seen[0].Type())
			}
			if n := e.lifecycleCount(t, "local", id, event.StateProvisioning); n != 0 {
				t.Fatalf("sandbox %s destroyed before its create ran has %d provisioning events", id, n)
			}
			unmade[id] = true
			continue
		}
		if _, ok := dirs[ready.Handle.Host]; !ok || ready.Host != ready.Handle.Host || ready.Reachability.Host != ready.Handle.Host {
			t.Fatalf("sandbox %s ready on host %q (ref %q, reachability %q), want one of the workers' hosts", id, ready.Handle.Host, ready.Host, ready.Reachability.Host)
		}
		if !strings.HasPrefix(ready.Reachability.RemoteDir, dirs[ready.Handle.Host]) {
			t.Fatalf("sandbox %s placed on %s has its workspace at %s, outside that host's data directory", id, ready.Handle.Host, ready.Reachability.RemoteDir)
		}
		placed[ready.Handle.Host]++
		if i%3 != 0 {
			e.publishDestroy(t, "local", id)
		}
	}
	for _, id := range ids {
		d := last[event.Destroyed](t, e.awaitEvent(t, id, event.StateDestroyed), event.TypeDestroyed)
		if !unmade[id] && (d.Cleanup.AlreadyGone || len(d.Cleanup.Removed) == 0) {
			t.Errorf("sandbox %s: the teardown found nothing to remove (%+v): it ran on a host that did not hold it", id, d.Cleanup)
		}
	}
	for host, dir := range dirs {
		if left := workspacesOf(t, dir); len(left) > 0 {
			t.Errorf("host %s still holds %d workspaces after every sandbox was destroyed: %v", host, len(left), left)
		}
	}
	t.Logf("placed per host: %v; destroyed before their create ran: %d", placed, len(unmade))
}

// TestDestroyWaitsForItsHost destroys a sandbox whose host has no live
// worker: the worker of the other host forwards the destroy and says on
// the sandbox that it waits for a worker on its host, the workspace stays,
// and once a worker of that host starts again it is torn down.
func TestDestroyWaitsForItsHost(t *testing.T) {
	t.Parallel()
	e := newEnv(t, hostsManifest())
	reg := extension.NewRegistry(local.Info)
	dirA, dirB := t.TempDir(), t.TempDir()
	a, _ := e.startOn(t, reg, "local", "wa1", "host-a", dirA)
	id := sandbox.NewID()
	e.publishCreate(t, "local", id, nil)
	ready := last[event.Ready](t, e.awaitEvent(t, id, event.StateReady), event.TypeReady)
	if ready.Handle.Host != "host-a" {
		t.Fatalf("placed on %q, want host-a, the only worker's", ready.Handle.Host)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := a.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}

	e.startOn(t, reg, "local", "wb1", "host-b", dirB)
	e.publishDestroy(t, "local", id)
	waiting := last[event.Destroying](t, e.awaitEvent(t, id, event.StateDestroying), event.TypeDestroying)
	if !strings.HasPrefix(waiting.Error, provisioner.WaitingForHost("host-a")) || waiting.Host != "host-a" {
		t.Fatalf("destroying = %+v, want the teardown error to say it waits for a worker on host-a", waiting)
	}
	// The forwarded destroy waits in host-a's durable, untouched.
	cons, err := e.js.Consumer(ctx, event.StreamCommands, bus.DurableProvisionerHost("local", "host-a"))
	if err != nil {
		t.Fatal(err)
	}
	if info := cons.CachedInfo(); info.NumPending != 1 {
		t.Fatalf("host-a's durable has %d pending, want the forwarded destroy", info.NumPending)
	}
	if n := e.lifecycleCount(t, "local", id, event.StateDestroyed); n != 0 {
		t.Fatal("destroyed with no worker on its host")
	}
	if got := workspacesOf(t, dirA); !slices.Equal(got, []string{id}) {
		t.Fatalf("host-a holds %v, want the sandbox's workspace", got)
	}

	e.startOn(t, reg, "local", "wa2", "host-a", dirA)
	d := last[event.Destroyed](t, e.awaitEvent(t, id, event.StateDestroyed), event.TypeDestroyed)
	if d.Cleanup.AlreadyGone || len(d.Cleanup.Removed) == 0 {
		t.Fatalf("destroyed = %+v, want the workspace removed", d)
	}
	if left := workspacesOf(t, dirA); len(left) > 0 {
		t.Fatalf("host-a still holds %v", left)
	}
}

// TestUpgradeKeepsInFlightCommands sets the pool up as an earlier version
// did (one durable over every command of the extension) with a command
// in it, then as this one: setup narrows the pool's durable to unplaced
// commands before it creates the hosts' (a work queue refuses overlapping
// consumers), and the command of the old setup is still handled.
func TestUpgradeKeepsInFlightCommands(t *testing.T) {
	t.Parallel()
	e := newEnv(t, hostsManifest())
	m, err := e.cat.Current().Extension("local")
	if err != nil {
		t.Fatal(err)
	}
	old := provisioner.Consumer(m)
	old.Filters = []string{event.CommandFilter("local")}
	e.srv.Setup(t, old)
	id := sandbox.NewID()
	e.publishCreate(t, "local", id, nil)

	dir := t.TempDir()
	e.startOn(t, extension.NewRegistry(local.Info), "local", "wa", "host-a", dir) // sets up PoolConsumers
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cons, err := e.js.Consumer(ctx, event.StreamCommands, bus.DurableProvisioner("local"))
	if err != nil {
		t.Fatal(err)
	}
	if f := cons.CachedInfo().Config.FilterSubject; f != event.UnplacedCommandFilter("local") {
		t.Fatalf("pool durable filter %q after the upgrade, want %q", f, event.UnplacedCommandFilter("local"))
	}
	e.awaitEvent(t, id, event.StateReady)
	e.publishDestroy(t, "local", id)
	e.awaitEvent(t, id, event.StateDestroyed)
	if left := workspacesOf(t, dir); len(left) > 0 {
		t.Fatalf("host-a still holds %v", left)
	}
}

// TestWorkerHostMustBeAPlacementHost refuses to start a worker of a
// locality: host pool on a host the manifest does not list: nothing
// would take the commands bound to it.
func TestWorkerHostMustBeAPlacementHost(t *testing.T) {
	t.Parallel()
	e := newEnv(t, hostsManifest())
	js := e.srv.JetStream(t)
	p, err := provisioner.New(provisioner.Options{JS: js, Catalog: e.cat, Extensions: extension.NewRegistry(local.Info),
		Pools: []string{"local"}, DataDir: t.TempDir(), WorkerID: "wc", Host: "host-c", CatalogTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err = p.Start(ctx)
	if err == nil {
		_ = p.Shutdown(ctx)
		t.Fatal("a worker of host-c started")
	}
	if !strings.Contains(err.Error(), `"host-c" is not one of the extension's placement hosts [host-a host-b]`) {
		t.Fatalf("error %q does not say which hosts there are", err)
	}
}

// TestHostIdentityReadsOnlyItsHost: a worker's identity names its host,
// and takes that host's commands, never another host's.
func TestHostIdentityReadsOnlyItsHost(t *testing.T) {
	t.Parallel()
	e := newEnv(t, hostsManifest())
	m, err := e.cat.Current().Extension("local")
	if err != nil {
		t.Fatal(err)
	}
	e.srv.Setup(t, provisioner.PoolConsumers(m)...)
	nc, violations := e.srv.ConnRefusable(t, auth.Identity{Role: auth.RoleProvisioner, Extension: "local", Host: "host-b"})
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		durable string
		allowed bool
	}{
		{bus.DurableProvisioner("local"), true},
		{bus.DurableProvisionerHost("local", "host-b"), true},
		{bus.DurableProvisionerHost("local", "host-a"), false},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		cons, err := js.Consumer(ctx, event.StreamCommands, c.durable)
		if err == nil {
			_, err = cons.Fetch(1, jetstream.FetchMaxWait(100*time.Millisecond))
		}
		cancel()
		if (err == nil) != c.allowed {
			t.Errorf("host-b's worker on %s: err %v, allowed %v", c.durable, err, c.allowed)
		}
	}
	if !violations.Await("$JS.API.CONSUMER.INFO."+event.StreamCommands+"."+bus.DurableProvisionerHost("local", "host-a"), 5*time.Second) {
		t.Errorf("no permissions violation on host-a's durable: %v", violations.Errors())
	}
}

// TestDestroyOutlivesAKilledHost kills host-a's worker (its connection
// dropped: no shutdown, its heartbeat left to expire) after it made a
// sandbox. A destroy taken on host-b is forwarded and waits in host-a's
// durable; the worker that replaces the killed one on host-a, with the
// same data directory, tears the sandbox down.
func TestDestroyOutlivesAKilledHost(t *testing.T) {
	t.Parallel()
	e := newEnv(t, hostsManifest())
	reg := extension.NewRegistry(local.Info)
	dirA := t.TempDir()
	_, ncA := e.startOn(t, reg, "local", "wa1", "host-a", dirA)
	id := sandbox.NewID()
	e.publishCreate(t, "local", id, nil)
	e.awaitEvent(t, id, event.StateReady)
	ncA.Close() // kill -9

	e.startOn(t, reg, "local", "wb1", "host-b", t.TempDir())
	e.publishDestroy(t, "local", id)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	eventually(t, 10*time.Second, func() bool {
		cons, err := e.js.Consumer(ctx, event.StreamCommands, bus.DurableProvisionerHost("local", "host-a"))
		return err == nil && cons.CachedInfo().NumPending == 1
	}, "the destroy forwarded to host-a's durable")
	if n := e.lifecycleCount(t, "local", id, event.StateDestroyed); n != 0 {
		t.Fatal("destroyed with its host's worker dead")
	}

	e.startOn(t, reg, "local", "wa2", "host-a", dirA)
	d := last[event.Destroyed](t, e.awaitEvent(t, id, event.StateDestroyed), event.TypeDestroyed)
	if d.Cleanup.AlreadyGone {
		t.Fatalf("destroyed = %+v, want the workspace removed", d)
	}
	if left := workspacesOf(t, dirA); len(left) > 0 {
		t.Fatalf("host-a still holds %v", left)
	}
}
