package bus_test

import (
	"context"
	"strings"
	"testing"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/trace"

	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
)

// TestRequestPropagatesTrace: a request carries its client span's trace
// context, and the answer's server span continues the caller's trace, as
// the gateway asking metering for a hold does, each under its own
// identity.
func TestRequestPropagatesTrace(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	answerer := srv.ConnAs(t, auth.Identity{Role: auth.RoleMetering})
	caller := srv.ConnAs(t, auth.Identity{Role: auth.RoleGateway})

	type answered struct {
		header nats.Header
		sc     trace.SpanContext
	}
	got := make(chan answered, 1)
	sub, err := answerer.Subscribe(event.SubjectMeteringHold, func(m *nats.Msg) {
		ctx, span := bus.StartAnswer(context.Background(), m.Subject, m.Header)
		got <- answered{m.Header, trace.SpanContextFromContext(ctx)}
		span.End()
		_ = m.Respond([]byte(`{}`))
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := answerer.FlushWithContext(testCtx(t)); err != nil {
		t.Fatal(err)
	}

	ctx, span := otel.Tracer("test").Start(testCtx(t), "admit")
	defer span.End()
	reply, err := bus.Request(ctx, caller, event.SubjectMeteringHold, []byte(`{}`))
	if err != nil {
		t.Fatal(err)
	}
	if string(reply.Data) != `{}` {
		t.Fatalf("reply %q", reply.Data)
	}
	a := <-got
	parts := strings.Split(a.header.Get("traceparent"), "-")
	if len(parts) != 4 || parts[1] != span.SpanContext().TraceID().String() {
		t.Fatalf("request traceparent %q, want the caller's trace %s", a.header.Get("traceparent"), span.SpanContext().TraceID())
	}
	if parts[2] == span.SpanContext().SpanID().String() {
		t.Errorf("request names the caller's span, not its own client span")
	}
	if a.sc.TraceID() != span.SpanContext().TraceID() || a.sc.SpanID().String() == parts[2] {
		t.Errorf("answer span %s/%s, want a child in the caller's trace %s", a.sc.TraceID(), a.sc.SpanID(), span.SpanContext().TraceID())
	}

	// No one answering is an error naming the subject, as before.
	if _, err := bus.Request(ctx, caller, event.SubjectMeteringGrant, nil); err == nil || !strings.Contains(err.Error(), event.SubjectMeteringGrant) {
		t.Errorf("request nobody answers: %v", err)
	}
}
