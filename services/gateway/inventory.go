package gateway

import (
	"context"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/event"
	inv "github.com/sand-boxer/sandboxer/pkg/inventory"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
)

// inventory is the records of every sandbox, folded from the lifecycle
// stream ([inventory.Follow]), for listings, capacity and metrics. Every
// entry carries the stream sequence of the last event folded into it, so
// the record of an event the gateway stored itself (put at once, for
// read-your-writes) is never replaced by an older one.
type inventory struct {
	js        jetstream.JetStream
	retention time.Duration
	log       *slog.Logger

	mu    sync.RWMutex
	recs  map[string]invEntry
	loads map[string]*extLoad // extension -> its live sandboxes and outcomes, kept with recs
	ready chan struct{}       // closed after the first full load
	live  bool                // the fold is running and loaded
	once  sync.Once

	// byState counts recs by state, and transient holds the records in a
	// transient state (few: most sandboxes are ready or ended); both are
	// kept with recs, for metrics.
	byState   map[event.State]int
	transient map[string]*sandbox.Record

	// byID holds the records of recs (not the deletions) sorted by id, and
	// byConsumer each consumer's, for pages. Both are kept with recs.
	byID       []*sandbox.Record
	byConsumer map[string][]*sandbox.Record
}

type invEntry struct {
	rec *sandbox.Record // nil: deleted at rev
	rev uint64
}

func newInventory(js jetstream.JetStream, retention time.Duration, log *slog.Logger) *inventory {
	return &inventory{
		js: js, retention: retention, log: log, recs: make(map[string]invEntry), byConsumer: make(map[string][]*sandbox.Record),
		loads: make(map[string]*extLoad), ready: make(chan struct{}),
		byState: make(map[event.State]int), transient: make(map[string]*sandbox.Record),
	}
}

// run folds the lifecycle stream until ctx ends. When the fold cannot
// start, it tries again after a pause; once started, it resumes by itself
// after the last event it folded.
func (v *inventory) run(ctx context.Context) {
	const pause = time.Second
	for ctx.Err() == nil {
		f, err := inv.Follow(ctx, v.js, v.retention, v.log, v.apply)
		if err == nil {
			select {
			case <-ctx.Done():
				<-f.Done()
				return
			case <-f.Ready():
			}
			v.setLive(true)
			v.once.Do(func() { close(v.ready) })
			<-f.Done()
			return
		}
		v.log.Warn("folding the lifecycle stream, will retry", "err", err, "retry_in", pause)
		t := time.NewTimer(pause)
		select {
		case <-ctx.Done():
		case <-t.C:
		}
		t.Stop()
	}
}

// apply takes one sandbox's record after an event of the stream.
func (v *inventory) apply(c inv.Change) {
	if c.Gone {
		v.put(c.Record.ID, nil, c.Record.Seq+1) // after its last event
		return
	}
	v.put(c.Record.ID, c.Record, c.Record.Seq)
}

// put stores rec (nil for a deletion) at rev unless a newer revision is
// already there. A record's ID is id.
func (v *inventory) put(id string, rec *sandbox.Record, rev uint64) {
	v.mu.Lock()
	defer v.mu.Unlock()
	cur, ok := v.recs[id]
	if ok && cur.rev >= rev {
		return
	}
	if rec == nil {
		// Removed (after its retention): nothing of it is kept, so the
		// inventory does not grow with every sandbox ever made. A write
		// older than the removal cannot come after it: removal follows
		// a sandbox's end by the retention.
		delete(v.recs, id)
	} else {
		v.recs[id] = invEntry{rec: rec, rev: rev}
	}
	v.index(id, cur.rec, rec)
	v.account(cur.rec, rec)
}

// index replaces old with rec (either may be nil) as the record of id in
// byID and byConsumer. The caller holds v.mu.
func (v *inventory) index(id string, old, rec *sandbox.Record) {
	v.byID = place(v.byID, id, rec)
	if old != nil && (rec == nil || rec.Consumer != old.Consumer) {
		if l := place(v.byConsumer[old.Consumer], id, nil); len(l) > 0 {
			v.byConsumer[old.Consumer] = l
		} else {
			delete(v.byConsumer, old.Consumer)
		}
	}
	if rec != nil {
		v.byConsumer[rec.Consumer] = place(v.byConsumer[rec.Consumer], id, rec)
	}
}

// place returns l, sorted by id, with rec as the record of id (nil: none).
// Ids are time-ordered, so a new one almost always goes at the end.
func place(l []*sandbox.Record, id string, rec *sandbox.Record) []*sandbox.Record {
	i, found := seek(l, id)
	switch {
	case found && rec != nil:
		l[i] = rec
	case found:
		l = slices.Delete(l, i, i+1)
	case rec != nil:
		l = slices.Insert(l, i, rec)
	}
	return l
}

// seek returns the position of id in l, sorted by id, or where it would go.
func seek(l []*sandbox.Record, id string) (int, bool) {
	return slices.BinarySearchFunc(l, id, func(r *sandbox.Record, id string) int { return strings.Compare(r.ID, id) })
}

func (v *inventory) setLive(b bool) {
	v.mu.Lock()
	v.live = b
	v.mu.Unlock()
}

func (v *inventory) isReady() bool {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.live
}

// listFilter selects sandboxes; empty fields match everything.
type listFilter struct {
	Consumer string
	State    event.State
	Profile  string
	Labels   [][2]string // key, value: every pair must match
}

func (f listFilter) match(r *sandbox.Record) bool {
	if f.Consumer != "" && r.Consumer != f.Consumer {
		return false
	}
	if f.State != "" && r.State != f.State {
		return false
	}
	if f.Profile != "" && r.Profile != f.Profile {
		return false
	}
	for _, l := range f.Labels {
		if got, ok := r.Labels[l[0]]; !ok || got != l[1] {
			return false
		}
	}
	return true
}

// page returns, in id order, the first limit (at least 1) records f
// matches whose ids sort after the id after ("" for the first page), and
// whether more match beyond them. after need not be a sandbox the
// inventory holds. It scans the records of f.Consumer (every record
// without one) from after until the page is full, so a selective state,
// profile or label costs a scan of the rest, allocating only the page.
func (v *inventory) page(f listFilter, after string, limit int) ([]*sandbox.Record, bool) {
	v.mu.RLock()
	defer v.mu.RUnlock()
	l := v.byID
	if f.Consumer != "" {
		l = v.byConsumer[f.Consumer]
	}
	i := 0
	if after != "" {
		var found bool
		if i, found = seek(l, after); found {
			i++
		}
	}
	out := make([]*sandbox.Record, 0, min(limit, len(l)-i))
	now := time.Now()
	for _, r := range l[i:] {
		if !f.match(r) || !r.Listed(now, v.retention) {
			continue // a sandbox that ended longer than the retention ago is not listed
		}
		if len(out) == limit {
			return out, true
		}
		out = append(out, r)
	}
	return out, false
}

// get returns the record of id as this gateway last saw it (stored or
// folded) and its stream sequence; false when it has none.
func (v *inventory) get(id string) (*sandbox.Record, uint64, bool) {
	v.mu.RLock()
	defer v.mu.RUnlock()
	e, ok := v.recs[id]
	if !ok || e.rec == nil {
		return nil, 0, false
	}
	return e.rec, e.rev, true
}
