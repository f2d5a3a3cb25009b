package bus

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/event"
)

// ErrConflict is a transition the stream refused: the last message on the
// subjects it was guarded by is no longer the one it was decided on.
// Another writer moved the sandbox first.
var ErrConflict = errors.New("the sandbox moved on")

// PublishTransition publishes e on subject, stored only while the last
// message of the stream on filter's subjects (a sandbox's: [event.Ref]'s
// RefFilter, or [event.SandboxFilter]) is still the one of sequence seq,
// 0 for none (Nats-Expected-Last-Subject-Sequence with its -Subject). The
// event is itself the compare-and-swap of the sandbox's state: of two
// writers that decided on the same sequence one is stored, and the other
// gets an error wrapping [ErrConflict]. The ack says Duplicate when an
// event of the same id was stored before within the stream's window.
func (p *Publisher) PublishTransition(ctx context.Context, subject string, e *event.Event, filter string, seq uint64) (*jetstream.PubAck, error) {
	ctx, span := StartPublish(ctx, subject, e)
	msg, err := event.Encode(ctx, subject, e)
	if err != nil {
		EndPublish(span, err)
		return nil, err
	}
	msg.Header.Set(jetstream.ExpectedLastSubjSeqHeader, strconv.FormatUint(seq, 10))
	msg.Header.Set(jetstream.ExpectedLastSubjSeqSubjHeader, filter)
	ack, err := p.PublishMsg(ctx, msg)
	if IsConflict(err) {
		err = fmt.Errorf("publishing %s after sequence %d of %s: %w", subject, seq, filter, ErrConflict)
	}
	EndPublish(span, err)
	return ack, err
}

// IsConflict reports whether err is a guarded publish the stream refused
// for its expected last sequence: [ErrConflict], or the server's own
// error.
func IsConflict(err error) bool {
	if errors.Is(err, ErrConflict) {
		return true
	}
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
		apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}
