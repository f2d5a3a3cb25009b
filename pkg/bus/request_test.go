package bus_test

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
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

// TestCall: one request-reply client for every service. A reply decodes
// into the reply type, a refusal in the micro convention is a
// *ServiceError carrying its code and description, a reply of another
// shape is ErrMalformedReply, and nobody answering names the subject.
func TestCall(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	answerer := srv.ConnAs(t, auth.Identity{Role: auth.RoleMetering})
	caller := srv.ConnAs(t, auth.Identity{Role: auth.RoleGateway})

	type request struct {
		Answer string `json:"answer"`
	}
	type reply struct {
		Amount int64 `json:"amount"`
	}
	sub, err := answerer.Subscribe(event.SubjectMeteringHold, func(m *nats.Msg) {
		var r request
		_ = json.Unmarshal(m.Data, &r)
		out := nats.NewMsg(m.Reply)
		switch r.Answer {
		case "ok":
			out.Data = []byte(`{"amount":42}`)
		case "refuse":
			out.Header.Set(micro.ErrorCodeHeader, "insufficient_credits")
			out.Header.Set(micro.ErrorHeader, "balance 0, want 5")
			out.Data = []byte(`{"code":"insufficient_credits","detail":"balance 0, want 5"}`)
		case "garbage":
			out.Data = []byte(`not json`)
		}
		_ = m.RespondMsg(out)
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := answerer.FlushWithContext(testCtx(t)); err != nil {
		t.Fatal(err)
	}

	got, err := bus.Call[reply](testCtx(t), caller, event.SubjectMeteringHold, request{Answer: "ok"})
	if err != nil || got.Amount != 42 {
		t.Errorf("answered: %+v, %v; want amount 42", got, err)
	}

	_, err = bus.Call[reply](testCtx(t), caller, event.SubjectMeteringHold, request{Answer: "refuse"})
	var se *bus.ServiceError
	if !errors.As(err, &se) || se.Code != "insufficient_credits" || se.Description != "balance 0, want 5" || se.Subject != event.SubjectMeteringHold {
		t.Errorf("refused: %v (%#v), want a ServiceError with code and description", err, se)
	}

	_, err = bus.Call[reply](testCtx(t), caller, event.SubjectMeteringHold, request{Answer: "garbage"})
	if !errors.Is(err, bus.ErrMalformedReply) || errors.As(err, &se) {
		t.Errorf("garbage: %v, want ErrMalformedReply", err)
	}

	_, err = bus.Call[reply](testCtx(t), caller, event.SubjectMeteringGrant, request{})
	if !errors.Is(err, nats.ErrNoResponders) || !strings.Contains(err.Error(), event.SubjectMeteringGrant) {
		t.Errorf("nobody answering: %v, want no responders naming the subject", err)
	}
}
