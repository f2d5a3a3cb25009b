package gateway

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"mime"
	"net"
	"net/http"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/nats-io/nats.go/jetstream"
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
		g.reject(ctx, st, cr, CodeNoRoute, err.Error())
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
			g.reject(ctx, st, cr, CodeInsufficientCredits, err.Error())
			return nil, rejection(http.StatusPaymentRequired, id, err.Error())
		case err != nil:
			g.log.ErrorContext(ctx, "admitting sandbox", "sandbox", id, "err", err)
			g.metrics.admitted(admitUnavailable)
			return nil, newProblem(http.StatusServiceUnavailable, "cannot admit sandboxes right now")
		}
		cr.Hold = hold
	}

	rec := sandbox.NewRequested(cr)
	rec.Trace = traceParent(ctx)
	ev, err := event.New(event.TypeCreate, Source, id, id+"."+event.VerbCreate, cr)
	if err != nil {
		g.log.ErrorContext(ctx, "building create command", "sandbox", id, "err", err)
		if cr.Hold != "" {
			g.reject(ctx, st, cr, CodeUnavailable, "building the create command failed")
		}
		g.metrics.admitted(admitUnavailable)
		return nil, newProblem(http.StatusInternalServerError, "cannot build the create command")
	}
	// The record first, then the command. A worker can take the command
	// only once the record (requested, with the create's labels, inputs
	// and trace) is stored, so no event of the sandbox reaches the
	// registry before there is a record to apply it to: the gateway alone
	// creates it. (Sent together on one connection, the command could be
	// stored by another stream leader, provisioned and announced first on
	// a cluster; the registry then created a record from the events and
	// the gateway's write failed, losing the labels.) And a sandbox with
	// no record never had a command, which is what lets an abandoned
	// Idempotency-Key be taken over (awaitIdempotent).
	rev, err := bus.KVWrite(ctx, g.opts.JS, bus.BucketSandboxes, id, rec.Marshal(), 0, 0)
	if err != nil {
		g.log.WarnContext(ctx, "recording sandbox", "sandbox", id, "err", err)
		// Nothing was published: the sandbox is rejected, which releases
		// its hold.
		if movedOn := g.reject(ctx, st, cr, CodeUnavailable, "recording the sandbox failed: "+err.Error()); movedOn != nil {
			return movedOn, nil
		}
		g.metrics.admitted(admitUnavailable)
		return nil, rejection(http.StatusServiceUnavailable, id, "cannot record the sandbox right now")
	}
	st.inv.put(id, rec, rev)
	_, err = g.pub.Publish(ctx, cr.Ref.CommandSubject(event.VerbCreate), ev)
	if err != nil {
		code, detail := CodeUnavailable, "cannot publish the create command"
		if errors.Is(err, bus.ErrBackPressure) {
			code, detail = CodeBackPressure, "too many pending commands; retry later"
		}
		g.log.WarnContext(ctx, "publishing create command", "sandbox", id, "err", err)
		if movedOn := g.reject(ctx, st, cr, code, err.Error()); movedOn != nil {
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

// reject moves sandbox cr.SandboxID to rejected in the sandboxes bucket
// and publishes the rejected event, so metering releases any hold and
// watchers see the end. It is best effort: failures are logged, and the
// registry applies the event if the bucket write failed. When the sandbox
// has already moved past requested (its create command did arrive after
// an ambiguous publish error), it rejects nothing and returns the record.
func (g *Gateway) reject(ctx context.Context, st *state, cr event.Create, code, reason string) (movedOn *sandbox.Record) {
	id := cr.SandboxID
	ev, err := event.New(event.TypeRejected, Source, id, id+"."+string(event.StateRejected),
		event.Rejected{Ref: cr.Ref, Code: code, Reason: reason})
	if err != nil {
		g.log.ErrorContext(ctx, "building rejected event", "sandbox", id, "err", err)
		return nil
	}
	if rec := g.recordRejection(ctx, st, cr, ev); rec != nil {
		g.log.WarnContext(ctx, "not rejecting a sandbox that moved on", "sandbox", id, "state", rec.State)
		return rec
	}
	if _, err := g.pub.Publish(ctx, cr.Ref.LifecycleSubject(event.StateRejected), ev); err != nil {
		g.log.ErrorContext(ctx, "publishing rejected event", "sandbox", id, "code", code, "err", err)
	}
	return nil
}

// recordRejection applies the rejected event ev to the sandbox's record,
// creating the record or compare-and-swapping it. It returns the record
// when the sandbox has moved past requested, and nil otherwise.
func (g *Gateway) recordRejection(ctx context.Context, st *state, cr event.Create, ev *event.Event) *sandbox.Record {
	id := cr.SandboxID
	failed := func(err error) *sandbox.Record {
		g.log.WarnContext(ctx, "recording rejection; the registry will apply the event", "sandbox", id, "err", err)
		return nil
	}
	const attempts = 5
	for range attempts {
		e, err := st.sandboxes.Get(ctx, id)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			rec := sandbox.NewRequested(cr)
			if _, err := sandbox.Apply(rec, ev); err != nil {
				return failed(err)
			}
			rev, err := bus.KVWrite(ctx, g.opts.JS, bus.BucketSandboxes, id, rec.Marshal(), 0, rec.TTL(g.opts.Retention))
			if errors.Is(err, jetstream.ErrKeyExists) {
				continue
			}
			if err != nil {
				return failed(err)
			}
			st.inv.put(id, rec, rev)
			return nil
		}
		if err != nil {
			return failed(err)
		}
		rec, err := sandbox.Unmarshal(e.Value())
		if err != nil {
			return failed(err)
		}
		changed, err := sandbox.Apply(rec, ev)
		if err != nil {
			return failed(err)
		}
		if !changed {
			if rec.State == event.StateRejected {
				return nil // rejected already; publishing again is harmless
			}
			return rec
		}
		rev, err := bus.KVWrite(ctx, g.opts.JS, bus.BucketSandboxes, id, rec.Marshal(), e.Revision(), rec.TTL(g.opts.Retention))
		if errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
			continue
		}
		if err != nil {
			return failed(err)
		}
		st.inv.put(id, rec, rev)
		return nil
	}
	return failed(fmt.Errorf("%d compare-and-swap conflicts", attempts))
}

