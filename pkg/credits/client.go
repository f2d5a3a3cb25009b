package credits

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

// Client calls a running metering service over NATS request-reply:
// admission for the gateway, the credits API for the gateway's HTTP
// endpoints and the CLI. It is safe for concurrent use. Every call's ctx
// must carry a deadline or be cancellable: it bounds the wait for an
// answer.
type Client struct {
	nc *nats.Conn
}

// AdmissionClient is the client the gateway admits sandboxes with.
type AdmissionClient = Client

// NewClient returns a client on nc.
func NewClient(nc *nats.Conn) *Client { return &Client{nc: nc} }

// NewAdmissionClient returns a client on nc.
func NewAdmissionClient(nc *nats.Conn) *AdmissionClient { return NewClient(nc) }

// Error is a refusal metering answered with. It wraps the sentinel of its
// code: [ErrInsufficientCredits], [ErrHoldClosed], [ErrNoPrice] or
// [ErrInvalidRequest].
type Error struct {
	Code   string
	Detail string
}

// Error returns the code and detail.
func (e *Error) Error() string { return "metering: " + e.Code + ": " + e.Detail }

// Unwrap returns the sentinel of the code, or nil.
func (e *Error) Unwrap() error {
	switch e.Code {
	case CodeInsufficientCredits:
		return ErrInsufficientCredits
	case CodeHoldClosed:
		return ErrHoldClosed
	case CodeNoPrice:
		return ErrNoPrice
	case CodeInvalidRequest:
		return ErrInvalidRequest
	}
	return nil
}

// Hold asks admission for a credit hold for one sandbox. A refusal for lack
// of credit wraps [ErrInsufficientCredits].
func (c *Client) Hold(ctx context.Context, r HoldRequest) (HoldReply, error) {
	var out HoldReply
	if err := c.call(ctx, event.SubjectMeteringHold, r, &out); err != nil {
		return HoldReply{}, fmt.Errorf("holding credit for %s: %w", r.SandboxID, err)
	}
	return out, nil
}

// Grant adds credit to an account.
func (c *Client) Grant(ctx context.Context, r GrantRequest) (GrantReply, error) {
	var out GrantReply
	if err := c.call(ctx, event.SubjectMeteringGrant, r, &out); err != nil {
		return GrantReply{}, fmt.Errorf("granting credit to %s: %w", r.Consumer, err)
	}
	return out, nil
}

// Balance returns an account.
func (c *Client) Balance(ctx context.Context, consumer string) (BalanceReply, error) {
	var out BalanceReply
	if err := c.call(ctx, event.SubjectMeteringBalance, BalanceRequest{Consumer: consumer}, &out); err != nil {
		return BalanceReply{}, fmt.Errorf("reading balance of %s: %w", consumer, err)
	}
	return out, nil
}

// Ledger returns one page of ledger entries.
func (c *Client) Ledger(ctx context.Context, r LedgerRequest) (LedgerReply, error) {
	var out LedgerReply
	if err := c.call(ctx, event.SubjectMeteringLedger, r, &out); err != nil {
		return LedgerReply{}, fmt.Errorf("reading ledger of %s: %w", r.Consumer, err)
	}
	return out, nil
}

// LedgerAll returns every entry matching r, paging through the ledger.
func (c *Client) LedgerAll(ctx context.Context, r LedgerRequest) ([]Entry, error) {
	var all []Entry
	for range 1 << 20 { // bounded: a billion entries at the largest page
		page, err := c.Ledger(ctx, r)
		if err != nil {
			return nil, err
		}
		all = append(all, page.Entries...)
		if !page.More || len(page.Entries) == 0 {
			return all, nil
		}
		r.AfterSeq = page.Entries[len(page.Entries)-1].Seq
	}
	return nil, errors.New("reading ledger: too many pages")
}

// Usage returns usage records.
func (c *Client) Usage(ctx context.Context, r UsageRequest) (UsageReply, error) {
	var out UsageReply
	if err := c.call(ctx, event.SubjectMeteringUsage, r, &out); err != nil {
		return UsageReply{}, fmt.Errorf("reading usage: %w", err)
	}
	return out, nil
}

func (c *Client) call(ctx context.Context, subject string, req, reply any) error {
	body, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("encoding request: %w", err)
	}
	msg, err := request(ctx, c.nc, subject, body)
	if err != nil {
		return err
	}
	if code := msg.Header.Get(micro.ErrorCodeHeader); code != "" || msg.Header.Get(micro.ErrorHeader) != "" {
		var er ErrorReply
		if json.Unmarshal(msg.Data, &er) != nil || er.Code == "" {
			er = ErrorReply{Code: code, Detail: msg.Header.Get(micro.ErrorHeader)}
		}
		return &Error{Code: er.Code, Detail: er.Detail}
	}
	if err := json.Unmarshal(msg.Data, reply); err != nil {
		return fmt.Errorf("decoding reply from %s: %w", subject, err)
	}
	return nil
}

var _ error = (*Error)(nil)

// tracerName names the tracer of the client's spans.
const tracerName = "github.com/sand-boxer/sandboxer/pkg/credits"

// request sends a request in a client span ("request <subject>") whose
// trace context the request's headers carry, so metering's answer (and a
// quote it asks for) joins the caller's trace: what bus.Request does,
// here without pkg/bus, which links nats-server.
func request(ctx context.Context, nc *nats.Conn, subject string, data []byte) (*nats.Msg, error) {
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
