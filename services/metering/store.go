package metering

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
)

// Accounts live in the credits bucket under account.<consumer>, changed
// only by compare-and-swap; open holds under hold.<consumer>.<sandbox>;
// ledger entries in the ledger bucket under their key, written once with
// Create; usage records in the credits bucket under
// usage.<consumer>.<sandbox>, written once with Create.
//
// A change is one compare-and-swap of the account that also stores, in
// the account's outbox, everything else the change writes: its ledger
// entries, the new values of the holds it changed, its notices and usage
// records. The outbox is then written and published; every write of it is
// idempotent (a ledger entry or usage record is a Create, which refuses a
// key that exists; a hold write names the revision its key must be at, so
// it applies once and never over a newer value; a publish carries
// Nats-Msg-Id from the item's key). Whoever loads an account with an
// outbox finishes it before changing anything, so a crash anywhere leaves
// nothing half-done for longer than the next change of that account, and
// a hold's key is current whenever its account's outbox is finished.
//
// A change is applied once: its ledger key is either in the outbox of the
// account it reads, or (once written) in the ledger, and the
// compare-and-swap fails if the account moved since it was read; every
// hold change goes with a change of its account, so the same
// compare-and-swap guards the holds a change read.

// errNoChange tells update that fn changed nothing.
var errNoChange = errors.New("no change")

// maxAttempts bounds the compare-and-swap retries of one change.
const maxAttempts = 64

type store struct {
	credits jetstream.KeyValue
	ledger  jetstream.KeyValue
	js      jetstream.JetStream
	log     *slog.Logger
	now     func() time.Time
	metrics *meteringMetrics

	mu sync.Mutex
	// writers has one writer per account this process changed, kept for
	// its cache: the account document and its open holds read so far
	// (a few hundred bytes each).
	writers map[string]*writer
	wg      sync.WaitGroup // running writers
}

// holdRef is a hold's key as a writer knows it: its value (nil: no open
// hold) and its revision.
type holdRef struct {
	h   *Hold
	rev uint64
}

// state is an account as one writer knows it: the document at revision
// rev (0: none stored) and the hold keys read since.
type state struct {
	a     *Account
	rev   uint64
	holds map[string]holdRef
	// migrated are holds moved out of a legacy account document: the
	// next compare-and-swap must create their keys.
	migrated map[string]*Hold
}

// load reads the account of consumer and its revision; a consumer with no
// account gets an empty one at revision 0. An account written before holds
// had keys of their own has them moved out by the next change.
func (s *store) load(ctx context.Context, consumer string) (*state, error) {
	st := &state{holds: map[string]holdRef{}}
	e, err := s.get(ctx, s.credits, accountKey(consumer))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		st.a = newAccount(consumer)
		return st, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading account %s: %w", consumer, err)
	}
	var a Account
	if err := json.Unmarshal(e.Value(), &a); err != nil {
		return nil, fmt.Errorf("decoding account %s: %w", consumer, err)
	}
	st.a, st.rev = &a, e.Revision()
	if len(a.LegacyHolds) > 0 {
		st.migrated = a.LegacyHolds
		a.LegacyHolds = nil
		a.Open = len(st.migrated)
		for _, g := range a.Grants {
			g.Holds = 0
		}
		for sb, h := range st.migrated {
			st.holds[sb] = holdRef{} // never had a key: created below
			for _, d := range h.Draws {
				if g := a.grant(d.Grant); g != nil {
					g.Holds++
				}
			}
		}
	}
	return st, nil
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

// entry is a key's value as the bucket's leader holds it.
type entry struct {
	value []byte
	rev   uint64
}

func (e entry) Value() []byte    { return e.value }
func (e entry) Revision() uint64 { return e.rev }

