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

// Hold deadlines. Admission holds credit, then the gateway publishes the
// create command; should it die in between, nothing would ever settle
// the hold. So admission first schedules the hold's deadline on the bus
// (event.HoldDeadlineScheduleSubject, firing to
// event.HoldDeadlineFireSubject), then holds. The schedule is cancelled
// ([bus.CancelSchedule]) when the sandbox becomes ready, or when its hold
// settles without a ready; one that fires finds
// either the hold closed or the meter running, and does nothing, or an
// open hold the sandbox never started: then metering rejects the sandbox
// (code hold_expired) with a rejected event published only if the
// sandbox has no lifecycle event at all
// (Nats-Expected-Last-Subject-Sequence 0 over its subjects). A create
// command still on its way is then refused by its worker, which finds
// the sandbox ended, and the rejected event releases the hold as any
// rejection does (a release in the ledger, a released event). A sandbox
// whose lifecycle started is the registry's reconciler's to end.

// TypeHoldDeadline is the internal timer of an admitted hold's deadline.
// It is not on the metering stream.
const TypeHoldDeadline event.Type = "dev.sandboxer.credits.hold_deadline.v1"

// CodeHoldExpired is the code of the rejected event of a sandbox whose
// hold's deadline passed before its lifecycle started.
const CodeHoldExpired = "hold_expired"

// HoldDeadline is the data of a [TypeHoldDeadline] timer.
type HoldDeadline struct {
	Consumer  string    `json:"consumer"`
	Sandbox   string    `json:"sandbox_id"`
	Profile   string    `json:"profile"`
	Extension string    `json:"extension"`
	Deadline  time.Time `json:"deadline"`
}

// holdDeadline is how long the hold of a sandbox of profile may wait for
// its lifecycle to start, or 0 when holds have no deadline.
func (m *Metering) holdDeadline(profile string) time.Duration {
	switch d := m.opts.HoldDeadline; {
	case d < 0:
		return 0
	case d > 0:
		return d
	}
	var d extension.Deadlines
	if p, err := m.pricer.cat.Current().Profile(profile); err == nil {
		d = p.Deadlines
	}
	return d.ProvisionDeadline() + d.ReadyDeadline() + defaultHoldGrace
}

// defaultHoldGrace is what a hold's default deadline adds to its
// profile's provision and ready deadlines: time for a create command
// queued behind others.
const defaultHoldGrace = 5 * time.Minute

// scheduleHoldDeadline schedules the deadline of r's hold. Its id is the
// sandbox's, so admission asked again within the de-duplication window
// schedules it once.
func (m *Metering) scheduleHoldDeadline(ctx context.Context, r credits.HoldRequest) error {
	d := m.holdDeadline(r.Profile)
	if d <= 0 {
		return nil
	}
	at := m.opts.Now().UTC().Add(d).Truncate(time.Second).Add(time.Second)
	e, err := event.New(TypeHoldDeadline, Source, r.SandboxID, r.SandboxID+".hold_deadline", HoldDeadline{
		Consumer: r.Consumer, Sandbox: r.SandboxID, Profile: r.Profile, Extension: r.Extension, Deadline: at,
	})
	if err != nil {
		return err
	}
	if _, err := bus.NewPublisher(m.opts.JS).Publish(ctx, event.HoldDeadlineScheduleSubject(r.SandboxID), e,
		jetstream.WithScheduleAt(at), jetstream.WithScheduleTarget(event.HoldDeadlineFireSubject(r.SandboxID))); err != nil {
		return fmt.Errorf("scheduling the hold deadline of %s: %w", r.SandboxID, err)
	}
	return nil
}

// stopHoldDeadline cancels the hold deadline of sb, if any. It is best
// effort: a deadline that fires for a hold closed or running does
// nothing.
func (m *Metering) stopHoldDeadline(ctx context.Context, sb string) {
	if err := bus.CancelSchedule(ctx, m.opts.JS, event.HoldDeadlineScheduleSubject(sb)); err != nil {
		m.log.WarnContext(ctx, "removing a hold deadline", "sandbox", sb, "err", err)
	}
}

