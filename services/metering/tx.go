package metering

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"time"
)

// The change model: a batch is what one writer applies to an account at
// once, and stores in one atomic batch; a tx is one change of it, which
// reaches the batch only when its function succeeds.

// errNoChange tells update that fn changed nothing.
var errNoChange = errors.New("no change")

// batch is what one atomic batch of an account writes: the account as
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
	// writes are the batch's hold writes, made by seal.
	writes []holdWrite
	// carried counts the events at the head of a.Events that an earlier
	// batch committed and whose publish is not yet known to be done:
	// listed again, written no more.
	carried int
	dirty   bool // write even when no change changed anything
}

// holdWrite is one hold key a batch writes: the hold's new value (nil:
// deleted, as it closed) over revision rev (0: a key that never existed).
type holdWrite struct {
	sandbox string
	h       *Hold
	rev     uint64
}

// newBatch starts a batch over st. carried are events of the last batch
// whose publish is not known to be done: the batch lists them again.
func newBatch(st *state, now time.Time, carried []*Item) *batch {
	b := &batch{st: st, a: st.a.clone(), holds: map[string]*Hold{}, pending: map[string]bool{}, ledger: map[string]bool{},
		usage: map[string]bool{}, absent: map[string]bool{}}
	// Published, or written and published, before the batch, but for
	// those carried: its write clears them.
	b.a.Events, b.a.Outbox, b.carried = slices.Clone(carried), nil, len(carried)
	b.dirty = len(st.a.Events) > len(carried) || len(st.a.Outbox) > 0 || len(st.migrated) > 0
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

// note records the ledger keys of the events from index i on.
func (b *batch) note(i int) {
	for _, it := range b.a.Events[i:] {
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
	// change's events join.
	cause context.Context
}

func (b *batch) tx(ctx context.Context, s *store, now time.Time) *tx {
	return &tx{ctx: ctx, s: s, b: b, a: b.a.clone(), now: now, holds: map[string]*Hold{}}
}

// commit merges a successful change into its batch. The events the
// change added carry its caller's trace context.
func (t *tx) commit() {
	n := len(t.b.a.Events)
	if len(t.a.Events) > n && t.cause != nil {
		if tp := traceParent(t.cause); tp != "" {
			for _, it := range t.a.Events[n:] {
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
// batch, by the change, or in the ledger.
func (t *tx) seen(key string) (bool, error) {
	if t.b.pending[key] {
		return true, nil
	}
	for _, it := range t.a.Events {
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
// this batch, by the change, or in the credits bucket.
func (t *tx) settled(sb string) (bool, error) {
	key := usageKey(t.a.Consumer, sb)
	for _, it := range t.a.Events {
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

// seal lists the batch's hold writes and checks the account.
func (b *batch) seal() error {
	b.writes = b.writes[:0]
	for _, sb := range slices.Sorted(maps.Keys(b.holds)) {
		h := b.holds[sb]
		base := b.st.holds[sb]
		switch {
		case h == nil && base.h == nil:
		case h == nil, base.h == nil, !reflect.DeepEqual(h, base.h):
			b.writes = append(b.writes, holdWrite{sandbox: sb, h: h, rev: base.rev})
		}
	}
	b.a.prune()
	if err := b.a.check(); err != nil {
		return fmt.Errorf("changing account %s: invariant broken, nothing written: %w", b.a.Consumer, err)
	}
	return nil
}

// changed reports whether the batch must be written.
func (b *batch) changed() bool { return b.dirty || len(b.a.Events) > b.carried || len(b.writes) > 0 }

// settled is the state after the batch was committed: the account at
// revision rev, and the holds it wrote at the revisions in revs.
func (b *batch) settled(rev uint64, revs map[string]uint64) *state {
	st := &state{a: b.a, rev: rev, holds: b.st.holds}
	for _, w := range b.writes {
		if w.h == nil {
			delete(st.holds, w.sandbox)
			continue
		}
		st.holds[w.sandbox] = holdRef{h: w.h, rev: revs[w.sandbox]}
	}
	return st
}