// get reads key of kv from the bucket's stream leader
// ([bus.LeaderLastMsg]), never from a follower: whether a ledger entry,
// a usage record or a hold exists decides whether a change applies, and
// no compare-and-swap guards that answer. A direct get (what
// [jetstream.KeyValue.Get] sends) may be answered by a replica that has
// not applied this process's own last writes; under load, and during a
// partition, such a read said a release just written was not in the
// ledger, the release was applied again, and the ledger refused its
// second entry (make chaos: a gap in one account's ledger sequence).
// A deleted or purged key is [jetstream.ErrKeyNotFound].
func (s *store) get(ctx context.Context, kv jetstream.KeyValue, key string) (entry, error) {
	m, err := bus.LeaderLastMsg(ctx, s.js.Conn(), bus.KVStream(kv.Bucket()), "$KV."+kv.Bucket()+"."+key)
	if errors.Is(err, bus.ErrNoMessage) {
		return entry{}, jetstream.ErrKeyNotFound
	}
	if err != nil {
		return entry{}, err
	}
	if op := m.Header.Get("KV-Operation"); op == "DEL" || op == "PURGE" {
		return entry{}, jetstream.ErrKeyNotFound
	}
	return entry{value: m.Data, rev: m.Sequence}, nil
}

// readHold reads the open hold of sb, if any.
func (s *store) readHold(ctx context.Context, consumer, sb string) (holdRef, error) {
	e, err := s.get(ctx, s.credits, holdStoreKey(consumer, sb))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return holdRef{}, nil
	}
	if err != nil {
		return holdRef{}, fmt.Errorf("reading hold %s: %w", sb, err)
	}
	var h Hold
	if err := json.Unmarshal(e.Value(), &h); err != nil {
		return holdRef{}, fmt.Errorf("decoding hold %s: %w", sb, err)
	}
	return holdRef{h: &h, rev: e.Revision()}, nil
}

// batch is what one compare-and-swap of an account writes: the account as
// its changes left it, and the holds they read or changed.
type batch struct {
	st *state
	a  *Account
	// holds are the batch's copies of the holds its changes touched; nil
	// is a hold closed by the batch.
	holds map[string]*Hold
	// pending are the ledger keys the batch recorded.
	pending map[string]bool
	// ledger caches which ledger keys exist.
	ledger map[string]bool
	// usage caches which sandboxes have a usage record.
	usage map[string]bool
	// absent are sandboxes read to have no open hold.
	absent map[string]bool
	dirty  bool // write even when no change changed anything
}

func newBatch(st *state, now time.Time) *batch {
	b := &batch{st: st, a: st.a.clone(), holds: map[string]*Hold{}, pending: map[string]bool{}, ledger: map[string]bool{},
		usage: map[string]bool{}, absent: map[string]bool{}}
	b.a.Outbox = nil // finished before the batch: the write clears it
	b.dirty = len(st.a.Outbox) > 0 || len(st.migrated) > 0
	for sb, h := range st.migrated {
		b.holds[sb] = h
	}
	seq := b.a.Seq
	b.a.expire(now)
	if b.a.Seq != seq {
		b.dirty = true
		b.note(0)
	}
	return b
}

// note records the ledger keys of the outbox items from index i on.
func (b *batch) note(i int) {
	for _, it := range b.a.Outbox[i:] {
		if it.Entry != nil {
			b.pending[it.Entry.Key] = true
		}
	}
}

// tx is one change of a batch: what its function may read and change.
// Its changes reach the batch only when the function succeeds.
type tx struct {
	ctx   context.Context
	s     *store
	b     *batch
	a     *Account
	now   time.Time
	holds map[string]*Hold
	// cause is the context of the change's caller, whose trace the
	// change's outbox items join.
	cause context.Context
}

func (b *batch) tx(ctx context.Context, s *store, now time.Time) *tx {
	return &tx{ctx: ctx, s: s, b: b, a: b.a.clone(), now: now, holds: map[string]*Hold{}}
}

// commit merges a successful change into its batch. The outbox items the
// change added carry its caller's trace context.
func (t *tx) commit() {
	n := len(t.b.a.Outbox)
	if len(t.a.Outbox) > n && t.cause != nil {
		if tp := traceParent(t.cause); tp != "" {
			for _, it := range t.a.Outbox[n:] {
				if it.Trace == "" {
					it.Trace = tp
				}
			}
		}
	}
	t.b.a = t.a
	t.b.note(n)
	for sb, h := range t.holds {
		t.b.holds[sb] = h
	}
}

