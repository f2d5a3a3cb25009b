package metering

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"time"
)

// Changes to one account go through one writer per account and process
// (group commit): callers queue their changes, and the writer takes every
// change queued, applies them one after the other to the account as it
// knows it, and stores the result with ONE atomic batch (commit.go). A
// caller is answered as soon as the batch is committed (its change is
// durable). The writer then publishes the batch's events in the
// background while it builds and commits the next batch, whose account
// lists them again unless their publish is known to be done (so they are
// always listed in the account as last committed until they are on the
// stream); after that commit it waits for them, publishing again any that
// failed, before it publishes its own, so events keep their order. When
// nothing more is queued it waits for the last publish, and a last write
// clears the account of the events. A read is answered once everything
// before it is published.
//
// The writer keeps the account, its revision and the holds it read in
// memory between batches, so a change needs no read first. Every change of
// a hold goes with a change of its account, so the account's guard proves
// the cached holds current too. When the server refuses the batch (another
// instance changed the account, or a key a change made already exists),
// the writer forgets what it knew, reloads and applies the changes again:
// a change whose key is now in the ledger finds it and changes nothing. A
// batch that writes nothing checks the account's revision instead, so an
// answer never rests on a stale cache.

// maxBatch bounds the changes of one batch, and so its size: a change
// writes at most a handful of keys (a settlement: debit, refund, release,
// usage record, hold), far below [bus.MaxAtomicBatch].
const maxBatch = 128

// batchTimeout bounds the work of one batch.
const batchTimeout = 20 * time.Second

// prefetch names what a change will read, fetched for the whole batch at
// once before its changes run.
type prefetch struct {
	holds  []string // sandboxes whose hold is read
	ledger []string // ledger keys asked about
	usage  []string // sandboxes whose usage record is asked about
}

// change is one queued change: fn applied to the account.
type change struct {
	ctx  context.Context
	pre  prefetch
	fn   func(t *tx) error
	read bool // answer once the batch's events are published, not at durability
	done chan result
}

type result struct {
	a   *Account
	err error
}

// writer is the writer of one account in this process.
type writer struct {
	consumer string

	mu      sync.Mutex
	queue   []*change
	running bool

	// Owned by the running drain.
	st      *state // nil: load first
	unclear bool   // the stored account lists events already published
	// pub is the publish of the last committed batch's events, which
	// may still be in flight while the next batch is built and
	// committed; nil when there is none to wait for. Its items are
	// listed in the account as last committed.
	pub *publishing
}

// publishing is a publish of account events under way: done is closed
// once every acknowledgement came or err says why not.
type publishing struct {
	items []*Item
	done  chan struct{}
	err   error
}

func (s *store) writer(consumer string) *writer {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.writers == nil {
		s.writers = map[string]*writer{}
	}
	w := s.writers[consumer]
	if w == nil {
		w = &writer{consumer: consumer}
		s.writers[consumer] = w
	}
	return w
}

// update applies fn to consumer's account and stores the result in an
// atomic batch with the other changes queued for the account, retrying
// on conflict. fn returns errNoChange when it changed
// nothing; any other error aborts the change (and only it), and update
// returns it. pre names what fn reads, to be fetched with the batch. The
// account returned is as stored. When ctx ends first, update returns its
// error, and the change may still be applied: every change is idempotent.
func (s *store) update(ctx context.Context, consumer string, pre prefetch, fn func(t *tx) error) (*Account, error) {
	return s.submit(ctx, consumer, &change{ctx: ctx, pre: pre, fn: fn})
}

func (s *store) submit(ctx context.Context, consumer string, c *change) (*Account, error) {
	c.done = make(chan result, 1)
	w := s.writer(consumer)
	w.mu.Lock()
	w.queue = append(w.queue, c)
	if !w.running {
		w.running = true
		s.wg.Add(1)
		go s.drain(w)
	}
	w.mu.Unlock()
	select {
	case r := <-c.done:
		return r.a, r.err
	case <-ctx.Done():
		return nil, fmt.Errorf("changing account %s: %w", consumer, ctx.Err())
	}
}

