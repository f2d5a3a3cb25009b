package provisioner

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// pool is the worker pool of one extension in this process.
type pool struct {
	p        *Provisioner
	name     string
	ext      extension.Extension
	manifest *extension.Manifest
	policy   bus.ConsumerPolicy
	consumer string
	// hostConsumer is the durable of the commands bound to host; "" when
	// the backend is not locality: host.
	hostConsumer string
	// host is this worker's placement host ([Options.Host]).
	host string
	// bound is true when the backend keeps each sandbox on its worker's
	// host (capabilities.locality: host).
	bound       bool
	concurrency int
	// waiting holds a token for each destroy that waits in its slot for
	// the sandbox's create to end; at most half the worker's slots wait,
	// so creates always find a slot to end in.
	waiting  chan struct{}
	source   string
	log      *slog.Logger
	inFlight atomic.Int64
	quotes   micro.Service // nil unless the backend is metered
	metrics  *poolMetrics
}

// consumers are the durables this worker takes the pool's commands from.
func (pl *pool) consumers() []string {
	if pl.hostConsumer == "" {
		return []string{pl.consumer}
	}
	return []string{pl.consumer, pl.hostConsumer}
}

// handle routes one command. Commands are idempotent: a redelivered create
// finds the sandbox past provisioning and does nothing; a redelivered
// destroy finds it destroyed.
func (pl *pool) handle(ctx context.Context, m *bus.Message) ([]bus.Out, error) {
	pl.inFlight.Add(1)
	defer pl.inFlight.Add(-1)
	ref, err := event.ParseCommandSubject(m.Subject)
	if err != nil {
		return nil, bus.Permanent(err)
	}
	if ref.Extension != pl.name {
		return nil, bus.Permanent(fmt.Errorf("command for extension %q reached pool %q", ref.Extension, pl.name))
	}
	if pl.bound && ref.Host != "" && ref.Host != pl.host {
		return nil, bus.Permanent(fmt.Errorf("command for host %q reached a worker of host %q", ref.Host, pl.host))
	}
	switch event.Type(m.Event.Type()) {
	case event.TypeCreate:
		if ref.Verb != event.VerbCreate {
			return nil, bus.Permanent(fmt.Errorf("create event on %s", m.Subject))
		}
		var c event.Create
		if err := event.DataAs(m.Event, &c); err != nil {
			return nil, err
		}
		if !ref.Matches(c.Ref) {
			return nil, bus.Permanent(fmt.Errorf("create data names sandbox %q of consumer %q on %q, subject %s", c.SandboxID, c.Consumer, c.Extension, m.Subject))
		}
		if pl.bound {
			// Placed here: its events, its handle and its destroys name
			// this worker's host, whatever host the gateway picked.
			c.Host = pl.host
		}
		return pl.create(ctx, m, c)
	case event.TypeDestroy:
		if ref.Verb != event.VerbDestroy {
			return nil, bus.Permanent(fmt.Errorf("destroy event on %s", m.Subject))
		}
		var d event.Destroy
		if err := event.DataAs(m.Event, &d); err != nil {
			return nil, err
		}
		if !ref.Matches(d.Ref) {
			return nil, bus.Permanent(fmt.Errorf("destroy data names sandbox %q of consumer %q on %q, subject %s", d.SandboxID, d.Consumer, d.Extension, m.Subject))
		}
		return pl.destroy(ctx, m, d)
	}
	return nil, bus.Permanent(fmt.Errorf("unknown command type %q", m.Event.Type()))
}

