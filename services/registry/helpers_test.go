package registry_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/goleak"

	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/echo"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
	"github.com/sand-boxer/sandboxer/services/registry"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// testExt is the extension of every test catalog.
const testExt = "echo"

// writeFiles writes name -> content into dir.
func writeFiles(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// testCatalog writes a valid catalog (ext.echo, profile.echo) and returns
// its directories.
func testCatalog(t *testing.T) (extDir, profDir string) {
	t.Helper()
	root := t.TempDir()
	extDir, profDir = filepath.Join(root, "extensions"), filepath.Join(root, "profiles")
	writeFiles(t, extDir, map[string]string{"ext.echo.yaml": goodManifest})
	writeFiles(t, profDir, map[string]string{"profile.echo.yaml": goodProfile})
	return extDir, profDir
}

const goodManifest = `name: echo
handler: echo
capabilities:
  isolation_levels: [process]
  pricing_model: self-hosted
`

const goodProfile = `slug: echo
extension: echo
isolation: process
`

// env is one bus and one running registry.
type env struct {
	srv *natstest.Server
	nc  *nats.Conn          // the registry's connection, as the registry
	js  jetstream.JetStream // the test's (admin) connection, for fixtures and checks
	reg *registry.Registry
	pub *bus.Publisher // publishes as the test, standing in for the other services
}

// testPolicy is the delivery policy of the test registries' durables.
var testPolicy = bus.ConsumerPolicy{AckWait: 5 * time.Second, Backoff: []time.Duration{50 * time.Millisecond}}

// start starts a registry on srv with a fresh connection, shut down by
// t.Cleanup (or earlier by stop).
func start(t *testing.T, srv *natstest.Server, opts ...func(*registry.Options)) *env {
	t.Helper()
	nc := srv.ConnAs(t, auth.Identity{Role: auth.RoleRegistry})
	regJS, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	js := srv.JetStream(t)
	extDir, profDir := testCatalog(t)
	o := registry.Options{
		JS: regJS, ExtensionsDir: extDir, ProfilesDir: profDir,
		Extensions: extension.NewRegistry(echo.Info),
		Policy:     testPolicy,
	}
	for _, f := range opts {
		f(&o)
	}
	srv.Setup(t, registry.Consumers(o.Policy)...)
	reg, err := registry.New(o)
	if err != nil {
		t.Fatal(err)
	}
	ctx := testCtx(t, 10*time.Second)
	if err := reg.Start(ctx); err != nil {
		t.Fatalf("starting registry: %v", err)
	}
	t.Cleanup(func() {
		if err := reg.Shutdown(context.Background()); err != nil {
			t.Errorf("shutting down registry: %v", err)
		}
	})
	return &env{srv: srv, nc: nc, js: js, reg: reg, pub: bus.NewPublisher(js)}
}

// stop shuts the registry down and closes its connection.
func (e *env) stop(t *testing.T) {
	t.Helper()
	if err := e.reg.Shutdown(testCtx(t, 10*time.Second)); err != nil {
		t.Fatalf("shutting down registry: %v", err)
	}
	e.nc.Close()
}

// testCtx is a context bounded by d and by the test.
func testCtx(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}

// eventually polls cond until it holds or d passes, then fails with the
// last reason cond gave.
func eventually(t *testing.T, d time.Duration, cond func() (bool, string)) {
	t.Helper()
	deadline := time.NewTimer(d)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, why := cond()
		if ok {
			return
		}
		select {
		case <-deadline.C:
			t.Fatalf("condition not met after %s: %s", d, why)
		case <-tick.C:
		}
	}
}

