package provisioner

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/attribute"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// Defaults of the orphan reconciler's [Options].
const (
	DefaultOrphanInterval = time.Minute
	DefaultOrphanGrace    = 10 * time.Minute
)

// orphanListTimeout bounds one listing of a backend.
const orphanListTimeout = time.Minute

// reconciler finds what one pool's backend holds that no live record
// owns, and tears it down. Each worker of the pool runs one; they agree
// through the lifecycle stream, never with each other:
//
//   - A held sandbox whose last event (on this extension's subjects, any
//     consumer) is not terminal is owned: it lives, or a command about it
//     is under way.
//   - One whose last event is destroyed or rejected is an orphan: what its
//     teardown said it removed, or what was never to be made, is still
//     there. The event must be older than the listing (its stream
//     sequence at most the extension's last before List began), so that a
//     teardown finishing while the backend was listed is not mistaken for
//     a leftover.
//   - One with no event at all is an orphan once it is older than the
//     grace period (by the backend's Since, else since this reconciler
//     first saw it): younger, it may be a create whose first event is not
//     stored yet.
//   - One whose last event is orphaned was claimed already; it is claimed
//     again once that event is older than the grace period (its teardown
//     failed, or left something).
//
// The claim is the orphaned event itself, published with
// Nats-Expected-Last-Subject-Sequence over the sandbox's subjects: the
// stream takes it only if the sandbox's last event is still the one the
// decision was made on, so of two workers deciding on the same event one
// claims and the other is refused (or, within the de-duplication window,
// gets the same event id acknowledged as a duplicate). Only the claimer
// tears down.
type reconciler struct {
	pl     *pool
	lister extension.Lister
	// firstSeen is when this reconciler first listed each sandbox: the
	// age of what a backend cannot date. Only the loop goroutine uses it.
	firstSeen map[string]time.Time
}

// startOrphans starts a reconciler for every pool whose backend is an
// [extension.Lister], unless OrphanInterval is negative. stopOrphans
// stops them and waits.
func (p *Provisioner) startOrphans(ctx context.Context) {
	octx, stop := context.WithCancel(context.WithoutCancel(ctx))
	p.stopOrphans = stop
	if p.opts.OrphanInterval < 0 {
		return
	}
	for _, pl := range p.pools {
		l, ok := pl.ext.(extension.Lister)
		if !ok {
			continue
		}
		r := &reconciler{pl: pl, lister: l, firstSeen: map[string]time.Time{}}
		p.orphans.Add(1)
		go func() {
			defer p.orphans.Done()
			r.run(octx)
		}()
	}
}

// run reconciles every OrphanInterval until ctx ends.
func (r *reconciler) run(ctx context.Context) {
	t := time.NewTicker(r.pl.p.opts.OrphanInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		r.round(ctx)
	}
}

// round lists the backend once and considers every sandbox it holds, in
// sandbox id order.
func (r *reconciler) round(ctx context.Context) {
	pl := r.pl
	// The extension's last event before the listing: a terminal event
	// stored at or before it was stored before anything was listed.
	var before uint64
	switch m, err := bus.LastMsg(ctx, pl.p.nc, event.StreamLifecycle, event.ExtensionLifecycleFilter(pl.name)); {
	case err == nil:
		before = m.Sequence
	case errors.Is(err, bus.ErrNoMessage):
	default:
		if ctx.Err() == nil {
			pl.log.WarnContext(ctx, "orphans: reading the extension's last event", "err", err)
		}
		return
	}
	lctx, cancel := context.WithTimeout(ctx, orphanListTimeout)
	held, err := r.lister.List(lctx)
	cancel()
	if err != nil {
		if ctx.Err() != nil {
			return
		}
		// What was listed is still worth looking at, one by one.
		pl.log.WarnContext(ctx, "orphans: listing what the backend holds", "listed", len(held), "err", err)
	}
	now := time.Now()
	slices.SortFunc(held, func(a, b extension.Held) int { return cmp.Compare(a.Handle.SandboxID, b.Handle.SandboxID) })
	seen := make(map[string]bool, len(held))
	for _, h := range held {
		if ctx.Err() != nil {
			return
		}
		id := h.Handle.SandboxID
		if !event.ValidName(id) {
			pl.log.DebugContext(ctx, "orphans: the backend holds something no sandbox id names", "sandbox", id)
			continue
		}
		seen[id] = true
		first, ok := r.firstSeen[id]
		if !ok {
			first = now
			r.firstSeen[id] = now
		}
		since := h.Since
		if since.IsZero() {
			since = first
		}
		r.consider(ctx, h, since, before, now)
	}
	if err == nil {
		for id := range r.firstSeen {
			if !seen[id] {
				delete(r.firstSeen, id)
			}
		}
	}
}

