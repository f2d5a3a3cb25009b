package gateway

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
)

// inventory is a live copy of the sandboxes bucket, for listings. Every
// entry carries the bucket revision it was read at, so a write the gateway
// made itself (put at once, for read-your-writes) is never replaced by an
// older update of the watch.
type inventory struct {
	kv  jetstream.KeyValue
	log *slog.Logger

	mu    sync.RWMutex
	recs  map[string]invEntry
	loads map[string]*extLoad // extension -> its live sandboxes and outcomes, kept with recs
	ready chan struct{}       // closed after the first full load
	live  bool                // the watch is running and loaded
	once  sync.Once
}

type invEntry struct {
	rec *sandbox.Record // nil: deleted at rev
	rev uint64
}

func newInventory(kv jetstream.KeyValue, log *slog.Logger) *inventory {
	return &inventory{kv: kv, log: log, recs: make(map[string]invEntry), loads: make(map[string]*extLoad), ready: make(chan struct{})}
}

// run watches the bucket until ctx ends. When the watch breaks, it starts
// again after a pause; the entries it already has stay, and revisions keep
// a restarted watch from moving an entry backwards.
func (v *inventory) run(ctx context.Context) {
	const pause = time.Second
	for ctx.Err() == nil {
		if err := v.watch(ctx); err != nil && ctx.Err() == nil {
			v.log.Warn("watching sandboxes, will retry", "err", err, "retry_in", pause)
		}
		v.setLive(false)
		t := time.NewTimer(pause)
		select {
		case <-ctx.Done():
		case <-t.C:
		}
		t.Stop()
	}
}

func (v *inventory) watch(ctx context.Context) error {
	w, err := v.kv.WatchAll(ctx)
	if err != nil {
		return err
	}
	defer func() { _ = w.Stop() }()
	for {
		select {
		case <-ctx.Done():
			return nil
		case e, ok := <-w.Updates():
			if !ok {
				return errors.New("sandboxes watch closed")
			}
			if e == nil {
				v.setLive(true)
				v.once.Do(func() { close(v.ready) })
				continue
			}
			v.apply(e)
		}
	}
}

func (v *inventory) apply(e jetstream.KeyValueEntry) {
	if e.Operation() != jetstream.KeyValuePut {
		v.put(e.Key(), nil, e.Revision())
		return
	}
	rec, err := sandbox.Unmarshal(e.Value())
	if err != nil {
		v.log.Warn("skipping undecodable sandbox record", "key", e.Key(), "err", err)
		return
	}
	v.put(e.Key(), rec, e.Revision())
}

// put stores rec (nil for a deletion) at rev unless a newer revision is
// already there.
func (v *inventory) put(id string, rec *sandbox.Record, rev uint64) {
	v.mu.Lock()
	defer v.mu.Unlock()
	cur, ok := v.recs[id]
	if ok && cur.rev >= rev {
		return
	}
	v.recs[id] = invEntry{rec: rec, rev: rev}
	v.account(cur.rec, rec)
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

// list returns the records f matches, oldest first.
func (v *inventory) list(f listFilter) []*sandbox.Record {
	v.mu.RLock()
	out := make([]*sandbox.Record, 0, 16)
	for _, e := range v.recs {
		if e.rec != nil && f.match(e.rec) {
			out = append(out, e.rec)
		}
	}
	v.mu.RUnlock()
	slices.SortFunc(out, func(a, b *sandbox.Record) int {
		if c := a.CreatedAt.Compare(b.CreatedAt); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out
}
