package registry_test

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/inventory"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
	"github.com/sand-boxer/sandboxer/services/registry"
)

const (
	workerA = "/sandboxer/provisioner/worker-a"
	workerB = "/sandboxer/provisioner/worker-b"
)

// TestProjection: lifecycle events move the record the registry's index
// folds through the states, keeping what each event says.
func TestProjection(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	e := start(t, srv)

	tests := []struct {
		name     string
		id       string
		gateway  bool // the gateway recorded the sandbox first (requested)
		sequence []event.State
	}{
		{
			name:     "from nothing",
			id:       "sbx-proj-a",
			sequence: []event.State{event.StateProvisioning, event.StateReady, event.StateDestroying, event.StateDestroyed},
		},
		{
			name:     "after the gateway's requested event",
			id:       "sbx-proj-b",
			gateway:  true,
			sequence: []event.State{event.StateProvisioning, event.StateReady, event.StateDestroying, event.StateDestroyed},
		},
		{
			name:     "failed then cleaned up",
			id:       "sbx-proj-c",
			sequence: []event.State{event.StateProvisioning, event.StateFailed, event.StateDestroying, event.StateDestroyed},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			want := tc.sequence
			if tc.gateway {
				ref := event.Ref{SandboxID: tc.id, Consumer: "team-a", Profile: "echo", Extension: testExt}
				ev, err := event.New(event.TypeRequested, "/sandboxer/gateway", tc.id, tc.id+".requested",
					event.Requested{Ref: ref, Labels: map[string]string{"team": "a"}, RequestedAt: time.Now().UTC()})
				if err != nil {
					t.Fatal(err)
				}
				if _, err := e.pub.PublishTransition(testCtx(t, 5*time.Second), ref.LifecycleSubject(event.StateRequested), ev, ref.RefFilter(), 0); err != nil {
					t.Fatal(err)
				}
				want = append([]event.State{event.StateRequested}, want...)
			}
			for _, s := range tc.sequence {
				e.publishState(t, workerA, tc.id, s, time.Time{})
				rec := e.awaitRecord(t, tc.id, 10*time.Second, inState(s))
				switch s {
				case event.StateReady:
					if rec.Handle == nil || rec.Handle.SandboxID != tc.id || rec.Reachability == nil || rec.Reachability.RemoteDir != "/tmp/"+tc.id {
						t.Errorf("ready record lacks handle or reachability: %+v", rec)
					}
					if rec.ReadyAt.IsZero() {
						t.Error("ready record has no ready_at")
					}
				case event.StateFailed:
					if rec.Reason != "boom" {
						t.Errorf("failed record reason %q", rec.Reason)
					}
				case event.StateDestroyed:
					if rec.DestroyedAt.IsZero() || rec.Reachability != nil {
						t.Errorf("destroyed record: destroyed_at %v, reachability %+v", rec.DestroyedAt, rec.Reachability)
					}
				}
			}
			rec := e.awaitRecord(t, tc.id, 5*time.Second, inState(event.StateDestroyed))
			if got := states(rec); !slices.Equal(got, want) {
				t.Errorf("history %v, want %v", got, want)
			}
			if rec.Consumer != "team-a" || rec.Profile != "echo" || rec.Extension != testExt || rec.Host != "localhost" {
				t.Errorf("record ref: %+v", rec)
			}
			if tc.gateway && rec.Labels["team"] != "a" {
				t.Errorf("projection lost the gateway's labels: %+v", rec.Labels)
			}
		})
	}
}

