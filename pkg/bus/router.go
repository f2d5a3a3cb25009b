package bus

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/sand-boxer/sandboxer/pkg/event"
)

// Message is one delivery handed to a [Handler].
type Message struct {
	// Event is the decoded CloudEvent.
	Event *event.Event
	// Subject is the subject the message was published on.
	Subject string
	// Delivered counts deliveries of this message, starting at 1.
	Delivered uint64
	// StreamSeq is the message's sequence in its stream.
	StreamSeq uint64
	// Timestamp is when the stream stored the message.
	Timestamp time.Time

	raw       jetstream.Msg
	exhausted ExhaustedFunc
}

// Raw returns the underlying JetStream message. Handlers must not ack it:
// the router does.
func (m *Message) Raw() jetstream.Msg { return m.raw }

// ExhaustedFunc is a message's compensation: what to publish when its
// last allowed delivery failed. err is an [*ExhaustedError].
type ExhaustedFunc func(ctx context.Context, m *Message, err error) ([]Out, error)

// OnExhausted registers fn as this delivery's compensation. When the
// delivery fails (the handler's error, its panic, or publishing what it
// returned) with an error that is not [Permanent], and it is the last one
// the consumer allows, the router calls fn and publishes what it returns
// before it writes the dead letter and terminates the message: the
// handler says what giving up on its message means (a failed event, a
// retry later), and the router still alone acks, naks and dead-letters.
// The dead letter is written whatever fn does; fn's error (or panic) is
// logged and added to the dead letter's reason. fn runs with its own
// deadline after the handler returned, so it must not wait on the
// handler's context. A handler registers it as soon as it knows what to
// compensate; the last registration wins.
func (m *Message) OnExhausted(fn ExhaustedFunc) { m.exhausted = fn }

// ExhaustedError is the error an [ExhaustedFunc] is called with: the last
// delivery's error, after Deliveries deliveries.
type ExhaustedError struct {
	Deliveries uint64
	Err        error
}

func (e *ExhaustedError) Error() string {
	return fmt.Sprintf("exhausted %d deliveries: %s", e.Deliveries, e.Err)
}

func (e *ExhaustedError) Unwrap() error { return e.Err }

// Handler handles one message and returns the events it produced. The
// router publishes them, then acks. A nil error with no events acks. An
// error naks with back-off, or dead-letters when the error is [Permanent]
// or the deliveries are exhausted (after publishing the compensation the
// handler registered with [Message.OnExhausted], if any). A panic is
// recovered and naks.
//
// Handlers must be idempotent: any message may be delivered more than once.
type Handler func(ctx context.Context, m *Message) ([]Out, error)

type permanentError struct{ err error }

func (p permanentError) Error() string { return p.err.Error() }
func (p permanentError) Unwrap() error { return p.err }

// Permanent marks err as one that no redelivery can fix: the router sends
// the message to the dead-letter stream at once.
func Permanent(err error) error {
	if err == nil {
		return nil
	}
	return permanentError{err}
}

// IsPermanent reports whether err was marked [Permanent] or is a malformed
// event.
func IsPermanent(err error) bool {
	var p permanentError
	return errors.As(err, &p) || errors.Is(err, event.ErrMalformed)
}

// Headers a dead letter carries besides the original ones.
const (
	HeaderDLQReason    = "Sandboxer-Dlq-Reason"
	HeaderDLQSubject   = "Sandboxer-Dlq-Subject"
	HeaderDLQStream    = "Sandboxer-Dlq-Stream"
	HeaderDLQConsumer  = "Sandboxer-Dlq-Consumer"
	HeaderDLQStreamSeq = "Sandboxer-Dlq-Stream-Seq"
	HeaderDLQDelivered = "Sandboxer-Dlq-Delivered"
)

// Route binds a handler to a durable consumer.
type Route struct {
	// Stream and Consumer name the durable consumer, which must exist
	// ([EnsureConsumer]).
	Stream, Consumer string
	// Policy gives the back-off between redeliveries. Its AckWait (for
	// heartbeats) and MaxDeliver (the delivery bound) are read from the
	// consumer itself.
	Policy ConsumerPolicy
	// Concurrency is how many handlers run at once in this process.
	// Default 1.
	Concurrency int
	// Handler handles each message.
	Handler Handler
	// HandlerContext, when set, is the context handlers run with instead of
	// Run's: Run's context then only stops pulling, so a service can drain
	// the handlers in flight before it cancels them.
	HandlerContext context.Context

	metrics *routeMetrics // set by Run
}

// RouterStats counts what a router did.
type RouterStats struct {
	Handled, Failed, DeadLettered, Panics atomic.Int64
	// Compensated counts the exhausted messages whose compensation
	// ([Message.OnExhausted]) was published.
	Compensated atomic.Int64
}

