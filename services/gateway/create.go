package gateway

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

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

// Request limits.
const (
	// MaxBodyBytes bounds a create request body.
	MaxBodyBytes = 1 << 20
	// MaxLabels bounds the labels of one request.
	MaxLabels = 64
	// MaxIdempotencyKey bounds an Idempotency-Key header.
	MaxIdempotencyKey = 255
)

// plan is a request that passed every check: what the sandbox will be.
type plan struct {
	profile  *extension.Profile
	manifest *extension.Manifest // the first of manifests
	// manifests are the extensions the profile may use, in order.
	manifests []*extension.Manifest
	// inputs are the request's inputs validated for each of manifests.
	inputs map[string]extension.Inputs
	labels map[string]string
	ttl    time.Duration
}

// manifestOf is the manifest of extension name among pl's candidates, or
// nil.
func (pl *plan) manifestOf(name string) *extension.Manifest {
	for _, m := range pl.manifests {
		if m.Name == name {
			return m
		}
	}
	return nil
}

// create handles POST /v1/sandboxes. Every check runs before anything is
// written; the writes then run to completion under WriteTimeout even if
// the client goes away.
func (g *Gateway) create(w http.ResponseWriter, r *http.Request, c caller) {
	st := g.current()
	if st == nil {
		g.writeProblem(w, r, newProblem(http.StatusServiceUnavailable, "gateway is not ready"))
		return
	}
	req, p := g.decodeCreate(w, r)
	if p != nil {
		g.writeProblem(w, r, p)
		return
	}
	idemKey, p := idempotencyKey(r.Header)
	if p != nil {
		g.writeProblem(w, r, p)
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), g.opts.WriteTimeout)
	defer cancel()
	rec, p := g.createSandbox(ctx, st, c, req, idemKey, nil)
	if p != nil {
		g.writeProblem(w, r, p)
		return
	}
	g.accepted(w, rec)
}

// createSandbox checks req against the catalog and, when it passes,
// routes, admits and records the sandbox and publishes its create command:
// the one path of a create, whether it came over HTTP or as a request
// event (origin names that event). A non-empty idemKey makes it
// repeatable: the same key from the same consumer returns the same
// sandbox.
func (g *Gateway) createSandbox(ctx context.Context, st *state, c caller, req api.CreateRequest, idemKey string, origin *event.Origin) (*sandbox.Record, *api.Problem) {
	pl, p := g.validate(req)
	if p != nil {
		g.metrics.admitted(admitInvalid)
		return nil, p
	}
	id := sandbox.NewID()
	var claim *idemClaim
	if idemKey != "" {
		var prev *sandbox.Record
		claim, prev, p = g.claim(ctx, st, c, idemKey, requestHash(req), id)
		if p != nil {
			return nil, p
		}
		if prev != nil {
			return prev, nil
		}
	}
	rec, p := g.request(ctx, st, c, id, pl, origin)
	if p != nil {
		claim.release(ctx)
		return nil, p
	}
	g.metrics.admitted(admitAdmitted)
	return rec, nil
}

func (g *Gateway) accepted(w http.ResponseWriter, rec *sandbox.Record) {
	w.Header().Set("Location", "/v1/sandboxes/"+rec.ID)
	writeJSON(w, http.StatusAccepted, api.FromRecord(rec))
}

