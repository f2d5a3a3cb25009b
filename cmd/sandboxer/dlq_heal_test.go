package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/catalog"
	"github.com/sand-boxer/sandboxer/pkg/credits"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/echo"
	"github.com/sand-boxer/sandboxer/pkg/inventory"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
	"github.com/sand-boxer/sandboxer/services/metering"
	"github.com/sand-boxer/sandboxer/services/provisioner"
	"github.com/sand-boxer/sandboxer/services/registry"
)

// healSystem is a registry, a metering service and an echo pool on a
// test server, each as its own identity, with bounds short enough for a
// test to exhaust deliveries and see retries: every command gets one
// delivery, a failed teardown is retried after 1s, 2s, ...
type healSystem struct {
	srv   *natstest.Server
	js    jetstream.JetStream // the test's, as admin
	pub   *bus.Publisher
	cat   *extension.Catalog
	meter *credits.Client
	pool  *provisioner.Provisioner
}

// healPolicy is every durable's: one delivery, so the first failure
// exhausts a command.
var healPolicy = bus.ConsumerPolicy{AckWait: 5 * time.Second, MaxDeliver: 1, Backoff: []time.Duration{50 * time.Millisecond}}

func startHealSystem(t *testing.T) *healSystem {
	t.Helper()
	srv := natstest.Start(t)
	ctx := testContext(t)
	m := echo.Manifest("echo")
	cat := &extension.Catalog{
		Extensions: map[string]*extension.Manifest{"echo": m},
		Profiles: map[string]*extension.Profile{"echo": {Slug: "echo", Extension: "echo", Isolation: extension.IsolationProcess,
			Price: &extension.Price{PerSecond: 1}}},
	}
	specs := append(registry.Consumers(healPolicy), metering.Consumers(healPolicy)...)
	for _, s := range provisioner.Consumers(cat) {
		s.Policy = healPolicy
		specs = append(specs, s)
	}
	srv.Setup(t, specs...)
	h := &healSystem{srv: srv, js: srv.JetStream(t), cat: cat}
	h.pub = bus.NewPublisher(h.js)

	regJS := jsOf(t, srv, auth.Identity{Role: auth.RoleRegistry})
	reg, err := registry.New(registry.Options{JS: regJS, Catalog: cat, Extensions: extension.NewRegistry(echo.Info),
		Policy: healPolicy, RetryBase: time.Second, ReconcileInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	if err := reg.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = reg.Shutdown(context.Background()) })
	met, err := metering.New(metering.Options{JS: jsOf(t, srv, auth.Identity{Role: auth.RoleMetering}), Policy: healPolicy, AccrualInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if err := met.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = met.Shutdown(context.Background()) })
	h.meter = credits.NewClient(srv.ConnAs(t, auth.Identity{Role: auth.RoleGateway}))
	h.pool = h.startPool(t)
	return h
}

// jsOf is a JetStream context connected as id.
func jsOf(t *testing.T, srv *natstest.Server, id auth.Identity) jetstream.JetStream {
	t.Helper()
	js, err := jetstream.New(srv.ConnAs(t, id))
	if err != nil {
		t.Fatal(err)
	}
	return js
}

// startPool starts a worker of the echo pool, shut down by t.Cleanup
// unless the test does it first.
func (h *healSystem) startPool(t *testing.T) *provisioner.Provisioner {
	t.Helper()
	ctx := testContext(t)
	nc := h.srv.ConnAs(t, auth.Identity{Role: auth.RoleProvisioner, Extension: "echo"})
	fctx, stop := context.WithCancel(context.Background())
	t.Cleanup(stop)
	cc, err := catalog.Follow(fctx, nc)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-cc.Ready():
	case <-ctx.Done():
		t.Fatal("catalog not readable")
	}
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	p, err := provisioner.New(provisioner.Options{JS: js, Catalog: cc, Extensions: extension.NewRegistry(echo.Info),
		Pools: []string{"echo"}, DataDir: t.TempDir(), OrphanInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Shutdown(context.Background()) })
	return p
}

// create admits sandbox id for consumer dev and publishes its create
// command, as the gateway does.
func (h *healSystem) create(t *testing.T, id string, inputs map[string]string) event.Ref {
	t.Helper()
	ctx := testContext(t)
	ref := event.Ref{SandboxID: id, Consumer: DevConsumer, Profile: "echo", Extension: "echo", Host: "localhost"}
	hr, err := h.meter.Hold(ctx, credits.HoldRequest{SandboxID: id, Consumer: DevConsumer, Profile: "echo", Extension: "echo", TTLSeconds: 60})
	if err != nil {
		t.Fatal(err)
	}
	cr := event.Create{Ref: ref, Inputs: inputs, TTLSeconds: 60, RequestedAt: time.Now().UTC(), Hold: hr.Hold}
	ev, err := event.New(event.TypeCreate, "/sandboxer/gateway", id, id+"."+event.VerbCreate, cr)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.pub.Publish(ctx, ref.CommandSubject(event.VerbCreate), ev); err != nil {
		t.Fatal(err)
	}
	return ref
}