// hold returns the open hold of sandbox sb for the change to read and
// modify, or nil.
func (t *tx) hold(sb string) (*Hold, error) {
	if h, ok := t.holds[sb]; ok {
		return h, nil
	}
	var h *Hold
	if bh, ok := t.b.holds[sb]; ok {
		h = bh
	} else {
		ref, ok := t.b.st.holds[sb]
		if !ok && !t.b.absent[sb] {
			var err error
			if ref, err = t.s.readHold(t.ctx, t.a.Consumer, sb); err != nil {
				return nil, err
			}
			if ref.h == nil {
				t.b.absent[sb] = true
			} else {
				t.b.st.holds[sb] = ref
			}
		}
		h = ref.h
	}
	if h == nil {
		return nil, nil
	}
	cp := cloneHold(h)
	t.holds[sb] = cp
	return cp, nil
}

// open opens hold h; the account change (reserve) is the caller's.
func (t *tx) open(h *Hold) { t.holds[h.Sandbox] = h }

// close closes the hold of sb; the account change (release) is the
// caller's.
func (t *tx) close(sb string) { t.holds[sb] = nil }

func cloneHold(h *Hold) *Hold {
	cp := *h
	cp.Draws = slices.Clone(h.Draws)
	cp.Quote.Breakdown = slices.Clone(h.Quote.Breakdown)
	if h.Price != nil {
		p := *h.Price
		cp.Price = &p
	}
	return &cp
}

// seen reports whether the ledger entry key was already recorded: by this
// batch, in the outbox of the change, or in the ledger.
func (t *tx) seen(key string) (bool, error) {
	if t.b.pending[key] {
		return true, nil
	}
	for _, it := range t.a.Outbox {
		if it.Entry != nil && it.Entry.Key == key {
			return true, nil
		}
	}
	if ok, known := t.b.ledger[key]; known {
		return ok, nil
	}
	ok, err := t.s.inLedger(t.ctx, key)
	if err != nil {
		return false, err
	}
	t.b.ledger[key] = ok
	return ok, nil
}

// closed reports whether the meter of sandbox sb was closed for good: its
// hold released (a release entry), or, for a free sandbox, whose hold
// closes without one, its usage record written. Once closed, no ready
// event or admission opens it again.
func (t *tx) closed(sb string) (bool, error) {
	if seen, err := t.seen(releaseKey(t.a.Consumer, sb)); err != nil || seen {
		return seen, err
	}
	return t.settled(sb)
}

// settled reports whether the usage record of sandbox sb was written: by
// this batch, in the outbox of the change, or in the credits bucket.
func (t *tx) settled(sb string) (bool, error) {
	key := usageKey(t.a.Consumer, sb)
	for _, it := range t.a.Outbox {
		if it.Usage != nil && it.Usage.Key == key {
			return true, nil
		}
	}
	if ok, known := t.b.usage[sb]; known {
		return ok, nil
	}
	ok, err := t.s.hasUsage(t.ctx, t.a.Consumer, sb)
	if err != nil {
		return false, err
	}
	t.b.usage[sb] = ok
	return ok, nil
}

// hasUsage reports whether the usage record of sandbox sb exists.
func (s *store) hasUsage(ctx context.Context, consumer, sb string) (bool, error) {
	_, err := s.get(ctx, s.credits, usageKey(consumer, sb))
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, jetstream.ErrKeyNotFound):
		return false, nil
	}
	return false, fmt.Errorf("reading usage record of %s: %w", sb, err)
}

func (s *store) inLedger(ctx context.Context, key string) (bool, error) {
	_, err := s.get(ctx, s.ledger, key)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, jetstream.ErrKeyNotFound):
		return false, nil
	}
	return false, fmt.Errorf("reading ledger entry %s: %w", key, err)
}

// seal adds the batch's hold writes to its outbox and checks the account.
func (b *batch) seal() error {
	for _, sb := range slices.Sorted(maps.Keys(b.holds)) {
		h := b.holds[sb]
		base := b.st.holds[sb]
		key := holdStoreKey(b.a.Consumer, sb)
		switch {
		case h == nil && base.h == nil:
		case h == nil:
			b.a.Outbox = append(b.a.Outbox, &Item{Hold: &HoldWrite{Key: key, Rev: base.rev, Delete: true}})
		case base.h == nil:
			b.a.Outbox = append(b.a.Outbox, &Item{Hold: &HoldWrite{Key: key, Hold: h}})
		case !reflect.DeepEqual(h, base.h):
			b.a.Outbox = append(b.a.Outbox, &Item{Hold: &HoldWrite{Key: key, Rev: base.rev, Hold: h}})
		}
	}
	b.a.prune()
	if err := b.a.check(); err != nil {
		return fmt.Errorf("changing account %s: invariant broken, nothing written: %w", b.a.Consumer, err)
	}
	return nil
}