func (pl *pool) create(ctx context.Context, m *bus.Message, c event.Create) ([]bus.Out, error) {
	// Should this be the last delivery and fail, the sandbox fails: its
	// teardown and the release of its hold follow.
	m.OnExhausted(func(ctx context.Context, m *bus.Message, err error) ([]bus.Out, error) {
		return pl.createExhausted(ctx, c, err)
	})
	// What the command asks for is checked first, in memory: a create
	// that cannot start is never announced.
	prof, perr := pl.p.opts.Catalog.Current().Profile(c.Profile)
	var in extension.Inputs
	if perr == nil {
		var ferrs extension.FieldErrors
		if in, ferrs = pl.manifest.ValidateInputs(nil, c.Inputs); ferrs != nil {
			perr = ferrs
		} else {
			in[extension.InputSandboxID] = c.SandboxID
		}
	}
	var announced func(context.Context) error
	announce := func(exp expect, dupRefused bool) (err error) {
		announced, err = pl.emitAsync(ctx, event.StateProvisioning, c.Ref, event.Provisioning{Ref: c.Ref, Worker: pl.p.opts.WorkerID, Attempt: int(m.Delivered)}, &exp, dupRefused)
		return err
	}
	// On a first delivery the announcement is guarded by the sandbox's
	// record: the stream takes it only if the sandbox's last event is still
	// the requested event the gateway stored before the command
	// (c.RecordSeq; none at all for a command without one). Taken, it
	// proves the create has not started, and nothing needs reading; a
	// duplicate of an announcement stored before (a command published
	// twice) proves nothing, and counts as refused. Refused, or on a
	// redelivery, the sandbox's last event decides, and the announcement
	// is guarded by it.
	first := false
	if m.Delivered <= 1 && perr == nil {
		if err := announce(expect{filter: c.Ref.RefFilter(), seq: c.RecordSeq}, true); err != nil {
			return nil, err
		}
		switch err := announced(ctx); {
		case err == nil:
			first = true
		case !errors.Is(err, errNotFirst):
			return nil, err
		}
	}
	if !first {
		st, seq, err := pl.latestSeq(ctx, c.Ref)
		if err != nil {
			return nil, err
		}
		if st.Rank() > event.StateProvisioning.Rank() {
			// A destroy came first, the gateway rejected a sandbox whose
			// command it then found stored, or a create replayed.
			pl.log.DebugContext(ctx, "create already done", "sandbox", c.SandboxID, "state", st)
			return nil, nil
		}
		if perr != nil {
			return pl.failed(ctx, c, "provision", nil, perr)
		}
		// Awaited before anything is made: a destroy that took the
		// sandbox past provisioning since the read refuses it, and a
		// fresh delivery finds the create done.
		if err := announce(expect{filter: c.Ref.RefFilter(), seq: seq}, false); err != nil {
			return nil, err
		}
		if err := announced(ctx); err != nil {
			return nil, err
		}
	}
	fail := func(phase string, h *extension.Handle, reason error) ([]bus.Out, error) {
		if err := announced(ctx); err != nil {
			return nil, err
		}
		return pl.failed(ctx, c, phase, h, reason)
	}

	pctx, cancel := context.WithTimeout(ctx, prof.Deadlines.ProvisionDeadline())
	pctx, span := pl.startCall(pctx, "Provision", c.Ref)
	start := time.Now()
	h, err := pl.ext.Provision(pctx, *prof, in, c.Host)
	took(ctx, pl.metrics.provision, start)
	endCall(span, err)
	cancel()
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("provisioning %s: %w", c.SandboxID, ctx.Err()) // shutting down: another worker retries
		}
		return fail("provision", handleOrRef(h, c.Ref), err)
	}
	if h.SandboxID == "" {
		h.SandboxID = c.SandboxID
	}
	if h.Host == "" || pl.bound {
		h.Host = c.Host
	}
	rctx, cancel := context.WithTimeout(ctx, prof.Deadlines.ReadyDeadline())
	rctx, span = pl.startCall(rctx, "WaitReady", c.Ref, attribute.String("sandboxer.host", h.Host))
	start = time.Now()
	reach, err := pl.ext.WaitReady(rctx, h)
	took(ctx, pl.metrics.ready, start)
	endCall(span, err)
	cancel()
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("waiting for %s: %w", c.SandboxID, ctx.Err())
		}
		return fail("wait_ready", &h, err)
	}
	if reach.Host == "" {
		reach.Host = h.Host
	}
	now := time.Now().UTC()
	ready := event.Ready{Ref: c.Ref, Handle: h, Reachability: reach, TTLSeconds: c.TTLSeconds, ReadyAt: now, Hold: c.Hold}
	ready.Host = h.Host
	if c.TTLSeconds > 0 {
		ready.ExpiresAt = now.Add(time.Duration(c.TTLSeconds) * time.Second)
	}
	out, err := pl.lifecycle(event.StateReady, ready.Ref, ready)
	if err != nil {
		return nil, err
	}
	if err := announced(ctx); err != nil {
		return nil, err
	}
	pl.log.InfoContext(ctx, "sandbox ready", "sandbox", c.SandboxID, "host", h.Host)
	pl.metrics.outcome(outcomeReady)
	return []bus.Out{out}, nil
}