// TestProjectionIdempotent: duplicated (from a second worker, so the
// stream keeps both) and reordered events change nothing twice: every
// state is entered at most once and the final state is the furthest.
func TestProjectionIdempotent(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	e := start(t, srv)

	type pub struct {
		source string
		state  event.State
	}
	var (
		prov  = event.StateProvisioning
		ready = event.StateReady
		ding  = event.StateDestroying
		dead  = event.StateDestroyed
	)
	a := func(s event.State) pub { return pub{workerA, s} }
	b := func(s event.State) pub { return pub{workerB, s} }
	// The registry projects up to 32 events at once, so the order it
	// applies them in is not the publishing order either.
	canonical := []event.State{prov, ready, ding, dead}
	tests := []struct {
		name string
		pubs []pub
	}{
		{"every event twice", []pub{a(prov), b(prov), a(ready), b(ready), a(ding), b(ding), a(dead), b(dead)}},
		{"duplicates after the end", []pub{a(prov), a(ready), a(ding), a(dead), b(ready), b(prov), b(ding)}},
		{"ready before provisioning", []pub{a(ready), a(prov), a(ding), a(dead)}},
		{"reversed", []pub{a(dead), a(ding), a(ready), a(prov)}},
		{"interleaved duplicates", []pub{a(prov), a(ready), b(prov), a(ding), b(ready), b(ding), a(dead), b(dead)}},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			id := fmt.Sprintf("sbx-idem-%d", i)
			var last uint64 // of the events the registry's durable takes
			for _, p := range tc.pubs {
				seq := e.publishState(t, p.source, id, p.state, time.Time{})
				if p.state != prov && p.state != dead {
					last = seq
				}
			}
			e.awaitAcked(t, event.StreamLifecycle, registry.ConsumerInventory, last)
			rec := e.awaitRecord(t, id, 5*time.Second, inState(event.StateDestroyed))
			checkOnce(t, rec)
			// A state a later event already passed is skipped, never
			// repeated: the history is an ordered subset of the state
			// machine's path, ending destroyed.
			got := states(rec)
			if !isOrderedSubset(got, canonical) || got[len(got)-1] != event.StateDestroyed {
				t.Errorf("history %v, want an ordered subset of %v ending destroyed", got, canonical)
			}
		})
	}
}

// isOrderedSubset reports whether every element of got appears in want, in
// the same order.
func isOrderedSubset(got, want []event.State) bool {
	i := 0
	for _, s := range got {
		for i < len(want) && want[i] != s {
			i++
		}
		if i == len(want) {
			return false
		}
		i++
	}
	return true
}

// TestProjectionDeadLetters: events no redelivery can fix go to the
// dead-letter stream at once, with the reason, and leave no record. (An
// event of a state the durable does not take, or of no state at all, is
// never delivered to it; the index's fold skips what it cannot fold.)
func TestProjectionDeadLetters(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	e := start(t, srv)

	raw := func(subject string, body string, hdr nats.Header) *nats.Msg {
		return &nats.Msg{Subject: subject, Data: []byte(body), Header: hdr}
	}
	encoded := func(subject string, ev *event.Event) *nats.Msg {
		m, err := event.Encode(t.Context(), subject, ev)
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	// Each case publishes its own event: the stream would drop a second
	// copy of one as a duplicate.
	ev := func(id string, s event.State) *event.Event { return lifecycleEvent(t, workerA, id, s, time.Time{}) }
	badData, err := event.New(event.TypeReady, workerA, "sbx-dlq-f", "sbx-dlq-f.ready", map[string]any{"sandbox_id": "sbx-dlq-f", "consumer": "team-a", "extension": testExt, "colour": "red"})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		id     string
		msg    *nats.Msg
		reason string
	}{
		{"not a cloudevent", "sbx-dlq-a", raw(event.LifecycleSubject("team-a", testExt, "sbx-dlq-a", event.StateReady), "not json", nil), "malformed event"},
		{"data for another sandbox", "sbx-dlq-c", encoded(event.LifecycleSubject("team-a", testExt, "sbx-dlq-c", event.StateReady), ev("sbx-other", event.StateReady)), `data names sandbox "sbx-other"`},
		{"type not matching subject", "sbx-dlq-e", encoded(event.LifecycleSubject("team-a", testExt, "sbx-dlq-e", event.StateReady), ev("sbx-dlq-e", event.StateProvisioning)), "does not announce state ready"},
		{"unknown data field", "sbx-dlq-f", encoded(event.LifecycleSubject("team-a", testExt, "sbx-dlq-f", event.StateReady), badData), "unknown field"},
		{"bad sandbox id", "Bad", encoded("sandboxer.evt.team-a.echo.Bad.ready", ev("sbx-dlq-g", event.StateReady)), "invalid sandbox id"},
		{"data for another consumer", "sbx-dlq-h", encoded(event.LifecycleSubject("team-b", testExt, "sbx-dlq-h", event.StateReady), ev("sbx-dlq-h", event.StateReady)), `data names consumer "team-a"`},
	}
	dlq := event.DLQSubject(event.StreamLifecycle, registry.ConsumerInventory)
	for _, tc := range tests {
		// Sequential: each case reads the last dead letter.
		t.Run(tc.name, func(t *testing.T) {
			ctx := testCtx(t, 10*time.Second)
			ack, err := e.js.PublishMsg(ctx, tc.msg)
			if err != nil {
				t.Fatal(err)
			}
			e.awaitAcked(t, event.StreamLifecycle, registry.ConsumerInventory, ack.Sequence)
			m := e.lastMsg(t, event.StreamDLQ, dlq)
			if m == nil {
				t.Fatal("no dead letter")
			}
			if got := m.Header.Get(bus.HeaderDLQStreamSeq); got != fmt.Sprint(ack.Sequence) {
				t.Fatalf("last dead letter is of seq %s, want %d", got, ack.Sequence)
			}
			if r := m.Header.Get(bus.HeaderDLQReason); !strings.Contains(r, tc.reason) {
				t.Errorf("dead letter reason %q, want it to contain %q", r, tc.reason)
			}
			if rec := e.indexed(t, tc.id); rec != nil {
				t.Errorf("a record exists for %s: %+v", tc.id, rec)
			}
		})
	}
	if n := e.reg.Stats().DeadLettered.Load(); n != int64(len(tests)) {
		t.Errorf("router dead-lettered %d messages, want %d", n, len(tests))
	}
}