// createBody mirrors api.CreateRequest with raw input and label values,
// so a value of the wrong JSON type is reported under its own key.
type createBody struct {
	Profile string                     `json:"profile"`
	Inputs  map[string]json.RawMessage `json:"inputs"`
	Labels  map[string]json.RawMessage `json:"labels"`
	TTL     string                     `json:"ttl"`
}

// decodeCreate reads the body strictly: one JSON object of at most
// MaxBodyBytes with no unknown fields, whose inputs and labels are
// strings.
func (g *Gateway) decodeCreate(w http.ResponseWriter, r *http.Request) (api.CreateRequest, *api.Problem) {
	var req api.CreateRequest
	var body createBody
	if p := g.decodeBody(w, r, MaxBodyBytes, &body); p != nil {
		return req, p
	}
	req.Profile, req.TTL = body.Profile, body.TTL
	var errs []extension.FieldError
	req.Inputs, errs = stringMap("inputs", body.Inputs, errs)
	req.Labels, errs = stringMap("labels", body.Labels, errs)
	if len(errs) > 0 {
		return req, newProblem(http.StatusBadRequest, "malformed request body", errs...)
	}
	return req, nil
}

// decodeBody decodes a request body of at most limit bytes into v,
// strictly: the content type application/json (or none), no unknown
// fields, exactly one JSON value, read within BodyReadTimeout.
// application/problem+json and other +json types are refused: the body
// of a request is the API's JSON, nothing else.
func (g *Gateway) decodeBody(w http.ResponseWriter, r *http.Request, limit int64, v any) *api.Problem {
	if ct := r.Header.Get("Content-Type"); ct != "" {
		mt, _, err := mime.ParseMediaType(ct)
		if err != nil || mt != "application/json" {
			return newProblem(http.StatusUnsupportedMediaType, fmt.Sprintf("content type %s: want application/json", strconv.Quote(clip(ct))))
		}
	}
	// The body has a deadline of its own, whatever the server's
	// ReadTimeout: a client that sends it slowly holds a connection for
	// at most that long. It is lifted once the body is read in full, so
	// what the handler does next is not cut by it; after a bad body, the
	// connection is closed instead (what is left of the body is not read:
	// the server would wait for it).
	rc := http.NewResponseController(w)
	deadline := rc.SetReadDeadline(time.Now().Add(g.opts.BodyReadTimeout)) == nil
	p := decodeJSON(w, r, limit, v)
	if p != nil {
		w.Header().Set("Connection", "close")
		return p
	}
	if deadline {
		_ = rc.SetReadDeadline(time.Time{})
	}
	return nil
}