// startCall starts the span of one call into the extension's code
// (Provision, WaitReady, Teardown, MeterActual, EstimateCost), a child of
// ctx's: the command's span, so in the sandbox's trace. Its attributes
// name the sandbox, never its inputs.
func (pl *pool) startCall(ctx context.Context, op string, ref event.Ref, attrs ...attribute.KeyValue) (context.Context, trace.Span) {
	attrs = append(attrs, attribute.String("sandboxer.extension", pl.name))
	if ref.SandboxID != "" {
		attrs = append(attrs, attribute.String("sandboxer.sandbox", ref.SandboxID), attribute.String("sandboxer.consumer", ref.Consumer),
			attribute.String("sandboxer.profile", ref.Profile))
	}
	return otel.Tracer(tracerName).Start(ctx, op, trace.WithAttributes(attrs...))
}

// tracerName names the tracer of the provisioner's spans.
const tracerName = "github.com/sand-boxer/sandboxer/services/provisioner"

// endCall records the outcome of an extension call and ends its span.
func endCall(span trace.Span, err error) {
	if err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, err.Error())
	}
	span.End()
}

// failed reports a create that cannot succeed: a failed event with the
// reason, and a destroy command so that teardown of whatever was made runs
// with the destroy path's retries.
func (pl *pool) failed(ctx context.Context, c event.Create, phase string, h *extension.Handle, reason error) ([]bus.Out, error) {
	pl.log.WarnContext(ctx, "sandbox failed", "sandbox", c.SandboxID, "phase", phase, "err", reason)
	f, err := pl.lifecycle(event.StateFailed, c.Ref, event.Failed{Ref: c.Ref, Phase: phase, Reason: reason.Error(), Handle: h})
	if err != nil {
		return nil, err
	}
	d, err := event.New(event.TypeDestroy, pl.source, c.SandboxID, c.SandboxID+".destroy",
		event.Destroy{Ref: c.Ref, Reason: event.ReasonFailed, RequestedBy: "provisioner", RequestedAt: time.Now().UTC()})
	if err != nil {
		return nil, bus.Permanent(err)
	}
	// What was made is on this host: its teardown is too. Nothing made
	// (the command was refused before Provision): any worker.
	var host string
	if pl.bound && h != nil {
		host = pl.host
	}
	pl.metrics.outcome(outcomeFailed + phase)
	return []bus.Out{f, {Subject: c.Ref.HostCommandSubject(event.VerbDestroy, host), Event: d}}, nil
}