// TestRetention: a sandbox that ended leaves the registry's index after
// the retention, a live one does not, and an event that arrives after
// that is acknowledged without bringing it back.
func TestRetention(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	e := start(t, srv, func(o *registry.Options) { o.Retention = time.Second })
	const ended, live = "sbx-ret-ended", "sbx-ret-live"
	for _, s := range []event.State{event.StateProvisioning, event.StateReady, event.StateDestroying, event.StateDestroyed} {
		e.publishState(t, workerA, ended, s, time.Time{})
	}
	for _, s := range []event.State{event.StateProvisioning, event.StateReady} {
		e.publishState(t, workerA, live, s, time.Time{})
	}
	e.awaitRecord(t, ended, 10*time.Second, inState(event.StateDestroyed))
	e.awaitRecord(t, live, 10*time.Second, inState(event.StateReady))
	ctx := testCtx(t, 20*time.Second)
	eventually(t, 15*time.Second, func() (bool, string) {
		rec := e.indexed(t, ended)
		return rec == nil, fmt.Sprintf("the destroyed sandbox still indexed: %+v", rec)
	})
	if rec := e.indexed(t, live); rec == nil || rec.State != event.StateReady {
		t.Fatalf("live record: %+v", rec)
	}
	// A late event (redelivered past the stream's duplicate window) of
	// the sandbox that left: acknowledged, nothing dead-lettered, and it
	// stays out of the index.
	late := lifecycleEvent(t, workerB, ended, event.StateDestroying, time.Time{})
	late.SetID(late.ID() + ".late")
	ack, err := e.pub.Publish(ctx, event.LifecycleSubject("team-a", testExt, ended, event.StateDestroying), late)
	if err != nil {
		t.Fatal(err)
	}
	e.awaitAcked(t, event.StreamLifecycle, registry.ConsumerInventory, ack.Sequence)
	if m := e.lastMsg(t, event.StreamDLQ, event.DLQSubject(event.StreamLifecycle, registry.ConsumerInventory)); m != nil {
		t.Fatalf("dead letter: %s", m.Header)
	}
	if rec := e.indexed(t, ended); rec != nil {
		t.Fatalf("a late event brought the sandbox back into the index: %+v", rec)
	}
	// Its events are still the stream's: a read by id folds them.
	rec, err := inventory.Read(ctx, e.js.Conn(), event.SandboxFilter(ended))
	if err != nil || rec == nil || rec.State != event.StateDestroyed {
		t.Fatalf("reading the sandbox that left the index: %+v, %v", rec, err)
	}
}