// Router is the one consume loop of every service: it decodes, runs the
// handler with InProgress heartbeats, publishes what the handler returned,
// acks, naks with back-off, and dead-letters poison messages.
type Router struct {
	js     jetstream.JetStream
	pub    *Publisher
	log    *slog.Logger
	tracer trace.Tracer
	Stats  RouterStats
	// Metrics, when set before Run, counts what Stats counts per durable
	// consumer, with redeliveries and handler durations, in Prometheus
	// families ([NewRouterMetrics]). Default nil: Stats only.
	Metrics *RouterMetrics
}

// NewRouter returns a router on js. A nil logger discards.
func NewRouter(js jetstream.JetStream, log *slog.Logger) *Router {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Router{
		js:     js,
		pub:    NewPublisher(js),
		log:    log,
		tracer: otel.Tracer("github.com/sand-boxer/sandboxer/pkg/bus"),
	}
}

// Run consumes rt until ctx is cancelled, then stops pulling and waits for
// the handlers in flight. Handlers see ctx, or rt.HandlerContext when set:
// on its cancellation they should return quickly; their messages are
// nak'ed for another instance. Run returns nil on cancellation.
func (r *Router) Run(ctx context.Context, rt Route) error {
	if rt.Handler == nil {
		return errors.New("running route: nil handler")
	}
	rt.Policy = rt.Policy.WithDefaults()
	rt.metrics = r.Metrics.route(rt.Consumer)
	n := rt.Concurrency
	if n <= 0 {
		n = 1
	}
	cons, err := r.js.Consumer(ctx, rt.Stream, rt.Consumer)
	if err != nil {
		return fmt.Errorf("looking up consumer %s/%s (created by `sandboxer setup`): %w", rt.Stream, rt.Consumer, err)
	}
	// The consumer's own bounds win over the route's: setup made it, and
	// the server redelivers by them.
	if cfg := cons.CachedInfo().Config; cfg.AckWait > 0 {
		rt.Policy.AckWait = cfg.AckWait
		rt.Policy.MaxDeliver = cfg.MaxDeliver
	}
	it, err := cons.Messages(jetstream.PullMaxMessages(n), jetstream.PullExpiry(5*time.Second))
	if err != nil {
		return fmt.Errorf("consuming %s/%s: %w", rt.Stream, rt.Consumer, err)
	}
	// On cancellation, drain rather than stop: messages already pulled
	// into the buffer come out of Next and are handed back (nak) at once,
	// instead of waiting out AckWait on a consumer nobody reads.
	stop := context.AfterFunc(ctx, it.Drain)
	defer stop()
	defer it.Stop()

	hctx := ctx
	if rt.HandlerContext != nil {
		hctx = rt.HandlerContext
	}
	sem := make(chan struct{}, n)
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			r.handBack(it)
			return nil
		}
		msg, err := it.Next()
		if err != nil {
			<-sem
			if errors.Is(err, jetstream.ErrMsgIteratorClosed) {
				return nil
			}
			if ctx.Err() != nil {
				r.handBack(it)
				return nil
			}
			r.log.Warn("pulling messages", "consumer", rt.Consumer, "err", err)
			continue
		}
		if ctx.Err() != nil {
			<-sem
			_ = msg.Nak()
			r.handBack(it)
			return nil
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			r.handle(hctx, rt, msg)
		}()
	}
}

// handBack naks what a draining iterator still holds, so another instance
// gets it now. It returns when the iterator is closed, or after a bound.
func (r *Router) handBack(it jetstream.MessagesContext) {
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		msg, err := it.Next()
		if err != nil {
			return
		}
		_ = msg.Nak()
	}
}