// consider decides whether the held sandbox is an orphan and, if this
// worker claims it, tears it down.
func (r *reconciler) consider(ctx context.Context, h extension.Held, since time.Time, before uint64, now time.Time) {
	pl := r.pl
	grace := pl.p.opts.OrphanGrace
	id := h.Handle.SandboxID
	if h.Handle.Host == "" {
		h.Handle.Host = pl.manifest.HostList()[0]
	}
	filter := event.ExtensionSandboxFilter(pl.name, id)
	last, err := bus.LastMsg(ctx, pl.p.nc, event.StreamLifecycle, filter)
	var (
		ref    event.Ref
		reason string
		guard  uint64 // the sequence of the last event; 0: none
	)
	switch {
	case errors.Is(err, bus.ErrNoMessage):
		if now.Sub(since) < grace {
			return // perhaps a create whose first event is on its way
		}
		// No event says whose it was: the consumer and profile are
		// unknown, as for a request refused before it was routed.
		ref = event.Ref{SandboxID: id, Consumer: event.Unrouted, Profile: event.Unrouted, Extension: pl.name, Host: h.Handle.Host}
		reason = event.ReasonNoEvents
	case err != nil:
		if ctx.Err() == nil {
			pl.log.WarnContext(ctx, "orphans: reading the state of a held sandbox", "sandbox", id, "err", err)
		}
		return
	default:
		lr, err := event.ParseLifecycleSubject(last.Subject)
		if err != nil {
			pl.log.WarnContext(ctx, "orphans: the last event of a held sandbox", "sandbox", id, "err", err)
			return
		}
		switch {
		case !lr.State.Terminal() && pl.bound && now.Sub(since) >= grace:
			r.placedElsewhere(ctx, h, lr)
			return // a live record owns it, perhaps on another host
		case !lr.State.Terminal():
			return // a live record owns it
		case lr.State == event.StateOrphaned && now.Sub(last.Time) < grace:
			return // claimed lately: its teardown runs, or is tried again after the grace
		case lr.State != event.StateOrphaned && last.Sequence > before:
			return // it ended while the backend was listed: look again next round
		}
		_, e, err := event.Decode(ctx, last.Header, last.Data)
		if err == nil {
			ref, err = event.RefOf(e)
		}
		if err != nil {
			pl.log.WarnContext(ctx, "orphans: decoding the last event of a held sandbox", "sandbox", id, "err", err)
			return
		}
		// The subject, which permissions vouch for, says whose it is.
		ref.SandboxID, ref.Consumer, ref.Extension, ref.Host = lr.Sandbox, lr.Consumer, lr.Extension, h.Handle.Host
		if !event.ValidName(ref.Profile) {
			ref.Profile = event.Unrouted
		}
		reason = string(lr.State)
		guard = last.Sequence
	}
	claimed, err := r.claim(ctx, ref, reason, h, guard, filter)
	if err != nil {
		if ctx.Err() == nil {
			pl.log.WarnContext(ctx, "orphans: claiming a leftover", "sandbox", id, "err", err)
		}
		return
	}
	if !claimed {
		return // the sandbox moved on, or another worker holds the claim
	}
	deadline := extension.DefaultTeardownDeadline
	if prof, err := pl.p.opts.Catalog.Current().Profile(ref.Profile); err == nil {
		deadline = prof.Deadlines.TeardownDeadline()
	}
	tctx, cancel := context.WithTimeout(ctx, deadline)
	tctx, span := pl.startCall(tctx, "Teardown", ref, attribute.String("sandboxer.host", h.Handle.Host), attribute.String("sandboxer.reason", "orphaned"))
	rep, err := pl.ext.Teardown(tctx, h.Handle)
	endCall(span, err)
	cancel()
	if err != nil {
		if ctx.Err() == nil {
			pl.log.WarnContext(ctx, "orphans: tearing down a leftover failed; it is claimed again after the grace period",
				"sandbox", id, "reason", reason, "grace", grace, "err", err)
		}
		return
	}
	pl.log.InfoContext(ctx, "orphan torn down", "sandbox", id, "consumer", ref.Consumer, "reason", reason, "removed", rep.Removed)
}

