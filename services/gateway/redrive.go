package gateway

import (
	"context"
	"errors"
	"net/http"

	"go.opentelemetry.io/otel/codes"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
)

// teardownStuck reports whether rec, on its way out, waits for nothing:
// its latest destroy attempt failed on every delivery (the registry's
// retry is pending, with back-off), or nothing was heard of its teardown
// for longer than its profile's teardown deadline (a destroy command
// lost). A DELETE then sends a fresh attempt.
func (g *Gateway) teardownStuck(rec *sandbox.Record) bool {
	if rec.TeardownStuck() {
		return true
	}
	var d extension.Deadlines
	if p, err := g.opts.Catalog.Current().Profile(rec.Profile); err == nil {
		d = p.Deadlines
	}
	since := rec.EnteredState()
	if rec.UpdatedAt.After(since) {
		since = rec.UpdatedAt
	}
	return g.opts.Now().Sub(since) > sandbox.StateDeadline(rec.State, d)
}

// redrive sends a fresh destroy attempt of rec's sandbox, asked for by c:
// it claims the attempt first with a destroying event of that attempt
// guarded by the sandbox's last event it read
// ([bus.Publisher.PublishTransition]), so that of two DELETEs, or a DELETE
// and the registry's retry or reconciler, one sends each attempt, and the
// next DELETE finds it under way. It answers with the record as it is
// then.
func (g *Gateway) redrive(ctx context.Context, st *state, c caller, seen *sandbox.Record) (*sandbox.Record, *api.Problem) {
	cur, _, err := getRecord(ctx, st, seen.ID)
	if err != nil {
		g.log.ErrorContext(ctx, "reading sandbox", "sandbox", seen.ID, "err", err)
		return nil, newProblem(http.StatusServiceUnavailable, "cannot read sandboxes right now")
	}
	if cur.State != seen.State || cur.DestroyAttempt != seen.DestroyAttempt || !g.teardownStuck(cur) {
		return cur, nil // it moved meanwhile
	}
	rec := cur.Clone() // the inventory's records are shared
	now := g.opts.Now().UTC()
	n := rec.NextAttempt()
	reason := event.ReasonRequested
	switch {
	case rec.State == event.StateExpired:
		reason = event.ReasonExpired
	case wentThrough(rec, event.StateFailed):
		reason = event.ReasonFailed
	case rec.Reason != "":
		reason = rec.Reason
	}
	claim, err := event.New(event.TypeDestroying, Source, rec.ID, event.DestroyingID(rec.ID, n),
		event.Destroying{Ref: rec.Ref(), Reason: reason, Attempt: n})
	if err != nil {
		return nil, newProblem(http.StatusInternalServerError, "cannot build the destroy attempt")
	}
	claim.SetTime(now) // the gateway's clock says when the attempt went out
	ack, err := g.pub.PublishTransition(ctx, rec.Ref().LifecycleSubject(event.StateDestroying), claim, rec.Ref().RefFilter(), rec.Seq)
	switch {
	case errors.Is(err, bus.ErrConflict) || (err == nil && ack.Duplicate):
		// Another re-drive, or the sandbox's own news, came first.
		if now, _, err := getRecord(ctx, st, rec.ID); err == nil {
			return now, nil
		}
		return cur, nil
	case err != nil:
		g.log.WarnContext(ctx, "claiming a destroy attempt", "sandbox", rec.ID, "err", err)
		return nil, newProblem(http.StatusServiceUnavailable, "cannot write sandboxes right now")
	}
	if _, err := sandbox.Apply(rec, claim); err == nil {
		rec.Seq = ack.Sequence
		st.inv.put(rec.ID, rec, ack.Sequence)
	}
	ctx, span := g.startDestroy(ctx, rec)
	defer span.End()
	ev, err := event.New(event.TypeDestroy, Source, rec.ID, event.DestroyID(rec.ID, n), event.Destroy{
		Ref: rec.Ref(), Reason: reason, RequestedBy: c.Consumer, RequestedAt: now, Attempt: n,
	})
	if err == nil {
		_, err = g.pub.Publish(ctx, rec.Ref().CommandSubject(event.VerbDestroy), ev)
	}
	if err != nil {
		// The record shows the attempt under way; the registry's
		// reconciler sends another after the teardown deadline.
		span.SetStatus(codes.Error, err.Error())
		g.log.WarnContext(ctx, "publishing a re-driven destroy command", "sandbox", rec.ID, "attempt", n, "err", err)
		detail := "cannot publish the destroy command right now"
		if errors.Is(err, bus.ErrBackPressure) {
			detail = "too many pending commands; retry later"
		}
		return nil, newProblem(http.StatusServiceUnavailable, detail)
	}
	g.log.WarnContext(ctx, "stuck teardown re-driven", "sandbox", rec.ID, "attempt", n, "last_error", rec.TeardownError, "by", c.Consumer)
	return rec, nil
}

// wentThrough reports whether rec entered state s at some point.
func wentThrough(rec *sandbox.Record, s event.State) bool {
	for _, t := range rec.History {
		if t.State == s {
			return true
		}
	}
	return false
}
