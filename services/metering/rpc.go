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
	"github.com/sand-boxer/sandboxer/pkg/credits"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
)

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
		if code == credits.CodeInternal {
			span.SetStatus(codes.Error, err.Error())
			m.log.ErrorContext(ctx, "answering request", "subject", in.subject, "err", err)
		}
		msg.Header = nats.Header{micro.ErrorHeader: {err.Error()}, micro.ErrorCodeHeader: {code}}
		msg.Data, _ = json.Marshal(credits.ErrorReply{Code: code, Detail: err.Error()})
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
	case errors.Is(err, credits.ErrInsufficientCredits):
		return credits.CodeInsufficientCredits
	case errors.Is(err, credits.ErrHoldClosed):
		return credits.CodeHoldClosed
	case errors.Is(err, credits.ErrNoPrice):
		return credits.CodeNoPrice
	case errors.Is(err, credits.ErrInvalidRequest):
		return credits.CodeInvalidRequest
	}
	return credits.CodeInternal
}

// decodeRequest decodes a JSON request body strictly.
func decodeRequest(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: decoding request: %v", credits.ErrInvalidRequest, err)
	}
	if dec.More() {
		return fmt.Errorf("%w: decoding request: trailing content", credits.ErrInvalidRequest)
	}
	return nil
}

func checkNames(kv ...string) error {
	for i := 0; i+1 < len(kv); i += 2 {
		if err := event.CheckName(kv[i], kv[i+1]); err != nil {
			return fmt.Errorf("%w: %w", credits.ErrInvalidRequest, err)
		}
	}
	return nil
}

// handleHold is admission: it prices the sandbox for its TTL and holds
// that much credit, or refuses with insufficient_credits and changes
// nothing. Asked again for the same sandbox, it answers with the same
// hold; asked for a sandbox whose hold is closed, it refuses.
func (m *Metering) handleHold(ctx context.Context, data []byte) (any, error) {
	var r credits.HoldRequest
	if err := decodeRequest(data, &r); err != nil {
		return nil, err
	}
	if err := checkNames("sandbox id", r.SandboxID, "consumer", r.Consumer, "profile", r.Profile, "extension", r.Extension); err != nil {
		return nil, err
	}
	if r.TTLSeconds < 0 || r.TTLSeconds > 100*365*24*3600 {
		return nil, fmt.Errorf("%w: ttl_seconds %d out of range", credits.ErrInvalidRequest, r.TTLSeconds)
	}
	if r.PricingModel != "" && !slices.Contains(extension.PricingModels, r.PricingModel) {
		return nil, fmt.Errorf("%w: unknown pricing model %q", credits.ErrInvalidRequest, r.PricingModel)
	}
	return m.Hold(ctx, r)
}

