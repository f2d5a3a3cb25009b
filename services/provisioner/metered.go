package provisioner

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// quoteTimeout bounds one EstimateCost call.
const quoteTimeout = 10 * time.Second

// serveQuotes answers quote requests for a metered pool on
// event.QuoteSubject, as a micro service whose instances (every worker of
// the pool) share one queue group. Metering asks; it never links backend
// code.
func (pl *pool) serveQuotes(m extension.Metered) (micro.Service, error) {
	svc, err := micro.AddService(pl.p.opts.JS.Conn(), micro.Config{
		Name:        "sandboxer-quote-" + pl.name,
		Version:     "0.1.0",
		Description: "price quotes of the metered extension " + pl.name,
		QueueGroup:  "provisioner-" + pl.name,
	})
	if err != nil {
		return nil, fmt.Errorf("serving quotes for %s: %w", pl.name, err)
	}
	err = svc.AddEndpoint("quote", micro.HandlerFunc(func(req micro.Request) {
		// The answer's span is a child of the asker's (metering pricing
		// an admission or an accrual tick): in the sandbox's trace.
		ctx, span := bus.StartAnswer(context.Background(), req.Subject(), nats.Header(req.Headers()))
		defer span.End()
		reply, code := pl.quote(ctx, m, req.Data())
		if reply.Error == "" {
			_ = req.RespondJSON(reply)
			return
		}
		span.SetStatus(codes.Error, reply.Error)
		// A refusal in the micro convention, which bus.Call reads; the
		// body still says it, for askers of an earlier version.
		body, _ := json.Marshal(reply)
		_ = req.Error(code, headerSafe(reply.Error), body)
	}), micro.WithEndpointSubject(event.QuoteSubject(pl.name)))
	if err != nil {
		_ = svc.Stop()
		return nil, fmt.Errorf("serving quotes for %s: %w", pl.name, err)
	}
	return svc, nil
}

// quote prices a quote request with the backend's EstimateCost. A refusal
// is a reply with Error set and the code to answer it with: 400 for a
// request that cannot be priced, 500 for a backend that failed to.
func (pl *pool) quote(ctx context.Context, m extension.Metered, data []byte) (event.QuoteReply, string) {
	var q event.QuoteRequest
	if err := json.Unmarshal(data, &q); err != nil {
		return event.QuoteReply{Error: "decoding quote request: " + err.Error()}, "400"
	}
	if q.DurationSeconds < 0 {
		return event.QuoteReply{Error: "duration_seconds must not be negative"}, "400"
	}
	prof, err := pl.p.opts.Catalog.Current().Profile(q.Profile)
	if err != nil {
		return event.QuoteReply{Error: err.Error()}, "400"
	}
	if !prof.Binds(pl.name) {
		return event.QuoteReply{Error: fmt.Sprintf("profile %q is not bound to extension %q", q.Profile, pl.name)}, "400"
	}
	ctx, cancel := context.WithTimeout(ctx, quoteTimeout)
	defer cancel()
	ctx, span := pl.startCall(ctx, "EstimateCost", event.Ref{}, attribute.String("sandboxer.profile", q.Profile),
		attribute.Int64("sandboxer.duration_seconds", q.DurationSeconds))
	mq, err := m.EstimateCost(ctx, *prof, time.Duration(q.DurationSeconds)*time.Second)
	endCall(span, err)
	if err != nil {
		return event.QuoteReply{Error: err.Error()}, "500"
	}
	return event.QuoteReply{Amount: mq.Amount, Breakdown: mq.Breakdown}, ""
}

// headerSafe is s on one line, as a header value must be.
func headerSafe(s string) string {
	return strings.Map(func(r rune) rune {
		if r == '\r' || r == '\n' {
			return ' '
		}
		return r
	}, s)
}

// meter asks a metered backend what a torn-down sandbox used. Backends
// that do not meter return nil.
func (pl *pool) meter(ctx context.Context, ref event.Ref, h extension.Handle, readyAt time.Time) (*event.MeterReading, error) {
	m, ok := pl.ext.(extension.Metered)
	if !ok {
		return nil, nil
	}
	u := extension.Usage{DestroyedAt: time.Now().UTC(), ReadyAt: readyAt}
	ctx, span := pl.startCall(ctx, "MeterActual", ref)
	r, err := m.MeterActual(ctx, h, u)
	endCall(span, err)
	if err != nil {
		return nil, fmt.Errorf("metering %s: %w", h.SandboxID, err)
	}
	return &event.MeterReading{Amount: r.Amount, Quantity: r.Quantity, Unit: r.Unit, Breakdown: r.Breakdown}, nil
}