func (pl *pool) destroy(ctx context.Context, m *bus.Message, d event.Destroy) ([]bus.Out, error) {
	// Should this be the last delivery and fail, the sandbox says so and
	// the registry schedules a fresh attempt.
	m.OnExhausted(func(ctx context.Context, m *bus.Message, err error) ([]bus.Out, error) {
		return pl.destroyExhausted(ctx, m, d, err)
	})
	// The sandbox's own events say where it is: this pool reads its
	// backend's lifecycle subjects and nothing else.
	st, last, err := pl.latestMsg(ctx, d.Ref)
	if err != nil {
		return nil, err
	}
	var seq uint64
	if last != nil {
		seq = last.Sequence
	}
	if st.Terminal() {
		return nil, nil // destroyed already, or rejected before anything was made
	}
	announced := false
	if st == event.StateRequested {
		// No event but its record (requested), or none at all: its
		// create has not started, for a create's first act is its
		// announcement, guarded the same way. Destroying, stored only
		// while that holds, means it never starts: it finds the sandbox
		// past provisioning. Nothing is waited for.
		err := pl.emitExpect(ctx, event.StateDestroying, d.Ref, event.DestroyingID(d.SandboxID, d.Attempt),
			event.Destroying{Ref: d.Ref, Reason: d.Reason, Attempt: d.Attempt}, expect{filter: d.Ref.RefFilter(), seq: seq})
		switch {
		case err == nil:
			announced = true
		case !errors.Is(err, errNotFirst):
			return nil, err
		}
	}
	var out outcome
	switch {
	case announced:
	case st == event.StateReady || st == event.StateFailed:
		// The create's outcome is the last event, just read (a destroy's
		// common case).
		if out, err = pl.outcomeOf(ctx, st, last.Header, last.Data); err != nil {
			return nil, err
		}
	default:
		if out, err = pl.createOutcome(ctx, d.Ref); err != nil {
			return nil, err
		}
	}
	if !announced && !out.done {
		// A create is in flight: let it finish, so teardown removes what
		// it makes instead of racing it. It runs in a slot of its own;
		// should this worker's waiting slots all be taken, the destroy
		// comes back later instead of crowding out creates.
		select {
		case pl.waiting <- struct{}{}:
		default:
			return nil, fmt.Errorf("destroying %s: its create is in flight, and %d destroys of this worker wait already", d.SandboxID, cap(pl.waiting))
		}
		pl.log.InfoContext(ctx, "destroy waits for its create", "sandbox", d.SandboxID, "state", st, "delivered", m.Delivered)
		start := time.Now()
		out, err = pl.awaitCreate(ctx, d.Ref)
		<-pl.waiting
		if err != nil {
			return nil, err
		}
		pl.log.InfoContext(ctx, "destroy waited for its create", "sandbox", d.SandboxID, "waited", time.Since(start).Round(time.Millisecond),
			"create_done", out.done, "ended", out.terminal)
		if out.terminal {
			return nil, nil
		}
	}
	ref := d.Ref
	h := extension.Handle{SandboxID: d.SandboxID, Host: d.Host}
	if out.ref != nil {
		ref = *out.ref // as the create announced it: its host, its request
	}
	if out.handle != nil {
		h = *out.handle
	} else if ref.Host != "" {
		h.Host = ref.Host
	}
	if h.Host == "" {
		h.Host = pl.manifest.HostList()[0]
	}
	if pl.bound && out.handle != nil && h.Host != pl.host {
		// Made on another host: only a worker there can tear it down.
		return pl.forward(ctx, m, d, ref, h.Host)
	}
	if pl.bound {
		// Placed here, or nowhere (a create refused before Provision, or
		// one that did not finish): what this host may hold.
		h.Host = pl.host
	}
	if !announced {
		if err := pl.emit(ctx, event.StateDestroying, ref, event.DestroyingID(ref.SandboxID, d.Attempt),
			event.Destroying{Ref: ref, Reason: d.Reason, Attempt: d.Attempt}); err != nil {
			return nil, err
		}
	}
	deadline := extension.DefaultTeardownDeadline
	if prof, err := pl.p.opts.Catalog.Current().Profile(ref.Profile); err == nil {
		deadline = prof.Deadlines.TeardownDeadline()
	}
	tctx, cancel := context.WithTimeout(ctx, deadline)
	tctx, span := pl.startCall(tctx, "Teardown", ref, attribute.String("sandboxer.host", h.Host), attribute.String("sandboxer.reason", d.Reason))
	start := time.Now()
	rep, err := pl.ext.Teardown(tctx, h)
	took(ctx, pl.metrics.teardown, start)
	endCall(span, err)
	cancel()
	if err != nil {
		// Cleanup must happen: retry with back-off; after the last
		// delivery the sandbox says why (destroyExhausted), the registry
		// schedules a fresh attempt, and the dead letter is for an
		// operator.
		if ctx.Err() == nil {
			pl.metrics.outcome(outcomeTeardownError)
		}
		return nil, fmt.Errorf("tearing down %s: %w", d.SandboxID, err)
	}
	reading, err := pl.meter(ctx, ref, h, out.readyAt)
	if err != nil {
		return nil, err
	}
	destroyed, err := pl.lifecycle(event.StateDestroyed, ref, event.Destroyed{Ref: ref, Reason: d.Reason, Cleanup: rep, Meter: reading, ReadyAt: out.readyAt})
	if err != nil {
		return nil, err
	}
	pl.log.InfoContext(ctx, "sandbox destroyed", "sandbox", d.SandboxID, "removed", len(rep.Removed))
	pl.metrics.outcome(outcomeDestroyed)
	return []bus.Out{destroyed}, nil
}

