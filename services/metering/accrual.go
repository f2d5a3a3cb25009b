package metering

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/credits"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// Accrual runs on the bus, not in a process. When a sandbox becomes ready,
// metering publishes its accrual schedule on event.AccrualScheduleSubject;
// the server stores it in the timers stream and delivers a tick to
// event.AccrualFireSubject, whatever metering instances are running. The
// ticks go to one durable consumer shared by every instance, so each tick
// is handled once, by whichever instance pulls it; a tick handled twice
// changes nothing the second time, because the debit is computed from the
// timestamps and the hold's state, which a compare-and-swap guards.
// Settlement cancels the schedule ([bus.CancelSchedule]); a tick for a
// sandbox that has no open hold cancels it again.
//
// When a tick is due depends on what is known of the price. A metered
// backend prices the usage itself, so its sandboxes tick every interval
// (Nats-Schedule: @every <interval>). A self-hosted price is known ahead:
// a tick would debit, out of the hold, what the hold already covers, and
// change nothing else until the hold no longer covers the usage through
// the lookahead. So such a sandbox gets one tick at a time (@at), when
// that happens, no sooner than an interval from now ([nextTick]), and
// each tick schedules the next. At that tick the hold is extended, or the
// low or exhausted notice goes out, exactly when a tick every interval
// would first have found the hold short; the ledger records the usage at
// each extension ("accrual through N s") and at settlement, instead of
// every interval, and what is on hold always covers what ran. A sandbox
// whose admission held enough for its TTL ticks once, a lookahead before
// the TTL runs out, or never when it is destroyed before.

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
	// One tick at a time for a self-hosted price: should this one never
	// succeed, the next still comes an interval later, as it would every
	// interval (a metered backend's schedule repeats by itself).
	msg.OnExhausted(func(ctx context.Context, _ *bus.Message, _ error) ([]bus.Out, error) {
		h, err := m.store.peek(ctx, c, sb)
		if err != nil || h == nil || h.PricingModel == extension.PricingMetered {
			return nil, err
		}
		out, err := m.tickAt(c, sb, fireSecond(m.opts.Now().UTC().Add(m.opts.AccrualInterval)))
		if err != nil {
			return nil, err
		}
		return []bus.Out{out}, nil
	})
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
			held = cloneHold(h)
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
		if held == nil || held.PricingModel == extension.PricingMetered {
			return nil, nil // not ready yet (its ready schedules), or ticking every interval
		}
		out, err := m.accrualSchedule(c, held, m.opts.Now().UTC())
		if err != nil || out == nil {
			return nil, err
		}
		return []bus.Out{*out}, nil
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

// accrualSchedule is the accrual schedule of consumer c's running hold h
// at now: every interval for a metered backend, one tick at [nextTick]
// for a self-hosted price; nil when nothing will ever be due. Publishing
// it replaces the sandbox's schedule, and each tick rolls up the one
// before, so a backlog never builds.
func (m *Metering) accrualSchedule(c string, h *Hold, now time.Time) (*bus.Out, error) {
	sb := h.Sandbox
	if h.PricingModel != extension.PricingMetered {
		at, ok := m.nextTick(h, now)
		if !ok {
			return nil, nil
		}
		out, err := m.tickAt(c, sb, at)
		return &out, err
	}
	tick, err := event.New(TypeAccrual, Source, sb, sb+".accrual", Accrual{Consumer: c, Sandbox: sb})
	if err != nil {
		return nil, err
	}
	return &bus.Out{Subject: event.AccrualScheduleSubject(sb), Event: tick, Opts: []jetstream.PublishOpt{
		jetstream.WithScheduleEvery(m.opts.AccrualInterval),
		jetstream.WithScheduleTarget(event.AccrualFireSubject(sb)), jetstream.WithScheduleRollup(),
	}}, nil
}

// tickAt is the schedule of consumer c's sandbox sb's one accrual tick at
// at (to the second). Its id is its time's: the schedule a tick publishes
// must not be dropped as a duplicate of the one before.
func (m *Metering) tickAt(c, sb string, at time.Time) (bus.Out, error) {
	tick, err := event.New(TypeAccrual, Source, sb, sb+".accrual@"+at.Format("20060102T150405Z"), Accrual{Consumer: c, Sandbox: sb})
	if err != nil {
		return bus.Out{}, err
	}
	return bus.Out{Subject: event.AccrualScheduleSubject(sb), Event: tick, Opts: []jetstream.PublishOpt{
		jetstream.WithScheduleAt(at), jetstream.WithScheduleTarget(event.AccrualFireSubject(sb)), jetstream.WithScheduleRollup(),
	}}, nil
}

// fireSecond is t rounded up to the second: schedules have second
// precision, and a tick must not come before its time.
func fireSecond(t time.Time) time.Time {
	if u := t.Truncate(time.Second); !u.Equal(t) {
		return u.Add(time.Second)
	}
	return t
}

// maxCoverSeconds bounds how far ahead a tick is put: a century.
const maxCoverSeconds = 100 * 365 * 24 * 3600

// nextTick is when the accrual of running self-hosted hold h must next
// run, seen at now: when what was debited and what is on hold stop
// covering the usage through the lookahead, to the second, and no sooner
// than an interval from now (a hold already short ticks every interval,
// as every hold once did). It reports false when nothing will ever be
// due: a price with no per-second part, whose start the hold covers.
func (m *Metering) nextTick(h *Hold, now time.Time) (time.Time, bool) {
	p := h.Price
	covered := h.Debited + h.Amount
	soonest := now.Add(m.opts.AccrualInterval)
	if p == nil {
		return time.Time{}, false
	}
	if covered < p.Start {
		return fireSecond(soonest.UTC()), true
	}
	if p.PerSecond <= 0 {
		return time.Time{}, false
	}
	secs := min((covered-p.Start)/p.PerSecond, maxCoverSeconds) // Cost(secs) <= covered
	// The first second the lookahead reaches past what is covered.
	at := h.ReadyAt.Add(time.Duration(secs+1)*time.Second - m.opts.Lookahead)
	if at.Before(soonest) {
		at = soonest
	}
	return fireSecond(at.UTC()), true
}
