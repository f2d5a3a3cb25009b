package provisioner_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/catalog"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/local"
	"github.com/sand-boxer/sandboxer/services/provisioner"
)

// reconciling starts a worker of pool, as start does, reconciling orphans
// every interval with grace; stop shuts it down and waits for its
// reconciler.
func (e *env) reconciling(t *testing.T, reg *extension.Registry, pool, worker string, interval, grace time.Duration) (stop func()) {
	t.Helper()
	nc := e.srv.ConnAs(t, auth.Identity{Role: auth.RoleProvisioner, Extension: pool})
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	m, err := e.cat.Current().Extension(pool)
	if err != nil {
		t.Fatal(err)
	}
	e.srv.Setup(t, provisioner.PoolConsumers(m)...)
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
		DataDir: e.dataDir, WorkerID: worker, OrphanInterval: interval, OrphanGrace: grace,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := p.Start(ctx); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	stop = func() {
		once.Do(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := p.Shutdown(ctx); err != nil {
				t.Errorf("shutting down %s: %v", worker, err)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// backend opens ext.local on the directory the workers of pool keep
// their workspaces in: what it makes there is what they hold.
func (e *env) backend(t *testing.T, pool string) *local.Local {
	t.Helper()
	m, err := e.cat.Current().Extension(pool)
	if err != nil {
		t.Fatal(err)
	}
	ext, err := extension.NewRegistry(local.Info).Open(context.Background(), m, extension.Env{DataDir: filepath.Join(e.dataDir, pool)})
	if err != nil {
		t.Fatal(err)
	}
	return ext.(*local.Local)
}

// workspace makes the workspace of sandbox id as the backend does, dated
// age ago, and returns its directory.
func workspace(t *testing.T, l *local.Local, id string, age time.Duration) string {
	t.Helper()
	if _, err := l.Provision(context.Background(), extension.Profile{}, extension.Inputs{extension.InputSandboxID: id}, "localhost"); err != nil {
		t.Fatal(err)
	}
	dir := l.Dir(id)
	if age > 0 {
		at := time.Now().Add(-age)
		if err := os.Chtimes(dir, at, at); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// orderedID is a sandbox id that sorts by its rank: the reconciler
// considers a pool's sandboxes in id order.
func orderedID(rank, what string) string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return "sbx-" + rank + "-" + what + "-" + hex.EncodeToString(b)
}

// orphaned returns the orphaned events of the pool's sandbox id on the
// stream, whatever their consumer.
func (e *env) orphaned(t *testing.T, pool, id string) []event.Orphaned {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	filter := "sandboxer.evt.*." + pool + "." + id + "." + string(event.StateOrphaned)
	c, err := e.js.OrderedConsumer(ctx, event.StreamLifecycle, jetstream.OrderedConsumerConfig{FilterSubjects: []string{filter}})
	if err != nil {
		t.Fatal(err)
	}
	var out []event.Orphaned
	for {
		info, err := c.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if info.NumPending == 0 {
			return out
		}
		msg, err := c.Next(jetstream.FetchContext(ctx))
		if err != nil {
			t.Fatal(err)
		}
		_, ev, err := event.Decode(ctx, msg.Headers(), msg.Data())
		if err != nil {
			t.Fatal(err)
		}
		var o event.Orphaned
		if err := event.DataAs(ev, &o); err != nil {
			t.Fatal(err)
		}
		if lr, err := event.ParseLifecycleSubject(msg.Subject()); err != nil || !lr.Matches(o.Ref) {
			t.Fatalf("orphaned event on %s names %+v (%v)", msg.Subject(), o.Ref, err)
		}
		out = append(out, o)
	}
}

func gone(dir string) bool {
	_, err := os.Lstat(dir)
	return errors.Is(err, os.ErrNotExist)
}

// TestOrphanWithoutEventsTornDownOnce: workspaces no event names, older
// than the grace period, are orphans. Two workers of the pool race for
// them, listing every 10ms: each is announced once, by one of them, with
// its consumer unknown, and torn down.
func TestOrphanWithoutEventsTornDownOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t, localManifest("local", 5*time.Second))
	l := e.backend(t, "local")
	dirs := map[string]string{}
	for i := range 8 {
		id := orderedID(string(rune('a'+i)), "orphan")
		dirs[id] = workspace(t, l, id, time.Hour)
	}
	reg := extension.NewRegistry(local.Info)
	stops := []func(){
		e.reconciling(t, reg, "local", "w1", 10*time.Millisecond, time.Minute),
		e.reconciling(t, reg, "local", "w2", 10*time.Millisecond, time.Minute),
	}
	for id, dir := range dirs {
		eventually(t, 20*time.Second, func() bool { return gone(dir) }, "orphan "+id+" torn down")
	}
	for _, stop := range stops {
		stop() // every round over: nothing more can be announced
	}
	for id, dir := range dirs {
		got := e.orphaned(t, "local", id)
		if len(got) != 1 {
			t.Fatalf("orphan %s announced %d times, want once: %+v", id, len(got), got)
		}
		o := got[0]
		want := event.Ref{SandboxID: id, Consumer: event.Unrouted, Profile: event.Unrouted, Extension: "local", Host: "localhost"}
		if o.Ref.SandboxID != want.SandboxID || o.Consumer != want.Consumer || o.Profile != want.Profile || o.Extension != want.Extension || o.Host != want.Host {
			t.Errorf("orphan announced as %+v, want %+v", o.Ref, want)
		}
		if o.Reason != event.ReasonNoEvents || o.Handle.SandboxID != id || !slices.Contains(o.Held, "dir:"+dir) ||
			(o.Worker != "w1" && o.Worker != "w2") || o.HeldSince.IsZero() || time.Since(o.HeldSince) < 59*time.Minute {
			t.Errorf("orphaned event %+v", o)
		}
	}
}

// TestOrphanAfterDestroyedAndOwnedLeftAlone: in one round, a ready
// sandbox (a live record owns it) and a workspace younger than the grace
// period with no event (a create in flight) are left alone, and the
// workspace of a sandbox whose events end destroyed is torn down and
// announced with the destroyed event's consumer and profile. The ids sort
// in that order, so the leftover is considered last in its round.
func TestOrphanAfterDestroyedAndOwnedLeftAlone(t *testing.T) {
	t.Parallel()
	e := newEnv(t, localManifest("local", 5*time.Second))
	reg := extension.NewRegistry(local.Info)
	stop := e.reconciling(t, reg, "local", "w1", 10*time.Millisecond, time.Minute)

	// A live sandbox, made through the pool.
	live := orderedID("1", "live")
	e.publishCreate(t, "local", live, nil)
	var ready event.Ready
	seen := e.awaitEvent(t, live, event.StateReady)
	if err := event.DataAs(seen[len(seen)-1], &ready); err != nil {
		t.Fatal(err)
	}

	// A create in flight: its workspace is there, its first event not yet.
	l := e.backend(t, "local")
	young := workspace(t, l, orderedID("2", "young"), 0)

	// A sandbox destroyed, as its events say, whose workspace was left.
	left := orderedID("3", "leftover")
	dir := workspace(t, l, left, 0)
	ref := event.Ref{SandboxID: left, Consumer: "dev", Profile: "local", Extension: "local", Host: "localhost"}
	h := extension.Handle{SandboxID: left, Host: "localhost"}
	pub := bus.NewPublisher(e.js)
	for _, ev := range []struct {
		s    event.State
		data any
	}{
		{event.StateProvisioning, event.Provisioning{Ref: ref, Worker: "gone", Attempt: 1}},
		{event.StateReady, event.Ready{Ref: ref, Handle: h, Reachability: event.Reachability{Host: "localhost", RemoteDir: dir}, ReadyAt: time.Now().UTC()}},
		{event.StateDestroying, event.Destroying{Ref: ref, Reason: event.ReasonRequested}},
		{event.StateDestroyed, event.Destroyed{Ref: ref, Reason: event.ReasonRequested, Cleanup: event.CleanupReport{AlreadyGone: true}}},
	} {
		evt, err := event.New(event.LifecycleType(ev.s), "/test", left, left+"."+string(ev.s), ev.data)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := pub.Publish(context.Background(), ref.LifecycleSubject(ev.s), evt); err != nil {
			t.Fatal(err)
		}
	}

	eventually(t, 20*time.Second, func() bool { return gone(dir) }, "the destroyed sandbox's workspace torn down")
	stop()
	got := e.orphaned(t, "local", left)
	if len(got) != 1 {
		t.Fatalf("leftover announced %d times, want once: %+v", len(got), got)
	}
	if o := got[0]; o.Ref.SandboxID != left || o.Consumer != "dev" || o.Profile != "local" || o.Reason != string(event.StateDestroyed) || o.Worker != "w1" {
		t.Errorf("leftover announced as %+v", o)
	}
	for what, d := range map[string]string{"the live sandbox's": ready.Reachability.RemoteDir, "the young": young} {
		if gone(d) {
			t.Errorf("%s workspace %s was torn down", what, d)
		}
		id := filepath.Base(d)
		if got := e.orphaned(t, "local", id); len(got) != 0 {
			t.Errorf("%s sandbox %s announced as an orphan: %+v", what, id, got)
		}
	}
	if !strings.HasPrefix(filepath.Base(ready.Reachability.RemoteDir), live) {
		t.Fatalf("the live sandbox's workspace is %s", ready.Reachability.RemoteDir)
	}
}
