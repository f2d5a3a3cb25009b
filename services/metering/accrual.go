package metering

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/credits"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// Accrual runs on the bus, not in a process. When a sandbox becomes ready,
// metering publishes one repeating schedule (Nats-Schedule: @every
// <interval>) on event.AccrualScheduleSubject; the server stores it in the
// timers stream and delivers a tick to event.AccrualFireSubject every
// interval, whatever metering instances are running. The ticks go to one
// durable consumer shared by every instance, so each tick is handled once,
// by whichever instance pulls it; a tick handled twice changes nothing the
// second time, because the debit is computed from the timestamps and the
// hold's state, which a compare-and-swap guards. Settlement cancels the
// schedule ([bus.CancelSchedule]); a tick for a sandbox that has no open
// hold cancels it again.

// onAccrual is the handler of accrual ticks. It debits the sandbox's usage
// since its last debit against its hold, extending the hold first when it
// does not cover the usage, then makes sure the hold covers the lookahead.
// When the hold cannot be extended that far, a low notice goes out once;
// when nothing is left for the next interval, an exhausted notice goes out
// and the tick returns the destroy command.
func (m *Metering) onAccrual(ctx context.Context, msg *bus.Message) ([]bus.Out, error) {
	sb, ok := strings.CutPrefix(msg.Subject, strings.TrimSuffix(event.AccrualFireFilter, ">"))
	if !ok || !event.ValidName(sb) {
		return nil, bus.Permanent(fmt.Errorf("handling accrual: %q is not an accrual subject", msg.Subject))
	}
	if event.Type(msg.Event.Type()) != TypeAccrual {
		return nil, bus.Permanent(fmt.Errorf("handling accrual %s: unexpected event type %s", msg.Subject, msg.Event.Type()))
	}
	var d Accrual
	if err := event.DataAs(msg.Event, &d); err != nil {
		return nil, bus.Permanent(fmt.Errorf("handling accrual %s: %w", msg.Subject, err))
	}
	if d.Sandbox != sb || !event.ValidName(d.Consumer) {
		return nil, bus.Permanent(fmt.Errorf("handling accrual %s: %w: data names sandbox %q, consumer %q", msg.Subject, event.ErrMalformed, d.Sandbox, d.Consumer))
	}
	c := d.Consumer
	// A self-hosted sandbox is priced in the change, from its hold; a
	// metered one needs its backend's quotes first.
	out, err := m.accrue(ctx, c, sb, msg.Event.ID(), nil)
	if !errors.Is(err, errNeedIO) {
		return out, err
	}
	h, err := m.store.peek(ctx, c, sb)
	if err != nil || h == nil || h.ReadyAt.IsZero() || h.Exhausted {
		// Closed, not ready or exhausted since: the change says what to do.
		if err != nil {
			return nil, err
		}
		return m.accrue(ctx, c, sb, msg.Event.ID(), &prices{})
	}
	now := m.opts.Now().UTC()
	tm := terms{Profile: h.Profile, Extension: h.Extension, Model: h.PricingModel, Price: h.Price}
	elapsed := max(now.Sub(h.ReadyAt), 0)
	cur, err := m.pricer.cost(ctx, tm, elapsed)
	if err == nil {
		var next credits.Quote
		if next, err = m.pricer.cost(ctx, tm, elapsed+m.opts.Lookahead); err == nil {
			return m.accrue(ctx, c, sb, msg.Event.ID(), &prices{cur: cur, next: next, at: now, ok: true})
		}
	}
	// No price now (a metered backend's workers are away): the next tick
	// charges what this one could not.
	m.log.WarnContext(ctx, "accrual skipped: no price", "sandbox", sb, "err", err)
	return nil, nil
}

// prices are a tick's prices, known before its change: cur of the usage
// so far, next of the usage through the lookahead, at time at. ok is false
// when there are none (the change only settles what needs no price).
type prices struct {
	cur, next credits.Quote
	at        time.Time
	ok        bool
}

