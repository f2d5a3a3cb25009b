package metering

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
)

// Accounts live in the credits bucket under account.<consumer>, changed
// only by compare-and-swap; ledger entries in the ledger bucket under their
// key, written once with Create; usage records in the credits bucket under
// usage.<consumer>.<sandbox>, written once with Create.
//
// A change is one compare-and-swap of the account that also stores the
// change's ledger entries, notices and usage records in the account's
// outbox. The outbox is then written (ledger Create, which refuses a key
// that exists, so a second write records nothing) and published (with
// Nats-Msg-Id from the entry's key), and cleared by a second
// compare-and-swap. Whoever loads an account with an outbox finishes it
// before changing anything, so a crash anywhere leaves nothing half-done
// for longer than the next change of that account.
//
// A change is applied once: its ledger key is either in the outbox of the
// account it reads, or (once written) in the ledger, and the
// compare-and-swap fails if the account moved since it was read.

// errNoChange tells update that fn changed nothing.
var errNoChange = errors.New("no change")

// maxAttempts bounds the compare-and-swap retries of one change.
const maxAttempts = 64

type store struct {
	credits jetstream.KeyValue
	ledger  jetstream.KeyValue
	pub     *bus.Publisher
	log     *slog.Logger
	now     func() time.Time
	// locks serialise the changes this process makes to one account, so
	// concurrent changes queue instead of failing their compare-and-swap
	// over and over. They are an optimisation: correctness across
	// processes comes from the compare-and-swap alone.
	locks [64]sync.Mutex
}

func (s *store) lock(consumer string) func() {
	h := fnv.New32a()
	_, _ = h.Write([]byte(consumer))
	m := &s.locks[h.Sum32()%uint32(len(s.locks))]
	m.Lock()
	return m.Unlock
}

// load reads the account of consumer and its revision; a consumer with no
// account gets an empty one at revision 0.
func (s *store) load(ctx context.Context, consumer string) (*Account, uint64, error) {
	e, err := s.credits.Get(ctx, accountKey(consumer))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return newAccount(consumer), 0, nil
	}
	if err != nil {
		return nil, 0, fmt.Errorf("reading account %s: %w", consumer, err)
	}
	var a Account
	if err := json.Unmarshal(e.Value(), &a); err != nil {
		return nil, 0, fmt.Errorf("decoding account %s: %w", consumer, err)
	}
	if a.Holds == nil {
		a.Holds = map[string]*Hold{}
	}
	return &a, e.Revision(), nil
}

// save writes a over revision rev.
func (s *store) save(ctx context.Context, a *Account, rev uint64) (uint64, error) {
	b, err := json.Marshal(a)
	if err != nil {
		return 0, fmt.Errorf("encoding account %s: %w", a.Consumer, err)
	}
	if rev == 0 {
		return s.credits.Create(ctx, accountKey(a.Consumer), b)
	}
	return s.credits.Update(ctx, accountKey(a.Consumer), b, rev)
}

func isConflict(err error) bool {
	return errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyRevisionMismatch) ||
		strings.Contains(err.Error(), "wrong last sequence")
}

// tx is what a change function may ask while it runs.
type tx struct {
	ctx   context.Context
	s     *store
	a     *Account
	now   time.Time
	dirty bool // the load finished an outbox or expired credit: save even when fn changes nothing
}

// seen reports whether the ledger entry key was already recorded: in the
// outbox of the account being changed, or in the ledger.
func (t *tx) seen(key string) (bool, error) {
	for _, it := range t.a.Outbox {
		if it.Entry != nil && it.Entry.Key == key {
			return true, nil
		}
	}
	_, err := t.s.ledger.Get(t.ctx, key)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, jetstream.ErrKeyNotFound):
		return false, nil
	}
	return false, fmt.Errorf("reading ledger entry %s: %w", key, err)
}

// update applies fn to consumer's account and stores the result with a
// compare-and-swap, retrying on conflict. fn returns errNoChange when it
// changed nothing; any other error aborts the change, and update returns
// it. The account returned is as stored.
func (s *store) update(ctx context.Context, consumer string, fn func(t *tx) error) (*Account, error) {
	unlock := s.lock(consumer)
	defer unlock()
	for attempt := 0; attempt < maxAttempts; attempt++ {
		if attempt > 0 {
			if err := backoff(ctx, attempt); err != nil {
				return nil, err
			}
		}
		a, rev, err := s.load(ctx, consumer)
		if err != nil {
			return nil, err
		}
		t := &tx{ctx: ctx, s: s, a: a, now: s.now().UTC()}
		if len(a.Outbox) > 0 {
			if err := s.flush(ctx, a.Outbox); err != nil {
				return nil, err
			}
			a.Outbox = nil
			t.dirty = true
		}
		seq := a.Seq
		a.expire(t.now)
		if a.Seq != seq {
			t.dirty = true
		}
		err = fn(t)
		switch {
		case errors.Is(err, errNoChange):
			if !t.dirty {
				return a, nil
			}
		case err != nil:
			return nil, err
		}
		a.prune()
		if err := a.check(); err != nil {
			return nil, fmt.Errorf("changing account %s: invariant broken, nothing written: %w", consumer, err)
		}
		a.UpdatedAt = t.now
		newRev, err := s.save(ctx, a, rev)
		if err != nil {
			if isConflict(err) {
				continue
			}
			return nil, fmt.Errorf("writing account %s: %w", consumer, err)
		}
		if len(a.Outbox) == 0 {
			return a, nil
		}
		if err := s.flush(ctx, a.Outbox); err != nil {
			// Stored in the outbox: the next change of the account finishes it.
			s.log.Warn("finishing account change later", "consumer", consumer, "err", err)
			return a, nil
		}
		a.Outbox = nil
		if _, err := s.save(ctx, a, newRev); err != nil && !isConflict(err) {
			s.log.Warn("clearing account outbox", "consumer", consumer, "err", err)
		}
		// On a conflict another change loaded the outbox and finished it.
		return a, nil
	}
	return nil, fmt.Errorf("changing account %s: too much contention after %d attempts", consumer, maxAttempts)
}

