package event

import (
	"context"
	"fmt"

	"github.com/nats-io/nats.go"
)

// Lifecycle is a lifecycle event decoded once, for every consumer: the
// CloudEvent, the state it announces, its data decoded strictly into that
// state's payload type, and the [Ref] at the top of that payload.
type Lifecycle struct {
	// Event is the CloudEvent as [Decode] read it.
	Event *Event
	// State is the state the event's type announces.
	State State
	// Data is the payload, a pointer to the type of State:
	// [*Provisioning], [*Ready], [*Failed], [*Expired], [*Destroying],
	// [*Destroyed], [*Rejected] or [*Orphaned]. A consumer switches on
	// its type.
	Data any
	// Ref is the sandbox the payload names.
	Ref Ref
}

// DecodeLifecycle reads a lifecycle event from a NATS message: [Decode],
// then [LifecycleOf]. It returns ctx carrying the message's remote trace
// context. Every error wraps [ErrMalformed]: retrying cannot help.
func DecodeLifecycle(ctx context.Context, h nats.Header, body []byte) (context.Context, *Lifecycle, error) {
	ctx, e, err := Decode(ctx, h, body)
	if err != nil {
		return ctx, nil, err
	}
	l, err := LifecycleOf(e)
	return ctx, l, err
}

// LifecycleOf decodes the data of e, a decoded lifecycle event (what a
// router's handler is given), strictly ([DataAs]) into the payload type
// of the state its type announces. An event of any other type, or data
// of another shape, is an error wrapping [ErrMalformed].
func LifecycleOf(e *Event) (*Lifecycle, error) {
	s, ok := StateOf(Type(e.Type()))
	if !ok {
		return nil, fmt.Errorf("%w: %s is not a lifecycle event", ErrMalformed, e.Type())
	}
	data, ref := payloadOf(s)
	if data == nil {
		return nil, fmt.Errorf("%w: no payload type for state %s", ErrMalformed, s)
	}
	if err := DataAs(e, data); err != nil {
		return nil, err
	}
	return &Lifecycle{Event: e, State: s, Data: data, Ref: *ref}, nil
}

// payloadOf returns a new payload of the type of state s and the Ref
// within it, or nil for a state no event announces.
func payloadOf(s State) (any, *Ref) {
	switch s {
	case StateRequested:
		d := new(Requested)
		return d, &d.Ref
	case StateProvisioning:
		d := new(Provisioning)
		return d, &d.Ref
	case StateReady:
		d := new(Ready)
		return d, &d.Ref
	case StateFailed:
		d := new(Failed)
		return d, &d.Ref
	case StateExpired:
		d := new(Expired)
		return d, &d.Ref
	case StateDestroying:
		d := new(Destroying)
		return d, &d.Ref
	case StateDestroyed:
		d := new(Destroyed)
		return d, &d.Ref
	case StateRejected:
		d := new(Rejected)
		return d, &d.Ref
	case StateOrphaned:
		d := new(Orphaned)
		return d, &d.Ref
	}
	return nil, nil
}
