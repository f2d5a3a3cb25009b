package registry

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
)

// Destroy retries are schedules on the bus, as expiries are. A worker
// that gives up on a destroy command (every delivery's teardown failed)
// announces a destroying event with the error and the attempt
// ([event.Destroying]); projecting it, the registry schedules one retry
// on event.RetryScheduleSubject, due after a back-off that doubles with
// each failed attempt (Options.RetryBase, capped at Options.RetryMax).
// When it fires on event.RetryFireSubject, the registry sends the destroy
// command of the next attempt, with its own id ([event.DestroyID]),
// unless the sandbox ended or a later attempt went out meanwhile (a
// re-drive). The sandbox stays destroying throughout, its record showing
// the last teardown error.

// retryDelay is how long after attempt failed's teardown failed the next
// attempt goes: RetryBase doubled per failed attempt, at most RetryMax.
func (r *Registry) retryDelay(failed int) time.Duration {
	d := r.opts.RetryBase
	for range max(failed, 0) {
		if d >= r.opts.RetryMax {
			break
		}
		d *= 2
	}
	return min(d, r.opts.RetryMax)
}

// retryID is the event id of the retry timer that sends attempt n.
func retryID(sandbox string, n int) string { return sandbox + ".retry." + strconv.Itoa(n) }

// scheduleRetry schedules the attempt after the failed one d reports. Its
// id is the attempt's, so a redelivered failure schedules it once within
// the de-duplication window (and after it, again at a later time: one
// schedule per subject).
func (r *Registry) scheduleRetry(ctx context.Context, rec *sandbox.Record, d event.Destroying) error {
	next := d.Attempt + 1
	at := fireAt(time.Now().Add(r.retryDelay(d.Attempt)))
	e, err := event.New(event.TypeRetry, Source, rec.ID, retryID(rec.ID, next),
		event.Retry{Ref: rec.Ref(), Reason: d.Reason, Attempt: next, RetryAt: at})
	if err != nil {
		return err
	}
	_, err = r.pub.Publish(ctx, event.RetryScheduleSubject(rec.ID), e,
		jetstream.WithScheduleAt(at), jetstream.WithScheduleTarget(event.RetryFireSubject(rec.ID)))
	if err != nil {
		return fmt.Errorf("scheduling destroy retry of %s: %w", rec.ID, err)
	}
	r.log.Warn("teardown failed: destroy retry scheduled", "sandbox", rec.ID, "failed_attempt", d.Attempt,
		"attempt", next, "retry_at", at, "err", d.Error)
	return nil
}

// onTimer is the handler of the registry's fired timers: expiries and
// destroy retries.
func (r *Registry) onTimer(ctx context.Context, m *bus.Message) ([]bus.Out, error) {
	if strings.HasPrefix(m.Subject, strings.TrimSuffix(event.RetryFireFilter, ">")) {
		return r.retry(ctx, m)
	}
	return r.fire(ctx, m)
}

