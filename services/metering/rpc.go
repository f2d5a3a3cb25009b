package metering

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// Error codes of the request-reply API ([ErrorReply.Code]).
const (
	CodeInsufficientCredits = "insufficient_credits"
	CodeHoldClosed          = "hold_closed"
	CodeNoPrice             = "no_price"
	CodeInvalidRequest      = "invalid_request"
	CodeInternal            = "internal"
)

// ErrInvalidRequest is wrapped by the client when metering refused a
// request as malformed.
var ErrInvalidRequest = errors.New("invalid request")

// HoldRequest asks admission for a quote and a credit hold for one sandbox
// ([event.SubjectMeteringHold]). Asking again for the same sandbox returns
// the same hold.
type HoldRequest struct {
	SandboxID string `json:"sandbox_id"`
	Consumer  string `json:"consumer"`
	Profile   string `json:"profile"`
	Extension string `json:"extension"`
	// TTLSeconds is the duration to hold credit for; 0 means the profile's
	// default TTL, or the service's default hold duration.
	TTLSeconds int64 `json:"ttl_seconds,omitempty"`
	// PricingModel is the extension's; empty means look it up in the
	// catalog.
	PricingModel extension.PricingModel `json:"pricing_model,omitempty"`
}

// HoldReply is admission's yes: the hold id (the create command carries
// it) and the amount held, in credit minor units.
type HoldReply struct {
	Hold   string `json:"hold"`
	Amount int64  `json:"amount"`
	// Quote is the price the amount comes from.
	Quote Quote `json:"quote"`
	// Available is what the account has left besides.
	Available int64 `json:"available"`
}

// ErrorReply is the body of every refusal; the same code and detail are
// in the Nats-Service-Error-Code and Nats-Service-Error headers.
type ErrorReply struct {
	Code   string `json:"code"`
	Detail string `json:"detail"`
}

// GrantRequest adds credit to an account ([event.SubjectMeteringGrant]).
type GrantRequest struct {
	Consumer string `json:"consumer"`
	// Amount is in credit minor units, more than 0.
	Amount int64 `json:"amount"`
	// Priority orders spending, lower first. Default 0.
	Priority int `json:"priority,omitempty"`
	// ExpiresAt, when set, is when the unspent rest expires.
	ExpiresAt time.Time `json:"expires_at,omitzero"`
	// Promo marks promotional credit.
	Promo bool `json:"promo,omitempty"`
	// ID makes the grant idempotent: a second grant with the same id for
	// the same consumer changes nothing. Empty: a fresh id.
	ID string `json:"id,omitempty"`
}

// GrantReply answers a grant with the account after it.
type GrantReply struct {
	// Grant is the grant of the request's id.
	Grant Grant `json:"grant"`
	// Duplicate is true when the id was granted before.
	Duplicate bool         `json:"duplicate,omitempty"`
	Balance   BalanceReply `json:"balance"`
}

// BalanceRequest asks for an account ([event.SubjectMeteringBalance]).
type BalanceRequest struct {
	Consumer string `json:"consumer"`
}

// HoldView is an open hold as the balance shows it.
type HoldView struct {
	Hold      string    `json:"hold"`
	Sandbox   string    `json:"sandbox_id"`
	Profile   string    `json:"profile"`
	Extension string    `json:"extension"`
	Amount    int64     `json:"amount"`
	Debited   int64     `json:"debited"`
	ReadyAt   time.Time `json:"ready_at,omitzero"`
}

// BalanceReply is an account: balance = held + available.
type BalanceReply struct {
	Consumer  string `json:"consumer"`
	Balance   int64  `json:"balance"`
	Held      int64  `json:"held"`
	Available int64  `json:"available"`
	// Seq is the sequence of the last ledger entry.
	Seq uint64 `json:"seq"`
	// Grants are the grants with credit left, in spending order.
	Grants []Grant    `json:"grants"`
	Holds  []HoldView `json:"holds"`
}