func (r *Router) handle(ctx context.Context, rt Route, msg jetstream.Msg) {
	meta, err := msg.Metadata()
	if err != nil {
		r.log.Error("reading message metadata", "consumer", rt.Consumer, "err", err)
		_ = msg.Term()
		return
	}
	if meta.NumDelivered > 1 {
		rt.metrics.redelivered.Inc()
	}
	hctx, e, derr := event.Decode(ctx, msg.Headers(), msg.Data())
	hctx, span := r.tracer.Start(hctx, "process "+rt.Consumer,
		trace.WithSpanKind(trace.SpanKindConsumer),
		trace.WithAttributes(
			attribute.String("messaging.system", "nats"),
			attribute.String("messaging.destination.name", msg.Subject()),
			attribute.String("messaging.consumer.group.name", rt.Consumer),
			attribute.Int64("messaging.nats.delivered", int64(meta.NumDelivered)),
		))
	defer span.End()
	if derr != nil {
		r.fail(hctx, rt, msg, meta, nil, derr, span)
		return
	}
	span.SetAttributes(attribute.String("cloudevents.event_type", e.Type()), attribute.String("cloudevents.event_id", e.ID()),
		attribute.String("cloudevents.event_subject", e.Subject()))
	m := &Message{Event: e, Subject: msg.Subject(), Delivered: meta.NumDelivered, StreamSeq: meta.Sequence.Stream, Timestamp: meta.Timestamp, raw: msg}

	stopBeat := heartbeat(msg, rt.Policy.AckWait)
	start := time.Now()
	outs, herr := r.call(hctx, rt, m)
	if herr == nil && len(outs) > 0 {
		herr = r.pub.PublishAll(hctx, outs)
	}
	rt.metrics.duration.Observe(time.Since(start).Seconds())
	stopBeat()
	if herr != nil {
		r.fail(hctx, rt, msg, meta, m, herr, span)
		return
	}
	if err := msg.Ack(); err != nil {
		r.log.WarnContext(hctx, "acking", "consumer", rt.Consumer, "subject", msg.Subject(), "err", err)
	}
	r.Stats.Handled.Add(1)
	rt.metrics.handled.Inc()
}

// call runs the handler and turns a panic into an error.
func (r *Router) call(ctx context.Context, rt Route, m *Message) (outs []Out, err error) {
	defer func() {
		if p := recover(); p != nil {
			r.Stats.Panics.Add(1)
			rt.metrics.panics.Inc()
			r.log.ErrorContext(ctx, "handler panicked", "consumer", rt.Consumer, "subject", m.Subject, "panic", p, "stack", string(debug.Stack()))
			outs, err = nil, fmt.Errorf("handler panicked: %v", p)
		}
	}()
	return rt.Handler(ctx, m)
}

// fail naks msg with back-off, or dead-letters it: at once when err is
// [Permanent], after its compensation (m's [Message.OnExhausted], m nil
// when msg could not be decoded) when its deliveries are exhausted.
func (r *Router) fail(ctx context.Context, rt Route, msg jetstream.Msg, meta *jetstream.MsgMetadata, m *Message, err error, span trace.Span) {
	span.RecordError(err)
	span.SetStatus(codes.Error, err.Error())
	r.Stats.Failed.Add(1)
	rt.metrics.failed.Inc()
	last := rt.Policy.MaxDeliver > 0 && int(meta.NumDelivered) >= rt.Policy.MaxDeliver
	if !IsPermanent(err) && !last {
		if ctx.Err() != nil {
			// Shutting down: hand the message to another instance now.
			_ = msg.Nak()
			return
		}
		delay := rt.Policy.Delay(meta.NumDelivered)
		r.log.WarnContext(ctx, "handler failed, will retry", "consumer", rt.Consumer, "subject", msg.Subject(),
			"delivered", meta.NumDelivered, "retry_in", delay, "err", err)
		_ = msg.NakWithDelay(delay)
		return
	}
	reason := err.Error()
	if last && !IsPermanent(err) {
		xerr := &ExhaustedError{Deliveries: meta.NumDelivered, Err: err}
		reason = xerr.Error()
		if m != nil && m.exhausted != nil {
			if cerr := r.compensate(ctx, rt, m, xerr); cerr != nil {
				r.log.ErrorContext(ctx, "compensating an exhausted message failed", "consumer", rt.Consumer, "subject", msg.Subject(), "err", cerr)
				reason += "; compensation failed: " + cerr.Error()
			}
		}
	}
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if derr := r.deadLetter(dctx, rt, msg, meta, reason); derr != nil {
		// Keep the message rather than lose it; it comes back after back-off.
		r.log.ErrorContext(ctx, "dead-lettering failed, keeping message", "consumer", rt.Consumer, "err", derr)
		_ = msg.NakWithDelay(rt.Policy.Delay(meta.NumDelivered))
		return
	}
	r.Stats.DeadLettered.Add(1)
	rt.metrics.deadLettered.Inc()
	r.log.ErrorContext(ctx, "message dead-lettered", "consumer", rt.Consumer, "subject", msg.Subject(), "reason", reason)
	_ = msg.TermWithReason(truncate(reason, 200))
}

// compensationTimeout bounds an exhausted message's compensation: building
// it (which may read the bus) and publishing it.
const compensationTimeout = 10 * time.Second

