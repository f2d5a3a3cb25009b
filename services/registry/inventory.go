package registry

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/inventory"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
)

// project is the handler of the registry's durable on the lifecycle
// stream: it keeps the sandbox's expiry and destroy retry schedules, the
// registry's own facts, in step with its state. It writes no record: the
// events are the record. Redelivered and reordered events are harmless:
// schedules have ids, and a fired timer reads the record again.
func (r *Registry) project(ctx context.Context, m *bus.Message) ([]bus.Out, error) {
	ref, err := event.ParseLifecycleSubject(m.Subject)
	if err != nil {
		return nil, bus.Permanent(fmt.Errorf("projecting event: %w", err))
	}
	if err := event.CheckName("sandbox id", ref.Sandbox); err != nil {
		return nil, bus.Permanent(fmt.Errorf("projecting %s: %w", m.Subject, err))
	}
	if to, ok := event.StateOf(event.Type(m.Event.Type())); !ok || to != ref.State {
		return nil, bus.Permanent(fmt.Errorf("projecting %s: event type %s does not announce state %s", m.Subject, m.Event.Type(), ref.State))
	}
	// The subject says whose sandbox this is, and permissions vouch for
	// it; a payload that says otherwise is refused.
	if d, err := event.RefOf(m.Event); err != nil {
		return nil, bus.Permanent(fmt.Errorf("projecting %s: %w", m.Subject, err))
	} else if d.SandboxID != ref.Sandbox {
		return nil, bus.Permanent(fmt.Errorf("projecting %s: %w: data names sandbox %q", m.Subject, event.ErrMalformed, d.SandboxID))
	} else if !ref.Matches(d) {
		return nil, bus.Permanent(fmt.Errorf("projecting %s: %w: data names consumer %q on %q", m.Subject, event.ErrMalformed, d.Consumer, d.Extension))
	}
	if ref.Extension == event.Unrouted {
		// A request refused before it was routed: there is no sandbox to
		// keep a record of; the rejected event and the reply said why.
		return nil, nil
	}
	// One event of a sandbox at a time in this instance, with its
	// schedule work: the event that moves a sandbox past ready cancels
	// its expiry only after the ready event scheduled it.
	defer r.sandboxLocks.lock(ref.Sandbox)()
	rec, _, err := r.applyEvent(ref.Sandbox, m.Event, streamSeq(m))
	if err != nil {
		return nil, err
	}
	switch {
	case ref.State == event.StateReady && rec.State == event.StateReady && !rec.ExpiresAt.IsZero():
		// Also on a redelivery that changed nothing: the schedule may not
		// have been published the first time. Its Nats-Msg-Id makes this
		// idempotent.
		if err := r.schedule(ctx, rec); err != nil {
			return nil, err
		}
	case ref.State.Rank() > event.StateReady.Rank() && firstPastReady(rec) == ref.State && !rec.ExpiresAt.IsZero():
		// This event moved the sandbox past ready (expired, destroying,
		// destroyed): nothing may fire. Once is enough: a purge that fails
		// leaves a schedule whose fire finds the sandbox no longer ready
		// and does nothing.
		if err := r.cancelExpiry(ctx, rec.ID); err != nil {
			return nil, err
		}
	}
	if ref.State == event.StateDestroying && rec.State == event.StateDestroying {
		// A teardown that failed on every delivery of its command: the
		// next attempt is scheduled, unless a later one went out (a
		// re-drive) or this is news of an older one. Also on a
		// redelivery that changed nothing: its id makes it idempotent.
		var d event.Destroying
		if err := event.DataAs(m.Event, &d); err != nil {
			return nil, bus.Permanent(fmt.Errorf("projecting %s: %w", m.Subject, err))
		}
		if d.Error != "" && d.Attempt >= rec.DestroyAttempt {
			if err := r.scheduleRetry(ctx, rec, d); err != nil {
				return nil, err
			}
		}
	}
	return nil, nil
}

// firstPastReady is the first state rec entered after ready, or "".
func firstPastReady(rec *sandbox.Record) event.State {
	for _, t := range rec.History {
		if t.State.Rank() > event.StateReady.Rank() {
			return t.State
		}
	}
	return ""
}

// applyEvent applies e, of stream sequence seq, to the record of sandbox
// id in this registry's index, and returns the record after it and the
// state before it. The index folds the stream on its own too (and may be
// behind or ahead of the durable's delivery by a few events); applying an
// event it already folded changes nothing. What is decided on it is the
// registry's own schedules; the record itself is the lifecycle stream's:
// nothing is written. An event Apply refuses is [bus.Permanent].
func (r *Registry) applyEvent(id string, e *event.Event, seq uint64) (*sandbox.Record, event.State, error) {
	rec, prev, err := r.index.applyEvent(id, e, seq)
	if err != nil {
		return nil, "", bus.Permanent(fmt.Errorf("applying %s to sandbox %s: %w", e.Type(), id, err))
	}
	return rec, prev, nil
}

// transition publishes ev, announcing state s of rec's sandbox, guarded
// by rec's last event (rec.Seq): the compare-and-swap of every transition
// the registry makes. It reports false when the sandbox moved on first.
func (r *Registry) transition(ctx context.Context, rec *sandbox.Record, s event.State, ev *event.Event) (bool, error) {
	ack, err := r.pub.PublishTransition(ctx, rec.Ref().LifecycleSubject(s), ev, rec.Ref().RefFilter(), rec.Seq)
	if errors.Is(err, bus.ErrConflict) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("announcing %s of %s: %w", s, rec.ID, err)
	}
	if ack.Duplicate {
		return false, nil // another registry's same decision, stored first
	}
	if _, err := sandbox.Apply(rec, ev); err == nil {
		rec.Seq = ack.Sequence
	}
	return true, nil
}

