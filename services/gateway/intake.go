package gateway

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
)

// IntakeQueue is the queue group every gateway's bus intake joins, so each
// request event is answered by one gateway.
const IntakeQueue = "gateway"

// Rejection codes of requests refused before they were routed.
const (
	// CodeMalformedRequest: the request event or its data could not be
	// read.
	CodeMalformedRequest = "malformed_request"
	// CodeInvalidRequest: the request failed a check (profile, inputs,
	// labels, TTL).
	CodeInvalidRequest = "invalid_request"
)

// startIntake subscribes the bus intake: tenants publish request events
// on sandboxer.req.<consumer>.<verb>, and the gateways answer each one,
// as a queue group. Each request runs in a goroutine of its own, at most
// IntakeConcurrency at once; beyond that the subscription's buffer holds
// them.
// intakeFlushTimeout bounds the wait for the server to confirm the
// intake's subscription.
const intakeFlushTimeout = 10 * time.Second

func (g *Gateway) startIntake(ctx context.Context, nc *nats.Conn) (*nats.Subscription, error) {
	sem := make(chan struct{}, g.opts.IntakeConcurrency)
	sub, err := nc.QueueSubscribe(event.RequestFilter, IntakeQueue, func(m *nats.Msg) {
		select {
		case sem <- struct{}{}:
		case <-g.bg.Done():
			return
		}
		if !g.track() {
			<-sem
			return
		}
		go func() {
			defer g.wg.Done()
			defer func() { <-sem }()
			g.intake(m)
		}()
	})
	if err != nil {
		return nil, fmt.Errorf("subscribing to requests: %w", err)
	}
	// The server has the interest once it answered a flush: a request
	// right after Start must find its responder.
	fctx, cancel := context.WithTimeout(ctx, intakeFlushTimeout)
	defer cancel()
	if err := nc.FlushWithContext(fctx); err != nil {
		_ = sub.Unsubscribe()
		return nil, fmt.Errorf("subscribing to requests: %w", err)
	}
	return sub, nil
}

// intake answers one request event. The consumer is the subject's, which
// the tenant's permissions vouch for; nothing in the payload can change
// it. A create runs every check of POST /v1/sandboxes and is repeatable by
// the event's source and id, for as long as an Idempotency-Key is
// remembered; a destroy, every check of DELETE /v1/sandboxes/{id}. A
// refused create is also announced with a rejected event on the tenant's
// lifecycle subjects, for requesters that do not wait for the reply.
func (g *Gateway) intake(m *nats.Msg) {
	ctx, cancel := context.WithTimeout(g.bg, g.opts.WriteTimeout)
	defer cancel()
	ref, err := event.ParseRequestSubject(m.Subject)
	if err != nil {
		// Only a subject the filter matched but that is not a request
		// (an invalid consumer token): nobody to answer as.
		g.log.Warn("refusing request on an invalid subject", "subject", extension.SafeField(m.Subject), "err", err)
		g.reply(m, api.BusReply{Problem: newProblem(http.StatusBadRequest, err.Error())})
		return
	}
	c := caller{Consumer: ref.Consumer, Role: api.RoleConsumer}
	hctx, e, derr := event.Decode(ctx, m.Header, m.Data)
	if hctx != nil {
		ctx = hctx
	}
	ctx, span := g.tracer.Start(ctx, "intake "+ref.Verb, trace.WithSpanKind(trace.SpanKindServer),
		trace.WithAttributes(attribute.String("messaging.system", "nats"), attribute.String("messaging.destination.name", m.Subject),
			attribute.String("sandboxer.consumer", ref.Consumer)))
	defer span.End()
	var origin *event.Origin
	if e != nil {
		origin = &event.Origin{Source: e.Source(), ID: e.ID()}
	}
	st := g.current()
	if st == nil {
		g.reply(m, api.BusReply{Problem: newProblem(http.StatusServiceUnavailable, "gateway is not ready")})
		return
	}
	var (
		rec *sandbox.Record
		p   *api.Problem
	)
	switch {
	case derr != nil:
		p = newProblem(http.StatusBadRequest, "malformed request event",
			extension.FieldError{Field: "event", Detail: derr.Error()})
		if ref.Verb == event.VerbCreate {
			g.rejectRequest(ctx, c.Consumer, "", nil, p)
		}
	case event.Type(e.Type()) != requestType(ref.Verb):
		p = newProblem(http.StatusBadRequest, "wrong event type for "+ref.Verb,
			extension.FieldError{Field: "type", Detail: fmt.Sprintf("want %s on %s, got %s", requestType(ref.Verb), m.Subject, extension.SafeField(e.Type()))})
	case ref.Verb == event.VerbCreate:
		var req api.CreateRequest
		if req, p = decodeCreateEvent(e); p == nil {
			rec, p = g.createSandbox(ctx, st, c, req, intakeKey(origin), origin)
		}
		if p != nil && p.Status < 500 && p.Instance == "" && p.Status != http.StatusConflict {
			// Refused before routing (a routed refusal published its own).
			g.rejectRequest(ctx, c.Consumer, req.Profile, origin, p)
		}
	case ref.Verb == event.VerbGet:
		var d event.GetRequest
		if err := event.DataAs(e, &d); err != nil {
			p = newProblem(http.StatusBadRequest, "malformed request data", extension.FieldError{Field: "data", Detail: err.Error()})
		} else {
			rec, p = g.visibleRecord(ctx, st, c, d.SandboxID)
		}
	default:
		var d event.DestroyRequest
		if err := event.DataAs(e, &d); err != nil {
			p = newProblem(http.StatusBadRequest, "malformed request data", extension.FieldError{Field: "data", Detail: err.Error()})
		} else if !event.ValidName(d.SandboxID) {
			p = newProblem(http.StatusNotFound, "no such sandbox")
		} else {
			rec, p = g.destroySandbox(ctx, st, c, d.SandboxID)
		}
	}
	if p != nil {
		span.SetAttributes(attribute.Int("sandboxer.status", p.Status))
		g.reply(m, api.BusReply{Problem: p})
		return
	}
	sb := api.FromRecord(rec)
	g.reply(m, api.BusReply{Sandbox: &sb})
}