// compensate runs m's compensation for xerr and publishes what it returns.
// A panic in it is an error.
func (r *Router) compensate(ctx context.Context, rt Route, m *Message, xerr *ExhaustedError) (err error) {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), compensationTimeout)
	defer cancel()
	outs, err := func() (outs []Out, err error) {
		defer func() {
			if p := recover(); p != nil {
				r.log.ErrorContext(ctx, "compensation panicked", "consumer", rt.Consumer, "subject", m.Subject, "panic", p, "stack", string(debug.Stack()))
				outs, err = nil, fmt.Errorf("compensation panicked: %v", p)
			}
		}()
		return m.exhausted(cctx, m, xerr)
	}()
	if err == nil {
		err = r.pub.PublishAll(cctx, outs)
	}
	if err != nil {
		return err
	}
	r.Stats.Compensated.Add(1)
	r.log.WarnContext(ctx, "exhausted message compensated", "consumer", rt.Consumer, "subject", m.Subject, "outputs", len(outs), "reason", xerr.Error())
	return nil
}

func (r *Router) deadLetter(ctx context.Context, rt Route, msg jetstream.Msg, meta *jetstream.MsgMetadata, reason string) error {
	h := nats.Header{}
	for k, v := range msg.Headers() {
		if serverDirective(k) {
			continue
		}
		h[k] = append([]string(nil), v...)
	}
	h.Set(HeaderDLQReason, truncate(reason, 2000))
	h.Set(HeaderDLQSubject, msg.Subject())
	h.Set(HeaderDLQStream, meta.Stream)
	h.Set(HeaderDLQConsumer, meta.Consumer)
	h.Set(HeaderDLQStreamSeq, strconv.FormatUint(meta.Sequence.Stream, 10))
	h.Set(HeaderDLQDelivered, strconv.FormatUint(meta.NumDelivered, 10))
	h.Set(event.HeaderMsgID, "dlq:"+meta.Stream+":"+strconv.FormatUint(meta.Sequence.Stream, 10))
	out := &nats.Msg{Subject: event.DLQSubject(rt.Stream, rt.Consumer), Header: h, Data: msg.Data()}
	_, err := r.pub.PublishMsg(ctx, out)
	return err
}

// serverDirective reports whether header k told the server what to do
// with the original message, or is what the server added: a schedule's
// (a fired timer carries Nats-Scheduler and Nats-Schedule-Next, which the
// dead-letter stream, taking no schedules, would refuse), a guard's, a
// TTL's, a batch's. They are not the message's to keep.
func serverDirective(k string) bool {
	return len(k) > 5 && strings.EqualFold(k[:5], "Nats-")
}

// heartbeat tells the server the message is in progress every third of
// ackWait until the returned stop is called. It costs a timer, not a
// goroutine, for the many messages handled in well under ackWait.
func heartbeat(msg jetstream.Msg, ackWait time.Duration) (stop func()) {
	every := ackWait / 3
	if every <= 0 {
		return func() {}
	}
	var (
		mu      sync.Mutex
		stopped bool
		t       *time.Timer
	)
	beat := func() {
		_ = msg.InProgress()
		mu.Lock()
		defer mu.Unlock()
		if !stopped {
			t.Reset(every)
		}
	}
	mu.Lock()
	t = time.AfterFunc(every, beat)
	mu.Unlock()
	return func() {
		mu.Lock()
		stopped = true
		t.Stop()
		mu.Unlock()
	}
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}

// Group is a set of routes running on one router, stopped together.
type Group struct {
	stopPull, stopHandlers context.CancelFunc
	done                   chan struct{}
}

// Start runs each route in a goroutine of its own until the group's
// Shutdown. The routes' HandlerContext is replaced by the group's, which
// Shutdown cancels only when its own context ends first.
func (r *Router) Start(routes ...Route) *Group {
	pullCtx, stopPull := context.WithCancel(context.Background())
	handlerCtx, stopHandlers := context.WithCancel(context.Background())
	g := &Group{stopPull: stopPull, stopHandlers: stopHandlers, done: make(chan struct{})}
	var wg sync.WaitGroup
	for _, rt := range routes {
		rt.HandlerContext = handlerCtx
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := r.Run(pullCtx, rt); err != nil {
				r.log.Error("router stopped", "consumer", rt.Consumer, "err", err)
			}
		}()
	}
	go func() { wg.Wait(); close(g.done) }()
	return g
}

// Shutdown stops pulling and waits for the handlers in flight. When ctx
// ends first, it cancels them (their messages go back to the stream for
// another instance), waits for them to return and reports ctx's error.
func (g *Group) Shutdown(ctx context.Context) error {
	g.stopPull()
	defer g.stopHandlers()
	select {
	case <-g.done:
		return nil
	case <-ctx.Done():
		g.stopHandlers()
		<-g.done
		return fmt.Errorf("draining handlers: %w", ctx.Err())
	}
}