// keyLocks serializes work on one key. Entries live only while someone
// holds or waits for their key.
type keyLocks struct {
	mu sync.Mutex
	m  map[string]*keyLock
}

type keyLock struct {
	mu   sync.Mutex
	refs int
}

// lock locks key and returns its unlock.
func (l *keyLocks) lock(key string) (unlock func()) {
	l.mu.Lock()
	if l.m == nil {
		l.m = make(map[string]*keyLock)
	}
	k := l.m[key]
	if k == nil {
		k = &keyLock{}
		l.m[key] = k
	}
	k.refs++
	l.mu.Unlock()
	k.mu.Lock()
	return func() {
		k.mu.Unlock()
		l.mu.Lock()
		if k.refs--; k.refs == 0 {
			delete(l.m, key)
		}
		l.mu.Unlock()
	}
}

// index is the record of every sandbox, folded from the lifecycle stream
// ([inventory.Follow]): what the reconciler reads every round and the
// sandboxes request answers with. Its records are shared: get returns a
// copy.
type index struct {
	mu   sync.RWMutex
	recs map[string]*sandbox.Record
	gone map[string]time.Time // sandboxes that left past their retention, when
}

func (x *index) apply(c inventory.Change) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.recs == nil {
		x.recs = make(map[string]*sandbox.Record)
	}
	if c.Gone {
		delete(x.recs, c.Record.ID)
		if x.gone == nil {
			x.gone = make(map[string]time.Time)
		}
		x.gone[c.Record.ID] = time.Now()
		return
	}
	// The follower's record is the whole fold up to its Seq: it wins over
	// what the durable's events made of the record up to the same event.
	if cur := x.recs[c.Record.ID]; cur == nil || cur.Seq <= c.Record.Seq {
		x.recs[c.Record.ID] = c.Record
	}
}

// applyEvent applies e, of stream sequence seq, to the record of id and
// keeps it; it returns a copy of the record after e and the state before.
func (x *index) applyEvent(id string, e *event.Event, seq uint64) (*sandbox.Record, event.State, error) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.recs == nil {
		x.recs = make(map[string]*sandbox.Record)
	}
	rec := &sandbox.Record{}
	if cur := x.recs[id]; cur != nil {
		rec = cur.Clone()
	}
	prev := rec.State
	changed, err := sandbox.Apply(rec, e)
	if err != nil {
		return nil, "", err
	}
	if rec.ID != id {
		return nil, "", fmt.Errorf("%w: data names sandbox %q, subject %q", event.ErrMalformed, rec.ID, id)
	}
	if _, left := x.gone[id]; changed && !left {
		rec.Seq = max(rec.Seq, seq)
		x.recs[id] = rec
		rec = rec.Clone()
	}
	return rec, prev, nil
}

// sweep forgets the tombstones older than retention (a sandbox's late
// events come within it) and the records that ended longer than it ago.
func (x *index) sweep(now time.Time, retention time.Duration) {
	x.mu.Lock()
	defer x.mu.Unlock()
	for id, at := range x.gone {
		if now.Sub(at) > retention {
			delete(x.gone, id)
		}
	}
	for id, rec := range x.recs {
		if !rec.Listed(now, retention) {
			delete(x.recs, id)
			if x.gone == nil {
				x.gone = make(map[string]time.Time)
			}
			x.gone[id] = now
		}
	}
}

// streamSeq is the lifecycle stream sequence of m, 0 when unknown.
func streamSeq(m *bus.Message) uint64 {
	if m.Raw() == nil {
		return 0
	}
	meta, err := m.Raw().Metadata()
	if err != nil {
		return 0
	}
	return meta.Sequence.Stream
}

// get returns a copy of the record of id, or nil.
func (x *index) get(id string) *sandbox.Record {
	x.mu.RLock()
	defer x.mu.RUnlock()
	if rec := x.recs[id]; rec != nil {
		return rec.Clone()
	}
	return nil
}

// all returns every record, sorted by id, shared: the caller must not
// modify them.
func (x *index) all() []*sandbox.Record {
	x.mu.RLock()
	out := make([]*sandbox.Record, 0, len(x.recs))
	for _, rec := range x.recs {
		out = append(out, rec)
	}
	x.mu.RUnlock()
	slices.SortFunc(out, func(a, b *sandbox.Record) int { return strings.Compare(a.ID, b.ID) })
	return out
}

// readRecord returns the record of the sandbox ref names, the fold of its
// events read from the stream (over its own subjects, ref's RefFilter, which
// the server finds by their literal prefix), and the sequence of its last
// event; nil and 0 when it has none.
func (r *Registry) readRecord(ctx context.Context, ref event.Ref) (*sandbox.Record, uint64, error) {
	rec, err := inventory.Read(ctx, r.opts.NC, ref.RefFilter())
	if err != nil {
		return nil, 0, fmt.Errorf("reading sandbox %s: %w", ref.SandboxID, err)
	}
	if rec == nil {
		return nil, 0, nil
	}
	return rec, rec.Seq, nil
}