// LedgerRequest asks for ledger entries ([event.SubjectMeteringLedger]).
type LedgerRequest struct {
	Consumer string `json:"consumer"`
	// Since keeps entries at or after this time.
	Since time.Time `json:"since,omitzero"`
	// AfterSeq keeps entries with a higher sequence: pages through a
	// long ledger.
	AfterSeq uint64 `json:"after_seq,omitempty"`
	// Limit bounds the entries returned. Default and maximum 1000.
	Limit int `json:"limit,omitempty"`
}

// LedgerReply lists entries in sequence order.
type LedgerReply struct {
	Consumer string  `json:"consumer"`
	Entries  []Entry `json:"entries"`
	// More is true when Limit cut the list: ask again with AfterSeq set to
	// the last entry's sequence.
	More bool `json:"more,omitempty"`
}

// UsageRequest asks for usage records ([event.SubjectMeteringUsage]).
type UsageRequest struct {
	// Consumer keeps one consumer's records; empty means every consumer.
	Consumer string `json:"consumer,omitempty"`
	// From and To keep records destroyed in [From, To).
	From time.Time `json:"from,omitzero"`
	To   time.Time `json:"to,omitzero"`
	// Limit bounds the records returned. Default and maximum 1000.
	Limit int `json:"limit,omitempty"`
}

// UsageReply lists usage records, oldest first.
type UsageReply struct {
	Records []UsageRecord `json:"records"`
	More    bool          `json:"more,omitempty"`
}

// maxList bounds the entries and records of one reply.
const maxList = 1000

// serve starts the micro service. Every metering instance joins the same
// queue group, so each request gets one answer.
func (m *Metering) serve() (micro.Service, error) {
	svc, err := micro.AddService(m.opts.NC, micro.Config{
		Name:        ServiceName,
		Version:     ServiceVersion,
		Description: "sand-boxer admission and credits",
		ErrorHandler: func(_ micro.Service, err *micro.NATSError) {
			m.log.Warn("request service error", "subject", err.Subject, "err", err.Description)
		},
	})
	if err != nil {
		return nil, fmt.Errorf("starting request service: %w", err)
	}
	for _, ep := range []struct {
		name, subject string
		h             func(context.Context, []byte) (any, error)
	}{
		{"hold", event.SubjectMeteringHold, m.handleHold},
		{"grant", event.SubjectMeteringGrant, m.handleGrant},
		{"balance", event.SubjectMeteringBalance, m.handleBalance},
		{"ledger", event.SubjectMeteringLedger, m.handleLedger},
		{"usage", event.SubjectMeteringUsage, m.handleUsage},
	} {
		if err := svc.AddEndpoint(ep.name, m.endpoint(ep.h), micro.WithEndpointSubject(ep.subject)); err != nil {
			_ = svc.Stop()
			return nil, fmt.Errorf("adding endpoint %s: %w", ep.name, err)
		}
	}
	return svc, nil
}

// requestTimeout bounds the work of one request.
const requestTimeout = 10 * time.Second

// endpoint adapts a handler returning a reply or an error to micro. Each
// request is handled on its own goroutine, up to Options.Requests at once
// (then the subscription waits), so concurrent requests for one account
// meet in one batch instead of queueing behind each other's round trips.
// micro expects a handler to respond before it returns (it reads the
// request's outcome for its statistics right after), so the goroutine
// takes only the request's data and answers on the connection itself.
func (m *Metering) endpoint(h func(context.Context, []byte) (any, error)) micro.HandlerFunc {
	return func(req micro.Request) {
		in := inbound{subject: req.Subject(), reply: req.Reply(), data: req.Data(), header: nats.Header(req.Headers())}
		m.reqSlots <- struct{}{}
		m.requests.Go(func() {
			defer func() { <-m.reqSlots }()
			m.answer(h, in)
		})
	}
}

// inbound is what answering a request needs of it.
type inbound struct {
	subject, reply string
	data           []byte
	header         nats.Header // the caller's trace context is there
}

