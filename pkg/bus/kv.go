package bus

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// KVMsg is the message that writes value under key in bucket only if the
// key is at revision rev (0: the key has no value and never had one), as
// KeyValue.Create and KeyValue.Update send it. Publish it synchronously
// or asynchronously; a conflict is the server's "wrong last sequence".
func KVMsg(bucket, key string, value []byte, rev uint64) *nats.Msg {
	return &nats.Msg{
		Subject: "$KV." + bucket + "." + key,
		Header:  nats.Header{jetstream.ExpectedLastSubjSeqHeader: []string{strconv.FormatUint(rev, 10)}},
		Data:    value,
	}
}

// KVWrite writes value under key in bucket at revision rev, as
// KeyValue.Create (rev 0) and KeyValue.Update do, and returns the new
// revision. With ttl > 0 the value lives that long (the bucket needs a
// LimitMarkerTTL): the server then removes it and leaves a delete marker.
// KeyValue.Update takes no time to live, so this publishes to the bucket's
// subject itself. A conflict wraps jetstream.ErrKeyExists (rev 0) or
// jetstream.ErrKeyRevisionMismatch. Unlike KeyValue.Create, rev 0 fails on
// a key that was deleted: a deleted record is not written again.
func KVWrite(ctx context.Context, js jetstream.JetStream, bucket, key string, value []byte, rev uint64, ttl time.Duration) (uint64, error) {
	opts := electionRetry() // refused unstored: safe to try again
	if ttl > 0 {
		opts = append(opts, jetstream.WithMsgTTL(ttl))
	}
	ack, err := js.PublishMsg(ctx, KVMsg(bucket, key, value, rev), opts...)
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence || apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant) {
		if rev == 0 {
			return 0, fmt.Errorf("writing %s/%s: %w", bucket, key, jetstream.ErrKeyExists)
		}
		return 0, fmt.Errorf("writing %s/%s: %w", bucket, key, jetstream.ErrKeyRevisionMismatch)
	}
	if err != nil {
		return 0, fmt.Errorf("writing %s/%s: %w", bucket, key, err)
	}
	return ack.Sequence, nil
}