// changed reports whether the batch must be written.
func (b *batch) changed() bool { return b.dirty || len(b.a.Outbox) > 0 }

// settled is the state after the batch was written at revision rev: the
// hold revisions of its writes are unknown until the outbox is written.
func (b *batch) settled(rev uint64) *state {
	st := &state{a: b.a, rev: rev, holds: b.st.holds}
	for sb, h := range b.holds {
		if h == nil {
			delete(st.holds, sb)
			continue
		}
		st.holds[sb] = holdRef{h: h, rev: b.st.holds[sb].rev}
	}
	return st
}

// Changes to one account go through one writer per account and process
// (group commit): callers queue their changes, and the writer takes every
// change queued, applies them one after the other to the account as it
// knows it, and stores the result with ONE compare-and-swap carrying the
// combined outbox. A caller is answered as soon as the compare-and-swap
// succeeded (its change is durable); the writer then writes the outbox in
// one round trip before the next batch, and the next batch's
// compare-and-swap clears it (or, when nothing more is queued, a last one).
//
// The writer keeps the account, its revision and the holds it read in
// memory between batches, so a change needs no read first. Every change of
// a hold goes with a change of its account, so the compare-and-swap proves
// the cached holds current too. When it fails (another instance changed
// the account), the writer forgets what it knew, reloads and applies the
// batch again. A batch that writes nothing checks the account's revision
// instead, so an answer never rests on a stale cache.

// maxBatch bounds the changes of one compare-and-swap, and so the size of
// the account's outbox.
const maxBatch = 128

// flushRetries bounds the further attempts at writing a stored outbox
// within its batch, the n-th after n × flushDelay (3.75s in all: an
// election on a three-node cluster took 3.5-10.5s in make chaos; the next
// change of the account finishes what these do not).
const (
	flushRetries = 5
	flushDelay   = 250 * time.Millisecond
)

// pause waits d, or until ctx ends.
func pause(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

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
	read bool // answer once the batch's outbox is written, not at durability
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
	unclear bool   // the stored outbox is written but still listed
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

// update applies fn to consumer's account and stores the result with a
// compare-and-swap, in a batch with the other changes queued for the
// account, retrying on conflict. fn returns errNoChange when it changed
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
// stored outbox if it must, and returns.
func (s *store) drain(w *writer) {
	defer s.wg.Done()
	for {
		w.mu.Lock()
		n := min(len(w.queue), maxBatch)
		cs := w.queue[:n:n]
		w.queue = w.queue[n:]
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

// run applies one batch of changes (none: just clear the outbox) and
// answers every change of it.
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
			st, err := s.load(ctx, w.consumer)
			if err == nil && len(st.a.Outbox) > 0 {
				err = s.flush(ctx, st, st.a.Outbox)
			}
			if err != nil {
				failAll(err)
				return
			}
			w.st = st
		}
		st := w.st
		now := s.now().UTC()
		b := newBatch(st, now)
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
			for i := range cs {
				answer(i, b.a, errs[i])
			}
			return
		}
		b.a.UpdatedAt = now
		rev, err := s.save(ctx, b.a, st.rev)
		if err != nil {
			w.st = nil
			if isConflict(err) {
				continue
			}
			failAll(fmt.Errorf("writing account %s: %w", w.consumer, err))
			return
		}
		w.st = b.settled(rev)
		s.metrics.committed(b.a.Outbox)
		for i, c := range cs {
			if !c.read {
				answer(i, b.a, errs[i])
			}
		}
		if len(b.a.Outbox) > 0 {
			// Every write of the outbox is idempotent: a failed one (a
			// leader election, a partition) is tried again at once, so
			// its events do not wait for the account's next change.
			err := s.flush(ctx, w.st, b.a.Outbox)
			for attempt := 1; err != nil && attempt <= flushRetries && pause(ctx, time.Duration(attempt)*flushDelay) == nil; attempt++ {
				err = s.flush(ctx, w.st, b.a.Outbox)
			}
			if err != nil {
				// Stored in the outbox: the next batch reloads and
				// finishes it.
				s.log.Warn("finishing account change later", "consumer", w.consumer, "err", err)
				w.st = nil
			} else {
				w.unclear = true
			}
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
	for k := range ledger {
		wg.Go(func() {
			ok, err := s.inLedger(ctx, k)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				first = cmp.Or(first, err)
				return
			}
			b.ledger[k] = ok
		})
	}
	for sb := range usage {
		wg.Go(func() {
			ok, err := s.hasUsage(ctx, consumer, sb)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				first = cmp.Or(first, err)
				return
			}
			b.usage[sb] = ok
		})
	}
	wg.Wait()
	return first
}