// latest is the state of the sandbox ref names, by the last of its
// lifecycle events (one direct get over its subjects); StateRequested when
// it has none yet.
func (pl *pool) latest(ctx context.Context, ref event.Ref) (event.State, error) {
	st, _, err := pl.latestSeq(ctx, ref)
	return st, err
}

// latestSeq is [pool.latest] and the stream sequence of that last event
// (0 when there is none): what a transition decided on it expects.
func (pl *pool) latestSeq(ctx context.Context, ref event.Ref) (event.State, uint64, error) {
	st, m, err := pl.latestMsg(ctx, ref)
	if err != nil || m == nil {
		return st, 0, err
	}
	return st, m.Sequence, nil
}

// latestMsg is [pool.latest] and that last event itself (nil when there
// is none).
func (pl *pool) latestMsg(ctx context.Context, ref event.Ref) (event.State, *bus.StoredMsg, error) {
	m, err := bus.LastMsg(ctx, pl.p.nc, event.StreamLifecycle, ref.RefFilter())
	if errors.Is(err, bus.ErrNoMessage) {
		return event.StateRequested, nil, nil
	}
	if err != nil {
		return "", nil, fmt.Errorf("reading the state of %s: %w", ref.SandboxID, err)
	}
	lr, err := event.ParseLifecycleSubject(m.Subject)
	if err != nil {
		return "", nil, bus.Permanent(fmt.Errorf("reading the state of %s: %w", ref.SandboxID, err))
	}
	return lr.State, m, nil
}

// outcome is how a sandbox's create ended, as its lifecycle events say.
type outcome struct {
	// done is true once the create ended (ready or failed).
	done bool
	// terminal is true when the sandbox ended without one (rejected, or
	// destroyed by another worker) while this one waited.
	terminal bool
	// ref is the sandbox's ref as its ready or failed event gave it.
	ref *event.Ref
	// handle is what the create made; nil when it failed before making
	// anything.
	handle  *extension.Handle
	readyAt time.Time
}

// createOutcome reads the sandbox's ready or failed event from the
// lifecycle stream.
func (pl *pool) createOutcome(ctx context.Context, ref event.Ref) (outcome, error) {
	for _, s := range []event.State{event.StateReady, event.StateFailed} {
		m, err := bus.LastMsg(ctx, pl.p.nc, event.StreamLifecycle, ref.LifecycleSubject(s))
		if errors.Is(err, bus.ErrNoMessage) {
			continue
		}
		if err != nil {
			return outcome{}, fmt.Errorf("reading %s of %s: %w", s, ref.SandboxID, err)
		}
		return pl.outcomeOf(ctx, s, m.Header, m.Data)
	}
	return outcome{}, nil
}