// accrue applies one tick. With p nil, it prices a self-hosted sandbox in
// the change and returns errNeedIO for a metered one.
func (m *Metering) accrue(ctx context.Context, c, sb, tick string, p *prices) ([]bus.Out, error) {
	var (
		exhausted, resend, gone bool
		held                    *Hold
	)
	_, err := m.store.update(ctx, c, prefetch{holds: []string{sb}}, func(t *tx) error {
		exhausted, resend, gone, held = false, false, false, nil
		a := t.a
		h, err := t.hold(sb)
		switch {
		case err != nil:
			return err
		case h == nil:
			gone = true
			return errNoChange
		case h.ReadyAt.IsZero():
			return errNoChange
		case h.Exhausted:
			// Redelivered after the destroy was decided: send it again.
			resend, held = true, cloneHold(h)
			return errNoChange
		}
		var cur, next credits.Quote
		at := t.now
		switch {
		case p != nil && !p.ok:
			return errNoChange
		case p != nil:
			cur, next, at = p.cur, p.next, p.at
		case h.PricingModel == extension.PricingMetered:
			return errNeedIO
		default:
			tm := terms{Profile: h.Profile, Extension: h.Extension, Model: h.PricingModel, Price: h.Price}
			elapsed := max(at.Sub(h.ReadyAt), 0)
			if cur, err = m.pricer.cost(t.ctx, tm, elapsed); err != nil {
				return err
			}
			if next, err = m.pricer.cost(t.ctx, tm, elapsed+m.opts.Lookahead); err != nil {
				return err
			}
		}
		cause := tick + "@" + at.Format("20060102T150405Z")
		seq := a.Seq
		short := false
		if delta := cur.Amount - h.Debited; delta > 0 {
			if delta > h.Amount {
				a.extend(h, delta-h.Amount, cause, t.now)
			}
			h.Debits++
			charged := a.debit(h, debitKey(c, sb, h.Debits), delta, cause, fmt.Sprintf("accrual through %ds", cur.DurationSeconds), t.now)
			if charged == 0 {
				h.Debits--
			}
			short = charged < delta
			h.ThroughSeconds = cur.DurationSeconds
		}
		need := next.Amount - h.Debited
		if !short && need > h.Amount {
			a.extend(h, need-h.Amount, cause, t.now)
		}
		notice := func(k credits.Kind) {
			a.Events = append(a.Events, &Item{Notice: &credits.Notice{
				Key: c + ".sb." + sb + "." + string(k), Kind: k, Consumer: c, Sandbox: sb, Hold: h.ID,
				Profile: h.Profile, Extension: h.Extension, Held: h.Amount, Available: a.Available(),
				Needed: max(need-h.Amount, 0), Debited: h.Debited, Cause: cause, At: t.now,
			}})
		}
		switch {
		case short || (need > h.Amount && h.Amount == 0 && a.Available() == 0):
			a.flagLow(h)
			h.Exhausted, exhausted = true, true
			notice(credits.KindExhausted)
		case need > h.Amount && !h.Low:
			a.flagLow(h)
			h.Low = true
			notice(credits.KindLow)
		case a.Seq == seq:
			return errNoChange
		}
		held = cloneHold(h)
		return nil
	})
	switch {
	case err != nil:
		return nil, err
	case gone:
		m.stopAccrual(ctx, sb)
		return nil, nil
	case resend:
		m.stopAccrual(ctx, sb)
		return m.destroyOut(held, c)
	case !exhausted:
		return nil, nil
	}
	m.stopAccrual(ctx, sb)
	m.log.InfoContext(ctx, "credits exhausted: destroying sandbox", "consumer", c, "sandbox", sb)
	return m.destroyOut(held, c)
}

// destroyOut is the destroy command of an exhausted sandbox.
func (m *Metering) destroyOut(h *Hold, consumer string) ([]bus.Out, error) {
	if err := event.CheckName("extension name", h.Extension); err != nil {
		return nil, bus.Permanent(fmt.Errorf("destroying sandbox %s: %w", h.Sandbox, err))
	}
	ref := event.Ref{SandboxID: h.Sandbox, Consumer: consumer, Profile: h.Profile, Extension: h.Extension, Host: h.Host}
	e, err := event.New(event.TypeDestroy, Source, h.Sandbox, h.Sandbox+"."+event.VerbDestroy, event.Destroy{
		Ref: ref, Reason: event.ReasonCreditsExhausted, RequestedBy: "metering", RequestedAt: m.opts.Now().UTC(),
	})
	if err != nil {
		return nil, err
	}
	return []bus.Out{{Subject: ref.CommandSubject(event.VerbDestroy), Event: e}}, nil
}
