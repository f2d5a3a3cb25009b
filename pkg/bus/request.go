package bus

import (
	"context"
	"fmt"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/sand-boxer/sandboxer/pkg/event"
)

// tracerName names the tracer of the bus's spans.
const tracerName = "github.com/sand-boxer/sandboxer/pkg/bus"

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