// Hold is admission in-process: what the hold endpoint answers. Like
// every in-process call of the API, it is valid between Start and
// Shutdown.
func (m *Metering) Hold(ctx context.Context, r credits.HoldRequest) (credits.HoldReply, error) {
	c, sb := r.Consumer, r.SandboxID
	trace.SpanFromContext(ctx).SetAttributes(attribute.String("sandboxer.sandbox", sb))
	tm, err := m.pricer.terms(r.Profile, r.Extension, r.PricingModel)
	if err != nil {
		return credits.HoldReply{}, err
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
		return credits.HoldReply{}, err
	}
	// The deadline first: a hold is never open without one, whatever
	// happens to this instance or the gateway after the change.
	if err := m.scheduleHoldDeadline(ctx, r); err != nil {
		return credits.HoldReply{}, err
	}
	var reply credits.HoldReply
	pre := prefetch{holds: []string{sb}, ledger: []string{releaseKey(c, sb)}, usage: []string{sb}}
	_, err = m.store.update(ctx, c, pre, func(t *tx) error {
		h, err := t.hold(sb)
		if err != nil {
			return err
		}
		if h != nil {
			reply = credits.HoldReply{Hold: h.ID, Amount: h.Reserved, Quote: h.Quote, Available: t.a.Available()}
			return errNoChange
		}
		closed, err := t.closed(sb)
		if err != nil {
			return err
		}
		if closed {
			return fmt.Errorf("%w: sandbox %s", credits.ErrHoldClosed, sb)
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
		reply = credits.HoldReply{Hold: h.ID, Amount: q.Amount, Quote: q, Available: t.a.Available()}
		return nil
	})
	if err != nil {
		if errors.Is(err, credits.ErrInsufficientCredits) || errors.Is(err, credits.ErrHoldClosed) {
			// Refused: no deadline to keep. Best effort: one that
			// fires finds no open hold. After any other error the hold
			// may be open, and keeps its deadline.
			m.stopHoldDeadline(context.WithoutCancel(ctx), sb)
		}
		return credits.HoldReply{}, err
	}
	return reply, nil
}

func (m *Metering) handleGrant(ctx context.Context, data []byte) (any, error) {
	var r credits.GrantRequest
	if err := decodeRequest(data, &r); err != nil {
		return nil, err
	}
	return m.Grant(ctx, r)
}

// Grant adds credit in-process: what the grant endpoint answers.
func (m *Metering) Grant(ctx context.Context, r credits.GrantRequest) (credits.GrantReply, error) {
	if err := checkNames("consumer", r.Consumer); err != nil {
		return credits.GrantReply{}, err
	}
	if r.ID == "" {
		b := make([]byte, 8)
		_, _ = rand.Read(b)
		r.ID = "g" + hex.EncodeToString(b)
	}
	if err := checkNames("grant id", r.ID); err != nil {
		return credits.GrantReply{}, err
	}
	if r.Amount <= 0 || r.Amount > credits.MaxBalance {
		return credits.GrantReply{}, fmt.Errorf("%w: amount %d: want 1 to %d (2^53) credit minor units", credits.ErrInvalidRequest, r.Amount, credits.MaxBalance)
	}
	if r.Priority < 0 || r.Priority > 1000 {
		return credits.GrantReply{}, fmt.Errorf("%w: priority %d: want 0 to 1000", credits.ErrInvalidRequest, r.Priority)
	}
	var reply credits.GrantReply
	asked := credits.Grant{ID: r.ID, Amount: r.Amount, Priority: r.Priority, ExpiresAt: r.ExpiresAt.UTC(), Promo: r.Promo}
	_, err := m.store.update(ctx, r.Consumer, prefetch{ledger: []string{grantKey(r.Consumer, r.ID)}}, func(t *tx) error {
		seen, err := t.seen(grantKey(r.Consumer, r.ID))
		if err != nil {
			return err
		}
		if seen {
			reply.Duplicate = true
			return errNoChange
		}
		if t.a.Balance > credits.MaxBalance-r.Amount {
			return fmt.Errorf("%w: a grant of %d would take %s's balance of %d beyond %d (2^53) credit minor units, the most an account holds",
				credits.ErrInvalidRequest, r.Amount, r.Consumer, t.a.Balance, credits.MaxBalance)
		}
		t.a.addGrant(Grant{Grant: asked}, "grant."+r.ID, t.now)
		return nil
	})
	if err != nil {
		return credits.GrantReply{}, err
	}
	a, holds, err := m.store.read(ctx, r.Consumer)
	if err != nil {
		return credits.GrantReply{}, err
	}
	if g := a.grant(r.ID); g != nil {
		reply.Grant = g.view()
	} else if !reply.Duplicate {
		reply.Grant = asked
	}
	reply.Balance = balanceOf(a, holds)
	return reply, nil
}

func (m *Metering) handleBalance(ctx context.Context, data []byte) (any, error) {
	var r credits.BalanceRequest
	if err := decodeRequest(data, &r); err != nil {
		return nil, err
	}
	return m.Balance(ctx, r.Consumer)
}

// Balance returns consumer's account in-process: what the balance endpoint
// answers.
func (m *Metering) Balance(ctx context.Context, consumer string) (credits.BalanceReply, error) {
	if err := checkNames("consumer", consumer); err != nil {
		return credits.BalanceReply{}, err
	}
	a, holds, err := m.store.read(ctx, consumer)
	if err != nil {
		return credits.BalanceReply{}, err
	}
	return balanceOf(a, holds), nil
}

func balanceOf(a *Account, holds []*Hold) credits.BalanceReply {
	r := credits.BalanceReply{Consumer: a.Consumer, Balance: a.Balance, Held: a.Held, Available: a.Available(), Seq: a.Seq,
		Grants: []credits.Grant{}, Holds: []credits.HoldView{}}
	for _, g := range a.spendingOrder() {
		r.Grants = append(r.Grants, g.view())
	}
	for _, h := range holds {
		r.Holds = append(r.Holds, credits.HoldView{Hold: h.ID, Sandbox: h.Sandbox, Profile: h.Profile, Extension: h.Extension,
			Amount: h.Amount, Debited: h.Debited, ReadyAt: h.ReadyAt})
	}
	slices.SortFunc(r.Holds, func(x, y credits.HoldView) int {
		if x.Hold < y.Hold {
			return -1
		}
		return 1
	})
	return r
}

func (m *Metering) handleLedger(ctx context.Context, data []byte) (any, error) {
	var r credits.LedgerRequest
	if err := decodeRequest(data, &r); err != nil {
		return nil, err
	}
	return m.Ledger(ctx, r)
}

// Ledger returns ledger entries in-process: what the ledger endpoint
// answers.
func (m *Metering) Ledger(ctx context.Context, r credits.LedgerRequest) (credits.LedgerReply, error) {
	if err := checkNames("consumer", r.Consumer); err != nil {
		return credits.LedgerReply{}, err
	}
	limit := r.Limit
	if limit <= 0 || limit > maxList {
		limit = maxList
	}
	all, err := m.store.entries(ctx, r.Consumer)
	if err != nil {
		return credits.LedgerReply{}, err
	}
	out := credits.LedgerReply{Consumer: r.Consumer, Entries: []credits.Entry{}}
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
	var r credits.UsageRequest
	if err := decodeRequest(data, &r); err != nil {
		return nil, err
	}
	return m.Usage(ctx, r)
}

// Usage returns usage records in-process: what the usage endpoint answers.
func (m *Metering) Usage(ctx context.Context, r credits.UsageRequest) (credits.UsageReply, error) {
	if r.Consumer != "" {
		if err := checkNames("consumer", r.Consumer); err != nil {
			return credits.UsageReply{}, err
		}
	}
	limit := r.Limit
	if limit <= 0 || limit > maxList {
		limit = maxList
	}
	all, err := m.store.usage(ctx, r.Consumer)
	if err != nil {
		return credits.UsageReply{}, err
	}
	out := credits.UsageReply{Records: []credits.UsageRecord{}}
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