// backoff waits a little before the next compare-and-swap attempt.
func backoff(ctx context.Context, attempt int) error {
	d := time.Duration(rand.Int64N(int64(min(attempt, 10))*int64(2*time.Millisecond) + 1))
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("changing account: %w", ctx.Err())
	}
}

// flush writes and publishes the outbox items, in order. Writing is
// idempotent (Create, and a key that exists is the same item) and so is
// publishing (Nats-Msg-Id is the item's key).
func (s *store) flush(ctx context.Context, items []*Item) error {
	outs := make([]bus.Out, 0, len(items))
	for _, it := range items {
		var (
			key, consumer, subject string
			kind                   Kind
			data                   any
		)
		switch {
		case it.Entry != nil:
			e := it.Entry
			b, err := json.Marshal(e)
			if err != nil {
				return fmt.Errorf("encoding ledger entry %s: %w", e.Key, err)
			}
			if _, err := s.ledger.Create(ctx, e.Key, b); err != nil && !errors.Is(err, jetstream.ErrKeyExists) {
				return fmt.Errorf("writing ledger entry %s: %w", e.Key, err)
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
			if _, err := s.credits.Create(ctx, u.Key, b); err != nil && !errors.Is(err, jetstream.ErrKeyExists) {
				return fmt.Errorf("writing usage record %s: %w", u.Key, err)
			}
			key, consumer, kind, data, subject = u.Key, u.Consumer, KindUsage, u, u.Sandbox
		case it.Notice != nil:
			n := it.Notice
			key, consumer, kind, data, subject = n.Key, n.Consumer, n.Kind, n, n.Sandbox
		default:
			continue
		}
		ev, err := event.New(kind.Type(), Source, subject, key, data)
		if err != nil {
			return err
		}
		outs = append(outs, bus.Out{Subject: event.MeteringSubject(consumer, string(kind)), Event: ev})
	}
	// One at a time, in order: a consumer's events reach the stream in
	// ledger order.
	for _, o := range outs {
		if _, err := s.pub.Publish(ctx, o.Subject, o.Event); err != nil {
			return err
		}
	}
	return nil
}

// read returns consumer's account without changing it, finishing a
// pending outbox and expiring credit on the way.
func (s *store) read(ctx context.Context, consumer string) (*Account, error) {
	return s.update(ctx, consumer, func(*tx) error { return errNoChange })
}

// entries returns consumer's ledger, in sequence order.
func (s *store) entries(ctx context.Context, consumer string) ([]Entry, error) {
	var out []Entry
	err := watchAll(ctx, s.ledger, consumer+".>", func(b []byte) error {
		var e Entry
		if err := json.Unmarshal(b, &e); err != nil {
			return fmt.Errorf("decoding ledger entry: %w", err)
		}
		out = append(out, e)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("reading ledger of %s: %w", consumer, err)
	}
	slices.SortFunc(out, func(x, y Entry) int {
		if x.Seq < y.Seq {
			return -1
		}
		if x.Seq > y.Seq {
			return 1
		}
		return 0
	})
	return out, nil
}

// usage returns the usage records of consumer, or of every consumer when
// consumer is empty.
func (s *store) usage(ctx context.Context, consumer string) ([]UsageRecord, error) {
	filter := "usage.>"
	if consumer != "" {
		filter = "usage." + consumer + ".>"
	}
	var out []UsageRecord
	err := watchAll(ctx, s.credits, filter, func(b []byte) error {
		var u UsageRecord
		if err := json.Unmarshal(b, &u); err != nil {
			return fmt.Errorf("decoding usage record: %w", err)
		}
		out = append(out, u)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("reading usage records: %w", err)
	}
	slices.SortFunc(out, func(x, y UsageRecord) int {
		if c := x.DestroyedAt.Compare(y.DestroyedAt); c != 0 {
			return c
		}
		return strings.Compare(x.Key, y.Key)
	})
	return out, nil
}

// watchAll calls fn with the value of every key of kv matching filter, as
// of now.
func watchAll(ctx context.Context, kv jetstream.KeyValue, filter string, fn func([]byte) error) error {
	w, err := kv.Watch(ctx, filter, jetstream.IgnoreDeletes())
	if err != nil {
		return err
	}
	defer func() { _ = w.Stop() }()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case e, ok := <-w.Updates():
			if !ok {
				return errors.New("watcher closed")
			}
			if e == nil {
				return nil
			}
			if err := fn(e.Value()); err != nil {
				return err
			}
		}
	}
}
