package metering

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/catalog"
	"github.com/sand-boxer/sandboxer/pkg/credits"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// pricer prices sandboxes: self-hosted ones by the profile's price list
// from the catalog, metered ones by asking their extension's workers for a
// quote over request-reply. It never links extension code.
type pricer struct {
	cat     *catalog.Cache
	nc      *nats.Conn
	timeout time.Duration
}

// terms are what a sandbox is priced by.
type terms struct {
	Profile, Extension string
	Model              extension.PricingModel
	Price              *extension.Price
}

// free reports whether a sandbox on these terms costs nothing: a
// self-hosted backend, and a profile without a price or priced at zero
// (as [extension.Charges] decides admission). Such a sandbox leaves no
// ledger entry, only its usage record.
func (t terms) free() bool {
	return t.Model == extension.PricingSelfHosted && t.Price.Free()
}

// terms looks up how a sandbox of profile on ext is priced. model, when
// given, is the caller's word for the extension's pricing model.
func (p *pricer) terms(profile, ext string, model extension.PricingModel) (terms, error) {
	t := terms{Profile: profile, Extension: ext, Model: model}
	cur := p.cat.Current()
	if t.Model == "" {
		m, err := cur.Extension(ext)
		if err != nil {
			return t, fmt.Errorf("%w: %w", credits.ErrNoPrice, err)
		}
		t.Model = m.Capabilities.PricingModel
	}
	switch t.Model {
	case extension.PricingMetered:
		return t, nil
	case extension.PricingSelfHosted:
		pr, err := cur.Profile(profile)
		if err != nil {
			return t, fmt.Errorf("%w: %w", credits.ErrNoPrice, err)
		}
		if pr.Price != nil {
			cp := *pr.Price
			t.Price = &cp
		}
		return t, nil
	}
	return t, fmt.Errorf("%w: unknown pricing model %q", credits.ErrNoPrice, t.Model)
}

// cost prices running for d under t.
func (p *pricer) cost(ctx context.Context, t terms, d time.Duration) (credits.Quote, error) {
	secs := max(int64((d+time.Second-1)/time.Second), 0)
	if t.Model != extension.PricingMetered {
		q := credits.Quote{Amount: t.Price.Cost(d), DurationSeconds: secs}
		if t.Price == nil {
			q.Breakdown = []string{"profile " + t.Profile + " has no price: free"}
		} else {
			q.Breakdown = []string{
				fmt.Sprintf("start: %d", t.Price.Start),
				fmt.Sprintf("%d second(s) x %d: %d", secs, t.Price.PerSecond, secs*t.Price.PerSecond),
			}
		}
		return q, nil
	}
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	r, err := bus.Call[event.QuoteReply](ctx, p.nc, event.QuoteSubject(t.Extension), event.QuoteRequest{Profile: t.Profile, DurationSeconds: secs})
	var se *bus.ServiceError
	switch {
	case errors.As(err, &se):
		return credits.Quote{}, fmt.Errorf("%w: %s quoted an error: %s", credits.ErrNoPrice, t.Extension, se.Description)
	case err != nil:
		return credits.Quote{}, fmt.Errorf("%w: asking %s for a quote: %w", credits.ErrNoPrice, t.Extension, err)
	}
	// A worker of an earlier version says its error in the body only.
	if r.Error != "" {
		return credits.Quote{}, fmt.Errorf("%w: %s quoted an error: %s", credits.ErrNoPrice, t.Extension, r.Error)
	}
	if r.Amount < 0 {
		return credits.Quote{}, fmt.Errorf("%w: %s quoted a negative amount %d", credits.ErrNoPrice, t.Extension, r.Amount)
	}
	return credits.Quote{Amount: r.Amount, DurationSeconds: secs, Breakdown: r.Breakdown}, nil
}
