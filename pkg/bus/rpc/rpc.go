// Package rpc is sand-boxer's request-reply on NATS: a client span the
// answer joins, JSON requests and replies, refusals in the micro services
// convention. It is a leaf: the contract packages' clients (pkg/credits)
// use it without pulling in pkg/bus's router and its metrics; pkg/bus
// re-exports it.
package rpc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/sand-boxer/sandboxer/pkg/event"
)

// tracerName names the tracer of the request and answer spans.
const tracerName = "github.com/sand-boxer/sandboxer/pkg/bus/rpc"

// Request sends data as a NATS request on subject and returns the reply,
// in a client span ("request <subject>") whose trace context the request
// carries in its traceparent and tracestate headers, so that the answering
// side's span ([StartAnswer]) joins the caller's trace. ctx bounds the
// wait and must carry a deadline or be cancellable. A reply is not
// inspected: an error the service answered with is the caller's to read.
func Request(ctx context.Context, nc *nats.Conn, subject string, data []byte) (*nats.Msg, error) {
	ctx, span := otel.Tracer(tracerName).Start(ctx, "request "+subject,
		trace.WithSpanKind(trace.SpanKindClient),
		trace.WithAttributes(
			attribute.String("messaging.system", "nats"),
			attribute.String("messaging.destination.name", subject),
			attribute.String("messaging.operation.type", "send"),
		))
	defer span.End()
	msg := nats.NewMsg(subject)
	msg.Data = data
	otel.GetTextMapPropagator().Inject(ctx, event.HeaderCarrier(msg.Header))
	reply, err := nc.RequestMsgWithContext(ctx, msg)
	if err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, err.Error())
		return nil, fmt.Errorf("requesting %s: %w", subject, err)
	}
	return reply, nil
}

// ErrMalformedReply wraps the error of a reply [Call] could not decode: the
// answering side speaks another contract, and asking again cannot help.
var ErrMalformedReply = errors.New("malformed reply")

// ServiceError is a refusal a service answered a request with, in the
// convention of NATS micro services that every sand-boxer service follows:
// the code in the Nats-Service-Error-Code header and the description in
// Nats-Service-Error. A service may add a body (metering's ErrorReply),
// which repeats the two. Code is the service's own: an HTTP-like status
// ("400") or a word ("insufficient_credits").
type ServiceError struct {
	// Subject is the subject the request was sent on.
	Subject string
	// Code is the Nats-Service-Error-Code header.
	Code string
	// Description is the Nats-Service-Error header.
	Description string
}

// Error returns the code and description.
func (e *ServiceError) Error() string { return e.Code + " " + e.Description }

// Call is the one request-reply client of sand-boxer's services: it
// encodes req as JSON, sends it on subject with [Request] (a client span
// the answer joins), and decodes the reply into a Rep. A refusal in the
// micro convention (either error header set) is a [*ServiceError]; a reply
// that is not a JSON Rep wraps [ErrMalformedReply]; no answer within ctx
// (no responders, a timeout, a cancelled ctx) is [Request]'s error, which
// names the subject and wraps nats.go's. ctx must carry a deadline or be
// cancellable. Rep comes first so that Req is inferred:
//
//	reply, err := rpc.Call[HoldReply](ctx, nc, event.SubjectMeteringHold, req)
func Call[Rep, Req any](ctx context.Context, nc *nats.Conn, subject string, req Req) (Rep, error) {
	var rep Rep
	body, err := json.Marshal(req)
	if err != nil {
		return rep, fmt.Errorf("encoding request for %s: %w", subject, err)
	}
	msg, err := Request(ctx, nc, subject, body)
	if err != nil {
		return rep, err
	}
	code, desc := msg.Header.Get(micro.ErrorCodeHeader), msg.Header.Get(micro.ErrorHeader)
	if code != "" || desc != "" {
		return rep, &ServiceError{Subject: subject, Code: code, Description: desc}
	}
	if err := json.Unmarshal(msg.Data, &rep); err != nil {
		return rep, fmt.Errorf("decoding reply from %s: %w: %w", subject, ErrMalformedReply, err)
	}
	return rep, nil
}

// StartAnswer starts the server span ("answer <subject>") of answering a
// request that arrived on subject with headers h: a child of the trace
// context h carries (a [Request] puts it there), or the root of a new
// trace when it carries none. The caller ends the span.
func StartAnswer(ctx context.Context, subject string, h nats.Header) (context.Context, trace.Span) {
	if h != nil {
		ctx = otel.GetTextMapPropagator().Extract(ctx, event.HeaderCarrier(h))
	}
	return otel.Tracer(tracerName).Start(ctx, "answer "+subject,
		trace.WithSpanKind(trace.SpanKindServer),
		trace.WithAttributes(
			attribute.String("messaging.system", "nats"),
			attribute.String("messaging.destination.name", subject),
			attribute.String("messaging.operation.type", "process"),
		))
}

var _ error = (*ServiceError)(nil)