// record polls sandbox id's record, the fold of its lifecycle events,
// until ok holds.
func (h *healSystem) record(t *testing.T, id, what string, ok func(*sandbox.Record) bool) *sandbox.Record {
	t.Helper()
	var rec *sandbox.Record
	awaitCond(t, id+": "+what, func() bool {
		var err error
		rec, err = inventory.Read(testContext(t), h.js.Conn(), event.SandboxFilter(id))
		return err == nil && rec != nil && ok(rec)
	})
	return rec
}

// count is how many messages of stream are on subject.
func (h *healSystem) count(t *testing.T, stream, subject string) uint64 {
	t.Helper()
	ctx := testContext(t)
	s, err := h.js.Stream(ctx, stream)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(subject))
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Subjects[subject]
}

// deadLetters are the dead letters of sandbox id, by their sequence.
func (h *healSystem) deadLetters(t *testing.T, id string) []deadLetter {
	t.Helper()
	ctx := testContext(t)
	s, err := h.js.Stream(ctx, event.StreamDLQ)
	if err != nil {
		t.Fatal(err)
	}
	all, err := listDeadLetters(ctx, s, "", 1000)
	if err != nil {
		t.Fatal(err)
	}
	var out []deadLetter
	for _, d := range all {
		if ref, err := event.ParseCommandSubject(d.Subject); err == nil && ref.Sandbox == id {
			out = append(out, d)
		}
	}
	return out
}

// idle waits until every durable has handled everything it was given.
func (h *healSystem) idle(t *testing.T) {
	t.Helper()
	ctx := testContext(t)
	awaitCond(t, "every durable idle", func() bool {
		for _, sc := range [][2]string{
			{event.StreamCommands, bus.DurableProvisioner("echo")},
			{event.StreamLifecycle, registry.ConsumerInventory}, {event.StreamTimers, registry.ConsumerTimers},
			{event.StreamLifecycle, metering.ConsumerLifecycle}, {event.StreamTimers, metering.ConsumerAccrual},
		} {
			c, err := h.js.Consumer(ctx, sc[0], sc[1])
			if err != nil {
				return false
			}
			info, err := c.Info(ctx)
			if err != nil || info.NumPending > 0 || info.NumAckPending > 0 {
				return false
			}
		}
		return true
	})
}

// ledger is consumer dev's ledger, as the credits API answers it.
func (h *healSystem) ledger(t *testing.T) []credits.Entry {
	t.Helper()
	r, err := h.meter.Ledger(testContext(t), credits.LedgerRequest{Consumer: DevConsumer})
	if err != nil {
		t.Fatal(err)
	}
	return r.Entries
}

// replayCLI runs `sandboxer dlq replay` for the dead letters given, as
// an operator does, with admin credentials.
func (h *healSystem) replayCLI(t *testing.T, letters []deadLetter) {
	t.Helper()
	creds := filepath.Join(t.TempDir(), "admin.creds")
	if err := os.WriteFile(creds, h.srv.Creds(t, natstest.Admin), 0o600); err != nil {
		t.Fatal(err)
	}
	args := []string{"dlq", "replay", "--nats", h.srv.ClientURL(), "--creds", creds}
	for _, d := range letters {
		args = append(args, strconv.FormatUint(d.Seq, 10))
	}
	root := newRoot()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	if err := root.ExecuteContext(testContext(t)); err != nil {
		t.Fatalf("dlq replay: %v\n%s", err, out.String())
	}
	t.Logf("dlq replay: %s", out.String())
}

// summary is what must not change when a dead letter is replayed: each
// lifecycle state's events, the destroy commands' attempts, the ledger.
func (h *healSystem) summary(t *testing.T, ref event.Ref) string {
	t.Helper()
	var b bytes.Buffer
	for _, s := range []event.State{event.StateProvisioning, event.StateReady, event.StateFailed, event.StateDestroying, event.StateDestroyed, event.StateRejected} {
		fmt.Fprintf(&b, "%s=%d ", s, h.count(t, event.StreamLifecycle, ref.LifecycleSubject(s)))
	}
	for _, e := range h.ledger(t) {
		if e.Sandbox == ref.SandboxID {
			fmt.Fprintf(&b, "%s:%d ", e.Kind, e.Amount)
		}
	}
	bal, err := h.meter.Balance(testContext(t), DevConsumer)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(&b, "balance=%d held=%d", bal.Balance, bal.Held)
	return b.String()
}

