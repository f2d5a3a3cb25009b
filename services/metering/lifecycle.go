package metering

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/credits"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// countLifecycle is onLifecycle, counting what it handled.
func (m *Metering) countLifecycle(ctx context.Context, msg *bus.Message) ([]bus.Out, error) {
	outs, err := m.onLifecycle(ctx, msg)
	if err == nil {
		m.processed.Add(1)
		m.metrics.foldedLifecycle(msg.Subject)
	}
	return outs, err
}

// onLifecycle is the handler of lifecycle events. ready starts the meter;
// failed and rejected release the hold (a sandbox that never became ready
// costs nothing); destroyed settles the usage and releases the rest. Every
// other state changes nothing here. Each change is keyed in the ledger, so
// a redelivered event changes nothing twice.
func (m *Metering) onLifecycle(ctx context.Context, msg *bus.Message) ([]bus.Out, error) {
	ref, err := event.ParseLifecycleSubject(msg.Subject)
	if err != nil {
		return nil, bus.Permanent(fmt.Errorf("handling lifecycle event: %w", err))
	}
	e := msg.Event
	if t := event.LifecycleType(ref.State); t == "" || event.Type(e.Type()) != t {
		return nil, bus.Permanent(fmt.Errorf("handling %s: unexpected event type %s", msg.Subject, e.Type()))
	}
	switch ref.State {
	case event.StateReady:
		var d event.Ready
		if err := decode(e, &d, ref); err != nil {
			return nil, err
		}
		return m.onReady(ctx, e, d)
	case event.StateFailed:
		var d event.Failed
		if err := decode(e, &d, ref); err != nil {
			return nil, err
		}
		return nil, m.settle(ctx, e, d.Ref, event.StateFailed, "failed: "+d.Reason, nil, time.Time{})
	case event.StateRejected:
		var d event.Rejected
		if err := decode(e, &d, ref); err != nil {
			return nil, err
		}
		return nil, m.settle(ctx, e, d.Ref, event.StateRejected, "rejected: "+d.Code, nil, time.Time{})
	case event.StateDestroyed:
		var d event.Destroyed
		if err := decode(e, &d, ref); err != nil {
			return nil, err
		}
		return nil, m.settle(ctx, e, d.Ref, event.StateDestroyed, d.Reason, d.Meter, d.ReadyAt)
	}
	return nil, nil
}

// decode reads e's data into v strictly and checks it names the sandbox
// its subject names, and a consumer.
func decode(e *event.Event, v any, ref event.LifecycleRef) error {
	if err := event.DataAs(e, v); err != nil {
		return bus.Permanent(fmt.Errorf("handling %s: %w", e.ID(), err))
	}
	var r event.Ref
	switch d := v.(type) {
	case *event.Ready:
		r = d.Ref
	case *event.Failed:
		r = d.Ref
	case *event.Rejected:
		r = d.Ref
	case *event.Destroyed:
		r = d.Ref
	}
	if !ref.Matches(r) {
		return bus.Permanent(fmt.Errorf("handling %s: %w: data names sandbox %q of consumer %q on %q, the subject %s of %q on %q",
			e.ID(), event.ErrMalformed, r.SandboxID, r.Consumer, r.Extension, ref.Sandbox, ref.Consumer, ref.Extension))
	}
	if err := event.CheckName("consumer", r.Consumer); err != nil {
		return bus.Permanent(fmt.Errorf("handling %s: %w: %w", e.ID(), event.ErrMalformed, err))
	}
	return nil
}

