package bus_test

import (
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
)

// TestSetupMigratesLegacySubjects starts from a bus the first version
// wrote, with subjects that did not carry the consumer and durables that
// had handled part of them. Setup moves every message to today's subject
// (the consumer from its own data), removes the originals, and each durable
// resumes where it was: the copies of what it had acknowledged are not
// delivered again, the rest are. A second setup moves nothing.
func TestSetupMigratesLegacySubjects(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	js := srv.JetStream(t)
	ctx := testCtx(t)
	pub := bus.NewPublisher(js)
	publish := func(subject string, typ event.Type, id string, data any) {
		t.Helper()
		e, err := event.New(typ, "/sandboxer/test", "", id, data)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := pub.Publish(ctx, subject, e); err != nil {
			t.Fatal(err)
		}
	}
	ref := func(id, consumer string) event.Ref {
		return event.Ref{SandboxID: id, Consumer: consumer, Profile: "local", Extension: "local", Host: "localhost"}
	}
	ready := func(id, consumer string) event.Ready {
		return event.Ready{Ref: ref(id, consumer), Handle: event.Handle{SandboxID: id, Host: "localhost"}, Reachability: event.Reachability{Host: "localhost"}, ReadyAt: time.Now().UTC()}
	}
	// The first version's durables, on its filters.
	oldRegistry := bus.ConsumerSpec{Stream: event.StreamLifecycle, Name: bus.DurableRegistry, Filters: []string{event.SubjectLifecycle}}
	oldMetering := bus.ConsumerSpec{Stream: event.StreamLifecycle, Name: bus.DurableMetering, Filters: []string{"sandboxer.evt.*.*.ready", "sandboxer.evt.*.*.destroyed"}}
	srv.Setup(t, oldRegistry, oldMetering)

	publish("sandboxer.evt.local.sbx-a.provisioning", event.TypeProvisioning, "sbx-a.provisioning", event.Provisioning{Ref: ref("sbx-a", "team-a"), Worker: "w", Attempt: 1})
	publish("sandboxer.evt.local.sbx-a.ready", event.TypeReady, "sbx-a.ready", ready("sbx-a", "team-a"))
	publish("sandboxer.evt.local.sbx-b.ready", event.TypeReady, "sbx-b.ready", ready("sbx-b", "team-b"))
	publish("sandboxer.cmd.local.create.sbx-c", event.TypeCreate, "sbx-c.create", event.Create{Ref: ref("sbx-c", "team-c"), RequestedAt: time.Now().UTC()})

	// The registry had handled the first two events; metering nothing.
	reg, err := js.Consumer(ctx, event.StreamLifecycle, bus.DurableRegistry)
	if err != nil {
		t.Fatal(err)
	}
	batch, err := reg.Fetch(2, jetstream.FetchMaxWait(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for m := range batch.Messages() {
		if err := m.DoubleAck(ctx); err != nil {
			t.Fatal(err)
		}
		n++
	}
	if n != 2 {
		t.Fatalf("registry handled %d, want 2", n)
	}

	newMetering := bus.ConsumerSpec{Stream: event.StreamLifecycle, Name: bus.DurableMetering,
		Filters: []string{event.StateFilter(event.StateReady), event.StateFilter(event.StateDestroyed)}}
	rep, err := (bus.Topology{}).Setup(ctx, js, bus.SetupOptions{Consumers: []bus.ConsumerSpec{oldRegistry, newMetering}})
	if err != nil {
		t.Fatal(err)
	}
	migrations := map[string]string{}
	for _, c := range rep {
		if c.Kind == "migration" {
			migrations[c.Name] = c.Detail
		}
	}
	if !strings.Contains(migrations[event.StreamLifecycle], "moved 3 messages") || !strings.Contains(migrations[event.StreamCommands], "moved 1 messages") {
		t.Fatalf("migrations reported %v", migrations)
	}

	// Nothing of the old forms is left; the copies are where today's
	// readers look, with the original event.
	for _, f := range []struct{ stream, filter string }{{event.StreamLifecycle, "sandboxer.evt.*.*.*"}, {event.StreamCommands, "sandboxer.cmd.*.*.*"}} {
		left, _, err := bus.LastPerSubject(ctx, srv.Conn(t), f.stream, []string{f.filter})
		if err != nil || len(left) != 0 {
			t.Fatalf("%s still holds %d legacy messages (%v)", f.stream, len(left), err)
		}
	}
	nc := srv.Conn(t)
	for subject, id := range map[string]string{
		event.LifecycleSubject("team-a", "local", "sbx-a", event.StateReady): "sbx-a.ready",
		event.LifecycleSubject("team-b", "local", "sbx-b", event.StateReady): "sbx-b.ready",
	} {
		m, err := bus.LastMsg(ctx, nc, event.StreamLifecycle, subject)
		if err != nil {
			t.Fatalf("copy on %s: %v", subject, err)
		}
		if m.Header.Get("ce-id") != id || m.Header.Get(bus.HeaderMigratedFrom) == "" {
			t.Errorf("copy on %s has headers %v", subject, m.Header)
		}
	}
	cmds, err := js.Stream(ctx, event.StreamCommands)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cmds.GetLastMsgForSubject(ctx, event.CommandSubject("local", event.VerbCreate, "team-c", "sbx-c")); err != nil {
		t.Fatalf("command copy: %v", err)
	}

	// The registry resumes at the copy of what it had not handled: sbx-b's
	// ready, and nothing else.
	next := func(name string) []string {
		t.Helper()
		c, err := js.Consumer(ctx, event.StreamLifecycle, name)
		if err != nil {
			t.Fatal(err)
		}
		b, err := c.Fetch(10, jetstream.FetchMaxWait(time.Second))
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for m := range b.Messages() {
			got = append(got, m.Subject())
			_ = m.Ack()
		}
		return got
	}
	if got := next(bus.DurableRegistry); len(got) != 1 || got[0] != event.LifecycleSubject("team-b", "local", "sbx-b", event.StateReady) {
		t.Errorf("registry resumed with %v, want sbx-b's ready only", got)
	}
	if got := next(bus.DurableMetering); len(got) != 2 {
		t.Errorf("metering resumed with %v, want both ready events", got)
	}

	rep, err = (bus.Topology{}).Setup(ctx, js, bus.SetupOptions{Consumers: []bus.ConsumerSpec{oldRegistry, newMetering}})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range rep {
		if c.Kind == "migration" || c.Action != bus.ActionUnchanged {
			t.Errorf("second setup: %s %s %s (%s)", c.Kind, c.Name, c.Action, c.Detail)
		}
	}
}