// drain runs batches of w's queue until it is empty, then clears the
// stored events if it must, and returns.
func (s *store) drain(w *writer) {
	defer s.wg.Done()
	for {
		w.mu.Lock()
		n := min(len(w.queue), maxBatch)
		cs := w.queue[:n:n]
		w.queue = w.queue[n:]
		if n == 0 && w.pub != nil {
			// Idle: the last events must be published before the
			// account is cleared of them, or left listed.
			w.mu.Unlock()
			s.settle(w)
			continue
		}
		if n == 0 && !w.unclear {
			w.running = false
			w.queue = nil
			w.mu.Unlock()
			return
		}
		w.mu.Unlock()
		live := cs[:0:0]
		for _, c := range cs {
			if err := c.ctx.Err(); err != nil {
				c.done <- result{err: fmt.Errorf("changing account %s: %w", w.consumer, err)}
				continue
			}
			live = append(live, c)
		}
		w.unclear = false // a batch, even empty, clears it or reloads
		s.run(w, live)
	}
}

// run applies one batch of changes (none: just clear the published
// events) and answers every change of it.
func (s *store) run(w *writer, cs []*change) {
	ctx, cancel := context.WithTimeout(context.Background(), batchTimeout)
	defer cancel()
	answered := make([]bool, len(cs))
	answer := func(i int, a *Account, err error) {
		if !answered[i] {
			answered[i] = true
			cs[i].done <- result{a: a, err: err}
		}
	}
	failAll := func(err error) {
		for i := range cs {
			answer(i, nil, err)
		}
	}
	errs := make([]error, len(cs))
	for attempt := 0; attempt < maxAttempts; attempt++ {
		if attempt > 0 {
			if err := backoff(ctx, attempt); err != nil {
				failAll(err)
				return
			}
		}
		if w.st == nil {
			s.settle(w) // in order: what was in flight first
			st, err := s.load(ctx, w.consumer)
			if err == nil {
				err = s.finish(ctx, st)
			}
			if err != nil {
				failAll(err)
				return
			}
			w.st = st
		}
		st := w.st
		now := s.now().UTC()
		b := newBatch(st, now, w.carried())
		if err := s.prefetch(ctx, b, cs); err != nil {
			w.st = nil
			failAll(err)
			return
		}
		for i, c := range cs {
			t := b.tx(ctx, s, now)
			t.cause = c.ctx
			err := c.fn(t)
			switch {
			case errors.Is(err, errNoChange):
				err = nil
			case err == nil:
				t.commit()
			}
			errs[i] = err
		}
		if err := b.seal(); err != nil {
			w.st = nil
			failAll(err)
			return
		}
		if !b.changed() {
			// Nothing to write: the answers hold if the account did not
			// move since it was cached.
			cur, err := s.revision(ctx, w.consumer)
			if err != nil {
				w.st = nil
				failAll(err)
				return
			}
			if cur != st.rev {
				w.st = nil
				continue
			}
			if slices.ContainsFunc(cs, func(c *change) bool { return c.read }) {
				s.settle(w) // a read is answered once everything before it is published
			}
			for i := range cs {
				answer(i, b.a, errs[i])
			}
			return
		}
		b.a.UpdatedAt = now
		rev, revs, err := s.commit(ctx, b, st.rev)
		if err != nil {
			if errors.Is(err, errBusy) {
				// Refused unstored: the cache still holds. Batches
				// abandoned by a killed instance hold the server's
				// places for seconds: wait longer than for a conflict.
				if err := pause(ctx, busyPause); err != nil {
					failAll(err)
					return
				}
				continue
			}
			w.st = nil
			if isConflict(err) {
				continue
			}
			failAll(fmt.Errorf("writing account %s: %w", w.consumer, err))
			return
		}
		w.st = b.settled(rev, revs)
		fresh := b.a.Events[b.carried:]
		s.metrics.committed(fresh)
		for i, c := range cs {
			if !c.read {
				answer(i, b.a, errs[i])
			}
		}
		// The previous batch's events, if this batch carried them, had
		// its whole commit to be published; any that failed go again,
		// before this batch's (they are listed in this batch's account).
		items := fresh
		if b.carried > 0 && w.pub != nil {
			<-w.pub.done
			if w.pub.err != nil {
				items = b.a.Events
			} else {
				w.unclear = true // listed, and published
			}
			w.pub = nil
		}
		if len(items) > 0 {
			w.pub = s.publishAsync(items)
		}
		if slices.ContainsFunc(cs, func(c *change) bool { return c.read }) {
			s.settle(w) // a read is answered once everything before it is published
		}
		for i := range cs {
			answer(i, b.a, errs[i])
		}
		return
	}
	w.st = nil
	failAll(fmt.Errorf("changing account %s: too much contention after %d attempts", w.consumer, maxAttempts))
}