// revision reads the revision of consumer's account, 0 when it has none.
func (s *store) revision(ctx context.Context, consumer string) (uint64, error) {
	e, err := s.get(ctx, s.credits, accountKey(consumer))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("reading account %s: %w", consumer, err)
	}
	return e.Revision(), nil
}

// wait waits until every writer is idle, or ctx ends.
func (s *store) wait(ctx context.Context) error {
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("waiting for account writers: %w", ctx.Err())
	}
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

// flush writes the outbox items of st's account, all at once,
// asynchronously on one connection, and waits for every acknowledgement
// (one round trip), then publishes its events one after another. Every
// write is idempotent (see the top of this file): a ledger entry or usage
// record that exists, or a hold write that finds its key at another
// revision, was done before (by this or another instance); such a hold is
// forgotten from st and read again when needed. Events reach the metering
// stream in outbox order, so in ledger order, even when a flush fails
// part way and the next one publishes them again.
func (s *store) flush(ctx context.Context, st *state, items []*Item) error {
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
			if err := publish(bus.KVMsg(s.ledger.Bucket(), e.Key, b, 0), pending{what: "writing ledger entry " + e.Key, once: true}); err != nil {
				first = cmp.Or(first, err)
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
			if err := publish(bus.KVMsg(s.credits.Bucket(), u.Key, b, 0), pending{what: "writing usage record " + u.Key, once: true}); err != nil {
				first = cmp.Or(first, err)
			}
			key, consumer, kind, data, subject = u.Key, u.Consumer, KindUsage, u, u.Sandbox
		case it.Notice != nil:
			n := it.Notice
			key, consumer, kind, data, subject = n.Key, n.Consumer, n.Kind, n, n.Sandbox
		case it.Hold != nil:
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
	// failed (a leader election, a partition) and was published again
	// by the next flush would land after those that followed it (make
	// chaos: a billing consumer saw seq 585 follow 583). A failure stops
	// here; the next flush publishes them all again, and the stream drops
	// those it has as duplicates.
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

// read returns consumer's account without changing it, finishing a
// pending outbox and expiring credit on the way, and its open holds.
func (s *store) read(ctx context.Context, consumer string) (*Account, []*Hold, error) {
	a, err := s.submit(ctx, consumer, &change{ctx: ctx, read: true, fn: func(*tx) error { return errNoChange }})
	if err != nil {
		return nil, nil, err
	}
	var holds []*Hold
	err = watchAll(ctx, s.credits, holdStoreKey(consumer, ">"), func(b []byte) error {
		var h Hold
		if err := json.Unmarshal(b, &h); err != nil {
			return fmt.Errorf("decoding hold: %w", err)
		}
		holds = append(holds, &h)
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("reading holds of %s: %w", consumer, err)
	}
	return a, holds, nil
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

// peek returns a copy of the open hold of sb as of the account's last
// change, or nil.
func (s *store) peek(ctx context.Context, consumer, sb string) (*Hold, error) {
	var out *Hold
	_, err := s.update(ctx, consumer, prefetch{holds: []string{sb}}, func(t *tx) error {
		h, err := t.hold(sb)
		if h != nil {
			out = cloneHold(h)
		}
		if err != nil {
			return err
		}
		return errNoChange
	})
	return out, err
}