// lifecycleEvent builds the event announcing state for sandbox id, from
// source (one worker or another).
func lifecycleEvent(t *testing.T, source, id string, state event.State, expiresAt time.Time) *event.Event {
	t.Helper()
	ref := event.Ref{SandboxID: id, Consumer: "team-a", Profile: "echo", Extension: testExt, Host: "localhost"}
	var data any
	switch state {
	case event.StateProvisioning:
		data = event.Provisioning{Ref: ref, Worker: "w1", Attempt: 1}
	case event.StateReady:
		now := time.Now().UTC()
		var ttl int64
		if !expiresAt.IsZero() {
			ttl = int64(expiresAt.Sub(now).Round(time.Second) / time.Second)
		}
		data = event.Ready{
			Ref: ref, Handle: event.Handle{SandboxID: id, Host: "localhost"},
			Reachability: event.Reachability{Host: "localhost", RemoteDir: "/tmp/" + id},
			TTLSeconds:   ttl, ReadyAt: now, ExpiresAt: expiresAt,
		}
	case event.StateDestroying:
		data = event.Destroying{Ref: ref, Reason: event.ReasonRequested}
	case event.StateDestroyed:
		data = event.Destroyed{Ref: ref, Reason: event.ReasonRequested, Cleanup: event.CleanupReport{Removed: []string{"/tmp/" + id}}}
	case event.StateFailed:
		data = event.Failed{Ref: ref, Phase: "provision", Reason: "boom"}
	default:
		t.Fatalf("no test event for state %s", state)
	}
	e, err := event.New(event.LifecycleType(state), source, id, id+"."+string(state), data)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// publishState publishes the event announcing state and returns its
// stream sequence.
func (e *env) publishState(t *testing.T, source, id string, state event.State, expiresAt time.Time) uint64 {
	t.Helper()
	ev := lifecycleEvent(t, source, id, state, expiresAt)
	ack, err := e.pub.Publish(testCtx(t, 5*time.Second), event.LifecycleSubject("team-a", testExt, id, state), ev)
	if err != nil {
		t.Fatalf("publishing %s of %s: %v", state, id, err)
	}
	if ack.Duplicate {
		t.Fatalf("publishing %s of %s from %s: stream dropped it as a duplicate", state, id, source)
	}
	return ack.Sequence
}

// awaitRecord asks the registry for sandbox id, as its index folded it
// from the lifecycle stream, until its record satisfies ok.
func (e *env) awaitRecord(t *testing.T, id string, d time.Duration, ok func(*sandbox.Record) bool) *sandbox.Record {
	t.Helper()
	var last *sandbox.Record
	eventually(t, d, func() (bool, string) {
		// Between a server restart and the registry's reconnect, its
		// subscriptions are not there yet: asked again.
		if _, err := registry.FetchSandboxes(testCtx(t, 5*time.Second), e.js.Conn(), registry.SandboxesRequest{ID: id}); errors.Is(err, nats.ErrNoResponders) {
			return false, fmt.Sprintf("sandbox %s: no registry answering yet", id)
		}
		last = e.indexed(t, id)
		return last != nil && ok(last), fmt.Sprintf("sandbox %s: record not as awaited; last: %+v", id, last)
	})
	return last
}

// indexed is the record of sandbox id the registry answers with, or nil.
func (e *env) indexed(t *testing.T, id string) *sandbox.Record {
	t.Helper()
	reply, err := registry.FetchSandboxes(testCtx(t, 5*time.Second), e.js.Conn(), registry.SandboxesRequest{ID: id})
	if err != nil {
		t.Fatalf("asking for sandbox %s: %v", id, err)
	}
	if len(reply.Sandboxes) == 0 {
		return nil
	}
	return reply.Sandboxes[0]
}

func inState(s event.State) func(*sandbox.Record) bool {
	return func(r *sandbox.Record) bool { return r.State == s }
}

// awaitAcked waits until consumer on stream has acknowledged every message
// up to seq: the registry is done with them, whatever it did.
func (e *env) awaitAcked(t *testing.T, stream, consumer string, seq uint64) {
	t.Helper()
	ctx := testCtx(t, 10*time.Second)
	eventually(t, 10*time.Second, func() (bool, string) {
		c, err := e.js.Consumer(ctx, stream, consumer)
		if err != nil {
			return false, err.Error()
		}
		info, err := c.Info(ctx)
		if err != nil {
			return false, err.Error()
		}
		return info.AckFloor.Stream >= seq, "ack floor " + itoa(info.AckFloor.Stream) + " < " + itoa(seq)
	})
}

func itoa(n uint64) string { return strconv.FormatUint(n, 10) }

// lastMsg returns the last message on subject in stream, or nil.
func (e *env) lastMsg(t *testing.T, stream, subject string) *jetstream.RawStreamMsg {
	t.Helper()
	ctx := testCtx(t, 5*time.Second)
	s, err := e.js.Stream(ctx, stream)
	if err != nil {
		t.Fatal(err)
	}
	m, err := s.GetLastMsgForSubject(ctx, subject)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil
	}
	if err != nil {
		t.Fatalf("reading %s on %s: %v", subject, stream, err)
	}
	return m
}

// schedule returns the schedule stored on subject of the timers stream,
// or nil when there is none: no message, or a cancel's marker
// (bus.CancelSchedule), which carries no schedule and expires a second
// later.
func (e *env) schedule(t *testing.T, subject string) *jetstream.RawStreamMsg {
	t.Helper()
	m := e.lastMsg(t, event.StreamTimers, subject)
	if m == nil || m.Header.Get(jetstream.ScheduleHeader) == "" {
		return nil
	}
	return m
}

// states lists the states of a record's history.
func states(r *sandbox.Record) []event.State {
	out := make([]event.State, len(r.History))
	for i, tr := range r.History {
		out[i] = tr.State
	}
	return out
}

// checkOnce fails when a state appears twice in the history.
func checkOnce(t *testing.T, r *sandbox.Record) {
	t.Helper()
	seen := map[event.State]bool{}
	for _, s := range states(r) {
		if seen[s] {
			t.Errorf("sandbox %s: state %s entered twice: %v", r.ID, s, states(r))
		}
		seen[s] = true
	}
}
