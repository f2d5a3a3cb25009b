package registry

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
)

// The reconciler is the registry's last line against a sandbox left in a
// state nothing moves it out of: a create command lost with the gateway
// that was publishing it, a failed event whose destroy never came, a
// teardown whose retry schedule was lost, an expiry that did not fire.
// Every ReconcileInterval it reads every record once and, for each past
// its state's deadline ([sandbox.StateDeadline], the notion the gateway's
// sandboxes_past_deadline metric counts, plus DeadlineGrace), steps in:
//
//   - requested or provisioning: it fails the sandbox (a failed event,
//     phase provision) and sends the destroy command, so that teardown
//     runs and metering releases the hold, as for any failed create. The
//     failed event is published with Nats-Expected-Last-Subject-Sequence
//     over the sandbox's subjects: the stream takes it only if the
//     sandbox's last event is still the one the decision was made on, so
//     a worker's late event and another registry's decision cannot both
//     win.
//   - failed, expired or destroying: it sends a fresh destroy attempt,
//     claimed first on the record by compare-and-swap
//     ([sandbox.Record.Redrive]): of several registries, one sends it.
//   - ready past its expiry: it expires the sandbox, as the expiry timer
//     does (one compare-and-swap moves the record).
//
// What it does is logged, and the sandbox's record and events say why.

// runReconciler reconciles every ReconcileInterval until ctx ends.
func (r *Registry) runReconciler(ctx context.Context) {
	t := time.NewTicker(r.opts.ReconcileInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if n, err := r.Reconcile(ctx); err != nil && ctx.Err() == nil {
			r.log.Warn("reconciling sandboxes", "err", err, "redriven", n)
		}
	}
}

// Reconcile runs one round of the reconciler: it reads every record and
// re-drives or fails those past their state's deadline. It returns how
// many it stepped in for. It is safe to run on several registries at
// once. The registry must be started.
func (r *Registry) Reconcile(ctx context.Context) (int, error) {
	var late []*sandbox.Record
	now := time.Now().UTC()
	r.index.sweep(now, r.opts.Retention)
	for _, rec := range r.index.all() {
		if !rec.State.Terminal() && r.pastDeadline(rec, now) {
			late = append(late, rec.Clone())
		}
	}
	n := 0
	var errs []error
	for _, rec := range late {
		if ctx.Err() != nil {
			return n, ctx.Err()
		}
		did, err := r.reconcile(ctx, rec, now)
		if err != nil {
			errs = append(errs, fmt.Errorf("sandbox %s: %w", rec.ID, err))
		}
		if did {
			n++
		}
	}
	return n, errors.Join(errs...)
}

// deadlines are the deadlines of rec's profile, or the defaults when the
// catalog no longer has it.
func (r *Registry) deadlines(rec *sandbox.Record) extension.Deadlines {
	if p, err := r.catalog.Profile(rec.Profile); err == nil {
		return p.Deadlines
	}
	return extension.Deadlines{}
}

// pastDeadline reports whether rec has been in its state longer than its
// deadline and the grace at now. A sandbox on its way out (failed,
// expired, destroying) counts from its last teardown news (an attempt
// started or failed, a re-drive), and a failed attempt's deadline adds
// the retry's back-off, so the reconciler steps in only when the retry
// did not come.
func (r *Registry) pastDeadline(rec *sandbox.Record, now time.Time) bool {
	d := r.deadlines(rec)
	switch rec.State {
	case event.StateReady:
		return !rec.ExpiresAt.IsZero() && now.Sub(rec.ExpiresAt) > r.opts.DeadlineGrace
	case event.StateRequested, event.StateProvisioning:
		return now.Sub(rec.EnteredState()) > sandbox.StateDeadline(rec.State, d)+r.opts.DeadlineGrace
	case event.StateFailed, event.StateExpired, event.StateDestroying:
		limit := sandbox.StateDeadline(rec.State, d) + r.opts.DeadlineGrace
		if rec.TeardownStuck() {
			limit += r.retryDelay(rec.TeardownFailedAttempt)
		}
		return now.Sub(later(rec.UpdatedAt, rec.EnteredState())) > limit
	}
	return false
}

// reconcile steps in for rec, found past its deadline at now. Every step
// is guarded by rec's last event (rec.Seq): should the index lag the
// stream, the sandbox moved on and nothing is done. It reports whether
// this registry did something.
func (r *Registry) reconcile(ctx context.Context, rec *sandbox.Record, now time.Time) (bool, error) {
	if err := event.CheckName("extension name", rec.Extension); err != nil {
		return false, err
	}
	switch rec.State {
	case event.StateReady:
		return r.expireLate(ctx, rec, now)
	case event.StateRequested, event.StateProvisioning:
		return r.failLate(ctx, rec, now)
	}
	return r.redrive(ctx, rec, now)
}