func requestType(verb string) event.Type {
	switch verb {
	case event.VerbCreate:
		return event.TypeRequestCreate
	case event.VerbGet:
		return event.TypeRequestGet
	}
	return event.TypeRequestDestroy
}

// intakeKey is the idempotency key of a request event: its source and id,
// which identify it. It starts with a byte no Idempotency-Key header may
// hold, so it never meets an HTTP key of the same consumer.
func intakeKey(o *event.Origin) string {
	return "\x00event\x00" + o.Source + "\x00" + o.ID
}

// reply answers m, when its sender waits for an answer.
func (g *Gateway) reply(m *nats.Msg, r api.BusReply) {
	g.countIntake(m.Subject, r)
	if m.Reply == "" {
		return
	}
	if !strings.HasPrefix(m.Reply, "_INBOX.") {
		// A reply subject is the requester's to choose: answering on one
		// that is not an inbox would publish wherever it points. (A
		// tenant's own inbox is _INBOX.tenant-<consumer>; another inbox
		// gets an answer nobody there asked for and nobody but the
		// tenant could read it into: harmless.)
		g.log.Warn("not answering a request whose reply subject is not an inbox", "subject", m.Subject, "reply", extension.SafeField(m.Reply))
		return
	}
	b, err := json.Marshal(r)
	if err != nil {
		g.log.Error("encoding request reply", "err", err)
		return
	}
	out := &nats.Msg{Subject: m.Reply, Header: nats.Header{"Content-Type": []string{"application/json"}}, Data: b}
	if err := m.RespondMsg(out); err != nil {
		g.log.Warn("answering request", "subject", m.Subject, "err", err)
	}
}

// decodeCreateEvent reads a create request's data as POST /v1/sandboxes
// reads its body: one JSON object of at most MaxBodyBytes, no unknown
// fields, string inputs and labels.
func decodeCreateEvent(e *event.Event) (api.CreateRequest, *api.Problem) {
	var req api.CreateRequest
	if ct := e.DataContentType(); ct != "" {
		if mt, _, err := mime.ParseMediaType(ct); err != nil || mt != "application/json" {
			return req, newProblem(http.StatusUnsupportedMediaType, fmt.Sprintf("data content type %s: want application/json", extension.SafeField(ct)))
		}
	}
	data := e.Data()
	if len(data) > MaxBodyBytes {
		return req, newProblem(http.StatusRequestEntityTooLarge, "request data too large",
			extension.FieldError{Field: "data", Detail: fmt.Sprintf("larger than %d bytes", MaxBodyBytes)})
	}
	var body createBody
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&body); err != nil {
		return req, bodyProblem(err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return req, newProblem(http.StatusBadRequest, "malformed request data",
			extension.FieldError{Field: "data", Detail: "want exactly one JSON object; found more after it"})
	}
	req.Profile, req.TTL = body.Profile, body.TTL
	var errs []extension.FieldError
	req.Inputs, errs = stringMap("inputs", body.Inputs, errs)
	req.Labels, errs = stringMap("labels", body.Labels, errs)
	if len(errs) > 0 {
		return req, newProblem(http.StatusBadRequest, "malformed request data", errs...)
	}
	return req, nil
}

// rejectRequest announces a create request refused before it was routed
// with a rejected event on the tenant's lifecycle subjects, under a fresh
// sandbox id and the extension [event.Unrouted]: no sandbox exists, and
// the registry keeps no record of it.
func (g *Gateway) rejectRequest(ctx context.Context, consumer, profile string, origin *event.Origin, p *api.Problem) {
	code := CodeInvalidRequest
	if p.Status == http.StatusBadRequest || p.Status == http.StatusUnsupportedMediaType || p.Status == http.StatusRequestEntityTooLarge {
		code = CodeMalformedRequest
	}
	if !event.ValidName(profile) {
		profile = event.Unrouted
	}
	id := sandbox.NewID()
	ref := event.Ref{SandboxID: id, Consumer: consumer, Profile: profile, Extension: event.Unrouted, Request: origin}
	reason := p.Error()
	if len(reason) > maxReason {
		reason = reason[:maxReason] + "..."
	}
	ev, err := event.New(event.TypeRejected, Source, id, id+"."+string(event.StateRejected),
		event.Rejected{Ref: ref, Code: code, Reason: reason})
	if err != nil {
		g.log.ErrorContext(ctx, "building rejected event", "sandbox", id, "consumer", consumer, "err", err)
		return
	}
	if _, err := g.pub.Publish(ctx, ref.LifecycleSubject(event.StateRejected), ev); err != nil {
		g.log.WarnContext(ctx, "publishing rejected event", "sandbox", id, "consumer", consumer, "code", code, "err", err)
	}
}

// maxReason bounds the reason of a rejected event.
const maxReason = 1000