// decodeJSON decodes r's body, exactly one JSON value of at most limit
// bytes without unknown fields, into v.
func decodeJSON(w http.ResponseWriter, r *http.Request, limit int64, v any) *api.Problem {
	known := jsonFields(v)
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, limit))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return bodyProblem(err, known...)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		if err != nil {
			if p := bodyProblem(err, known...); p.Status == http.StatusRequestEntityTooLarge || p.Status == http.StatusRequestTimeout {
				return p
			}
		}
		return newProblem(http.StatusBadRequest, "malformed request body",
			extension.FieldError{Field: "body", Detail: "want exactly one JSON object; found more after it"})
	}
	return nil
}

// jsonFields are the JSON names of the fields of the struct v points to,
// in declaration order.
func jsonFields(v any) []string {
	t := reflect.TypeOf(v)
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == nil || t.Kind() != reflect.Struct {
		return nil
	}
	var out []string
	for i := range t.NumField() {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		switch {
		case name == "-" || !f.IsExported():
		case name == "":
			out = append(out, f.Name)
		default:
			out = append(out, name)
		}
	}
	return out
}

// stringMap converts raw JSON values that must be strings, adding an error
// per value that is not.
func stringMap(field string, raw map[string]json.RawMessage, errs []extension.FieldError) (map[string]string, []extension.FieldError) {
	if raw == nil {
		return nil, errs
	}
	out := make(map[string]string, len(raw))
	for _, k := range slices.Sorted(maps.Keys(raw)) {
		var s string
		if string(raw[k]) == "null" || json.Unmarshal(raw[k], &s) != nil {
			errs = append(errs, extension.FieldError{Field: field + "." + extension.SafeField(k), Detail: "want a JSON string, got " + jsonKindOf(raw[k])})
			continue
		}
		out[k] = s
	}
	return out, errs
}

// jsonKindOf names the kind of a JSON value by its first byte.
func jsonKindOf(v json.RawMessage) string {
	if len(v) == 0 {
		return "nothing"
	}
	switch v[0] {
	case '{':
		return "object"
	case '[':
		return "array"
	case 't', 'f':
		return "boolean"
	case 'n':
		return "null"
	case '"':
		return "string"
	}
	return "number"
}

// bodyProblem describes a JSON decoding error, naming the field where it
// can; an unknown field's problem lists known, the fields of the body
// being decoded (those of a create request when none are given: the bus
// intake's).
func bodyProblem(err error, known ...string) *api.Problem {
	var (
		tooLarge *http.MaxBytesError
		syntax   *json.SyntaxError
		typ      *json.UnmarshalTypeError
		netErr   net.Error
	)
	bad := func(field, detail string) *api.Problem {
		return newProblem(http.StatusBadRequest, "malformed request body", extension.FieldError{Field: field, Detail: detail})
	}
	if len(known) == 0 {
		known = jsonFields(&createBody{})
	}
	switch {
	case errors.As(err, &tooLarge):
		return newProblem(http.StatusRequestEntityTooLarge, "request body too large",
			extension.FieldError{Field: "body", Detail: fmt.Sprintf("larger than %d bytes", tooLarge.Limit)})
	case errors.As(err, &netErr) && netErr.Timeout():
		return newProblem(http.StatusRequestTimeout, "request body not received in time")
	case errors.Is(err, io.EOF):
		return bad("body", "empty: want a JSON object")
	case errors.Is(err, io.ErrUnexpectedEOF):
		return bad("body", "truncated JSON")
	case errors.As(err, &syntax):
		return bad("body", fmt.Sprintf("malformed JSON at byte %d: %v", syntax.Offset, syntax))
	case errors.As(err, &typ):
		field := typ.Field
		if field == "" {
			field = "body"
		}
		return bad(field, fmt.Sprintf("want a JSON %s, got %s", jsonKind(typ.Type.Kind().String()), typ.Value))
	}
	if name, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
		if s, uerr := strconv.Unquote(name); uerr == nil {
			name = s
		}
		return bad(extension.SafeField(name), "unknown field (known: "+strings.Join(known, ", ")+")")
	}
	return bad("body", err.Error())
}

