package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/workers"
	"github.com/sand-boxer/sandboxer/services/gateway"
	"github.com/sand-boxer/sandboxer/services/metering"
)

// meteringAdmitter is the gateway's admission by the metering service: a
// credit hold for the sandbox's TTL on the extension the resolver chose.
// Services never import each other; the binary ties them together here.
type meteringAdmitter struct{ c *metering.Client }

// Admit asks metering for a hold. A refusal for lack of credit wraps
// [gateway.ErrInsufficientCredits] with metering's reason, so the gateway
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
	h, err := a.c.Hold(ctx, metering.HoldRequest{
		SandboxID: r.SandboxID, Consumer: r.Consumer, Profile: r.Profile.Slug, Extension: r.Route.Extension,
		TTLSeconds: int64((r.TTL + time.Second - 1) / time.Second),
	})
	if errors.Is(err, metering.ErrInsufficientCredits) {
		detail := err.Error()
		var me *metering.Error
		if errors.As(err, &me) {
			detail = me.Detail
		}
		return "", fmt.Errorf("%w: %s", gateway.ErrInsufficientCredits, strings.TrimPrefix(detail, metering.ErrInsufficientCredits.Error()+": "))
	}
	if err != nil {
		return "", fmt.Errorf("admitting sandbox: %w", err)
	}
	return h.Hold, nil
}

// meteringCredits serves the gateway's credits API from the metering
// service. The api types mirror metering's field for field (same JSON
// names), so each reply converts through JSON.
type meteringCredits struct{ c *metering.Client }

// Balance returns consumer's account.
func (m meteringCredits) Balance(ctx context.Context, consumer string) (api.CreditBalance, error) {
	b, err := m.c.Balance(ctx, consumer)
	if err != nil {
		return api.CreditBalance{}, creditsError(err)
	}
	return convert[api.CreditBalance](b)
}

// Grant adds credit.
func (m meteringCredits) Grant(ctx context.Context, r api.GrantRequest) (api.GrantResult, error) {
	g, err := m.c.Grant(ctx, metering.GrantRequest{
		Consumer: r.Consumer, Amount: r.Amount, Priority: r.Priority, ExpiresAt: r.ExpiresAt, Promo: r.Promo, ID: r.ID,
	})
	if err != nil {
		return api.GrantResult{}, creditsError(err)
	}
	return convert[api.GrantResult](g)
}

// Ledger returns every entry q selects, paging through metering's ledger.
func (m meteringCredits) Ledger(ctx context.Context, q api.LedgerQuery) (api.Ledger, error) {
	es, err := m.c.LedgerAll(ctx, metering.LedgerRequest{Consumer: q.Consumer, Since: q.Since})
	if err != nil {
		return api.Ledger{}, creditsError(err)
	}
	entries, err := convert[[]api.LedgerEntry](es)
	if err != nil {
		return api.Ledger{}, err
	}
	if entries == nil {
		entries = []api.LedgerEntry{}
	}
	return api.Ledger{Consumer: q.Consumer, Entries: entries}, nil
}

// Usage returns the usage records q selects.
func (m meteringCredits) Usage(ctx context.Context, q api.UsageQuery) (api.UsageList, error) {
	u, err := m.c.Usage(ctx, metering.UsageRequest{Consumer: q.Consumer, From: q.From, To: q.To})
	if err != nil {
		return api.UsageList{}, creditsError(err)
	}
	return convert[api.UsageList](u)
}

// creditsError marks metering's refusals of malformed requests for the
// gateway, which answers them 422 with metering's reason.
func creditsError(err error) error {
	if !errors.Is(err, metering.ErrInvalidRequest) {
		return err
	}
	detail := err.Error()
	var me *metering.Error
	if errors.As(err, &me) {
		detail = me.Detail
	}
	return fmt.Errorf("%w: %s", gateway.ErrInvalidRequest, strings.TrimPrefix(detail, metering.ErrInvalidRequest.Error()+": "))
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

// convert copies v into a T through JSON.
func convert[T any](v any) (T, error) {
	var out T
	b, err := json.Marshal(v)
	if err != nil {
		return out, fmt.Errorf("encoding %T: %w", v, err)
	}
	if err := json.Unmarshal(b, &out); err != nil {
		return out, fmt.Errorf("decoding %T: %w", out, err)
	}
	return out, nil
}

var (
	_ gateway.Admitter = meteringAdmitter{}
	_ gateway.Credits  = meteringCredits{}
)