// onReady starts the meter of a sandbox: its hold records when it became
// ready, and its accrual schedule fires every interval from now on. A
// sandbox that was never admitted gets an empty hold, extended as it runs.
// A free one admitted without a hold (the gateway admits none) gets
// nothing: it has nothing to hold or accrue, and its destroyed event says
// when it became ready ([Metering.settleFree]).
func (m *Metering) onReady(ctx context.Context, e *event.Event, d event.Ready) ([]bus.Out, error) {
	c, sb := d.Consumer, d.SandboxID
	if _, free := m.free(ctx, d.Ref); free && d.Hold == "" {
		return nil, nil
	}
	readyAt := d.ReadyAt
	if readyAt.IsZero() {
		readyAt = e.Time()
	}
	running, admitted := false, false
	var started *Hold // the hold as the change left it
	pre := prefetch{holds: []string{sb}, ledger: []string{releaseKey(c, sb)}, usage: []string{sb}}
	_, err := m.store.update(ctx, c, pre, func(t *tx) error {
		running, admitted, started = false, false, nil
		h, err := t.hold(sb)
		if err != nil {
			return err
		}
		admitted = h != nil && !h.Implicit
		if h == nil {
			// Never admitted, or already settled.
			closed, err := t.closed(sb)
			if err != nil {
				return err
			}
			if closed {
				return errNoChange
			}
			tm, err := m.pricer.terms(d.Profile, d.Extension, "")
			if err != nil {
				m.log.WarnContext(ctx, "sandbox ready without admission and without a price: metering it as free", "sandbox", sb, "err", err)
				tm = terms{Profile: d.Profile, Extension: d.Extension, Model: extension.PricingSelfHosted}
			}
			h = &Hold{
				ID: sb, Sandbox: sb, Profile: d.Profile, Extension: d.Extension, PricingModel: tm.Model,
				Price: tm.Price, CreatedAt: t.now, Implicit: true,
			}
			if tm.free() {
				t.a.openFree(h)
			} else if err := t.a.reserve(h, 0, e.ID(), t.now); err != nil {
				return err
			}
			t.open(h)
		}
		running = !h.Exhausted && h.accrues()
		if !h.ReadyAt.IsZero() {
			started = cloneHold(h)
			return errNoChange
		}
		h.ReadyAt = readyAt.UTC()
		h.Host = d.Host
		started = cloneHold(h)
		return nil
	})
	if err == nil && admitted {
		// Its lifecycle started: the hold's deadline has no more say.
		m.stopHoldDeadline(ctx, sb)
	}
	if err != nil || !running {
		return nil, err
	}
	out, err := m.accrualSchedule(c, started, m.opts.Now().UTC())
	if err != nil || out == nil {
		return nil, err
	}
	return []bus.Out{*out}, nil
}

// settle ends the meter of a sandbox that reached state: it charges the
// actual usage (the backend's meter when given, else the lifecycle
// timestamps at the hold's price) less what was already debited, refunds
// what was debited beyond it, records the usage and releases the rest of
// the hold. A sandbox that failed or was rejected costs nothing. readyAt,
// when known, is when the sandbox became ready, as its destroyed event
// says.
func (m *Metering) settle(ctx context.Context, e *event.Event, ref event.Ref, state event.State, reason string, meter *event.MeterReading, readyAt time.Time) error {
	if tm, free := m.free(ctx, ref); free {
		if done, err := m.settleFree(ctx, e, ref, tm, state, reason, readyAt); done || err != nil {
			return err
		}
	}
	c, sb := ref.Consumer, ref.SandboxID
	var (
		actual   = credits.Actual{Source: credits.SourceLifecycle, Unit: "second"}
		endAt    = e.Time().UTC()
		priced   bool // actual and readyAt are known before the change
		schedule bool // the settled hold had an accrual schedule
		deadline bool // the settled hold was admitted, its deadline not ended by ready
	)
	apply := func(t *tx) error {
		schedule, deadline = false, false
		h, err := t.hold(sb)
		if err != nil {
			return err
		}
		// An admitted hold's deadline ends at ready (onReady cancels it;
		// should that have failed, the deadline's fire finds the hold
		// running or closed and does nothing): only one that never saw
		// ready still has it.
		deadline = h != nil && !h.Implicit && h.ReadyAt.IsZero()
		if h == nil {
			if state != event.StateDestroyed {
				return errNoChange
			}
			closed, err := t.closed(sb)
			if err != nil {
				return err
			}
			if closed {
				return errNoChange
			}
			if _, free := m.free(ctx, ref); free {
				// Its hold settled since settleFree read it (or its
				// terms turned free): settleFree's record closes it.
				return errFreeWithoutHold
			}
			// A destroyed sandbox with no hold: close its account so a
			// late ready or admission cannot open one.
			t.a.record(&credits.Entry{Key: releaseKey(c, sb), Kind: credits.EntryRelease, Sandbox: sb, Hold: sb, Cause: e.ID(), Reason: "destroyed without a hold", At: t.now})
			return nil
		}
		if state == event.StateDestroyed && !priced {
			// Priced in the change when that needs no I/O: the hold
			// knows when it became ready, and the price is the
			// profile's or the backend's reading.
			if h.ReadyAt.IsZero() || (meter == nil && h.PricingModel == extension.PricingMetered) {
				return errNeedIO
			}
			if actual, err = m.actual(t.ctx, h, h.ReadyAt, endAt, meter); err != nil {
				return err
			}
		}
		if h.ReadyAt.IsZero() && !readyAt.IsZero() {
			h.ReadyAt = readyAt
		}
		schedule = !h.ReadyAt.IsZero() && h.accrues()
		u := usageOf(c, h, actual, endAt, reason, e.ID())
		switch diff := actual.Amount - h.Debited; {
		case diff > 0:
			charged := t.a.debit(h, settleKey(c, sb), diff, e.ID(), "settlement: "+actual.Source, t.now)
			u.Unpaid = diff - charged
		case diff < 0:
			before := h.Debited
			t.a.refund(h, -diff, e.ID(), t.now)
			u.Refunded = before - h.Debited
		}
		u.Charged = h.Debited
		u.Reserved = h.Reserved
		t.a.release(h, e.ID(), reason, t.now)
		t.close(sb)
		t.a.Events = append(t.a.Events, &Item{Usage: u})
		return nil
	}
	pre := prefetch{holds: []string{sb}, ledger: []string{releaseKey(c, sb)}, usage: []string{sb}}
	_, err := m.store.update(ctx, c, pre, apply)
	if errors.Is(err, errFreeWithoutHold) {
		tm, _ := m.free(ctx, ref)
		return m.recordFree(ctx, e, ref, tm, reason, readyAt)
	}
	if errors.Is(err, errNeedIO) {
		// Price it outside the change: when the sandbox became ready
		// (its ready event may not have been handled yet: the stream
		// has it), and a metered backend's quote.
		h, err := m.store.peek(ctx, c, sb)
		if err != nil {
			return err
		}
		if h != nil {
			if !h.ReadyAt.IsZero() {
				readyAt = h.ReadyAt
			}
			if readyAt.IsZero() {
				if readyAt, err = m.readyAt(ctx, event.Ref{Consumer: c, Extension: ref.Extension, SandboxID: sb}); err != nil {
					return err
				}
			}
			if !readyAt.IsZero() {
				if actual, err = m.actual(ctx, h, readyAt, endAt, meter); err != nil {
					return err
				}
			}
		}
		priced = true
		_, err = m.store.update(ctx, c, pre, apply)
		if errors.Is(err, errFreeWithoutHold) {
			tm, _ := m.free(ctx, ref)
			return m.recordFree(ctx, e, ref, tm, reason, readyAt)
		}
		if err != nil {
			return err
		}
	} else if err != nil {
		return err
	}
	if schedule {
		m.stopAccrual(ctx, sb)
	}
	if deadline {
		m.stopHoldDeadline(ctx, sb)
	}
	return nil
}