func jsonKind(goKind string) string {
	switch goKind {
	case "map", "struct":
		return "object"
	case "slice", "array":
		return "array"
	}
	return goKind
}

// idempotencyKey reads the optional Idempotency-Key header: at most
// MaxIdempotencyKey printable ASCII characters.
func idempotencyKey(h http.Header) (string, *api.Problem) {
	vs := h.Values(api.HeaderIdempotencyKey)
	if len(vs) == 0 {
		return "", nil
	}
	bad := func(detail string) (string, *api.Problem) {
		return "", newProblem(http.StatusBadRequest, "invalid Idempotency-Key header",
			extension.FieldError{Field: "header." + api.HeaderIdempotencyKey, Detail: detail})
	}
	if len(vs) > 1 {
		return bad("give it once")
	}
	k := vs[0]
	if k == "" || len(k) > MaxIdempotencyKey {
		return bad(fmt.Sprintf("want 1 to %d characters", MaxIdempotencyKey))
	}
	for i := 0; i < len(k); i++ {
		if k[i] < 0x20 || k[i] > 0x7e {
			return bad("want printable ASCII characters")
		}
	}
	return k, nil
}

// validate checks a request against the catalog and reports every invalid
// field at once, as a 422.
func (g *Gateway) validate(req api.CreateRequest) (*plan, *api.Problem) {
	var errs extension.FieldErrors
	cat := g.opts.Catalog.Current()
	pl := &plan{}
	if req.Profile == "" {
		errs = append(errs, extension.FieldError{Field: "profile", Detail: "required"})
	} else if p, err := cat.Profile(req.Profile); err != nil {
		errs = append(errs, extension.FieldError{Field: "profile", Detail: fmt.Sprintf("unknown profile %s (known: %s)",
			strconv.Quote(clip(req.Profile)), strings.Join(slices.Sorted(maps.Keys(cat.Profiles)), ", "))})
	} else {
		// A routed profile's request must suit every candidate, so that
		// where it lands never decides whether it is valid.
		names := p.ExtensionNames()
		pl.inputs = make(map[string]extension.Inputs, len(names))
		seen := map[extension.FieldError]bool{}
		for _, name := range names {
			m, err := cat.Extension(name)
			if err != nil {
				errs = append(errs, extension.FieldError{Field: "profile", Detail: fmt.Sprintf("profile %s binds extension %s, which is not in the catalog", p.Slug, name)})
				continue
			}
			pl.manifests = append(pl.manifests, m)
			in, ierrs := m.ValidateInputs(p.Inputs, req.Inputs)
			for _, fe := range ierrs {
				if len(names) > 1 {
					fe.Detail = "extension " + name + ": " + fe.Detail
				}
				if !seen[fe] {
					seen[fe] = true
					errs = append(errs, fe)
				}
			}
			pl.inputs[name] = in
		}
		if len(names) == 0 {
			errs = append(errs, extension.FieldError{Field: "profile", Detail: fmt.Sprintf("profile %s binds no extension", p.Slug)})
		}
		if len(pl.manifests) == len(names) && len(names) > 0 {
			pl.profile, pl.manifest = p, pl.manifests[0]
		}
	}

	if len(req.Labels) > MaxLabels {
		errs = append(errs, extension.FieldError{Field: "labels", Detail: fmt.Sprintf("at most %d labels", MaxLabels)})
	} else {
		if pl.profile != nil && len(pl.profile.Labels) > 0 {
			pl.labels = maps.Clone(pl.profile.Labels)
		}
		for _, k := range slices.Sorted(maps.Keys(req.Labels)) {
			v := req.Labels[k]
			if err := extension.CheckLabel(k, v); err != nil {
				errs = append(errs, extension.FieldError{Field: "labels." + extension.SafeField(k), Detail: clipQuoted(err.Error(), k, v)})
				continue
			}
			if pl.labels == nil {
				pl.labels = make(map[string]string, len(req.Labels))
			}
			pl.labels[k] = v
		}
	}

	if req.TTL == "" {
		if pl.profile != nil {
			pl.ttl = pl.profile.TTL.Default.D()
		}
	} else if d, err := time.ParseDuration(req.TTL); err != nil {
		errs = append(errs, extension.FieldError{Field: "ttl", Detail: fmt.Sprintf("want a duration such as 30m or 2h, got %s", strconv.Quote(clip(req.TTL)))})
	} else if d < time.Second {
		errs = append(errs, extension.FieldError{Field: "ttl", Detail: "must be at least 1s"})
	} else if pl.profile != nil && pl.profile.TTL.Max > 0 && d > pl.profile.TTL.Max.D() {
		errs = append(errs, extension.FieldError{Field: "ttl", Detail: fmt.Sprintf("longer than the profile's maximum of %s", pl.profile.TTL.Max)})
	} else {
		pl.ttl = d
	}

	if len(errs) > 0 {
		return nil, newProblem(http.StatusUnprocessableEntity, "invalid sandbox request", errs...)
	}
	return pl, nil
}

