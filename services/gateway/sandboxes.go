package gateway

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
)

// visible reads sandbox id for c from its lifecycle events (consistent
// right after a create). It writes the answer and returns nil when the sandbox is
// missing or belongs to another consumer: both are a 404, so a consumer
// cannot learn that another's sandbox exists.
func (g *Gateway) visible(ctx context.Context, w http.ResponseWriter, r *http.Request, st *state, c caller, id string) *sandbox.Record {
	rec, p := g.visibleRecord(ctx, st, c, id)
	if p != nil {
		g.writeProblem(w, r, p)
		return nil
	}
	return rec
}

// visibleRecord reads sandbox id for c, or the problem to answer: a 404
// when it is missing or another consumer's.
func (g *Gateway) visibleRecord(ctx context.Context, st *state, c caller, id string) (*sandbox.Record, *api.Problem) {
	rec, _, err := getRecord(ctx, st, id)
	switch {
	case errors.Is(err, errNotFound) || (err == nil && !c.owns(rec.Consumer)):
		return nil, newProblem(http.StatusNotFound, "no such sandbox")
	case err != nil:
		g.log.ErrorContext(ctx, "reading sandbox", "sandbox", id, "err", err)
		return nil, newProblem(http.StatusServiceUnavailable, "cannot read sandboxes right now")
	}
	return rec, nil
}

// get handles GET /v1/sandboxes/{id}.
func (g *Gateway) get(w http.ResponseWriter, r *http.Request, c caller) {
	st := g.current()
	if st == nil {
		g.writeProblem(w, r, newProblem(http.StatusServiceUnavailable, "gateway is not ready"))
		return
	}
	rec := g.visible(r.Context(), w, r, st, c, r.PathValue("id"))
	if rec == nil {
		return
	}
	writeJSON(w, http.StatusOK, api.FromRecord(rec))
}

// list handles GET
// /v1/sandboxes?state=&profile=&label=k=v&consumer=&limit=&after=. A
// consumer sees only its own sandboxes, whatever it asks; an admin sees
// every consumer's, or one's with consumer=. The answer is one page of at
// most limit sandboxes in id order, after the sandbox id after; next is the
// after of the following page, set only when more sandboxes match.
func (g *Gateway) list(w http.ResponseWriter, r *http.Request, c caller) {
	st := g.current()
	if st == nil || !st.inv.isReady() {
		g.writeProblem(w, r, newProblem(http.StatusServiceUnavailable, "sandbox listing is not loaded"))
		return
	}
	q := r.URL.Query()
	var errs []extension.FieldError
	f := listFilter{Consumer: q.Get("consumer"), Profile: q.Get("profile")}
	if s := q.Get("state"); s != "" {
		if !event.State(s).Valid() {
			errs = append(errs, extension.FieldError{Field: "state", Detail: "unknown state " + extension.SafeField(s)})
		}
		f.State = event.State(s)
	}
	for _, l := range q["label"] {
		k, v, ok := strings.Cut(l, "=")
		if !ok || k == "" {
			errs = append(errs, extension.FieldError{Field: "label", Detail: "want key=value, got " + extension.SafeField(l)})
			continue
		}
		f.Labels = append(f.Labels, [2]string{k, v})
	}
	limit := api.DefaultPageSize
	if s := q.Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > api.MaxPageSize {
			errs = append(errs, extension.FieldError{Field: "limit", Detail: fmt.Sprintf("want an integer from 1 to %d, got %s", api.MaxPageSize, extension.SafeField(s))})
		}
		limit = n
	}
	after := q.Get("after")
	if after != "" && !event.ValidName(after) {
		errs = append(errs, extension.FieldError{Field: "after", Detail: "want the next of a previous page, got " + extension.SafeField(after)})
	}
	if len(errs) > 0 {
		g.writeProblem(w, r, newProblem(http.StatusBadRequest, "invalid filter", errs...))
		return
	}
	out := api.SandboxList{Sandboxes: []api.Sandbox{}}
	if !c.admin() {
		if f.Consumer != "" && f.Consumer != c.Consumer {
			writeJSON(w, http.StatusOK, out)
			return
		}
		f.Consumer = c.Consumer
	}
	recs, more := st.inv.page(f, after, limit)
	out.Sandboxes = make([]api.Sandbox, len(recs))
	for i, rec := range recs {
		out.Sandboxes[i] = api.FromRecord(rec)
	}
	if more {
		out.Next = recs[len(recs)-1].ID
	}
	writeJSON(w, http.StatusOK, out)
}

// destroy handles DELETE /v1/sandboxes/{id}: it publishes a destroy
// command and answers 202 with the sandbox as it is. A sandbox already on
// its way out (expired, destroying) gets no new command unless its
// teardown is stuck (its latest attempt failed, or nothing was heard of
// it for longer than the profile's teardown deadline): then it gets a
// fresh destroy attempt ([Gateway.redrive]). One gone (destroyed,
// rejected) gets none. A repeated destroy publishes the same command,
// which the commands stream keeps once within its duplicate window.
func (g *Gateway) destroy(w http.ResponseWriter, r *http.Request, c caller) {
	st := g.current()
	if st == nil {
		g.writeProblem(w, r, newProblem(http.StatusServiceUnavailable, "gateway is not ready"))
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), g.opts.WriteTimeout)
	defer cancel()
	rec, p := g.destroySandbox(ctx, st, c, r.PathValue("id"))
	if p != nil {
		g.writeProblem(w, r, p)
		return
	}
	writeJSON(w, http.StatusAccepted, api.FromRecord(rec))
}

