package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"
)

// Headers of a JetStream atomic batch publish (nats-server 2.12+, on a
// stream with AllowAtomicPublish): every message of a batch carries its
// id and its place from 1, and the last one the commit.
const (
	HeaderBatchID       = "Nats-Batch-Id"
	HeaderBatchSequence = "Nats-Batch-Sequence"
	HeaderBatchCommit   = "Nats-Batch-Commit"
)

// MaxAtomicBatch is the most messages nats-server takes in one atomic
// batch (its default limit, max_batch_size).
const MaxAtomicBatch = 1000

// Refusals of an atomic batch that store nothing of it, so it may be sent
// again.
const (
	// JSErrCodeAtomicTooManyInflight: too many batches in flight on the
	// stream (50 by default, batches abandoned by a killed publisher
	// among them until the server drops them after 10s).
	JSErrCodeAtomicTooManyInflight jetstream.ErrorCode = 10210
	// JSErrCodeAtomicIncomplete: the server lacks some of the batch's
	// messages. Only the commit is answered, so this is also how a first
	// message refused for too many batches in flight shows.
	JSErrCodeAtomicIncomplete jetstream.ErrorCode = 10176
)

// Retryable reports whether err is the refusal of an atomic batch that
// stored nothing of it and may succeed if sent again.
func Retryable(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && (apiErr.ErrorCode == JSErrCodeAtomicTooManyInflight || apiErr.ErrorCode == JSErrCodeAtomicIncomplete)
}

// BatchAck is the server's acknowledgement of a committed atomic batch:
// its messages are stored under consecutive sequences, the last one
// Sequence.
type BatchAck struct {
	Stream   string `json:"stream"`
	Sequence uint64 `json:"seq"`
	Count    int    `json:"count"`
}

// First is the sequence of the batch's first message; message i (from 0)
// is stored under First()+i.
func (a BatchAck) First() uint64 { return a.Sequence - uint64(a.Count) + 1 }

// AtomicOption tunes [PublishAtomic].
type AtomicOption func(*atomicOptions)

type atomicOptions struct {
	beforeCommit func()
}

// BeforeCommit calls f once every message but the commit was sent, before
// the commit is: a test closes the connection there to cut a batch short,
// as a kill -9 of the publisher would.
func BeforeCommit(f func()) AtomicOption {
	return func(o *atomicOptions) { o.beforeCommit = f }
}

// PublishAtomic publishes msgs as one JetStream atomic batch onto the one
// stream their subjects belong to: the server stores every message or
// none. Each message's own headers are checked as a single publish's are
// (Nats-Expected-Last-Subject-Sequence, for one, against the stream as
// the batch's earlier messages leave it); one refused refuses the whole
// batch, and the error is the server's *jetstream.APIError. A batch the
// server never got to commit (the connection lost before the commit, a
// kill -9) is dropped by the server, unapplied. Only the commit is
// answered, so a batch costs one round trip. A batch of one message is
// published as a plain publish (one message is atomic as it is), which
// spares the server the staging store it keeps for a batch (a file store
// of its own on a stream of one replica on file storage).
//
// When no server answers the commit (no stream leader, as during an
// election), the whole batch is sent again under a new id every 250ms,
// for up to 10s within ctx: nothing of it was stored. When ctx ends
// before the answer, whether the batch was applied is unknown; the
// caller reads to find out. msgs' headers are set in place.
func PublishAtomic(ctx context.Context, nc *nats.Conn, msgs []*nats.Msg, opts ...AtomicOption) (BatchAck, error) {
	var o atomicOptions
	for _, opt := range opts {
		opt(&o)
	}
	if len(msgs) == 0 {
		return BatchAck{}, errors.New("publishing atomic batch: no messages")
	}
	if len(msgs) > MaxAtomicBatch {
		return BatchAck{}, fmt.Errorf("publishing atomic batch: %d messages, at most %d", len(msgs), MaxAtomicBatch)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
	}
	for attempt := 1; ; attempt++ {
		ack, err := publishAtomic(ctx, nc, msgs, o)
		if !errors.Is(err, nats.ErrNoResponders) || attempt >= electionRetryAttempts {
			return ack, err
		}
		t := time.NewTimer(electionRetryWait)
		select {
		case <-ctx.Done():
			t.Stop()
			return BatchAck{}, fmt.Errorf("publishing atomic batch: %w (after %v)", ctx.Err(), err)
		case <-t.C:
		}
	}
}

func publishAtomic(ctx context.Context, nc *nats.Conn, msgs []*nats.Msg, o atomicOptions) (BatchAck, error) {
	if len(msgs) == 1 {
		// One message is atomic as it is: a plain publish, which spares
		// the server the batch's staging store.
		return publishOne(ctx, nc, msgs[0])
	}
	id := nuid.Next()
	last := len(msgs) - 1
	for i, m := range msgs {
		if m.Header == nil {
			m.Header = nats.Header{}
		}
		m.Header.Set(HeaderBatchID, id)
		m.Header.Set(HeaderBatchSequence, strconv.Itoa(i+1))
		m.Header.Del(HeaderBatchCommit)
		if i == last {
			break
		}
		// Unanswered: a message the server refuses makes the batch
		// incomplete, which the commit's answer says.
		if err := nc.PublishMsg(m); err != nil {
			return BatchAck{}, fmt.Errorf("publishing atomic batch: message %d of %d: %w", i+1, len(msgs), err)
		}
	}
	if o.beforeCommit != nil {
		o.beforeCommit()
	}
	commit := msgs[last]
	commit.Header.Set(HeaderBatchCommit, "1")
	resp, err := nc.RequestMsgWithContext(ctx, commit)
	if err != nil {
		return BatchAck{}, fmt.Errorf("publishing atomic batch: commit: %w", err)
	}
	var r struct {
		BatchAck
		Error *jetstream.APIError `json:"error,omitempty"`
	}
	if err := json.Unmarshal(resp.Data, &r); err != nil {
		return BatchAck{}, fmt.Errorf("publishing atomic batch: decoding the answer %q: %w", resp.Data, err)
	}
	if r.Error != nil {
		return BatchAck{}, fmt.Errorf("publishing atomic batch of %d: %w", len(msgs), r.Error)
	}
	if r.Count != len(msgs) {
		return BatchAck{}, fmt.Errorf("publishing atomic batch: %d of %d messages acknowledged", r.Count, len(msgs))
	}
	return r.BatchAck, nil
}

// publishOne publishes m as a plain JetStream publish, answered as a batch
// of one.
func publishOne(ctx context.Context, nc *nats.Conn, m *nats.Msg) (BatchAck, error) {
	for _, h := range []string{HeaderBatchID, HeaderBatchSequence, HeaderBatchCommit} {
		m.Header.Del(h)
	}
	resp, err := nc.RequestMsgWithContext(ctx, m)
	if err != nil {
		return BatchAck{}, fmt.Errorf("publishing atomic batch of 1: %w", err)
	}
	var r struct {
		BatchAck
		Error *jetstream.APIError `json:"error,omitempty"`
	}
	if err := json.Unmarshal(resp.Data, &r); err != nil {
		return BatchAck{}, fmt.Errorf("publishing atomic batch of 1: decoding the answer %q: %w", resp.Data, err)
	}
	if r.Error != nil {
		return BatchAck{}, fmt.Errorf("publishing atomic batch of 1: %w", r.Error)
	}
	r.Count = 1
	return r.BatchAck, nil
}