// clip shortens a value of the request for quoting in an answer: at most
// 64 bytes of it, cut at a character.
func clip(s string) string { return clipTo(s, 64) }

// clipTo shortens s to at most n bytes, cut at a character, marked with
// "..." when cut.
func clipTo(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "..."
}

// clipQuoted replaces each of values that msg quotes (as %q does) with
// its clipped quote.
func clipQuoted(msg string, values ...string) string {
	for _, v := range values {
		if len(v) > 64 {
			msg = strings.ReplaceAll(msg, strconv.Quote(v), strconv.Quote(clip(v)))
		}
	}
	return msg
}

// requestHash identifies a request's content for Idempotency-Key reuse.
// encoding/json writes map keys sorted, so equal requests hash equal.
func requestHash(req api.CreateRequest) string {
	b, _ := json.Marshal(req) // strings and maps of strings: cannot fail
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// idemRecord is the value of an Idempotency-Key in its bucket.
type idemRecord struct {
	SandboxID   string `json:"sandbox_id"`
	RequestHash string `json:"request_hash"`
}

// idemClaim is an Idempotency-Key this request wrote.
type idemClaim struct {
	kv  jetstream.KeyValue
	key string
	rev uint64
}

// release drops the claim, unless it changed since, so the key can be
// used again after a request that did not happen. A nil claim is a no-op.
func (c *idemClaim) release(ctx context.Context) {
	if c == nil {
		return
	}
	_ = c.kv.Delete(ctx, c.key, jetstream.LastRevision(c.rev))
}

// idemBucketKey is hex SHA-256 of consumer NUL key: keys are per consumer,
// and any header value maps to a valid bucket key.
func idemBucketKey(consumer, key string) string {
	sum := sha256.Sum256([]byte(consumer + "\x00" + key))
	return hex.EncodeToString(sum[:])
}

// claim records that key stands for sandbox id. When the key already
// stands for a sandbox, it returns that sandbox's record instead; for a
// different request, a 422. A concurrent request with the same key that
// has not recorded its sandbox yet is waited for, up to IdempotencyWait.
func (g *Gateway) claim(ctx context.Context, st *state, c caller, key, hash, id string) (*idemClaim, *sandbox.Record, *api.Problem) {
	k := idemBucketKey(c.Consumer, key)
	val, _ := json.Marshal(idemRecord{SandboxID: id, RequestHash: hash})
	deadline := time.Now().Add(g.opts.IdempotencyWait)
	const attempts = 3
	for range attempts {
		rev, err := st.idem.Create(ctx, k, val)
		if err == nil {
			return &idemClaim{kv: st.idem, key: k, rev: rev}, nil, nil
		}
		if !errors.Is(err, jetstream.ErrKeyExists) {
			g.log.ErrorContext(ctx, "recording idempotency key", "err", err)
			return nil, nil, newProblem(http.StatusServiceUnavailable, "cannot record the Idempotency-Key right now")
		}
		rec, p := g.awaitIdempotent(ctx, st, k, hash, deadline)
		if p != nil || rec != nil {
			return nil, rec, p
		}
		// The other request gave the key up: try to claim it again.
	}
	return nil, nil, g.inProgress()
}

// awaitIdempotent waits for the sandbox an existing Idempotency-Key stands
// for to be recorded. It returns (nil, nil) when the key disappears.
func (g *Gateway) awaitIdempotent(ctx context.Context, st *state, k, hash string, deadline time.Time) (*sandbox.Record, *api.Problem) {
	const poll = 25 * time.Millisecond
	for {
		e, err := st.idem.Get(ctx, k)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			return nil, nil
		}
		if err != nil {
			g.log.ErrorContext(ctx, "reading idempotency key", "err", err)
			return nil, newProblem(http.StatusServiceUnavailable, "cannot read the Idempotency-Key right now")
		}
		var ir idemRecord
		if err := json.Unmarshal(e.Value(), &ir); err != nil {
			return nil, newProblem(http.StatusInternalServerError, "undecodable Idempotency-Key record")
		}
		if ir.RequestHash != hash {
			return nil, newProblem(http.StatusUnprocessableEntity, "idempotency key reused with a different request",
				extension.FieldError{Field: "header." + api.HeaderIdempotencyKey, Detail: "already used for a different request"})
		}
		rec, _, err := getRecord(ctx, st, ir.SandboxID)
		if err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
			g.log.ErrorContext(ctx, "reading sandbox", "sandbox", ir.SandboxID, "err", err)
			return nil, newProblem(http.StatusServiceUnavailable, "cannot read sandboxes right now")
		}
		if rec != nil {
			return rec, nil
		}
		// A key older than any request's writes whose sandbox has no
		// record was abandoned: its request ended (or its gateway died)
		// before recording the sandbox, and so before publishing a
		// command, which follows the record. It is taken over: deleted at
		// the revision read, then claimed again by the caller.
		if time.Since(e.Created()) > g.abandonedAfter() {
			err := st.idem.Delete(ctx, k, jetstream.LastRevision(e.Revision()))
			switch {
			case err == nil:
				g.log.WarnContext(ctx, "taking over an abandoned Idempotency-Key", "sandbox", ir.SandboxID, "claimed", e.Created())
				return nil, nil
			case errors.Is(err, jetstream.ErrKeyRevisionMismatch):
				// Another request took it over first: read it again.
				continue
			default:
				g.log.ErrorContext(ctx, "taking over an Idempotency-Key", "err", err)
				return nil, newProblem(http.StatusServiceUnavailable, "cannot record the Idempotency-Key right now")
			}
		}
		if !time.Now().Add(poll).Before(deadline) {
			return nil, g.inProgress()
		}
		t := time.NewTimer(poll)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, g.inProgress()
		case <-t.C:
		}
	}
}

