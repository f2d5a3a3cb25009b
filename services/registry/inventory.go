package registry

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
)

// maxCASAttempts bounds the read-apply-write loop of one event against
// concurrent writers of the same record.
const maxCASAttempts = 16

// errConflict is returned when a record kept changing under every attempt
// to write it: the router retries the message later.
var errConflict = errors.New("sandbox record kept changing")

// project is the handler of the inventory consumer: it applies one
// lifecycle event to the sandbox's record with compare-and-swap, then
// keeps the sandbox's expiry and destroy retry schedules in step with its
// state. Applying an
// event that does not move the record forward changes nothing, so
// redelivered and reordered events are harmless.
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
	// schedule work: events of one sandbox arrive close together
	// (provisioning and ready within microseconds from a fast backend).
	// Side by side, both would read, and one would lose its
	// compare-and-swap and read again; in turn, the second finds the
	// first's write in the cache. And the event that moves a sandbox past
	// ready cancels its expiry only after the ready event scheduled it.
	defer r.sandboxLocks.lock(ref.Sandbox)()
	rec, prev, err := r.applyEvent(ctx, ref.Sandbox, m.Event)
	if errors.Is(err, errRemoved) {
		r.log.Debug("event for a removed sandbox record", "sandbox", ref.Sandbox, "state", ref.State)
		return nil, nil
	}
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
	case prev.Rank() <= event.StateReady.Rank() && rec.State.Rank() > event.StateReady.Rank() && !rec.ExpiresAt.IsZero():
		// This event moved the sandbox past ready (expired, destroying,
		// destroyed): nothing may fire. Once is enough: a purge that fails
		// after the record moved leaves a schedule whose fire finds the
		// sandbox no longer ready and does nothing.
		if err := r.cancelExpiry(ctx, rec.ID); err != nil {
			return nil, err
		}
	}
	switch {
	case ref.State == event.StateDestroying && rec.State == event.StateDestroying:
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
	case rec.State == event.StateDestroyed && prev != event.StateDestroyed && rec.TeardownError != "":
		// Destroyed after a failed attempt: no retry may fire. Best
		// effort, like an expiry's: a retry that fires finds the
		// sandbox ended and does nothing.
		if err := r.cancelRetry(ctx, rec.ID); err != nil {
			r.log.Warn("cancelling a destroy retry", "sandbox", rec.ID, "err", err)
		}
	}
	return nil, nil
}

// applyEvent applies e to the record of sandbox id in the sandboxes
// bucket: read (from the cache of records this instance wrote, or the
// bucket), [sandbox.Apply], then Update at the read revision (or Create
// when there is no record), re-reading from the bucket on a conflict, a
// bounded number of times. It returns the record as stored and the state
// it had before e; an event that does not move the record returns that
// same state. An event Apply refuses is [bus.Permanent].
func (r *Registry) applyEvent(ctx context.Context, id string, e *event.Event) (*sandbox.Record, event.State, error) {
	cached := true
	for range maxCASAttempts {
		var (
			rec *sandbox.Record
			rev uint64
			err error
		)
		if cached {
			rec, rev = r.records.get(id)
		}
		if rec == nil {
			if rec, rev, err = r.readRecord(ctx, id); err != nil {
				return nil, "", err
			}
		}
		if rec == nil {
			rec = &sandbox.Record{}
		}
		prev := rec.State
		changed, err := sandbox.Apply(rec, e)
		if err != nil {
			return nil, "", bus.Permanent(fmt.Errorf("applying %s to sandbox %s: %w", e.Type(), id, err))
		}
		if !changed {
			return rec, prev, nil
		}
		if rec.ID != id {
			return nil, "", bus.Permanent(fmt.Errorf("applying %s: %w: data names sandbox %q, subject %q", e.Type(), event.ErrMalformed, rec.ID, id))
		}
		b := rec.Marshal()
		newRev, err := bus.KVWrite(ctx, r.opts.JS, bus.BucketSandboxes, id, b, rev, rec.TTL(r.opts.Retention))
		switch {
		case rev == 0 && errors.Is(err, jetstream.ErrKeyExists):
			if !cached {
				// Read twice as absent, yet not creatable: the record
				// was removed after its retention. An event that late
				// changes nothing.
				return nil, "", errRemoved
			}
			cached = false
			continue
		case errors.Is(err, jetstream.ErrKeyRevisionMismatch):
			cached = false
			continue
		}
		if err != nil {
			r.records.drop(id)
			return nil, "", fmt.Errorf("writing sandbox %s: %w", id, err)
		}
		switch rec.State {
		case event.StateRequested, event.StateProvisioning, event.StateDestroying:
			// Transient: the next event follows within seconds.
			r.records.put(id, b, newRev)
		default:
			// Ready (or past it): the next event may be hours away; a read
			// then costs less than holding every live sandbox in memory.
			r.records.drop(id)
		}
		r.log.Debug("sandbox moved", "sandbox", id, "state", rec.State)
		return rec, prev, nil
	}
	r.records.drop(id)
	return nil, "", fmt.Errorf("applying %s to sandbox %s: %w after %d attempts", e.Type(), id, errConflict, maxCASAttempts)
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

// errRemoved is applyEvent's answer for a sandbox whose record was removed
// after its retention.
var errRemoved = errors.New("sandbox record removed after its retention")

// recordCache remembers the records this instance wrote in a transient
// state, with their revisions, so the event that follows within seconds
// needs no read. It is only a hint: a stale entry fails its
// compare-and-swap and the record is read again. Its size is bounded.
type recordCache struct {
	mu sync.Mutex
	m  map[string]cachedRecord
}

type cachedRecord struct {
	b   []byte
	rev uint64
}

// maxCachedRecords bounds the cache; past it, an arbitrary entry goes.
const maxCachedRecords = 100_000

func (c *recordCache) get(id string) (*sandbox.Record, uint64) {
	c.mu.Lock()
	e, ok := c.m[id]
	c.mu.Unlock()
	if !ok {
		return nil, 0
	}
	rec, err := sandbox.Unmarshal(e.b)
	if err != nil {
		return nil, 0
	}
	return rec, e.rev
}

func (c *recordCache) put(id string, b []byte, rev uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = make(map[string]cachedRecord)
	}
	if _, ok := c.m[id]; !ok && len(c.m) >= maxCachedRecords {
		for k := range c.m {
			delete(c.m, k)
			break
		}
	}
	c.m[id] = cachedRecord{b: b, rev: rev}
}

func (c *recordCache) drop(id string) {
	c.mu.Lock()
	delete(c.m, id)
	c.mu.Unlock()
}

// readRecord returns the record of sandbox id and its revision, or nil and
// 0 when there is none.
func (r *Registry) readRecord(ctx context.Context, id string) (*sandbox.Record, uint64, error) {
	entry, err := r.sandboxes.Get(ctx, id)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, 0, nil
	}
	if err != nil {
		return nil, 0, fmt.Errorf("reading sandbox %s: %w", id, err)
	}
	rec, err := sandbox.Unmarshal(entry.Value())
	if err != nil {
		return nil, 0, fmt.Errorf("reading sandbox %s: %w", id, err)
	}
	return rec, entry.Revision(), nil
}
