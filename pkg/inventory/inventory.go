// Package inventory reads the records of sandboxes from the lifecycle
// stream, which is their one record: a sandbox's record is the fold of its
// lifecycle events ([sandbox.Apply]), and the inventory of every sandbox
// is the fold of the whole stream. Nothing here writes.
//
// The package must never import a service: the services read records
// through it.
package inventory

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
)

// MaxEvents bounds the events one read of a sandbox folds: a sandbox has
// a handful (requested, provisioning, ready, a few destroying, destroyed),
// and a teardown retried past this many attempts still shows its state,
// for the last event is read on its own.
const MaxEvents = 256

// Read returns the record of the sandbox whose lifecycle subjects filter
// matches ([event.Ref]'s RefFilter, or [event.SandboxFilter] when only the
// id is known): the fold of its events, read with one batched direct get,
// its Seq the sequence of the last of them. It is nil when the sandbox has
// no event (never recorded, or gone with the stream's max age). Events on
// the subjects of a request refused before it was routed
// ([event.Unrouted]) are not a sandbox's, and are skipped.
func Read(ctx context.Context, nc *nats.Conn, filter string) (*sandbox.Record, error) {
	msgs, err := bus.SubjectMsgs(ctx, nc, event.StreamLifecycle, filter, MaxEvents)
	if err != nil {
		return nil, err
	}
	if len(msgs) == MaxEvents {
		// More than a read folds: the state is the last event's, which
		// is read on its own and folded last.
		last, err := bus.LastMsg(ctx, nc, event.StreamLifecycle, filter)
		if err != nil {
			return nil, err
		}
		msgs = append(msgs, last)
	}
	var rec *sandbox.Record
	for _, m := range msgs {
		if rec, err = fold(ctx, rec, m.Subject, m.Sequence, m.Header, m.Data); err != nil {
			return nil, err
		}
	}
	return rec, nil
}

// fold applies the stored event of subject, sequence seq, to rec (nil: the
// first event heard of the sandbox) and returns the record after it.
func fold(ctx context.Context, rec *sandbox.Record, subject string, seq uint64, h nats.Header, data []byte) (*sandbox.Record, error) {
	ref, err := event.ParseLifecycleSubject(subject)
	if err != nil {
		return nil, fmt.Errorf("folding %s: %w", subject, err)
	}
	if ref.Extension == event.Unrouted {
		return rec, nil
	}
	_, e, err := event.Decode(ctx, h, data)
	if err != nil {
		return nil, fmt.Errorf("folding %s: %w", subject, err)
	}
	if to, ok := event.StateOf(event.Type(e.Type())); !ok || to != ref.State {
		return nil, fmt.Errorf("folding %s: %w: event type %s does not announce state %s", subject, event.ErrMalformed, e.Type(), ref.State)
	}
	if rec == nil {
		rec = &sandbox.Record{}
	}
	if _, err := sandbox.Apply(rec, e); err != nil {
		return nil, fmt.Errorf("folding %s (sequence %d): %w", subject, seq, err)
	}
	if rec.ID == "" {
		return nil, nil // an orphaned event only: no sandbox record
	}
	// The subject says whose sandbox this is, and permissions vouch for
	// it; a payload that says otherwise is not the sandbox's.
	if rec.ID != ref.Sandbox || rec.Consumer != ref.Consumer || rec.Extension != ref.Extension {
		return nil, fmt.Errorf("folding %s (sequence %d): %w: data names sandbox %q of %q on %q",
			subject, seq, event.ErrMalformed, rec.ID, rec.Consumer, rec.Extension)
	}
	rec.Seq = seq
	return rec, nil
}

// Change is one sandbox's record after an event of the stream: a fresh
// value each time, which its receiver may keep and share read-only.
type Change struct {
	Record *sandbox.Record
	// Gone is true when the sandbox ended longer than the retention ago:
	// it leaves the inventory.
	Gone bool
}

// Follower folds the whole lifecycle stream, from its first event, into
// the record of every sandbox, and keeps folding new events as they are
// stored. Build it with [Follow].
type Follower struct {
	js        jetstream.JetStream
	log       *slog.Logger
	retention time.Duration
	now       func() time.Time
	fn        func(Change)

	recs   map[string]*sandbox.Record
	gone   map[string]time.Time // sandboxes dropped past their retention, when
	ready  chan struct{}
	done   chan struct{}
	caught bool
	swept  time.Time // when records past their retention were last dropped
}

// sweepEvery is how often at most the follower looks for records that
// ended longer than the retention ago, as events come.
const sweepEvery = time.Minute