// retry is the handler of fired destroy retries. It sends the destroy
// command of the retry's attempt when the sandbox has not ended and no
// one sent that attempt or a later one yet (a DELETE's or the
// reconciler's re-drive). It claims the attempt on the record first, with
// compare-and-swap, as every re-drive does, so each attempt goes out
// once: a redelivered or replayed retry finds it claimed. Should the
// publish fail after the claim, the attempt shows under way and the
// reconciler sends another after the teardown deadline.
func (r *Registry) retry(ctx context.Context, m *bus.Message) ([]bus.Out, error) {
	id, ok := strings.CutPrefix(m.Subject, strings.TrimSuffix(event.RetryFireFilter, ">"))
	if !ok || !event.ValidName(id) {
		return nil, bus.Permanent(fmt.Errorf("handling retry: %q is not a retry fire subject", m.Subject))
	}
	if event.Type(m.Event.Type()) != event.TypeRetry {
		return nil, bus.Permanent(fmt.Errorf("handling retry %s: unexpected event type %s", m.Subject, m.Event.Type()))
	}
	var d event.Retry
	if err := event.DataAs(m.Event, &d); err != nil {
		return nil, bus.Permanent(fmt.Errorf("handling retry %s: %w", m.Subject, err))
	}
	if d.SandboxID != id || d.Attempt < 1 {
		return nil, bus.Permanent(fmt.Errorf("handling retry %s: %w: data names sandbox %q, attempt %d", m.Subject, event.ErrMalformed, d.SandboxID, d.Attempt))
	}
	if err := event.CheckName("consumer name", d.Consumer); err != nil {
		return nil, bus.Permanent(fmt.Errorf("handling retry %s: %w", m.Subject, err))
	}
	if err := event.CheckName("extension name", d.Extension); err != nil {
		return nil, bus.Permanent(fmt.Errorf("handling retry %s: %w", m.Subject, err))
	}
	rec, _, err := r.readRecord(ctx, d.Ref)
	switch {
	case err != nil:
		return nil, err
	case rec == nil:
		r.log.Warn("destroy retry fired for an unknown sandbox", "sandbox", id)
		return nil, nil
	case rec.State.Terminal():
		return nil, nil
	case rec.DestroyAttempt >= d.Attempt:
		r.log.Debug("destroy retry fired after its attempt went out", "sandbox", id, "attempt", d.Attempt, "latest", rec.DestroyAttempt)
		return nil, nil
	}
	if err := event.CheckName("extension name", rec.Extension); err != nil {
		return nil, bus.Permanent(fmt.Errorf("retrying destroy of %s: %w", id, err))
	}
	lastError := rec.TeardownError
	claimed, err := r.claimAttempt(ctx, rec, d.Reason, d.Attempt)
	if err != nil || !claimed {
		return nil, err // moved on, or claimed by another: a redelivery finds it so
	}
	out, err := destroyCommand(rec, d.Reason, d.Attempt, "registry", time.Now().UTC())
	if err != nil {
		return nil, err
	}
	r.retries.Inc()
	r.log.Info("destroy retried", "sandbox", id, "attempt", d.Attempt, "last_error", lastError)
	return []bus.Out{out}, nil
}

// claimAttempt claims destroy attempt n of rec's sandbox, for reason: a
// destroying event of that attempt (the id its worker's announcement has,
// [event.DestroyingID]) guarded by rec's last event. It reports false when
// the sandbox moved on first, or another claimed the attempt.
func (r *Registry) claimAttempt(ctx context.Context, rec *sandbox.Record, reason string, n int) (bool, error) {
	ev, err := event.New(event.TypeDestroying, Source, rec.ID, event.DestroyingID(rec.ID, n),
		event.Destroying{Ref: rec.Ref(), Reason: reason, Attempt: n})
	if err != nil {
		return false, err
	}
	ok, err := r.transition(ctx, rec, event.StateDestroying, ev)
	if err != nil {
		return false, fmt.Errorf("claiming destroy attempt %d of %s: %w", n, rec.ID, err)
	}
	return ok, nil
}

// destroyCommand is the destroy command of attempt n of rec's sandbox,
// for reason, asked for by by at at: its subject from the sandbox's own
// reference, its id the attempt's.
func destroyCommand(rec *sandbox.Record, reason string, n int, by string, at time.Time) (bus.Out, error) {
	ref := rec.Ref()
	e, err := event.New(event.TypeDestroy, Source, rec.ID, event.DestroyID(rec.ID, n), event.Destroy{
		Ref: ref, Reason: reason, RequestedBy: by, RequestedAt: at, Attempt: n,
	})
	if err != nil {
		return bus.Out{}, err
	}
	return bus.Out{Subject: ref.CommandSubject(event.VerbDestroy), Event: e}, nil
}

// destroyReason is the reason a fresh destroy of rec gives: the one its
// teardown had, else what brought it to its end.
func destroyReason(rec *sandbox.Record) string {
	switch {
	case rec.State == event.StateExpired:
		return event.ReasonExpired
	case rec.State == event.StateFailed || wasFailed(rec):
		return event.ReasonFailed
	case rec.Reason != "":
		return rec.Reason
	}
	return event.ReasonRequested
}

// wasFailed reports whether rec went through failed.
func wasFailed(rec *sandbox.Record) bool {
	for _, t := range rec.History {
		if t.State == event.StateFailed {
			return true
		}
	}
	return false
}