// free returns the terms of a sandbox of ref's profile on its extension,
// and whether it costs nothing on them ([terms.free]); one without a
// price (its profile or extension gone from the catalog) is metered as
// free, as it always was.
func (m *Metering) free(ctx context.Context, ref event.Ref) (terms, bool) {
	tm, err := m.pricer.terms(ref.Profile, ref.Extension, "")
	if err != nil {
		m.log.WarnContext(ctx, "sandbox without a price: metering it as free", "sandbox", ref.SandboxID, "err", err)
		return terms{Profile: ref.Profile, Extension: ref.Extension, Model: extension.PricingSelfHosted}, true
	}
	return tm, tm.free()
}

// settleFree settles a free sandbox that has no hold, as one admitted
// without a hold has none: it changes no account and records no ledger
// entry. Failed or rejected, it leaves nothing; destroyed, its usage
// record, written only if its key never existed (the server refuses a
// second one, whoever writes it), and its usage event. Until the event is
// published the destroyed event is not acknowledged, so a crash between
// the two publishes it on the redelivery; a record written before is
// published as it was written. It reports false, having done nothing,
// when the sandbox has a hold after all (admitted while it was priced, or
// opened by an earlier version of metering): that hold settles as any
// other.
func (m *Metering) settleFree(ctx context.Context, e *event.Event, ref event.Ref, tm terms, state event.State, reason string, readyAt time.Time) (bool, error) {
	c, sb := ref.Consumer, ref.SandboxID
	held, err := m.store.readHold(ctx, c, sb)
	if err != nil || held.h != nil {
		return false, err
	}
	if state != event.StateDestroyed {
		return true, nil
	}
	return true, m.recordFree(ctx, e, ref, tm, reason, readyAt)
}

// errFreeWithoutHold tells settle that the destroyed sandbox has no hold
// and is free after all: [Metering.recordFree] settles it.
var errFreeWithoutHold = errors.New("free sandbox without a hold")