// redrive sends a fresh destroy attempt of rec, claimed first with a
// destroying event guarded by rec's last event.
func (r *Registry) redrive(ctx context.Context, rec *sandbox.Record, now time.Time) (bool, error) {
	defer r.sandboxLocks.lock(rec.ID)()
	state, since := rec.State, later(rec.UpdatedAt, rec.EnteredState())
	n, lastError := rec.NextAttempt(), rec.TeardownError
	claimed, err := r.claimAttempt(ctx, rec, destroyReason(rec), n)
	if err != nil || !claimed {
		return false, err // it moved, or another registry claimed the attempt
	}
	out, err := destroyCommand(rec, destroyReason(rec), n, "registry", now)
	if err == nil {
		_, err = r.pub.Publish(ctx, out.Subject, out.Event)
	}
	if err != nil {
		// The record shows the attempt under way: the next one goes
		// after another deadline.
		return false, fmt.Errorf("sending destroy attempt %d: %w", n, err)
	}
	r.redrives.WithLabelValues(string(state)).Inc()
	r.log.Warn("sandbox past its deadline: destroy re-driven", "sandbox", rec.ID, "state", state, "since", since,
		"attempt", n, "last_error", lastError)
	return true, nil
}

// failLate fails rec, a create past its deadline, guarded on its last
// event, and sends its destroy command.
func (r *Registry) failLate(ctx context.Context, rec *sandbox.Record, now time.Time) (bool, error) {
	ref := rec.Ref()
	var guard uint64
	switch m, err := bus.LastMsg(ctx, r.opts.NC, event.StreamLifecycle, ref.RefFilter()); {
	case errors.Is(err, bus.ErrNoMessage):
	case err != nil:
		return false, fmt.Errorf("reading the last event: %w", err)
	default:
		lr, err := event.ParseLifecycleSubject(m.Subject)
		if err != nil {
			return false, err
		}
		if lr.State != rec.State {
			return false, nil // its last event is not projected yet: next round
		}
		guard = m.Sequence
	}
	limit := sandbox.StateDeadline(rec.State, r.deadlines(rec))
	reason := fmt.Sprintf("%s for longer than its deadline (%s): failed by the registry's reconciler", rec.State, limit)
	e, err := event.New(event.TypeFailed, Source, rec.ID, rec.ID+".failed.deadline."+strconv.FormatUint(guard, 10),
		event.Failed{Ref: ref, Phase: "provision", Reason: reason})
	if err != nil {
		return false, err
	}
	subject := ref.LifecycleSubject(event.StateFailed)
	msg, err := event.Encode(ctx, subject, e)
	if err != nil {
		return false, err
	}
	msg.Header.Set(jetstream.ExpectedLastSubjSeqHeader, strconv.FormatUint(guard, 10))
	msg.Header.Set(jetstream.ExpectedLastSubjSeqSubjHeader, ref.RefFilter())
	_, err = r.pub.PublishMsg(ctx, msg)
	var apiErr *jetstream.APIError
	switch {
	case errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence || apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant):
		return false, nil // the sandbox moved on meanwhile
	case err != nil:
		return false, fmt.Errorf("failing it: %w", err)
	}
	// Stored, or a duplicate of another registry's same decision: the
	// destroy goes either way, once (its id is the first attempt's).
	out, err := destroyCommand(rec, event.ReasonFailed, rec.DestroyAttempt, "registry", now)
	if err == nil {
		_, err = r.pub.Publish(ctx, out.Subject, out.Event)
	}
	if err != nil {
		return false, fmt.Errorf("sending its destroy command: %w", err)
	}
	r.redrives.WithLabelValues(string(rec.State)).Inc()
	r.log.Warn("sandbox past its deadline: failed", "sandbox", rec.ID, "state", rec.State, "since", rec.EnteredState(), "deadline", limit)
	return true, nil
}

// expireLate expires rec, ready past its expiry, as its timer would have.
func (r *Registry) expireLate(ctx context.Context, rec *sandbox.Record, now time.Time) (bool, error) {
	expired, err := expiredEvent(rec, now)
	if err != nil {
		return false, err
	}
	unlock := r.sandboxLocks.lock(rec.ID)
	stored, err := r.transition(ctx, rec, event.StateExpired, expired)
	unlock()
	if err != nil || !stored {
		return false, err
	}
	moved := rec
	outs, err := r.expiryOuts(moved, expired)
	if err != nil {
		return false, err
	}
	for _, o := range outs {
		if _, err := r.pub.Publish(ctx, o.Subject, o.Event); err != nil {
			return false, fmt.Errorf("expiring it: %w", err)
		}
	}
	r.expiries.Inc()
	r.redrives.WithLabelValues(string(event.StateReady)).Inc()
	r.log.Warn("sandbox past its expiry: expired by the reconciler", "sandbox", rec.ID, "expires_at", rec.ExpiresAt)
	return true, nil
}

// later is the later of a and b.
func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}
