package metering

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/credits"
	"github.com/sand-boxer/sandboxer/pkg/event"
)

// errBusy is a batch the server refused unstored for too many batches in
// flight (or found incomplete, as a first message refused for that shows):
// it is sent again, after a longer pause.
var errBusy = errors.New("too many atomic batches in flight")

// commit stores batch b in ONE atomic batch onto the credits stream (see
// the top of store.go): the ledger entries and usage records of its
// events, each only if its key never existed; its hold writes, each over
// the revision read; and the account document over revision rev. It
// returns the account's new revision and those of the holds written. A
// refused guard is a conflict (isConflict): nothing of the batch was
// stored.
func (s *store) commit(ctx context.Context, b *batch, rev uint64) (uint64, map[string]uint64, error) {
	if s.failCommit.Load() {
		return 0, nil, fmt.Errorf("writing account %s: failing commits, as a test asked", b.a.Consumer)
	}
	bucket := s.credits.Bucket()
	var msgs []*nats.Msg
	add := func(key string, v any, expect uint64) error {
		body, err := json.Marshal(v)
		if err != nil {
			return fmt.Errorf("encoding %s: %w", key, err)
		}
		msgs = append(msgs, bus.KVMsg(bucket, key, body, expect))
		return nil
	}
	for _, it := range b.a.Events[b.carried:] {
		var err error
		switch {
		case it.Entry != nil:
			err = add(ledgerKey(it.Entry.Key), it.Entry, 0)
		case it.Usage != nil:
			err = add(it.Usage.Key, it.Usage, 0)
		}
		if err != nil {
			return 0, nil, err
		}
	}
	holdAt := map[int]string{} // message index: the sandbox whose hold it writes
	for _, w := range b.writes {
		key := holdStoreKey(b.a.Consumer, w.sandbox)
		if w.h == nil {
			m := bus.KVMsg(bucket, key, nil, w.rev)
			m.Header.Set(kvOperation, kvDelete)
			msgs = append(msgs, m)
			continue
		}
		holdAt[len(msgs)] = w.sandbox
		if err := add(key, w.h, w.rev); err != nil {
			return 0, nil, err
		}
	}
	if err := add(accountKey(b.a.Consumer), b.a, rev); err != nil {
		return 0, nil, err
	}
	var opts []bus.AtomicOption
	if f := s.beforeCommit.Load(); f != nil {
		opts = append(opts, bus.BeforeCommit(*f))
	}
	select {
	case s.slots <- struct{}{}:
	case <-ctx.Done():
		return 0, nil, fmt.Errorf("writing account %s: %w", b.a.Consumer, ctx.Err())
	}
	ack, err := bus.PublishAtomic(ctx, s.js.Conn(), msgs, opts...)
	<-s.slots
	if bus.Retryable(err) {
		return 0, nil, fmt.Errorf("writing account %s: %w (%w)", b.a.Consumer, errBusy, err)
	}
	if err != nil {
		return 0, nil, fmt.Errorf("writing account %s: %w", b.a.Consumer, err)
	}
	revs := make(map[string]uint64, len(holdAt))
	for i, sb := range holdAt {
		revs[sb] = ack.First() + uint64(i)
	}
	return ack.Sequence, revs, nil
}

// The KV headers of a delete.
const (
	kvOperation = "KV-Operation"
	kvDelete    = "DEL"
)

// finish does what a loaded account says is left undone: the writes and
// publishes of the outbox of an account of the previous version, and the
// publish of the events of the last change.
func (s *store) finish(ctx context.Context, st *state) error {
	if len(st.a.Outbox) > 0 {
		if err := s.flush(ctx, st, st.a.Outbox, true); err != nil {
			return err
		}
	}
	if len(st.a.Events) > 0 {
		return s.publish(ctx, st.a.Events)
	}
	return nil
}

// publish publishes the metering events of items.
func (s *store) publish(ctx context.Context, items []*Item) error {
	return s.flush(ctx, nil, items, false)
}

// publishAsync publishes the metering events of items in the background,
// within [batchTimeout], while the writer goes on to its next batch.
func (s *store) publishAsync(items []*Item) *publishing {
	p := &publishing{items: items, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		ctx, cancel := context.WithTimeout(context.Background(), batchTimeout)
		defer cancel()
		p.err = s.flush(ctx, nil, items, false)
	}()
	return p
}