// claim publishes the orphaned event of ref, guarded: stored only if the
// last event on filter is still guard (none, for 0). It reports whether
// this worker holds the claim.
func (r *reconciler) claim(ctx context.Context, ref event.Ref, reason string, h extension.Held, guard uint64, filter string) (bool, error) {
	pl := r.pl
	data := event.Orphaned{Ref: ref, Reason: reason, Handle: h.Handle, Held: h.Resources, HeldSince: h.Since.UTC(), Worker: pl.p.opts.WorkerID}
	// One id per sandbox and guard: two workers claiming on the same last
	// event publish one fact; a claim after an earlier one is another.
	e, err := event.New(event.TypeOrphaned, pl.source, ref.SandboxID, ref.SandboxID+"."+string(event.StateOrphaned)+"."+strconv.FormatUint(guard, 10), data)
	if err != nil {
		return false, err
	}
	subject := ref.LifecycleSubject(event.StateOrphaned)
	pctx, cancel := context.WithTimeout(ctx, pl.policy.AckWait)
	defer cancel()
	pctx, span := bus.StartPublish(pctx, subject, e)
	msg, err := event.Encode(pctx, subject, e)
	if err != nil {
		bus.EndPublish(span, err)
		return false, err
	}
	msg.Header.Set(jetstream.ExpectedLastSubjSeqHeader, strconv.FormatUint(guard, 10))
	msg.Header.Set(jetstream.ExpectedLastSubjSeqSubjHeader, filter)
	ack, err := pl.p.pub.PublishMsg(pctx, msg)
	bus.EndPublish(span, err)
	var apiErr *jetstream.APIError
	switch {
	case errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence || apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant):
		return false, nil // the sandbox moved on, or another worker claimed it
	case err != nil:
		return false, fmt.Errorf("announcing %s of %s: %w", event.StateOrphaned, ref.SandboxID, err)
	case ack.Duplicate:
		return false, nil // another worker's claim on the same last event
	}
	return true, nil
}

// placedElsewhere tears down what this host holds of a live sandbox that
// was placed on another host: a create that ran here until its worker
// died, then ran again, to the end, on a worker of another host. The
// sandbox's own events stay as they are; the sandbox lives on there.
// What is held here is older than the grace period, so no create of it
// can still be running on this host.
func (r *reconciler) placedElsewhere(ctx context.Context, h extension.Held, lr event.LifecycleRef) {
	pl := r.pl
	ref := event.Ref{SandboxID: lr.Sandbox, Consumer: lr.Consumer, Extension: lr.Extension, Profile: event.Unrouted}
	out, err := pl.createOutcome(ctx, ref)
	if err != nil {
		if ctx.Err() == nil {
			pl.log.WarnContext(ctx, "orphans: reading where a held sandbox was placed", "sandbox", ref.SandboxID, "err", err)
		}
		return
	}
	if out.handle == nil || out.handle.Host == pl.host {
		return
	}
	if out.ref != nil {
		ref.Profile = out.ref.Profile
	}
	deadline := extension.DefaultTeardownDeadline
	if prof, err := pl.p.opts.Catalog.Current().Profile(ref.Profile); err == nil {
		deadline = prof.Deadlines.TeardownDeadline()
	}
	tctx, cancel := context.WithTimeout(ctx, deadline)
	tctx, span := pl.startCall(tctx, "Teardown", ref, attribute.String("sandboxer.host", pl.host), attribute.String("sandboxer.reason", "placed_elsewhere"))
	rep, err := pl.ext.Teardown(tctx, h.Handle)
	endCall(span, err)
	cancel()
	if err != nil {
		if ctx.Err() == nil {
			pl.log.WarnContext(ctx, "orphans: tearing down the leftover of a sandbox placed on another host failed; tried again next round",
				"sandbox", ref.SandboxID, "placed_on", out.handle.Host, "err", err)
		}
		return
	}
	pl.log.InfoContext(ctx, "leftover of a sandbox placed on another host torn down", "sandbox", ref.SandboxID, "placed_on", out.handle.Host, "removed", rep.Removed)
}