// outcomeOf decodes a ready or failed event, read on the subject of
// state s.
func (pl *pool) outcomeOf(ctx context.Context, s event.State, h nats.Header, data []byte) (outcome, error) {
	_, l, err := event.DecodeLifecycle(ctx, h, data)
	if err != nil {
		return outcome{}, bus.Permanent(err)
	}
	if l.State != s {
		return outcome{}, bus.Permanent(fmt.Errorf("%w: a %s event on a %s subject", event.ErrMalformed, l.State, s))
	}
	switch d := l.Data.(type) {
	case *event.Ready:
		return outcome{done: true, ref: &d.Ref, handle: &d.Handle, readyAt: d.ReadyAt}, nil
	case *event.Failed:
		return outcome{done: true, ref: &d.Ref, handle: d.Handle}, nil
	}
	return outcome{}, bus.Permanent(fmt.Errorf("%w: a %s event is no create's outcome", event.ErrMalformed, l.State))
}

// awaitCreate waits for the sandbox's create to end (ready or failed), or
// for the sandbox to end otherwise (rejected, destroyed), until the
// create could not still be running. It listens on the sandbox's
// subjects, then reads them once, so no event slips between the two.
func (pl *pool) awaitCreate(ctx context.Context, ref event.Ref) (outcome, error) {
	wait := pl.policy.AckWait * time.Duration(pl.policy.MaxDeliver)
	if prof, err := pl.p.opts.Catalog.Current().Profile(ref.Profile); err == nil {
		wait += prof.Deadlines.ProvisionDeadline() + prof.Deadlines.ReadyDeadline()
	}
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	ch := make(chan *nats.Msg, 16)
	sub, err := pl.p.nc.ChanSubscribe(ref.RefFilter(), ch)
	if err != nil {
		return outcome{}, fmt.Errorf("watching sandbox %s: %w", ref.SandboxID, err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := pl.p.nc.FlushWithContext(wctx); err != nil {
		return outcome{}, fmt.Errorf("watching sandbox %s: %w", ref.SandboxID, err)
	}
	if out, err := pl.createOutcome(wctx, ref); err != nil || out.done {
		return out, err
	}
	if st, err := pl.latest(wctx, ref); err != nil {
		return outcome{}, err
	} else if st.Terminal() {
		return outcome{terminal: true}, nil
	}
	for {
		select {
		case <-wctx.Done():
			if ctx.Err() != nil {
				return outcome{}, ctx.Err()
			}
			pl.log.WarnContext(ctx, "create did not finish, tearing down anyway", "sandbox", ref.SandboxID, "waited", wait)
			return outcome{}, nil
		case m := <-ch:
			lr, err := event.ParseLifecycleSubject(m.Subject)
			if err != nil {
				continue
			}
			switch {
			case lr.State == event.StateReady || lr.State == event.StateFailed:
				return pl.outcomeOf(ctx, lr.State, m.Header, m.Data)
			case lr.State.Terminal():
				return outcome{terminal: true}, nil
			}
		}
	}
}

// lifecycle builds the lifecycle event announcing state s. Its id is
// "<sandbox>.<state>" whoever emits it, so a second emission of the same
// fact is dropped by the stream's de-duplication.
func (pl *pool) lifecycle(s event.State, ref event.Ref, data any) (bus.Out, error) {
	return pl.lifecycleWithID(s, ref, ref.SandboxID+"."+string(s), data)
}

// lifecycleWithID builds the lifecycle event announcing state s with event
// id id: a fact of its own in state s (a retry's destroying, a teardown
// that failed).
func (pl *pool) lifecycleWithID(s event.State, ref event.Ref, id string, data any) (bus.Out, error) {
	e, err := event.New(event.LifecycleType(s), pl.source, ref.SandboxID, id, data)
	if err != nil {
		return bus.Out{}, bus.Permanent(err)
	}
	return bus.Out{Subject: ref.LifecycleSubject(s), Event: e}, nil
}

// expect is what a transition was decided on: the stream sequence of the
// last event on filter's subjects (a sandbox's), 0 for none. The stream
// stores the transition only if that is still so.
type expect struct {
	filter string
	seq    uint64
}

// emitAsync publishes a lifecycle event without waiting for the stream's
// ack; the returned function waits for it. With exp, the stream stores it
// only if exp still holds, and a refusal is [errNotFirst].
// With dupRefused, an ack saying the stream held the event already (the
// same event id within its de-duplication window, stored by an earlier
// publish, unguarded by this one) is a refusal too.
func (pl *pool) emitAsync(ctx context.Context, s event.State, ref event.Ref, data any, exp *expect, dupRefused bool) (func(context.Context) error, error) {
	return pl.emitAsyncWithID(ctx, s, ref, ref.SandboxID+"."+string(s), data, exp, dupRefused)
}

func (pl *pool) emitAsyncWithID(ctx context.Context, s event.State, ref event.Ref, id string, data any, exp *expect, dupRefused bool) (func(context.Context) error, error) {
	out, err := pl.lifecycleWithID(s, ref, id, data)
	if err != nil {
		return nil, err
	}
	msg, err := event.Encode(ctx, out.Subject, out.Event)
	if err != nil {
		return nil, bus.Permanent(err)
	}
	if exp != nil {
		msg.Header.Set(jetstream.ExpectedLastSubjSeqHeader, strconv.FormatUint(exp.seq, 10))
		msg.Header.Set(jetstream.ExpectedLastSubjSeqSubjHeader, exp.filter)
	}
	f, err := pl.p.opts.JS.PublishMsgAsync(msg)
	if err != nil {
		return nil, fmt.Errorf("announcing %s of %s: %w", s, ref.SandboxID, err)
	}
	var (
		once   sync.Once
		result error
	)
	wait := func(ctx context.Context) error {
		if pl.p.opts.JS.Conn().IsClosed() {
			return fmt.Errorf("announcing %s of %s: %w", s, ref.SandboxID, nats.ErrConnectionClosed)
		}
		t := time.NewTimer(pl.policy.AckWait)
		defer t.Stop()
		select {
		case ack := <-f.Ok():
			if dupRefused && ack.Duplicate {
				return fmt.Errorf("announcing %s of %s: stored before: %w", s, ref.SandboxID, errNotFirst)
			}
			return nil
		case err := <-f.Err():
			var apiErr *jetstream.APIError
			if exp != nil && errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence || apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant) {
				return fmt.Errorf("announcing %s of %s: %w", s, ref.SandboxID, errNotFirst)
			}
			return fmt.Errorf("announcing %s of %s: %w", s, ref.SandboxID, err)
		case <-t.C:
			return fmt.Errorf("announcing %s of %s: no ack after %s", s, ref.SandboxID, pl.policy.AckWait)
		case <-ctx.Done():
			return fmt.Errorf("announcing %s of %s: %w", s, ref.SandboxID, ctx.Err())
		}
	}
	// The outcome is read once and remembered: the future answers once.
	return func(ctx context.Context) error {
		once.Do(func() { result = wait(ctx) })
		return result
	}, nil
}

// emitExpect publishes a lifecycle event with event id id now, stored
// only if exp still holds; a refusal is [errNotFirst].
func (pl *pool) emitExpect(ctx context.Context, s event.State, ref event.Ref, id string, data any, exp expect) error {
	wait, err := pl.emitAsyncWithID(ctx, s, ref, id, data, &exp, false)
	if err != nil {
		return err
	}
	return wait(ctx)
}

// errNotFirst is a guarded announcement the stream refused: the sandbox
// had moved on from the event it was decided on.
var errNotFirst = errors.New("the sandbox already has events")

// emit publishes a lifecycle event with event id id now, before the work
// it announces.
func (pl *pool) emit(ctx context.Context, s event.State, ref event.Ref, id string, data any) error {
	out, err := pl.lifecycleWithID(s, ref, id, data)
	if err != nil {
		return err
	}
	if _, err := pl.p.pub.Publish(ctx, out.Subject, out.Event); err != nil {
		return fmt.Errorf("announcing %s of %s: %w", s, ref.SandboxID, err)
	}
	return nil
}

func handleOrRef(h extension.Handle, ref event.Ref) *extension.Handle {
	if h.SandboxID == "" {
		h.SandboxID = ref.SandboxID
	}
	if h.Host == "" {
		h.Host = ref.Host
	}
	return &h
}