// request routes and admits a valid request, records the sandbox and
// publishes its create command. When the command cannot be published, the
// sandbox is rejected and the answer is a 503.
func (g *Gateway) request(ctx context.Context, st *state, c caller, id string, pl *plan, origin *event.Origin) (*sandbox.Record, *api.Problem) {
	cr := event.Create{
		Ref:         event.Ref{SandboxID: id, Consumer: c.Consumer, Profile: pl.profile.Slug, Extension: pl.manifest.Name, Request: origin},
		Inputs:      pl.inputs[pl.manifest.Name],
		Labels:      pl.labels,
		TTLSeconds:  int64((pl.ttl + time.Second - 1) / time.Second),
		RequestedAt: g.opts.Now().UTC(),
	}
	// The span of the request (HTTP or bus intake) names the sandbox: the
	// start of the sandbox's trace.
	trace.SpanFromContext(ctx).SetAttributes(attribute.String(attrSandbox, id))
	route, err := g.opts.Resolver.Resolve(ctx, RouteRequest{
		SandboxID: id, Consumer: c.Consumer, Profile: pl.profile, Manifest: pl.manifest,
		Candidates: pl.manifests, Load: st.inv,
	})
	if err == nil {
		err = checkRoute(route)
	}
	if err == nil && !pl.profile.Binds(route.Extension) {
		err = fmt.Errorf("checking route: profile %s does not bind extension %q", pl.profile.Slug, route.Extension)
	}
	switch {
	case errors.Is(err, ErrNoRoute):
		g.metrics.admitted(admitNoRoute)
		g.reject(ctx, st, cr, 0, CodeNoRoute, err.Error())
		return nil, rejection(http.StatusServiceUnavailable, id, "no route for this sandbox: "+err.Error())
	case err != nil:
		g.log.ErrorContext(ctx, "resolving route", "sandbox", id, "err", err)
		g.metrics.admitted(admitUnavailable)
		return nil, newProblem(http.StatusServiceUnavailable, "cannot route sandboxes right now")
	}
	cr.Extension, cr.Host = route.Extension, route.Host
	cr.Inputs = pl.inputs[route.Extension]

	if g.opts.Admitter != nil {
		actx, span := g.tracer.Start(ctx, "admit", trace.WithAttributes(attribute.String(attrSandbox, id),
			attribute.String("sandboxer.consumer", c.Consumer), attribute.String("sandboxer.extension", route.Extension)))
		hold, err := g.opts.Admitter.Admit(actx, AdmitRequest{
			SandboxID: id, Consumer: c.Consumer, Profile: pl.profile, Route: route, Manifest: pl.manifestOf(route.Extension), TTL: pl.ttl,
		})
		if err != nil {
			span.SetStatus(codes.Error, err.Error())
		}
		span.End()
		switch {
		case errors.Is(err, ErrInsufficientCredits):
			g.metrics.admitted(admitInsufficient)
			g.reject(ctx, st, cr, 0, CodeInsufficientCredits, err.Error())
			return nil, rejection(http.StatusPaymentRequired, id, err.Error())
		case err != nil:
			g.log.ErrorContext(ctx, "admitting sandbox", "sandbox", id, "err", err)
			g.metrics.admitted(admitUnavailable)
			return nil, newProblem(http.StatusServiceUnavailable, "cannot admit sandboxes right now")
		}
		cr.Hold = hold
	}

	// The record first, then the command: the requested event, with the
	// create's labels, inputs and trace, guarded by the sandbox having no
	// event at all. A worker can take the command only once the record is
	// stored, and its first provisioning expects exactly that event
	// (RecordSeq): a command that outran its record cannot start. And a
	// sandbox with no record never had a command, which is what lets an
	// abandoned Idempotency-Key be taken over (awaitIdempotent).
	rec, err := g.record(ctx, st, cr, traceParent(ctx))
	if err != nil {
		g.log.WarnContext(ctx, "recording sandbox", "sandbox", id, "err", err)
		// No command was published: the sandbox is rejected, which
		// releases its hold. Should the record have been stored after
		// all (an ambiguous error), the rejection finds it and follows
		// it.
		if movedOn := g.reject(ctx, st, cr, 0, CodeUnavailable, "recording the sandbox failed: "+err.Error()); movedOn != nil {
			return movedOn, nil
		}
		g.metrics.admitted(admitUnavailable)
		return nil, rejection(http.StatusServiceUnavailable, id, "cannot record the sandbox right now")
	}
	cr.RecordSeq = rec.Seq
	ev, err := event.New(event.TypeCreate, Source, id, id+"."+event.VerbCreate, cr)
	if err != nil {
		g.log.ErrorContext(ctx, "building create command", "sandbox", id, "err", err)
		g.reject(ctx, st, cr, rec.Seq, CodeUnavailable, "building the create command failed")
		g.metrics.admitted(admitUnavailable)
		return nil, newProblem(http.StatusInternalServerError, "cannot build the create command")
	}
	_, err = g.pub.Publish(ctx, cr.Ref.CommandSubject(event.VerbCreate), ev)
	if err != nil {
		code, detail := CodeUnavailable, "cannot publish the create command"
		if errors.Is(err, bus.ErrBackPressure) {
			code, detail = CodeBackPressure, "too many pending commands; retry later"
		}
		g.log.WarnContext(ctx, "publishing create command", "sandbox", id, "err", err)
		if movedOn := g.reject(ctx, st, cr, rec.Seq, code, err.Error()); movedOn != nil {
			return movedOn, nil // the command arrived after all
		}
		if code == CodeBackPressure {
			g.metrics.admitted(admitBackPressure)
		} else {
			g.metrics.admitted(admitUnavailable)
		}
		return nil, rejection(http.StatusServiceUnavailable, id, detail)
	}
	g.log.InfoContext(ctx, "sandbox requested", "sandbox", id, "consumer", c.Consumer, "profile", cr.Profile, "extension", cr.Extension)
	return rec, nil
}

// attrSandbox is the span attribute naming the sandbox a span is about.
const attrSandbox = "sandboxer.sandbox"

// traceParent is the W3C traceparent of ctx's span, or empty when ctx
// has none: what a sandbox's record keeps of its create's trace.
func traceParent(ctx context.Context) string {
	c := propagation.MapCarrier{}
	propagation.TraceContext{}.Inject(ctx, c)
	return c.Get("traceparent")
}

// rejection is the answer for a sandbox the gateway rejected: the problem
// names the sandbox, whose record says why.
func rejection(status int, id, detail string) *api.Problem {
	p := newProblem(status, detail)
	p.Instance = "/v1/sandboxes/" + id
	return p
}

// checkRoute refuses a route a resolver made up: its parts become subject
// tokens and command arguments.
func checkRoute(rt Route) error {
	if err := event.CheckName("route extension", rt.Extension); err != nil {
		return fmt.Errorf("checking route: %w", err)
	}
	if rt.Host != "" {
		if err := extension.CheckFormat(extension.FormatHost, rt.Host); err != nil {
			return fmt.Errorf("checking route host %q: %w", rt.Host, err)
		}
	}
	return nil
}
