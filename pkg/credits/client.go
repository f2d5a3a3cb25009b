package credits

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go"

	"github.com/sand-boxer/sandboxer/pkg/bus/rpc"
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
	rep, err := rpc.Call[json.RawMessage](ctx, c.nc, subject, req)
	var se *rpc.ServiceError
	switch {
	case errors.As(err, &se):
		// Metering's ErrorReply body repeats the headers' code and
		// detail.
		return &Error{Code: se.Code, Detail: se.Description}
	case err != nil:
		return err
	}
	if err := json.Unmarshal(rep, reply); err != nil {
		return fmt.Errorf("decoding reply from %s: %w", subject, err)
	}
	return nil
}

var _ error = (*Error)(nil)