// prefetch reads, all at once, the holds and ledger keys the changes of
// b will ask about and b does not know yet.
func (s *store) prefetch(ctx context.Context, b *batch, cs []*change) error {
	holds := map[string]bool{}
	ledger := map[string]bool{}
	usage := map[string]bool{}
	for _, c := range cs {
		known := true
		for _, sb := range c.pre.holds {
			if _, ok := b.st.holds[sb]; !ok {
				holds[sb] = true
				known = false
			}
		}
		if known && len(c.pre.holds) > 0 {
			continue // an open hold: its ledger keys are not asked about
		}
		for _, k := range c.pre.ledger {
			if _, ok := b.ledger[k]; !ok {
				ledger[k] = true
			}
		}
		for _, sb := range c.pre.usage {
			if _, ok := b.usage[sb]; !ok {
				usage[sb] = true
			}
		}
	}
	if len(holds)+len(ledger)+len(usage) == 0 {
		return nil
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
	)
	consumer := b.a.Consumer
	for sb := range holds {
		wg.Go(func() {
			ref, err := s.readHold(ctx, consumer, sb)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err != nil:
				first = cmp.Or(first, err)
			case ref.h == nil:
				b.absent[sb] = true
			default:
				b.st.holds[sb] = ref
			}
		})
	}
	// exists asks has about each key of keys and notes the answer in into.
	exists := func(keys map[string]bool, has func(key string) (bool, error), into map[string]bool) {
		for k := range keys {
			wg.Go(func() {
				ok, err := has(k)
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					first = cmp.Or(first, err)
					return
				}
				into[k] = ok
			})
		}
	}
	exists(ledger, func(k string) (bool, error) { return s.inLedger(ctx, k) }, b.ledger)
	exists(usage, func(sb string) (bool, error) { return s.hasUsage(ctx, consumer, sb) }, b.usage)
	wg.Wait()
	return first
}

// busyPause is the longest wait before a batch refused for too many in
// flight is sent again.
const busyPause = 250 * time.Millisecond

// pause waits a random time up to max, or until ctx ends.
func pause(ctx context.Context, max time.Duration) error {
	return sleep(ctx, time.Duration(rand.Int64N(int64(max))+1))
}

// backoff waits a little before the next attempt of a batch.
func backoff(ctx context.Context, attempt int) error {
	return sleep(ctx, time.Duration(rand.Int64N(int64(min(attempt, 10))*int64(2*time.Millisecond)+1)))
}

// sleep waits d, or until ctx ends.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("changing account: %w", ctx.Err())
	}
}

// carried returns the events of the last batch a new batch must list
// again: those whose publish is still in flight or failed (the new
// batch's write would otherwise clear them from the account before they
// are on the stream). A publish done and acknowledged is forgotten.
func (w *writer) carried() []*Item {
	if w.pub == nil {
		return nil
	}
	select {
	case <-w.pub.done:
		if w.pub.err == nil {
			w.pub = nil
			return nil
		}
	default:
	}
	return w.pub.items
}

// settle waits for w's publish in flight, if any. Published, the account
// may be cleared of its events (an empty batch does it); failed, they
// stay listed and the next batch reloads the account and publishes them.
func (s *store) settle(w *writer) {
	if w.pub == nil {
		return
	}
	<-w.pub.done
	if err := w.pub.err; err != nil {
		s.log.Warn("publishing account events later", "consumer", w.consumer, "err", err)
		w.st = nil
	} else {
		w.unclear = true
	}
	w.pub = nil
}