// Follow starts folding the lifecycle stream with an ordered consumer
// until ctx ends, calling fn (from one goroutine, in stream order) with
// each sandbox's record after each of its events. Records of sandboxes
// that ended longer than retention ago are dropped (fn hears them Gone);
// a negative retention keeps them. [Follower.Ready] is closed once the
// events stored when Follow started are folded. Should the consumer
// break, it resumes after the last event folded. An event that cannot be
// folded (malformed, or naming another sandbox than its subject) changes
// nothing and is logged to log (nil: discarded).
func Follow(ctx context.Context, js jetstream.JetStream, retention time.Duration, log *slog.Logger, fn func(Change)) (*Follower, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	f := &Follower{js: js, log: log, retention: retention, now: time.Now, fn: fn, recs: make(map[string]*sandbox.Record), gone: make(map[string]time.Time), ready: make(chan struct{}), done: make(chan struct{})}
	s, err := js.Stream(ctx, event.StreamLifecycle)
	if err != nil {
		return nil, fmt.Errorf("following %s: %w", event.StreamLifecycle, err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("following %s: %w", event.StreamLifecycle, err)
	}
	upTo := info.State.LastSeq
	if info.State.Msgs == 0 {
		f.caughtUp()
	}
	go f.run(ctx, upTo)
	return f, nil
}

// Ready is closed once the events stored when Follow started are folded:
// from then on the inventory is as current as the stream's delivery.
func (f *Follower) Ready() <-chan struct{} { return f.ready }

func (f *Follower) caughtUp() {
	if !f.caught {
		f.caught = true
		close(f.ready)
	}
}

// Done is closed once the follower stopped, after ctx ended.
func (f *Follower) Done() <-chan struct{} { return f.done }

func (f *Follower) run(ctx context.Context, upTo uint64) {
	defer close(f.done)
	const pause = time.Second
	var last uint64
	for ctx.Err() == nil {
		err := f.consume(ctx, &last, upTo)
		if ctx.Err() != nil {
			return
		}
		_ = err // resumed below, after last
		t := time.NewTimer(pause)
		select {
		case <-ctx.Done():
		case <-t.C:
		}
		t.Stop()
	}
}

func (f *Follower) consume(ctx context.Context, last *uint64, upTo uint64) error {
	cfg := jetstream.OrderedConsumerConfig{FilterSubjects: []string{event.SubjectLifecycle}, DeliverPolicy: jetstream.DeliverAllPolicy}
	if *last > 0 {
		cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, *last+1
	}
	c, err := f.js.OrderedConsumer(ctx, event.StreamLifecycle, cfg)
	if err != nil {
		return fmt.Errorf("following %s: %w", event.StreamLifecycle, err)
	}
	it, err := c.Messages()
	if err != nil {
		return fmt.Errorf("following %s: %w", event.StreamLifecycle, err)
	}
	go func() {
		<-ctx.Done()
		it.Stop()
	}()
	defer it.Stop()
	for {
		msg, err := it.Next()
		if err != nil {
			if errors.Is(err, jetstream.ErrMsgIteratorClosed) {
				return nil
			}
			return fmt.Errorf("following %s: %w", event.StreamLifecycle, err)
		}
		meta, err := msg.Metadata()
		if err != nil {
			continue
		}
		*last = meta.Sequence.Stream
		f.apply(ctx, msg.Subject(), meta.Sequence.Stream, msg.Headers(), msg.Data())
		if meta.Sequence.Stream >= upTo || meta.NumPending == 0 {
			f.caughtUp()
		}
	}
}

// apply folds one event into its sandbox's record. An event that cannot
// be folded (malformed: refused by the stream's writers' checks
// elsewhere) changes nothing.
func (f *Follower) apply(ctx context.Context, subject string, seq uint64, h nats.Header, data []byte) {
	ref, err := event.ParseLifecycleSubject(subject)
	if err != nil || ref.Extension == event.Unrouted {
		return
	}
	if _, ok := f.gone[ref.Sandbox]; ok {
		return // a late event of a sandbox dropped past its retention
	}
	var cur *sandbox.Record
	if old := f.recs[ref.Sandbox]; old != nil {
		cur = old.Clone()
	}
	rec, err := fold(ctx, cur, subject, seq, h, data)
	if err != nil {
		f.log.Warn("a lifecycle event that cannot be folded changes nothing", "subject", subject, "seq", seq, "err", err)
		return
	}
	if rec == nil {
		return
	}
	if !rec.Listed(f.now(), f.retention) {
		f.drop(rec)
		return
	}
	f.recs[ref.Sandbox] = rec
	f.fn(Change{Record: rec})
	if now := f.now(); now.Sub(f.swept) > sweepEvery {
		f.swept = now
		for _, r := range f.recs {
			if !r.Listed(now, f.retention) {
				f.drop(r)
			}
		}
		// A sandbox's events come within its life: a tombstone outlives
		// the retention once more, then goes.
		for id, at := range f.gone {
			if now.Sub(at) > f.retention {
				delete(f.gone, id)
			}
		}
	}
}

// drop removes rec, whose sandbox ended longer than the retention ago,
// leaving a tombstone so that a late event (a redelivery, an orphaned
// note) does not bring it back.
func (f *Follower) drop(rec *sandbox.Record) {
	_, held := f.recs[rec.ID]
	delete(f.recs, rec.ID)
	f.gone[rec.ID] = f.now()
	if held {
		f.fn(Change{Record: rec, Gone: true})
	}
}
