package registry_test

import (
	"errors"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
	"github.com/sand-boxer/sandboxer/services/registry"
)

// testRef is the reference of test sandbox id, as lifecycleEvent has it.
func testRef(id string) event.Ref {
	return event.Ref{SandboxID: id, Consumer: "team-a", Profile: "echo", Extension: testExt, Host: "localhost"}
}

// publishDestroying publishes the destroying event of attempt n of
// sandbox id: its start (errMsg empty, id DestroyingID) or its failure on
// every delivery (id TeardownFailedID), as a worker does.
func (e *env) publishDestroying(t *testing.T, id string, n int, errMsg string) uint64 {
	t.Helper()
	eid := event.DestroyingID(id, n)
	if errMsg != "" {
		eid = event.TeardownFailedID(id, n)
	}
	ev, err := event.New(event.TypeDestroying, workerA, id, eid,
		event.Destroying{Ref: testRef(id), Reason: event.ReasonRequested, Attempt: n, Error: errMsg, Deliveries: 3})
	if err != nil {
		t.Fatal(err)
	}
	ack, err := e.pub.Publish(testCtx(t, 5*time.Second), testRef(id).LifecycleSubject(event.StateDestroying), ev)
	if err != nil {
		t.Fatal(err)
	}
	return ack.Sequence
}

// destroyCommands are the destroy commands of sandbox id on the commands
// stream (no worker takes them here), in order.
func (e *env) destroyCommands(t *testing.T, id string) []event.Destroy {
	t.Helper()
	ctx := testCtx(t, 5*time.Second)
	s, err := e.js.Stream(ctx, event.StreamCommands)
	if err != nil {
		t.Fatal(err)
	}
	var out []event.Destroy
	for seq := uint64(1); ; {
		m, err := s.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(testRef(id).CommandSubject(event.VerbDestroy)))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return out
		}
		if err != nil {
			t.Fatalf("reading destroy commands of %s: %v", id, err)
		}
		seq = m.Sequence + 1
		_, ev, err := event.Decode(ctx, m.Header, m.Data)
		if err != nil {
			t.Fatal(err)
		}
		var d event.Destroy
		if err := event.DataAs(ev, &d); err != nil {
			t.Fatal(err)
		}
		if ev.ID() != event.DestroyID(id, d.Attempt) {
			t.Errorf("destroy command of attempt %d has id %q, want %q", d.Attempt, ev.ID(), event.DestroyID(id, d.Attempt))
		}
		out = append(out, d)
	}
}

// awaitAttempt waits until sandbox id's destroy command of attempt n is
// stored and returns every destroy command of it.
func (e *env) awaitAttempt(t *testing.T, id string, n int, d time.Duration) []event.Destroy {
	t.Helper()
	var cmds []event.Destroy
	eventually(t, d, func() (bool, string) {
		cmds = e.destroyCommands(t, id)
		for _, c := range cmds {
			if c.Attempt == n {
				return true, ""
			}
		}
		return false, "no destroy command of attempt " + itoa(uint64(n))
	})
	return cmds
}