// recordFree writes the usage record of the free sandbox ref names,
// destroyed by e, and publishes its usage event ([store.recordUsage]):
// from readyAt, or, unsaid, when the lifecycle stream says it became
// ready.
func (m *Metering) recordFree(ctx context.Context, e *event.Event, ref event.Ref, tm terms, reason string, readyAt time.Time) error {
	c, sb := ref.Consumer, ref.SandboxID
	var err error
	if readyAt.IsZero() {
		// Not said (an event of an earlier version): the stream has it.
		if readyAt, err = m.readyAt(ctx, event.Ref{Consumer: c, Extension: ref.Extension, SandboxID: sb}); err != nil {
			return err
		}
	}
	h := &Hold{ID: sb, Sandbox: sb, Profile: ref.Profile, Extension: ref.Extension, PricingModel: tm.Model, Price: tm.Price, ReadyAt: readyAt.UTC(), Free: true}
	endAt := e.Time().UTC()
	actual := credits.Actual{Source: credits.SourceLifecycle, Unit: "second"}
	if !readyAt.IsZero() {
		if actual, err = m.actual(ctx, h, h.ReadyAt, endAt, nil); err != nil {
			return err
		}
	}
	return m.store.recordUsage(ctx, usageOf(c, h, actual, endAt, reason, e.ID()), traceParent(ctx))
}

// usageOf is the usage record of consumer c's sandbox of hold h, destroyed
// (or failed, or rejected) at endAt: quote and actual side by side; what
// was charged, refunded and left unpaid is the settlement's to fill in.
func usageOf(c string, h *Hold, actual credits.Actual, endAt time.Time, reason, cause string) *credits.UsageRecord {
	u := &credits.UsageRecord{
		Key: usageKey(c, h.Sandbox), Consumer: c, Sandbox: h.Sandbox, Hold: h.ID, Profile: h.Profile, Extension: h.Extension,
		PricingModel: string(h.PricingModel), ReadyAt: h.ReadyAt, DestroyedAt: endAt, Quote: h.Quote,
		Actual: actual, Reason: reason, Cause: cause,
	}
	if !h.ReadyAt.IsZero() && endAt.After(h.ReadyAt) {
		u.Seconds = int64((endAt.Sub(h.ReadyAt) + time.Second - 1) / time.Second)
	}
	return u
}

// errNeedIO tells settle that pricing needs I/O outside the change.
var errNeedIO = errors.New("pricing needs i/o")

// actual is what a ready sandbox of hold h used from readyAt to endAt.
func (m *Metering) actual(ctx context.Context, h *Hold, readyAt, endAt time.Time, meter *event.MeterReading) (credits.Actual, error) {
	if meter != nil {
		if meter.Amount < 0 {
			return credits.Actual{}, bus.Permanent(fmt.Errorf("settling %s: %w: negative meter reading %d", h.Sandbox, event.ErrMalformed, meter.Amount))
		}
		return credits.Actual{Source: credits.SourceMeter, Amount: meter.Amount, Quantity: meter.Quantity, Unit: meter.Unit, Breakdown: meter.Breakdown}, nil
	}
	d := max(endAt.Sub(readyAt), 0)
	q, err := m.pricer.cost(ctx, terms{Profile: h.Profile, Extension: h.Extension, Model: h.PricingModel, Price: h.Price}, d)
	if err != nil {
		// A metered backend that cannot be asked: settle at what the
		// accrual charged, rather than hold the credit forever.
		m.log.WarnContext(ctx, "settling at the accrued amount", "sandbox", h.Sandbox, "err", err)
		return credits.Actual{Source: credits.SourceLifecycle, Amount: h.Debited, Quantity: int64((d + time.Second - 1) / time.Second), Unit: "second",
			Breakdown: []string{"no quote: settled at the accrued amount"}}, nil
	}
	return credits.Actual{Source: credits.SourceLifecycle, Amount: q.Amount, Quantity: q.DurationSeconds, Unit: "second", Breakdown: q.Breakdown}, nil
}

// readyAt reads when sandbox sb became ready from its ready event on the
// lifecycle stream, or zero when it has none.
func (m *Metering) readyAt(ctx context.Context, r event.Ref) (time.Time, error) {
	sb := r.SandboxID
	raw, err := m.lifecycle.GetLastMsgForSubject(ctx, r.LifecycleSubject(event.StateReady))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return time.Time{}, nil
	}
	if err != nil {
		return time.Time{}, fmt.Errorf("reading ready event of %s: %w", sb, err)
	}
	_, l, err := event.DecodeLifecycle(ctx, raw.Header, raw.Data)
	if err != nil {
		return time.Time{}, nil
	}
	d, ok := l.Data.(*event.Ready)
	if !ok {
		return time.Time{}, nil
	}
	if d.ReadyAt.IsZero() {
		return l.Event.Time().UTC(), nil
	}
	return d.ReadyAt.UTC(), nil
}

// stopAccrual cancels the accrual schedule of sb, if any. It is best
// effort: a tick for a settled sandbox removes it again.
func (m *Metering) stopAccrual(ctx context.Context, sb string) {
	if err := bus.CancelSchedule(ctx, m.opts.JS, event.AccrualScheduleSubject(sb)); err != nil {
		m.log.WarnContext(ctx, "removing accrual schedule", "sandbox", sb, "err", err)
	}
}