// abandonedAfter is how old an Idempotency-Key with no recorded sandbox
// must be to be abandoned: twice the bound of a request's writes
// (WriteTimeout), which the request that claimed it cannot outlast.
func (g *Gateway) abandonedAfter() time.Duration { return 2 * g.opts.WriteTimeout }

func (g *Gateway) inProgress() *api.Problem {
	return newProblem(http.StatusConflict, "a request with this Idempotency-Key is still in progress; retry later")
}

// getRecord reads one sandbox from the bucket. A key that is not a valid
// sandbox id is not found.
func getRecord(ctx context.Context, st *state, id string) (*sandbox.Record, uint64, error) {
	if !event.ValidName(id) {
		return nil, 0, jetstream.ErrKeyNotFound
	}
	// On a cluster a read may be answered by a replica that has not yet
	// applied this gateway's own write (a record it created a moment
	// ago): what the inventory holds at a newer revision wins.
	mine, myRev, ok := st.inv.get(id)
	e, err := st.sandboxes.Get(ctx, id)
	if errors.Is(err, jetstream.ErrKeyNotFound) && ok {
		return mine, myRev, nil
	}
	if err != nil {
		return nil, 0, err
	}
	if ok && myRev > e.Revision() {
		return mine, myRev, nil
	}
	rec, err := sandbox.Unmarshal(e.Value())
	if err != nil {
		return nil, 0, err
	}
	return rec, e.Revision(), nil
}