// destroySandbox publishes the destroy command of c's sandbox id and
// returns the sandbox as it is: the one path of a destroy, over HTTP or as
// a request event. A sandbox already on its way out (expired, destroying)
// gets no new command unless its teardown is stuck, and then a fresh
// attempt; one gone (destroyed, rejected) gets none.
//
// A sandbox this gateway's fold of the lifecycle stream holds as not yet
// on its way out (the common case: a DELETE of a ready sandbox) is
// decided on the fold, without a read: its owner never changes, and a
// command for a sandbox that ended a moment ago finds it ended in the
// worker, as one sent just before it ended does. Any other is read from
// the stream, so whether a teardown is stuck and is re-driven is decided
// on the sandbox as it is.
func (g *Gateway) destroySandbox(ctx context.Context, st *state, c caller, id string) (*sandbox.Record, *api.Problem) {
	rec, _, ok := st.inv.get(id)
	switch {
	case ok && !c.owns(rec.Consumer):
		return nil, newProblem(http.StatusNotFound, "no such sandbox")
	case !ok || !destroyOnFold(rec.State):
		var p *api.Problem
		if rec, p = g.visibleRecord(ctx, st, c, id); p != nil {
			return nil, p
		}
	}
	trace.SpanFromContext(ctx).SetAttributes(attribute.String(attrSandbox, rec.ID))
	switch rec.State {
	case event.StateDestroyed, event.StateRejected:
		return rec, nil
	case event.StateExpired, event.StateDestroying:
		if !g.teardownStuck(rec) {
			return rec, nil
		}
		return g.redrive(ctx, st, c, rec)
	}
	ctx, span := g.startDestroy(ctx, rec)
	defer span.End()
	ev, err := event.New(event.TypeDestroy, Source, rec.ID, rec.ID+"."+event.VerbDestroy, event.Destroy{
		Ref: rec.Ref(), Reason: event.ReasonRequested, RequestedBy: c.Consumer, RequestedAt: g.opts.Now().UTC(),
	})
	if err == nil {
		_, err = g.pub.Publish(ctx, rec.Ref().CommandSubject(event.VerbDestroy), ev)
	}
	if err != nil {
		span.SetStatus(codes.Error, err.Error())
		g.log.WarnContext(ctx, "publishing destroy command", "sandbox", rec.ID, "err", err)
		detail := "cannot publish the destroy command right now"
		if errors.Is(err, bus.ErrBackPressure) {
			detail = "too many pending commands; retry later"
		}
		return nil, newProblem(http.StatusServiceUnavailable, detail)
	}
	g.log.InfoContext(ctx, "sandbox destroy requested", "sandbox", rec.ID, "consumer", rec.Consumer, "by", c.Consumer)
	return rec, nil
}

// destroyOnFold reports whether a destroy of a sandbox the fold holds in
// state s is decided on the fold: one whose answer is a destroy command.
func destroyOnFold(s event.State) bool {
	switch s {
	case event.StateRequested, event.StateProvisioning, event.StateReady, event.StateFailed:
		return true
	}
	return false
}

// startDestroy starts the span of destroying rec's sandbox ("destroy
// sandbox") in the sandbox's own trace, the one its create began
// (rec.Trace): the destroy command carries it, so teardown, the destroyed
// event and the settlement join the create's trace, and a sandbox has
// one trace from its create to its usage record. The request that asked
// (a DELETE, a destroy request event) has a trace of its own: the two are
// linked both ways. A record without a trace context (written by a
// gateway that did not keep one) leaves the destroy in the request's
// trace.
func (g *Gateway) startDestroy(ctx context.Context, rec *sandbox.Record) (context.Context, trace.Span) {
	opts := []trace.SpanStartOption{trace.WithAttributes(attribute.String(attrSandbox, rec.ID),
		attribute.String("sandboxer.consumer", rec.Consumer), attribute.String("sandboxer.extension", rec.Extension))}
	if sc := recordTrace(rec); sc.IsValid() {
		req := trace.SpanFromContext(ctx)
		if rc := req.SpanContext(); rc.IsValid() && rc.TraceID() != sc.TraceID() {
			req.AddLink(trace.Link{SpanContext: sc, Attributes: []attribute.KeyValue{attribute.String("sandboxer.link", "sandbox")}})
			opts = append(opts, trace.WithLinks(trace.Link{SpanContext: rc, Attributes: []attribute.KeyValue{attribute.String("sandboxer.link", "request")}}))
		}
		ctx = trace.ContextWithRemoteSpanContext(ctx, sc)
	}
	return g.tracer.Start(ctx, "destroy sandbox", opts...)
}

// recordTrace is the span context of rec's create, from its traceparent;
// invalid when it has none.
func recordTrace(rec *sandbox.Record) trace.SpanContext {
	if rec.Trace == "" {
		return trace.SpanContext{}
	}
	ctx := propagation.TraceContext{}.Extract(context.Background(), propagation.MapCarrier{"traceparent": rec.Trace})
	return trace.SpanContextFromContext(ctx)
}
