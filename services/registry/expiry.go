package registry

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
)

// ExpiredReason is the reason of the expired event a TTL produces.
const ExpiredReason = "ttl"

// Sandbox TTLs are schedules on the bus, not timers in a process: a ready
// sandbox with an expiry gets one message on its schedule subject
// (event.ExpiryScheduleSubject) that the server delivers, at the expiry, to
// its fire subject (event.ExpiryFireSubject) as a copy carrying the same
// CloudEvent. The server then purges the schedule itself. The schedule is
// stored in the timers stream, so it survives restarts of the server and of
// every registry.

// schedule publishes the expiry schedule of rec. In this instance, the
// projection of the event that moves the sandbox past ready runs after
// this (project holds the sandbox's lock) and cancels it. Across
// instances the two can cross, and a schedule can outlive the sandbox's
// ready state: its fire finds the sandbox no longer ready and does
// nothing.
func (r *Registry) schedule(ctx context.Context, rec *sandbox.Record) error {
	e, err := event.New(event.TypeExpiry, Source, rec.ID, rec.ID+".expiry",
		event.Expiry{Ref: rec.Ref(), ExpiresAt: rec.ExpiresAt})
	if err != nil {
		return err
	}
	_, err = r.pub.Publish(ctx, event.ExpiryScheduleSubject(rec.ID), e,
		jetstream.WithScheduleAt(fireAt(rec.ExpiresAt)),
		jetstream.WithScheduleTarget(event.ExpiryFireSubject(rec.ID)))
	if err != nil {
		return fmt.Errorf("scheduling expiry of %s: %w", rec.ID, err)
	}
	r.log.Debug("expiry scheduled", "sandbox", rec.ID, "expires_at", rec.ExpiresAt)
	return nil
}

// fireAt is t rounded up to the second: schedules have second precision,
// and a sandbox must not expire before its time.
func fireAt(t time.Time) time.Time {
	if u := t.Truncate(time.Second); !u.Equal(t) {
		return u.Add(time.Second)
	}
	return t
}

// cancelExpiry removes the pending expiry schedule of sandbox id, if any.
func (r *Registry) cancelExpiry(ctx context.Context, id string) error {
	if err := bus.CancelSchedule(ctx, r.opts.JS, event.ExpiryScheduleSubject(id)); err != nil {
		return fmt.Errorf("cancelling expiry of %s: %w", id, err)
	}
	return nil
}

// fire is the handler of fired expiry timers. When the sandbox is still
// ready, it publishes the expired event guarded by the sandbox's last
// event (the compare-and-swap of every transition) and returns the
// destroy command for the router to publish. A redelivery after the
// sandbox was expired sends the same command again, which the stream
// de-duplicates. A timer for a sandbox
// in any other state, or unknown, is acknowledged and does nothing.
func (r *Registry) fire(ctx context.Context, m *bus.Message) ([]bus.Out, error) {
	id, ok := strings.CutPrefix(m.Subject, strings.TrimSuffix(event.ExpiryFireFilter, ">"))
	if !ok || !event.ValidName(id) {
		return nil, bus.Permanent(fmt.Errorf("handling timer: %q is not an expiry fire subject", m.Subject))
	}
	if event.Type(m.Event.Type()) != event.TypeExpiry {
		return nil, bus.Permanent(fmt.Errorf("handling timer %s: unexpected event type %s", m.Subject, m.Event.Type()))
	}
	var d event.Expiry
	if err := event.DataAs(m.Event, &d); err != nil {
		return nil, bus.Permanent(fmt.Errorf("handling timer %s: %w", m.Subject, err))
	}
	if d.SandboxID != id {
		return nil, bus.Permanent(fmt.Errorf("handling timer %s: %w: data names sandbox %q", m.Subject, event.ErrMalformed, d.SandboxID))
	}
	if err := event.CheckName("consumer name", d.Consumer); err != nil {
		return nil, bus.Permanent(fmt.Errorf("handling timer %s: %w", m.Subject, err))
	}
	if err := event.CheckName("extension name", d.Extension); err != nil {
		return nil, bus.Permanent(fmt.Errorf("handling timer %s: %w", m.Subject, err))
	}
	rec, _, err := r.readRecord(ctx, d.Ref)
	if err != nil {
		return nil, err
	}
	switch {
	case rec == nil:
		r.log.Warn("expiry fired for an unknown sandbox", "sandbox", id)
		return nil, nil
	case rec.State == event.StateReady:
		if err := event.CheckName("extension name", rec.Extension); err != nil {
			return nil, bus.Permanent(fmt.Errorf("expiring sandbox %s: %w", id, err))
		}
		expired, err := expiredEvent(rec, time.Now().UTC())
		if err != nil {
			return nil, err
		}
		unlock := r.sandboxLocks.lock(id)
		stored, err := r.transition(ctx, rec, event.StateExpired, expired)
		unlock()
		if err != nil {
			return nil, err
		}
		if !stored {
			// The sandbox left ready while the timer fired, or another
			// registry expired it: a redelivery finds which.
			return nil, fmt.Errorf("expiring sandbox %s: %w", id, bus.ErrConflict)
		}
		r.expiries.Inc()
		return r.expiryOuts(rec, expired)
	case rec.State == event.StateExpired && rec.Reason == ExpiredReason:
		// Redelivered after the sandbox was expired: the destroy command
		// again, de-duplicated.
		expired, err := expiredEvent(rec, expiredAt(rec))
		if err != nil {
			return nil, err
		}
		return r.expiryOuts(rec, expired)
	}
	r.log.Debug("expiry fired for a sandbox no longer ready", "sandbox", id, "state", rec.State)
	return nil, nil
}

// expiredEvent is the expired event of rec at t.
func expiredEvent(rec *sandbox.Record, t time.Time) (*event.Event, error) {
	e, err := event.New(event.TypeExpired, Source, rec.ID, rec.ID+".expired",
		event.Expired{Ref: rec.Ref(), Reason: ExpiredReason, ExpiredAt: t})
	if err != nil {
		return nil, err
	}
	e.SetTime(t)
	return e, nil
}

// expiredAt is when rec entered the expired state.
func expiredAt(rec *sandbox.Record) time.Time {
	for _, tr := range rec.History {
		if tr.State == event.StateExpired {
			return tr.At
		}
	}
	return rec.UpdatedAt
}

// expiryOuts are the destroy command of rec, expired by the event
// expired (stored already).
func (r *Registry) expiryOuts(rec *sandbox.Record, expired *event.Event) ([]bus.Out, error) {
	destroy, err := destroyCommand(rec, event.ReasonExpired, 0, "registry", expired.Time().UTC())
	if err != nil {
		return nil, err
	}
	r.log.Info("sandbox expired", "sandbox", rec.ID, "expires_at", rec.ExpiresAt)
	return []bus.Out{destroy}, nil
}