// flush publishes the events of items, and with writes first does the
// items' writes, all at once, asynchronously on one connection, waiting
// for every acknowledgement (one round trip); then it publishes the
// events one after another. Only the outbox of an account
// of the previous version has writes to do; each is idempotent: a ledger
// entry or usage record that exists, or a hold write that finds its key at
// another revision, was done before (by this or another instance); such a
// hold is forgotten from st and read again when needed. Events reach the
// metering stream in the items' order, so in ledger order; each carries
// Nats-Msg-Id from its key, so a second publish within the stream's
// de-duplication window stores nothing.
func (s *store) flush(ctx context.Context, st *state, items []*Item, writes bool) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
	}
	type pending struct {
		f    jetstream.PubAckFuture
		what string
		hold *HoldWrite // a hold write: its revision is remembered
		once bool       // a Create: a key that exists was written before
	}
	var (
		waits  []pending
		events []outEvent
	)
	publish := func(msg *nats.Msg, p pending) error {
		f, err := s.js.PublishMsgAsync(msg)
		if err != nil {
			return fmt.Errorf("%s: %w", p.what, err)
		}
		p.f = f
		waits = append(waits, p)
		return nil
	}
	var first error
	for _, it := range items {
		var (
			key, consumer, subject string
			kind                   credits.Kind
			data                   any
		)
		switch {
		case it.Entry != nil:
			e := it.Entry
			b, err := json.Marshal(e)
			if err != nil {
				return fmt.Errorf("encoding ledger entry %s: %w", e.Key, err)
			}
			if writes {
				if err := publish(bus.KVMsg(s.credits.Bucket(), ledgerKey(e.Key), b, 0), pending{what: "writing ledger entry " + e.Key, once: true}); err != nil {
					first = cmp.Or(first, err)
				}
			}
			key, consumer, kind, data, subject = e.Key, e.Consumer, kindOf(e.Kind), e, e.Sandbox
			if subject == "" {
				subject = e.Grant
			}
		case it.Usage != nil:
			u := it.Usage
			b, err := json.Marshal(u)
			if err != nil {
				return fmt.Errorf("encoding usage record %s: %w", u.Key, err)
			}
			if writes {
				if err := publish(bus.KVMsg(s.credits.Bucket(), u.Key, b, 0), pending{what: "writing usage record " + u.Key, once: true}); err != nil {
					first = cmp.Or(first, err)
				}
			}
			key, consumer, kind, data, subject = u.Key, u.Consumer, credits.KindUsage, u, u.Sandbox
		case it.Notice != nil:
			n := it.Notice
			key, consumer, kind, data, subject = n.Key, n.Consumer, n.Kind, n, n.Sandbox
		case it.Hold != nil && writes:
			w := it.Hold
			var b []byte
			if !w.Delete {
				var err error
				if b, err = json.Marshal(w.Hold); err != nil {
					return fmt.Errorf("encoding hold %s: %w", w.Key, err)
				}
			}
			// At revision 0 the write fails on a key that ever existed,
			// even deleted: a closed hold never opens again.
			msg := bus.KVMsg(s.credits.Bucket(), w.Key, b, w.Rev)
			if w.Delete {
				msg.Header.Set("KV-Operation", "DEL")
			}
			if err := publish(msg, pending{what: "writing hold " + w.Key, hold: w}); err != nil {
				first = cmp.Or(first, err)
			}
			continue
		default:
			continue
		}
		ev, err := event.New(kind.Type(), Source, subject, key, data)
		if err != nil {
			return err
		}
		// Published in the trace of what caused it (a sandbox's lifecycle
		// event, a request), which the item kept.
		mctx := ctx
		if it.Trace != "" {
			mctx = propagation.TraceContext{}.Extract(ctx, propagation.MapCarrier{"traceparent": it.Trace})
		}
		msubject := event.MeteringSubject(consumer, string(kind))
		mctx, span := bus.StartPublish(mctx, msubject, ev)
		msg, err := event.Encode(mctx, msubject, ev)
		if err != nil {
			bus.EndPublish(span, err)
			return err
		}
		events = append(events, outEvent{msg: msg, span: span})
	}
	defer func() {
		for _, e := range events {
			e.span.End() // a no-op for those ended with their ack
		}
	}()
	for _, p := range waits {
		select {
		case ack := <-p.f.Ok():
			if w := p.hold; w != nil {
				sb := w.Key[strings.LastIndexByte(w.Key, '.')+1:]
				if w.Delete {
					delete(st.holds, sb)
				} else {
					st.holds[sb] = holdRef{h: w.Hold, rev: ack.Sequence}
				}
			}
		case err := <-p.f.Err():
			switch {
			case isConflict(err) && p.hold != nil:
				delete(st.holds, p.hold.Key[strings.LastIndexByte(p.hold.Key, '.')+1:]) // read it again when needed
			case isConflict(err) && p.once:
			default:
				first = cmp.Or(first, fmt.Errorf("%s: %w", p.what, err))
			}
		case <-ctx.Done():
			return fmt.Errorf("waiting for outbox writes: %w", ctx.Err())
		}
	}
	if first != nil {
		return first
	}
	// The events go out once what they announce is stored, one after
	// another, each after the previous one's ack: for one consumer, entry
	// events reach the stream in seq order. Published together, one that
	// failed (a leader election, a partition) and was published again by
	// the next flush would land after those that followed it (make chaos,
	// on the outbox design: a billing consumer saw seq 585 follow 583). A
	// failure stops here; the next flush publishes them all again, and the
	// stream drops those it has as duplicates.
	for _, e := range events {
		_, err := s.js.PublishMsg(ctx, e.msg)
		bus.EndPublish(e.span, err)
		if err != nil {
			return fmt.Errorf("publishing %s: %w", e.msg.Subject, err)
		}
	}
	return nil
}

// outEvent is a metering event a flush publishes, in its publish span.
type outEvent struct {
	msg  *nats.Msg
	span trace.Span
}

// traceParent is the W3C traceparent of ctx's span, or empty when it has
// none.
func traceParent(ctx context.Context) string {
	c := propagation.MapCarrier{}
	propagation.TraceContext{}.Inject(ctx, c)
	return c.Get("traceparent")
}