// TestSelfHealing forces each path of giving up for real and checks the
// sandbox ends as it must, then replays every dead letter with the CLI
// and checks nothing doubles:
//   - a create whose one delivery fails (its worker shuts down mid
//     Provision) ends failed, then destroyed, and its hold is released;
//   - a destroy whose teardown fails (ext.echo's fail_teardown 2) stays
//     destroying with the error on its record, is retried by the
//     registry with back-off, and ends destroyed once the backend lets
//     it, charged once.
func TestSelfHealing(t *testing.T) {
	h := startHealSystem(t)
	ctx := testContext(t)
	if _, err := h.meter.Grant(ctx, credits.GrantRequest{Consumer: DevConsumer, Amount: 10_000, ID: "heal"}); err != nil {
		t.Fatal(err)
	}

	// A create dead-lettered: its worker goes away mid-Provision, on the
	// command's only delivery.
	slow := h.create(t, sandbox.NewID(), map[string]string{"delay": "1h"})
	h.record(t, slow.SandboxID, "provisioning", func(r *sandbox.Record) bool { return r.State == event.StateProvisioning })
	sctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	_ = h.pool.Shutdown(sctx) // cancels the Provision in flight: its delivery fails
	cancel()
	h.pool = h.startPool(t)
	rec := h.record(t, slow.SandboxID, "destroyed", func(r *sandbox.Record) bool { return r.State == event.StateDestroyed })
	if !slicesContain(states(rec), event.StateFailed) || rec.Reason == "" {
		t.Errorf("the dead-lettered create: history %v, reason %q; want failed on the way, with a reason", states(rec), rec.Reason)
	}
	if dl := h.deadLetters(t, slow.SandboxID); len(dl) != 1 || dl[0].Consumer != bus.DurableProvisioner("echo") {
		t.Fatalf("dead letters of the create: %+v", dl)
	}
	h.idle(t)
	bal, err := h.meter.Balance(ctx, DevConsumer)
	if err != nil {
		t.Fatal(err)
	}
	if bal.Held != 0 || bal.Balance != 10_000 {
		t.Errorf("after the failed create: balance %d, held %d; want 10000 and 0 (released, nothing charged)", bal.Balance, bal.Held)
	}

	// A destroy dead-lettered twice: teardown fails on attempts 0 and 1,
	// then succeeds on the registry's second retry.
	stubborn := h.create(t, sandbox.NewID(), map[string]string{"fail_teardown": "2"})
	h.record(t, stubborn.SandboxID, "ready", func(r *sandbox.Record) bool { return r.State == event.StateReady })
	destroy, err := event.New(event.TypeDestroy, "/sandboxer/gateway", stubborn.SandboxID, event.DestroyID(stubborn.SandboxID, 0),
		event.Destroy{Ref: stubborn, Reason: event.ReasonRequested, RequestedBy: DevConsumer, RequestedAt: time.Now().UTC()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.pub.Publish(ctx, stubborn.CommandSubject(event.VerbDestroy), destroy); err != nil {
		t.Fatal(err)
	}
	stuck := h.record(t, stubborn.SandboxID, "destroying with the teardown's error", func(r *sandbox.Record) bool { return r.TeardownError != "" })
	if stuck.State != event.StateDestroying {
		t.Errorf("after a failed teardown: state %s, want destroying", stuck.State)
	}
	t.Logf("stuck: attempt %d, error %q", stuck.DestroyAttempt, stuck.TeardownError)
	rec = h.record(t, stubborn.SandboxID, "destroyed", func(r *sandbox.Record) bool { return r.State == event.StateDestroyed })
	if rec.DestroyAttempt != 2 || rec.TeardownFailedAttempt != 1 || rec.TeardownError == "" {
		t.Errorf("destroyed after retries: attempt %d, last failure of attempt %d (%q); want 2, 1", rec.DestroyAttempt, rec.TeardownFailedAttempt, rec.TeardownError)
	}
	if dl := h.deadLetters(t, stubborn.SandboxID); len(dl) != 2 {
		t.Fatalf("dead letters of the destroy: %d, want attempts 0 and 1", len(dl))
	}
	h.idle(t)
	if n := h.count(t, event.StreamLifecycle, stubborn.LifecycleSubject(event.StateDestroyed)); n != 1 {
		t.Errorf("%d destroyed events, want 1", n)
	}
	if bal, err = h.meter.Balance(ctx, DevConsumer); err != nil || bal.Held != 0 {
		t.Errorf("after the destroy: %+v, %v; want nothing held", bal, err)
	}

	// Every dead letter replayed by an operator: nothing doubles.
	before := map[string]string{slow.SandboxID: h.summary(t, slow), stubborn.SandboxID: h.summary(t, stubborn)}
	letters := append(h.deadLetters(t, slow.SandboxID), h.deadLetters(t, stubborn.SandboxID)...)
	h.replayCLI(t, letters)
	awaitCond(t, "the dead letters replayed", func() bool {
		return len(h.deadLetters(t, slow.SandboxID))+len(h.deadLetters(t, stubborn.SandboxID)) == 0
	})
	h.idle(t)
	for _, ref := range []event.Ref{slow, stubborn} {
		if after := h.summary(t, ref); after != before[ref.SandboxID] {
			t.Errorf("replaying changed %s:\nbefore %s\nafter  %s", ref.SandboxID, before[ref.SandboxID], after)
		}
		if dl := h.deadLetters(t, ref.SandboxID); len(dl) != 0 {
			t.Errorf("replays of %s were dead-lettered again: %+v", ref.SandboxID, dl)
		}
	}
}

// states lists the states of a record's history.
func states(r *sandbox.Record) []event.State {
	out := make([]event.State, len(r.History))
	for i, tr := range r.History {
		out[i] = tr.State
	}
	return out
}

func slicesContain(ss []event.State, s event.State) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}