func TestRetryDelay(t *testing.T) {
	t.Parallel()
	reg, err := registry.New(registry.Options{JS: natstest.Start(t).JetStream(t), RetryBase: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	for failed, want := range []time.Duration{30 * time.Second, time.Minute, 2 * time.Minute, 4 * time.Minute, 8 * time.Minute, 10 * time.Minute, 10 * time.Minute} {
		if got := reg.RetryDelay(failed); got != want {
			t.Errorf("after attempt %d failed: %s, want %s", failed, got, want)
		}
	}
	if got := reg.RetryDelay(1000); got != 10*time.Minute {
		t.Errorf("after attempt 1000 failed: %s, want the cap", got)
	}
}

// TestDestroyRetry: a teardown that failed on every delivery keeps the
// sandbox destroying with the error on its record; the registry's retry
// fires the next attempt's destroy command (its own id), again after
// that attempt fails, and nothing more once the sandbox is destroyed.
func TestDestroyRetry(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	e := start(t, srv, func(o *registry.Options) { o.RetryBase = time.Second; o.ReconcileInterval = -1 })
	const id = "sbx-retry"
	e.publishState(t, workerA, id, event.StateProvisioning, time.Time{})
	e.publishState(t, workerA, id, event.StateReady, time.Time{})
	e.publishDestroying(t, id, 0, "")
	e.publishDestroying(t, id, 0, "backend says no")

	rec := e.awaitRecord(t, id, 5*time.Second, func(r *sandbox.Record) bool { return r.TeardownError != "" })
	if rec.State != event.StateDestroying || rec.TeardownError != "backend says no" || !rec.TeardownStuck() || rec.TeardownFailedAt.IsZero() {
		t.Fatalf("record after the failed teardown: %+v", rec)
	}
	sched := e.lastMsg(t, event.StreamTimers, event.RetryScheduleSubject(id))
	if sched != nil && sched.Header.Get("Nats-Schedule-Target") != event.RetryFireSubject(id) {
		t.Errorf("retry schedule target %q", sched.Header.Get("Nats-Schedule-Target"))
	}
	cmds := e.awaitAttempt(t, id, 1, 10*time.Second)
	if len(cmds) != 1 || cmds[0].Reason != event.ReasonRequested || cmds[0].RequestedBy != "registry" {
		t.Fatalf("destroy commands after the first failure: %+v", cmds)
	}
	rec = e.awaitRecord(t, id, 5*time.Second, func(r *sandbox.Record) bool { return r.DestroyAttempt == 1 })
	if rec.TeardownStuck() || rec.TeardownError != "backend says no" {
		t.Errorf("record with attempt 1 out: stuck %v, error %q", rec.TeardownStuck(), rec.TeardownError)
	}

	// Attempt 1 fails too: attempt 2 follows, after twice the back-off.
	e.publishDestroying(t, id, 1, "")
	e.publishDestroying(t, id, 1, "still no")
	retry := e.awaitRecord(t, id, 5*time.Second, func(r *sandbox.Record) bool { return r.TeardownError == "still no" }).TeardownFailedAt
	cmds = e.awaitAttempt(t, id, 2, 15*time.Second)
	if len(cmds) != 2 {
		t.Fatalf("destroy commands after the second failure: %+v", cmds)
	}
	rec = e.awaitRecord(t, id, 5*time.Second, func(r *sandbox.Record) bool { return r.DestroyAttempt == 2 })
	if rec.UpdatedAt.Sub(retry) < time.Second {
		t.Errorf("attempt 2 went %s after attempt 1 failed, less than the 2s back-off allows (to the second)", rec.UpdatedAt.Sub(retry))
	}

	// Attempt 2 succeeds. A failure of attempt 2 reported after the end
	// (a redelivery) schedules nothing.
	e.publishDestroying(t, id, 2, "")
	e.publishState(t, workerA, id, event.StateDestroyed, time.Time{})
	e.awaitRecord(t, id, 5*time.Second, inState(event.StateDestroyed))
	last := e.publishDestroying(t, id, 2, "late news")
	e.awaitAcked(t, event.StreamLifecycle, registry.ConsumerInventory, last)
	if m := e.schedule(t, event.RetryScheduleSubject(id)); m != nil {
		t.Errorf("a retry is scheduled after the sandbox was destroyed: %s", m.Header.Get("ce-id"))
	}
	// A retry that fires after the end (published by hand, as a lost
	// purge would leave it) sends nothing.
	ev, err := event.New(event.TypeRetry, "/sandboxer/registry", id, id+".retry.3",
		event.Retry{Ref: testRef(id), Reason: event.ReasonRequested, Attempt: 3, RetryAt: time.Now().UTC()})
	if err != nil {
		t.Fatal(err)
	}
	ack, err := e.pub.Publish(testCtx(t, 5*time.Second), event.RetryFireSubject(id), ev)
	if err != nil {
		t.Fatal(err)
	}
	e.awaitAcked(t, event.StreamTimers, registry.ConsumerTimers, ack.Sequence)
	if cmds := e.destroyCommands(t, id); len(cmds) != 2 {
		t.Errorf("destroy commands after the end: %+v, want the two retries only", cmds)
	}
}

// TestRetryReplayed: the retry timer of an attempt delivered again (a
// dead letter replayed, a redelivery) after its attempt went out sends
// no second command; after a later attempt went out, none either.
func TestRetryReplayed(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	e := start(t, srv, func(o *registry.Options) { o.RetryBase = time.Second; o.ReconcileInterval = -1 })
	const id = "sbx-retry-replayed"
	e.publishState(t, workerA, id, event.StateProvisioning, time.Time{})
	e.publishState(t, workerA, id, event.StateReady, time.Time{})
	e.publishDestroying(t, id, 0, "")
	e.publishDestroying(t, id, 0, "boom")
	e.awaitAttempt(t, id, 1, 10*time.Second)
	e.publishDestroying(t, id, 1, "")
	e.awaitRecord(t, id, 5*time.Second, func(r *sandbox.Record) bool { return r.DestroyAttempt == 1 })
	for _, n := range []int{1, 1} {
		ev, err := event.New(event.TypeRetry, "/sandboxer/registry", id, id+".retry."+itoa(uint64(n))+".replayed."+itoa(uint64(time.Now().UnixNano())),
			event.Retry{Ref: testRef(id), Reason: event.ReasonRequested, Attempt: n, RetryAt: time.Now().UTC()})
		if err != nil {
			t.Fatal(err)
		}
		ack, err := e.pub.Publish(testCtx(t, 5*time.Second), event.RetryFireSubject(id), ev)
		if err != nil {
			t.Fatal(err)
		}
		e.awaitAcked(t, event.StreamTimers, registry.ConsumerTimers, ack.Sequence)
	}
	if cmds := e.destroyCommands(t, id); len(cmds) != 1 {
		t.Errorf("destroy commands: %+v, want attempt 1's once", cmds)
	}
}

// deadlineProfile is the test profile with short create deadlines.
const deadlineProfile = `slug: echo
extension: echo
isolation: process
deadlines:
  provision: 1s
  ready: 1s
  teardown: 2s
`

// TestReconcile: sandboxes past their state's deadline are failed (a
// create: failed event, destroy command), get a fresh destroy attempt
// (failed, destroying) or are expired (ready past its expiry), by exactly
// one of two registries reconciling at once; a sandbox within its deadline is left alone, and a second round
// changes nothing.
func TestReconcile(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	profDir := filepath.Join(t.TempDir(), "profiles")
	writeFiles(t, profDir, map[string]string{"profile.echo.yaml": deadlineProfile})
	opts := func(o *registry.Options) {
		o.ProfilesDir = profDir
		o.ReconcileInterval = -1
		o.DeadlineGrace = -1
		o.RetryBase = time.Hour // no retry fires in this test: the reconciler must
	}
	// Everything happened before these registries started, and was
	// projected by one that lost its schedules: the durable has it all
	// acknowledged, only the lifecycle stream says where each sandbox is.
	srv.Setup(t, registry.Consumers(testPolicy)...)
	pub := bus.NewPublisher(srv.JetStream(t))
	long := time.Now().UTC().Add(-time.Hour)
	publishAt := func(id string, s event.State, at, expiresAt time.Time) {
		t.Helper()
		var ev *event.Event
		if s == event.StateRequested {
			var err error
			if ev, err = event.New(event.TypeRequested, "/sandboxer/gateway", id, id+".requested",
				event.Requested{Ref: testRef(id), RequestedAt: at}); err != nil {
				t.Fatal(err)
			}
		} else {
			ev = lifecycleEvent(t, workerA, id, s, expiresAt)
		}
		ev.SetTime(at)
		if _, err := pub.Publish(testCtx(t, 5*time.Second), testRef(id).LifecycleSubject(s), ev); err != nil {
			t.Fatal(err)
		}
	}
	// requested: only the gateway's record, written an hour ago.
	const requested = "sbx-late-requested"
	publishAt(requested, event.StateRequested, long, time.Time{})
	// provisioning for an hour, and one that just started.
	const provisioning, fresh = "sbx-late-provisioning", "sbx-fresh-provisioning"
	publishAt(provisioning, event.StateProvisioning, long, time.Time{})
	publishAt(fresh, event.StateProvisioning, time.Now().UTC(), time.Time{})
	// failed an hour ago, its destroy lost; destroying for an hour.
	const failed, destroying = "sbx-late-failed", "sbx-late-destroying"
	publishAt(failed, event.StateProvisioning, long, time.Time{})
	publishAt(failed, event.StateFailed, long, time.Time{})
	publishAt(destroying, event.StateProvisioning, long, time.Time{})
	publishAt(destroying, event.StateReady, long, time.Time{})
	publishAt(destroying, event.StateDestroying, long, time.Time{})
	// ready past its expiry, its schedule lost: only its events say so.
	const ready = "sbx-late-ready"
	publishAt(ready, event.StateProvisioning, long, time.Time{})
	publishAt(ready, event.StateReady, long, long.Add(time.Minute))
	// Those of them the durable takes: ready (2), failed is not, destroying (1).
	drain(t, srv, event.StreamLifecycle, registry.ConsumerInventory, 3)
	a := start(t, srv, opts)
	b := start(t, srv, opts)
	for id, s := range map[string]event.State{provisioning: event.StateProvisioning, fresh: event.StateProvisioning, failed: event.StateFailed, destroying: event.StateDestroying} {
		a.awaitRecord(t, id, 5*time.Second, inState(s))
	}

	var (
		wg     sync.WaitGroup
		counts [2]int
	)
	for i, e := range []*env{a, b} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n, err := e.reg.Reconcile(testCtx(t, 10*time.Second))
			if err != nil {
				t.Errorf("registry %d: %v", i, err)
			}
			counts[i] = n
		}()
	}
	wg.Wait()
	t.Logf("stepped in: %d and %d", counts[0], counts[1])
	if counts[0]+counts[1] < 5 {
		t.Errorf("the registries stepped in for %d sandboxes together, want at least the 5 late ones", counts[0]+counts[1])
	}
	r := a.awaitRecord(t, ready, 5*time.Second, inState(event.StateExpired))
	if r.Reason != registry.ExpiredReason {
		t.Errorf("ready past its expiry: %s, reason %q", r.State, r.Reason)
	}
	if n := countMsgs(t, a, event.StreamLifecycle, testRef(ready).LifecycleSubject(event.StateExpired)); n != 1 {
		t.Errorf("%d expired events, want 1", n)
	}
	if cmds := a.destroyCommands(t, ready); len(cmds) != 1 || cmds[0].Reason != event.ReasonExpired {
		t.Errorf("ready past its expiry: destroy commands %+v", cmds)
	}

	for _, id := range []string{requested, provisioning} {
		r := a.awaitRecord(t, id, 5*time.Second, inState(event.StateFailed))
		if r.Reason == "" {
			t.Errorf("%s: failed without a reason", id)
		}
		if n := countMsgs(t, a, event.StreamLifecycle, testRef(id).LifecycleSubject(event.StateFailed)); n != 1 {
			t.Errorf("%s: %d failed events, want 1", id, n)
		}
		if cmds := a.destroyCommands(t, id); len(cmds) != 1 || cmds[0].Reason != event.ReasonFailed || cmds[0].Attempt != 0 {
			t.Errorf("%s: destroy commands %+v, want one of attempt 0 for failed", id, cmds)
		}
	}
	for id, reason := range map[string]string{failed: event.ReasonFailed, destroying: event.ReasonRequested} {
		if cmds := a.destroyCommands(t, id); len(cmds) != 1 || cmds[0].Attempt != 1 || cmds[0].Reason != reason {
			t.Errorf("%s: destroy commands %+v, want attempt 1 once, reason %s", id, cmds, reason)
		}
		if r, _, err := readRecord(t, a, id); err != nil || r.DestroyAttempt != 1 {
			t.Errorf("%s: record %+v, %v; want attempt 1 claimed", id, r, err)
		}
	}
	if cmds := a.destroyCommands(t, fresh); len(cmds) != 0 {
		t.Errorf("a sandbox within its deadline got destroy commands: %+v", cmds)
	}
	if r, _, err := readRecord(t, a, fresh); err != nil || r.State != event.StateProvisioning {
		t.Errorf("a sandbox within its deadline: %+v, %v", r, err)
	}

	// A round right after changes nothing: the failed ones have just
	// failed, the re-driven ones have an attempt under way.
	if n, err := a.reg.Reconcile(testCtx(t, 10*time.Second)); err != nil || n != 0 {
		t.Errorf("second round: %d, %v; want nothing to do", n, err)
	}
}

// drain acknowledges the n messages pending on durable of stream, as a
// consumer that handled them would.
func drain(t *testing.T, srv *natstest.Server, stream, durable string, n int) {
	t.Helper()
	ctx := testCtx(t, 10*time.Second)
	c, err := srv.JetStream(t).Consumer(ctx, stream, durable)
	if err != nil {
		t.Fatal(err)
	}
	batch, err := c.Fetch(n, jetstream.FetchMaxWait(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	got := 0
	for m := range batch.Messages() {
		if err := m.DoubleAck(ctx); err != nil {
			t.Fatal(err)
		}
		got++
	}
	if got != n {
		t.Fatalf("drained %d messages of %s, want %d", got, durable, n)
	}
}

// countMsgs counts the messages on subject in stream.
func countMsgs(t *testing.T, e *env, stream, subject string) uint64 {
	t.Helper()
	ctx := testCtx(t, 5*time.Second)
	c, err := e.js.OrderedConsumer(ctx, stream, jetstream.OrderedConsumerConfig{FilterSubjects: []string{subject}})
	if err != nil {
		t.Fatal(err)
	}
	info, err := c.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return info.NumPending
}
