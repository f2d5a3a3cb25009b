package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/credits"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/workers"
	"github.com/sand-boxer/sandboxer/services/gateway"
)

// meteringAdmitter is the gateway's admission by the metering service: a
// credit hold for the sandbox's TTL on the extension the resolver chose.
// Services never import each other; the binary ties them together here,
// through the credits contract (pkg/credits) both speak.
type meteringAdmitter struct{ c *credits.Client }

// Admit asks metering for a hold. A refusal for lack of credit wraps
// [credits.ErrInsufficientCredits] (the gateway's
// [gateway.ErrInsufficientCredits]) with metering's reason, so the gateway
// answers 402 and publishes the rejected event. Metering answers the same
// hold when asked again for the same sandbox. A free sandbox (a
// self-hosted backend, a profile without a price) needs no credit and
// gets no hold: metering meters it from its ready event without a ledger
// entry, and writes its usage record when it is destroyed.
func (a meteringAdmitter) Admit(ctx context.Context, r gateway.AdmitRequest) (string, error) {
	if r.Profile == nil {
		return "", errors.New("admitting sandbox: no profile")
	}
	if !extension.Charges(r.Profile, r.Manifest) {
		return "", nil
	}
	h, err := a.c.Hold(ctx, credits.HoldRequest{
		SandboxID: r.SandboxID, Consumer: r.Consumer, Profile: r.Profile.Slug, Extension: r.Route.Extension,
		TTLSeconds: int64((r.TTL + time.Second - 1) / time.Second),
	})
	if errors.Is(err, credits.ErrInsufficientCredits) {
		return "", refusal(err, credits.ErrInsufficientCredits)
	}
	if err != nil {
		return "", fmt.Errorf("admitting sandbox: %w", err)
	}
	return h.Hold, nil
}

// meteringCredits serves the gateway's credits API from the metering
// service: the API's bodies are the contract's types, passed on as
// metering answers them.
type meteringCredits struct{ c *credits.Client }

// Balance returns consumer's account.
func (m meteringCredits) Balance(ctx context.Context, consumer string) (api.CreditBalance, error) {
	b, err := m.c.Balance(ctx, consumer)
	if err != nil {
		return api.CreditBalance{}, creditsError(err)
	}
	return b, nil
}

// Grant adds credit.
func (m meteringCredits) Grant(ctx context.Context, r api.GrantRequest) (api.GrantResult, error) {
	g, err := m.c.Grant(ctx, r)
	if err != nil {
		return api.GrantResult{}, creditsError(err)
	}
	return g, nil
}

// Ledger returns every entry q selects, paging through metering's ledger.
func (m meteringCredits) Ledger(ctx context.Context, q api.LedgerQuery) (api.Ledger, error) {
	entries, err := m.c.LedgerAll(ctx, credits.LedgerRequest{Consumer: q.Consumer, Since: q.Since})
	if err != nil {
		return api.Ledger{}, creditsError(err)
	}
	if entries == nil {
		entries = []api.LedgerEntry{}
	}
	return api.Ledger{Consumer: q.Consumer, Entries: entries}, nil
}

// Usage returns the usage records q selects.
func (m meteringCredits) Usage(ctx context.Context, q api.UsageQuery) (api.UsageList, error) {
	u, err := m.c.Usage(ctx, credits.UsageRequest{Consumer: q.Consumer, From: q.From, To: q.To})
	if err != nil {
		return api.UsageList{}, creditsError(err)
	}
	return u, nil
}

// creditsError gives the gateway metering's refusal of a malformed
// request as "invalid request: <metering's reason>", which it answers 422;
// any other error as it is.
func creditsError(err error) error {
	if !errors.Is(err, credits.ErrInvalidRequest) {
		return err
	}
	return refusal(err, credits.ErrInvalidRequest)
}

// refusal is metering's refusal err as "<sentinel>: <metering's reason>",
// wrapping sentinel: what the gateway shows a caller.
func refusal(err, sentinel error) error {
	detail := err.Error()
	var me *credits.Error
	if errors.As(err, &me) {
		detail = me.Detail
	}
	return fmt.Errorf("%w: %s", sentinel, strings.TrimPrefix(detail, sentinel.Error()+": "))
}

// watchWorkers starts a cache of live workers for the gateway's resolver.
// It follows the workers bucket until the returned stop is called, which
// waits for the watch to end.
func watchWorkers(ctx context.Context, js jetstream.JetStream) (*workers.Cache, func(context.Context) error, error) {
	kv, err := js.KeyValue(ctx, bus.BucketWorkers)
	if err != nil {
		return nil, nil, fmt.Errorf("opening workers bucket: %w", err)
	}
	wctx, cancel := context.WithCancel(context.Background())
	wc, err := workers.Watch(wctx, kv)
	if err != nil {
		cancel()
		return nil, nil, err
	}
	stop := func(ctx context.Context) error {
		cancel()
		select {
		case <-wc.Done():
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	select {
	case <-wc.Ready():
	case <-ctx.Done():
		_ = stop(context.Background())
		return nil, nil, fmt.Errorf("loading workers: %w", ctx.Err())
	}
	return wc, stop, nil
}

var (
	_ gateway.Admitter = meteringAdmitter{}
	_ gateway.Credits  = meteringCredits{}
)