// answer handles one request and responds with its reply or, the way
// micro does, its error: the error code and description in headers and
// an ErrorReply as the body.
func (m *Metering) answer(h func(context.Context, []byte) (any, error), in inbound) {
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	// The server span of the answer, a child of the caller's client span:
	// what the request changes (a hold's ledger entry and its event)
	// joins the caller's trace.
	ctx, span := bus.StartAnswer(ctx, in.subject, in.header)
	defer span.End()
	reply, err := h(ctx, in.data)
	msg := &nats.Msg{Subject: in.reply}
	if err == nil {
		msg.Data, err = json.Marshal(reply)
	}
	if err != nil {
		code := codeOf(err)
		span.SetAttributes(attribute.String("sandboxer.metering.code", code))
		if code == CodeInternal {
			span.SetStatus(codes.Error, err.Error())
			m.log.ErrorContext(ctx, "answering request", "subject", in.subject, "err", err)
		}
		msg.Header = nats.Header{micro.ErrorHeader: {err.Error()}, micro.ErrorCodeHeader: {code}}
		msg.Data, _ = json.Marshal(ErrorReply{Code: code, Detail: err.Error()})
	}
	if in.reply == "" {
		return // nobody asked for an answer
	}
	if err := m.opts.NC.PublishMsg(msg); err != nil {
		m.log.WarnContext(ctx, "answering request", "subject", in.subject, "err", err)
	}
}

func codeOf(err error) string {
	switch {
	case errors.Is(err, ErrInsufficientCredits):
		return CodeInsufficientCredits
	case errors.Is(err, ErrHoldClosed):
		return CodeHoldClosed
	case errors.Is(err, ErrNoPrice):
		return CodeNoPrice
	case errors.Is(err, ErrInvalidRequest):
		return CodeInvalidRequest
	}
	return CodeInternal
}

// decodeRequest decodes a JSON request body strictly.
func decodeRequest(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: decoding request: %v", ErrInvalidRequest, err)
	}
	if dec.More() {
		return fmt.Errorf("%w: decoding request: trailing content", ErrInvalidRequest)
	}
	return nil
}

func checkNames(kv ...string) error {
	for i := 0; i+1 < len(kv); i += 2 {
		if err := event.CheckName(kv[i], kv[i+1]); err != nil {
			return fmt.Errorf("%w: %w", ErrInvalidRequest, err)
		}
	}
	return nil
}

// handleHold is admission: it prices the sandbox for its TTL and holds
// that much credit, or refuses with insufficient_credits and changes
// nothing. Asked again for the same sandbox, it answers with the same
// hold; asked for a sandbox whose hold is closed, it refuses.
func (m *Metering) handleHold(ctx context.Context, data []byte) (any, error) {
	var r HoldRequest
	if err := decodeRequest(data, &r); err != nil {
		return nil, err
	}
	if err := checkNames("sandbox id", r.SandboxID, "consumer", r.Consumer, "profile", r.Profile, "extension", r.Extension); err != nil {
		return nil, err
	}
	if r.TTLSeconds < 0 || r.TTLSeconds > 100*365*24*3600 {
		return nil, fmt.Errorf("%w: ttl_seconds %d out of range", ErrInvalidRequest, r.TTLSeconds)
	}
	if r.PricingModel != "" && !slices.Contains(extension.PricingModels, r.PricingModel) {
		return nil, fmt.Errorf("%w: unknown pricing model %q", ErrInvalidRequest, r.PricingModel)
	}
	return m.Hold(ctx, r)
}

