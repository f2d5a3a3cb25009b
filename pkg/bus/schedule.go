package bus

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel"

	"github.com/sand-boxer/sandboxer/pkg/event"
)

// CancelMarkerTTL is how long the marker [CancelSchedule] leaves on a
// schedule's subject lasts: the least per-message TTL the server takes.
const CancelMarkerTTL = time.Second

// CancelSchedule cancels the message schedule on subject, if any, of a
// stream that allows rollups and per-message TTLs (the timers stream): it
// publishes on the subject an empty message that rolls the subject up (the
// schedule is removed with it) and carries no schedule, which the server
// takes as the end of the subject's schedule; the marker itself expires
// after [CancelMarkerTTL]. A publish is what the schedule's owner may
// already do on its own subjects, and costs the server far less than the
// purge API, which would let its caller purge any subject of the stream.
// Cancelling a subject with no schedule leaves nothing behind either.
func CancelSchedule(ctx context.Context, js jetstream.JetStream, subject string) error {
	marker := func() *nats.Msg {
		m := nats.NewMsg(subject)
		m.Header.Set(jetstream.MsgRollup, jetstream.MsgRollupSubject)
		// In the trace of ctx, as every message about a sandbox is.
		otel.GetTextMapPropagator().Inject(ctx, event.HeaderCarrier(m.Header))
		return m
	}
	_, err := js.PublishMsg(ctx, marker(), jetstream.WithMsgTTL(CancelMarkerTTL))
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) && apiErr.ErrorCode == jsErrCodeMsgTTLDisabled {
		// A timers stream that `sandboxer setup` has not yet updated
		// (services upgraded first): the marker stays, a few bytes,
		// until the next schedule on the subject rolls it up.
		_, err = js.PublishMsg(ctx, marker())
	}
	if err != nil {
		return fmt.Errorf("cancelling the schedule on %s: %w", subject, err)
	}
	return nil
}

// jsErrCodeMsgTTLDisabled is the server's error code for a per-message TTL
// on a stream that does not allow them.
const jsErrCodeMsgTTLDisabled jetstream.ErrorCode = 10166