// onTimer is the handler of metering's fired timers: accrual ticks and
// hold deadlines.
func (m *Metering) onTimer(ctx context.Context, msg *bus.Message) ([]bus.Out, error) {
	if strings.HasPrefix(msg.Subject, strings.TrimSuffix(event.HoldDeadlineFireFilter, ">")) {
		return m.onHoldDeadline(ctx, msg)
	}
	return m.countAccrual(ctx, msg)
}

// onHoldDeadline is the handler of fired hold deadlines: a hold still
// open whose sandbox never started gets the sandbox rejected, which
// releases it.
func (m *Metering) onHoldDeadline(ctx context.Context, msg *bus.Message) ([]bus.Out, error) {
	sb, ok := strings.CutPrefix(msg.Subject, strings.TrimSuffix(event.HoldDeadlineFireFilter, ">"))
	if !ok || !event.ValidName(sb) {
		return nil, bus.Permanent(fmt.Errorf("handling hold deadline: %q is not a hold deadline subject", msg.Subject))
	}
	if event.Type(msg.Event.Type()) != TypeHoldDeadline {
		return nil, bus.Permanent(fmt.Errorf("handling hold deadline %s: unexpected event type %s", msg.Subject, msg.Event.Type()))
	}
	var d HoldDeadline
	if err := event.DataAs(msg.Event, &d); err != nil {
		return nil, bus.Permanent(fmt.Errorf("handling hold deadline %s: %w", msg.Subject, err))
	}
	if d.Sandbox != sb || !event.ValidName(d.Consumer) || !event.ValidName(d.Extension) || !event.ValidName(d.Profile) {
		return nil, bus.Permanent(fmt.Errorf("handling hold deadline %s: %w: data names sandbox %q, consumer %q, extension %q, profile %q",
			msg.Subject, event.ErrMalformed, d.Sandbox, d.Consumer, d.Extension, d.Profile))
	}
	h, err := m.store.peek(ctx, d.Consumer, sb)
	switch {
	case err != nil:
		return nil, err
	case h == nil || !h.ReadyAt.IsZero() || h.Implicit:
		return nil, nil // settled, running, or never admitted
	}
	ref := event.Ref{SandboxID: sb, Consumer: d.Consumer, Profile: h.Profile, Extension: h.Extension}
	reason := fmt.Sprintf("no lifecycle event by the hold's deadline %s: the create command never came", d.Deadline.Format(time.RFC3339))
	e, err := event.New(event.TypeRejected, Source, sb, sb+".rejected."+CodeHoldExpired,
		event.Rejected{Ref: ref, Code: CodeHoldExpired, Reason: reason})
	if err != nil {
		return nil, err
	}
	subject := ref.LifecycleSubject(event.StateRejected)
	pctx, span := bus.StartPublish(ctx, subject, e)
	out, err := event.Encode(pctx, subject, e)
	if err != nil {
		bus.EndPublish(span, err)
		return nil, err
	}
	out.Header.Set(jetstream.ExpectedLastSubjSeqHeader, "0")
	out.Header.Set(jetstream.ExpectedLastSubjSeqSubjHeader, ref.RefFilter())
	ack, err := bus.NewPublisher(m.opts.JS).PublishMsg(pctx, out)
	bus.EndPublish(span, err)
	var apiErr *jetstream.APIError
	switch {
	case errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence || apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant):
		// Its lifecycle started: the sandbox's own events (or the
		// registry's reconciler) settle the hold.
		return nil, nil
	case err != nil:
		return nil, fmt.Errorf("rejecting %s past its hold's deadline: %w", sb, err)
	}
	if !ack.Duplicate {
		m.metrics.holdsExpired.Inc()
	}
	m.log.WarnContext(ctx, "hold past its deadline without a create: sandbox rejected, hold released", "consumer", d.Consumer, "sandbox", sb, "deadline", d.Deadline)
	return nil, nil
}