// Hold is admission in-process: what the hold endpoint answers. Like
// every in-process call of the API, it is valid between Start and
// Shutdown.
func (m *Metering) Hold(ctx context.Context, r HoldRequest) (HoldReply, error) {
	c, sb := r.Consumer, r.SandboxID
	trace.SpanFromContext(ctx).SetAttributes(attribute.String("sandboxer.sandbox", sb))
	tm, err := m.pricer.terms(r.Profile, r.Extension, r.PricingModel)
	if err != nil {
		return HoldReply{}, err
	}
	d := time.Duration(r.TTLSeconds) * time.Second
	if d == 0 {
		if p, err := m.pricer.cat.Current().Profile(r.Profile); err == nil && p.TTL.Default > 0 {
			d = p.TTL.Default.D()
		} else {
			d = m.opts.DefaultHoldDuration
		}
	}
	q, err := m.pricer.cost(ctx, tm, d)
	if err != nil {
		return HoldReply{}, err
	}
	// The deadline first: a hold is never open without one, whatever
	// happens to this instance or the gateway after the change.
	if err := m.scheduleHoldDeadline(ctx, r); err != nil {
		return HoldReply{}, err
	}
	var reply HoldReply
	pre := prefetch{holds: []string{sb}, ledger: []string{releaseKey(c, sb)}, usage: []string{sb}}
	_, err = m.store.update(ctx, c, pre, func(t *tx) error {
		h, err := t.hold(sb)
		if err != nil {
			return err
		}
		if h != nil {
			reply = HoldReply{Hold: h.ID, Amount: h.Reserved, Quote: h.Quote, Available: t.a.Available()}
			return errNoChange
		}
		closed, err := t.closed(sb)
		if err != nil {
			return err
		}
		if closed {
			return fmt.Errorf("%w: sandbox %s", ErrHoldClosed, sb)
		}
		h = &Hold{
			ID: sb, Sandbox: sb, Profile: r.Profile, Extension: r.Extension, PricingModel: tm.Model,
			Price: tm.Price, Quote: q, CreatedAt: t.now,
		}
		if tm.free() {
			// Nothing to hold, nothing for the ledger.
			t.a.openFree(h)
		} else if err := t.a.reserve(h, q.Amount, "admission."+sb, t.now); err != nil {
			return err
		}
		t.open(h)
		reply = HoldReply{Hold: h.ID, Amount: q.Amount, Quote: q, Available: t.a.Available()}
		return nil
	})
	if err != nil {
		if errors.Is(err, ErrInsufficientCredits) || errors.Is(err, ErrHoldClosed) {
			// Refused: no deadline to keep. Best effort: one that
			// fires finds no open hold. After any other error the hold
			// may be open, and keeps its deadline.
			m.stopHoldDeadline(context.WithoutCancel(ctx), sb)
		}
		return HoldReply{}, err
	}
	return reply, nil
}

func (m *Metering) handleGrant(ctx context.Context, data []byte) (any, error) {
	var r GrantRequest
	if err := decodeRequest(data, &r); err != nil {
		return nil, err
	}
	return m.Grant(ctx, r)
}

// Grant adds credit in-process: what the grant endpoint answers.
func (m *Metering) Grant(ctx context.Context, r GrantRequest) (GrantReply, error) {
	if err := checkNames("consumer", r.Consumer); err != nil {
		return GrantReply{}, err
	}
	if r.ID == "" {
		b := make([]byte, 8)
		_, _ = rand.Read(b)
		r.ID = "g" + hex.EncodeToString(b)
	}
	if err := checkNames("grant id", r.ID); err != nil {
		return GrantReply{}, err
	}
	if r.Amount <= 0 || r.Amount > MaxBalance {
		return GrantReply{}, fmt.Errorf("%w: amount %d: want 1 to %d (2^53) credit minor units", ErrInvalidRequest, r.Amount, MaxBalance)
	}
	if r.Priority < 0 || r.Priority > 1000 {
		return GrantReply{}, fmt.Errorf("%w: priority %d: want 0 to 1000", ErrInvalidRequest, r.Priority)
	}
	var reply GrantReply
	_, err := m.store.update(ctx, r.Consumer, prefetch{ledger: []string{grantKey(r.Consumer, r.ID)}}, func(t *tx) error {
		seen, err := t.seen(grantKey(r.Consumer, r.ID))
		if err != nil {
			return err
		}
		if seen {
			reply.Duplicate = true
			return errNoChange
		}
		if t.a.Balance > MaxBalance-r.Amount {
			return fmt.Errorf("%w: a grant of %d would take %s's balance of %d beyond %d (2^53) credit minor units, the most an account holds",
				ErrInvalidRequest, r.Amount, r.Consumer, t.a.Balance, MaxBalance)
		}
		t.a.addGrant(Grant{ID: r.ID, Amount: r.Amount, Priority: r.Priority, ExpiresAt: r.ExpiresAt.UTC(), Promo: r.Promo}, "grant."+r.ID, t.now)
		return nil
	})
	if err != nil {
		return GrantReply{}, err
	}
	a, holds, err := m.store.read(ctx, r.Consumer)
	if err != nil {
		return GrantReply{}, err
	}
	if g := a.grant(r.ID); g != nil {
		reply.Grant = *g
	} else if !reply.Duplicate {
		reply.Grant = Grant{ID: r.ID, Amount: r.Amount, Priority: r.Priority, ExpiresAt: r.ExpiresAt.UTC(), Promo: r.Promo}
	}
	reply.Balance = balanceOf(a, holds)
	return reply, nil
}

