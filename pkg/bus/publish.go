package bus

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/sand-boxer/sandboxer/pkg/event"
)

// Out is one event a handler produced, for the router to publish before it
// acknowledges the message that caused it.
type Out struct {
	Subject string
	Event   *event.Event
	// Opts are extra publish options (a schedule, an expected sequence).
	Opts []jetstream.PublishOpt
}

// ErrBackPressure is returned when a bounded stream refuses a publish
// because it is full: the caller should retry later or refuse upstream.
var ErrBackPressure = errors.New("stream full")

// jsErrCodeStreamStoreFailed is the server's error code for a store refusing
// a message at a limit (maximum messages or bytes with discard new).
const jsErrCodeStreamStoreFailed jetstream.ErrorCode = 10077

// Publisher publishes CloudEvents to JetStream in binary content mode and
// waits for the stream's acknowledgement. A duplicate (same Nats-Msg-Id
// inside the stream's window) counts as success: the fact is recorded once.
type Publisher struct {
	js jetstream.JetStream
}

// NewPublisher returns a Publisher on js.
func NewPublisher(js jetstream.JetStream) *Publisher { return &Publisher{js: js} }

// Publish encodes e for subject, publishes it and waits for the ack, in a
// producer span ([StartPublish]) whose context the message carries.
func (p *Publisher) Publish(ctx context.Context, subject string, e *event.Event, opts ...jetstream.PublishOpt) (*jetstream.PubAck, error) {
	ctx, span := StartPublish(ctx, subject, e)
	msg, err := event.Encode(ctx, subject, e)
	if err != nil {
		EndPublish(span, err)
		return nil, err
	}
	ack, err := p.PublishMsg(ctx, msg, opts...)
	EndPublish(span, err)
	return ack, err
}

// StartPublish starts the producer span of publishing e on subject
// ("publish <type>"): a child of ctx's span. Encode the event with the
// returned context, so the message's traceparent names this span, and end
// the span with [EndPublish] once the stream acknowledged it.
func StartPublish(ctx context.Context, subject string, e *event.Event) (context.Context, trace.Span) {
	return otel.Tracer(tracerName).Start(ctx, "publish "+e.Type(),
		trace.WithSpanKind(trace.SpanKindProducer),
		trace.WithAttributes(
			attribute.String("messaging.system", "nats"),
			attribute.String("messaging.destination.name", subject),
			attribute.String("messaging.operation.type", "send"),
			attribute.String("cloudevents.event_type", e.Type()),
			attribute.String("cloudevents.event_id", e.ID()),
			attribute.String("cloudevents.event_subject", e.Subject()),
		))
}

// EndPublish records the outcome of a publish on its span and ends it.
func EndPublish(span trace.Span, err error) {
	if err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, err.Error())
	}
	span.End()
}

// PublishMsg publishes an already encoded message and waits for the ack.
func (p *Publisher) PublishMsg(ctx context.Context, msg *nats.Msg, opts ...jetstream.PublishOpt) (*jetstream.PubAck, error) {
	ack, err := p.js.PublishMsg(ctx, msg, append(electionRetry(), opts...)...)
	if err != nil {
		return nil, publishErr(msg.Subject, err)
	}
	return ack, nil
}

// A stream with no leader (an election on a cluster, a node restarting)
// has no responder: the server refuses the publish at once, and nothing
// is stored. Such a publish is tried again every electionRetryWait, up to
// electionRetryAttempts times (10s, about twice the elections seen on the
// compose cluster under kill -9) and never past the caller's context: a
// write during an election waits for the new leader instead of failing
// its caller. nats.go's default is two retries, half a second.
const (
	electionRetryWait     = 250 * time.Millisecond
	electionRetryAttempts = 40
)

// electionRetry is the publish options of that retry; a caller's own
// options, after it, override them.
func electionRetry() []jetstream.PublishOpt {
	return []jetstream.PublishOpt{jetstream.WithRetryWait(electionRetryWait), jetstream.WithRetryAttempts(electionRetryAttempts)}
}

// PublishAll publishes outs concurrently and waits for every ack, so n
// events cost one round trip, not n. It returns the first error. When ctx
// has no deadline the wait is bounded by the JetStream context's default
// timeout, as a single Publish is: an ack that never comes is an error,
// not a hang.
func (p *Publisher) PublishAll(ctx context.Context, outs []Out) error {
	switch len(outs) {
	case 0:
		return nil
	case 1:
		_, err := p.Publish(ctx, outs[0].Subject, outs[0].Event, outs[0].Opts...)
		return err
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, p.js.Options().DefaultTimeout)
		defer cancel()
	}
	futures := make([]jetstream.PubAckFuture, 0, len(outs))
	spans := make([]trace.Span, 0, len(outs))
	defer func() {
		for _, s := range spans {
			s.End() // a no-op for those ended with their ack
		}
	}()
	for _, o := range outs {
		sctx, span := StartPublish(ctx, o.Subject, o.Event)
		spans = append(spans, span)
		msg, err := event.Encode(sctx, o.Subject, o.Event)
		if err != nil {
			EndPublish(span, err)
			return err
		}
		f, err := p.js.PublishMsgAsync(msg, o.Opts...)
		if err != nil {
			err = publishErr(o.Subject, err)
			EndPublish(span, err)
			return err
		}
		futures = append(futures, f)
	}
	var first error
	for i, f := range futures {
		select {
		case <-f.Ok():
			EndPublish(spans[i], nil)
		case err := <-f.Err():
			err = publishErr(f.Msg().Subject, err)
			EndPublish(spans[i], err)
			if first == nil {
				first = err
			}
		case <-ctx.Done():
			return fmt.Errorf("waiting for publish acks: %w", ctx.Err())
		}
	}
	return first
}

func publishErr(subject string, err error) error {
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) && apiErr.ErrorCode == jsErrCodeStreamStoreFailed {
		return fmt.Errorf("publishing %s: %w: %v", subject, ErrBackPressure, err)
	}
	return fmt.Errorf("publishing %s: %w", subject, err)
}
