package event_test

import (
	"context"
	"errors"
	"reflect"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/event"
)

// TestDecodeLifecycle: every state an event announces decodes, from the
// message, into its own payload type, the same payload that was sent, with
// the Ref at its top; a state without a payload type cannot be added
// unnoticed.
func TestDecodeLifecycle(t *testing.T) {
	t.Parallel()
	at := time.Date(2026, 12, 1, 15, 0, 0, 0, time.UTC)
	ref := event.Ref{SandboxID: "sb-1", Consumer: "dev", Profile: "p", Extension: "local", Host: "h1"}
	h := event.Handle{SandboxID: "sb-1", Host: "h1"}
	payloads := map[event.State]any{
		event.StateRequested:    &event.Requested{Ref: ref, Labels: map[string]string{"team": "a"}, TTLSeconds: 60, RequestedAt: at},
		event.StateProvisioning: &event.Provisioning{Ref: ref, Worker: "w1", Attempt: 2},
		event.StateReady:        &event.Ready{Ref: ref, Handle: h, Reachability: event.Reachability{Host: "h1"}, ReadyAt: at},
		event.StateFailed:       &event.Failed{Ref: ref, Phase: "provision", Reason: "boom", Handle: &h},
		event.StateExpired:      &event.Expired{Ref: ref, Reason: "ttl", ExpiredAt: at},
		event.StateDestroying:   &event.Destroying{Ref: ref, Reason: event.ReasonRequested, Attempt: 1},
		event.StateDestroyed:    &event.Destroyed{Ref: ref, Reason: event.ReasonRequested, Meter: &event.MeterReading{Amount: 3, Quantity: 1, Unit: "minute"}},
		event.StateRejected:     &event.Rejected{Ref: ref, Code: "no_route", Reason: "no extension"},
		event.StateOrphaned:     &event.Orphaned{Ref: ref, Reason: "destroyed", Handle: h, Worker: "w2"},
	}
	for _, s := range event.States {
		if event.LifecycleType(s) == "" {
			continue // a state with no event of its own
		}
		t.Run(string(s), func(t *testing.T) {
			t.Parallel()
			want, ok := payloads[s]
			if !ok {
				t.Fatalf("no payload for state %s in this test: add one, and its type to payloadOf", s)
			}
			e, err := event.New(event.LifecycleType(s), "/test", ref.SandboxID, ref.SandboxID+"."+string(s), want)
			if err != nil {
				t.Fatal(err)
			}
			msg, err := event.Encode(context.Background(), ref.LifecycleSubject(s), e)
			if err != nil {
				t.Fatal(err)
			}
			_, l, err := event.DecodeLifecycle(context.Background(), msg.Header, msg.Data)
			if err != nil {
				t.Fatal(err)
			}
			if l.State != s || l.Ref != ref || l.Event.ID() != e.ID() {
				t.Errorf("decoded state %s, ref %+v, id %s; want %s, %+v, %s", l.State, l.Ref, l.Event.ID(), s, ref, e.ID())
			}
			if reflect.TypeOf(l.Data) != reflect.TypeOf(want) || !reflect.DeepEqual(l.Data, want) {
				t.Errorf("data %T %+v, want %T %+v", l.Data, l.Data, want, want)
			}
		})
	}
}

// TestDecodeLifecycleRefuses: what is not a lifecycle event of the
// shape its type says is malformed, never a zero payload.
func TestDecodeLifecycleRefuses(t *testing.T) {
	t.Parallel()
	ref := event.Ref{SandboxID: "sb-1", Consumer: "dev", Profile: "p", Extension: "local"}
	for _, tc := range []struct {
		name string
		typ  event.Type
		data any
	}{
		{"a command", event.TypeCreate, event.Create{Ref: ref}},
		{"an unknown field", event.TypeReady, map[string]any{"sandbox_id": "sb-1", "surprise": true}},
		{"a field of the wrong type", event.TypeDestroyed, map[string]any{"sandbox_id": 7}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e, err := event.New(tc.typ, "/test", ref.SandboxID, "x", tc.data)
			if err != nil {
				t.Fatal(err)
			}
			msg, err := event.Encode(context.Background(), ref.LifecycleSubject(event.StateReady), e)
			if err != nil {
				t.Fatal(err)
			}
			_, l, err := event.DecodeLifecycle(context.Background(), msg.Header, msg.Data)
			if !errors.Is(err, event.ErrMalformed) || l != nil {
				t.Errorf("decoded %+v, %v; want ErrMalformed", l, err)
			}
		})
	}
	if _, _, err := event.DecodeLifecycle(context.Background(), nil, nil); !errors.Is(err, event.ErrMalformed) {
		t.Errorf("empty message: %v, want ErrMalformed", err)
	}
}