func (m *Metering) handleBalance(ctx context.Context, data []byte) (any, error) {
	var r BalanceRequest
	if err := decodeRequest(data, &r); err != nil {
		return nil, err
	}
	return m.Balance(ctx, r.Consumer)
}

// Balance returns consumer's account in-process: what the balance endpoint
// answers.
func (m *Metering) Balance(ctx context.Context, consumer string) (BalanceReply, error) {
	if err := checkNames("consumer", consumer); err != nil {
		return BalanceReply{}, err
	}
	a, holds, err := m.store.read(ctx, consumer)
	if err != nil {
		return BalanceReply{}, err
	}
	return balanceOf(a, holds), nil
}

func balanceOf(a *Account, holds []*Hold) BalanceReply {
	r := BalanceReply{Consumer: a.Consumer, Balance: a.Balance, Held: a.Held, Available: a.Available(), Seq: a.Seq,
		Grants: []Grant{}, Holds: []HoldView{}}
	for _, g := range a.spendingOrder() {
		r.Grants = append(r.Grants, *g)
	}
	for _, h := range holds {
		r.Holds = append(r.Holds, HoldView{Hold: h.ID, Sandbox: h.Sandbox, Profile: h.Profile, Extension: h.Extension,
			Amount: h.Amount, Debited: h.Debited, ReadyAt: h.ReadyAt})
	}
	slices.SortFunc(r.Holds, func(x, y HoldView) int {
		if x.Hold < y.Hold {
			return -1
		}
		return 1
	})
	return r
}

func (m *Metering) handleLedger(ctx context.Context, data []byte) (any, error) {
	var r LedgerRequest
	if err := decodeRequest(data, &r); err != nil {
		return nil, err
	}
	return m.Ledger(ctx, r)
}

// Ledger returns ledger entries in-process: what the ledger endpoint
// answers.
func (m *Metering) Ledger(ctx context.Context, r LedgerRequest) (LedgerReply, error) {
	if err := checkNames("consumer", r.Consumer); err != nil {
		return LedgerReply{}, err
	}
	limit := r.Limit
	if limit <= 0 || limit > maxList {
		limit = maxList
	}
	all, err := m.store.entries(ctx, r.Consumer)
	if err != nil {
		return LedgerReply{}, err
	}
	out := LedgerReply{Consumer: r.Consumer, Entries: []Entry{}}
	for _, e := range all {
		if e.Seq <= r.AfterSeq || (!r.Since.IsZero() && e.At.Before(r.Since)) {
			continue
		}
		if len(out.Entries) == limit {
			out.More = true
			break
		}
		out.Entries = append(out.Entries, e)
	}
	return out, nil
}

func (m *Metering) handleUsage(ctx context.Context, data []byte) (any, error) {
	var r UsageRequest
	if err := decodeRequest(data, &r); err != nil {
		return nil, err
	}
	return m.Usage(ctx, r)
}

// Usage returns usage records in-process: what the usage endpoint answers.
func (m *Metering) Usage(ctx context.Context, r UsageRequest) (UsageReply, error) {
	if r.Consumer != "" {
		if err := checkNames("consumer", r.Consumer); err != nil {
			return UsageReply{}, err
		}
	}
	limit := r.Limit
	if limit <= 0 || limit > maxList {
		limit = maxList
	}
	all, err := m.store.usage(ctx, r.Consumer)
	if err != nil {
		return UsageReply{}, err
	}
	out := UsageReply{Records: []UsageRecord{}}
	for _, u := range all {
		if (!r.From.IsZero() && u.DestroyedAt.Before(r.From)) || (!r.To.IsZero() && !u.DestroyedAt.Before(r.To)) {
			continue
		}
		if len(out.Records) == limit {
			out.More = true
			break
		}
		out.Records = append(out.Records, u)
	}
	return out, nil
}
