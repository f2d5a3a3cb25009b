package registry

import (
	"context"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
)

// maxCASAttempts bounds the read-apply-write loop of one event against
// concurrent writers of the same record.
const maxCASAttempts = 16

// errConflict is returned when a record kept changing under every attempt
// to write it: the router retries the message later.
var errConflict = errors.New("sandbox record kept changing")

// project is the handler of the inventory consumer: it applies one
// lifecycle event to the sandbox's record with compare-and-swap, then
// keeps the sandbox's expiry schedule in step with its state. Applying an
// event that does not move the record forward changes nothing, so
// redelivered and reordered events are harmless.
func (r *Registry) project(ctx context.Context, m *bus.Message) ([]bus.Out, error) {
	ref, err := event.ParseLifecycleSubject(m.Subject)
	if err != nil {
		return nil, bus.Permanent(fmt.Errorf("projecting event: %w", err))
	}
	if err := event.CheckName("sandbox id", ref.Sandbox); err != nil {
		return nil, bus.Permanent(fmt.Errorf("projecting %s: %w", m.Subject, err))
	}
	if to, ok := event.StateOf(event.Type(m.Event.Type())); !ok || to != ref.State {
		return nil, bus.Permanent(fmt.Errorf("projecting %s: event type %s does not announce state %s", m.Subject, m.Event.Type(), ref.State))
	}
	rec, _, err := r.applyEvent(ctx, ref.Sandbox, m.Event)
	if err != nil {
		return nil, err
	}
	switch {
	case ref.State == event.StateReady && rec.State == event.StateReady && !rec.ExpiresAt.IsZero():
		// Also on a redelivery that changed nothing: the schedule may not
		// have been published the first time. Its Nats-Msg-Id makes this
		// idempotent.
		if err := r.schedule(ctx, rec); err != nil {
			return nil, err
		}
	case rec.State.Rank() > event.StateReady.Rank() && !rec.ExpiresAt.IsZero():
		// Past ready (expired, destroying, destroyed): nothing may fire.
		if err := r.cancelExpiry(ctx, rec.ID); err != nil {
			return nil, err
		}
	}
	return nil, nil
}

// applyEvent applies e to the record of sandbox id in the sandboxes
// bucket: read, [sandbox.Apply], then Update at the read revision (or
// Create when there is no record), re-reading on a conflict, a bounded
// number of times. It returns the record as stored and whether e changed
// it. An event Apply refuses is [bus.Permanent].
func (r *Registry) applyEvent(ctx context.Context, id string, e *event.Event) (*sandbox.Record, bool, error) {
	for range maxCASAttempts {
		rec, rev, err := r.readRecord(ctx, id)
		if err != nil {
			return nil, false, err
		}
		if rec == nil {
			rec = &sandbox.Record{}
		}
		changed, err := sandbox.Apply(rec, e)
		if err != nil {
			return nil, false, bus.Permanent(fmt.Errorf("applying %s to sandbox %s: %w", e.Type(), id, err))
		}
		if !changed {
			return rec, false, nil
		}
		if rec.ID != id {
			return nil, false, bus.Permanent(fmt.Errorf("applying %s: %w: data names sandbox %q, subject %q", e.Type(), event.ErrMalformed, rec.ID, id))
		}
		if rev == 0 {
			_, err = r.sandboxes.Create(ctx, id, rec.Marshal())
			if errors.Is(err, jetstream.ErrKeyExists) {
				continue
			}
		} else {
			_, err = r.sandboxes.Update(ctx, id, rec.Marshal(), rev)
			if errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
				continue
			}
		}
		if err != nil {
			return nil, false, fmt.Errorf("writing sandbox %s: %w", id, err)
		}
		r.log.Debug("sandbox moved", "sandbox", id, "state", rec.State)
		return rec, true, nil
	}
	return nil, false, fmt.Errorf("applying %s to sandbox %s: %w after %d attempts", e.Type(), id, errConflict, maxCASAttempts)
}

// readRecord returns the record of sandbox id and its revision, or nil and
// 0 when there is none.
func (r *Registry) readRecord(ctx context.Context, id string) (*sandbox.Record, uint64, error) {
	entry, err := r.sandboxes.Get(ctx, id)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, 0, nil
	}
	if err != nil {
		return nil, 0, fmt.Errorf("reading sandbox %s: %w", id, err)
	}
	rec, err := sandbox.Unmarshal(entry.Value())
	if err != nil {
		return nil, 0, fmt.Errorf("reading sandbox %s: %w", id, err)
	}
	return rec, entry.Revision(), nil
}
