package bus

import (
	"context"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel/trace"

	"github.com/sand-boxer/sandboxer/pkg/bus/rpc"
)

// tracerName names the tracer of the bus's spans.
const tracerName = "github.com/sand-boxer/sandboxer/pkg/bus"

// Request-reply lives in the leaf package [rpc], which the contract
// packages' clients import without the rest of pkg/bus; these are its
// names here, for the services.

// Request is [rpc.Request]: data sent as a request on subject, in a client
// span the answer joins.
func Request(ctx context.Context, nc *nats.Conn, subject string, data []byte) (*nats.Msg, error) {
	return rpc.Request(ctx, nc, subject, data)
}

// ErrMalformedReply is [rpc.ErrMalformedReply].
var ErrMalformedReply = rpc.ErrMalformedReply

// ServiceError is [rpc.ServiceError]: a refusal a service answered with.
type ServiceError = rpc.ServiceError

// Call is [rpc.Call], the one request-reply client of sand-boxer's
// services:
//
//	reply, err := bus.Call[HoldReply](ctx, nc, event.SubjectMeteringHold, req)
func Call[Rep, Req any](ctx context.Context, nc *nats.Conn, subject string, req Req) (Rep, error) {
	return rpc.Call[Rep](ctx, nc, subject, req)
}

// StartAnswer is [rpc.StartAnswer]: the server span of answering a
// request, a child of the trace its headers carry.
func StartAnswer(ctx context.Context, subject string, h nats.Header) (context.Context, trace.Span) {
	return rpc.StartAnswer(ctx, subject, h)
}
