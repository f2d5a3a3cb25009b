package metering

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/credits"
)

// Everything metering keeps is in the credits bucket, ONE stream
// (KV_credits) that takes atomic batch publishes: accounts under
// account.<consumer>; open holds under hold.<consumer>.<sandbox>; ledger
// entries under ledger.<ledger key> ([bus.LedgerPrefix]); usage records
// under usage.<consumer>.<sandbox>.
//
// A change of an account is one atomic batch (commit.go): the ledger
// entries and usage records it makes, each guarded by
// Nats-Expected-Last-Subject-Sequence 0, so the server itself refuses a
// key that ever existed; the new values of the holds it changed, each
// guarded by the revision read (0 for a hold opened: a closed hold's key
// never opens again); and the account document, guarded by the revision
// read. The server stores the batch whole or not at all: a refused guard,
// a connection lost or a kill -9 before the commit leaves nothing of it.
// So no cause is recorded twice, ever (its key); the balance is the fold
// of the ledger (both move in one write); and a change is applied once:
// it reads the account at a revision, and the batch is refused if the
// account moved since. Every hold changes with its account, so the
// account's guard proves current the holds a change read.
//
// A batch cannot reach the metering stream, which is another stream: the
// account document lists its change's events (Account.Events), which are
// published after the commit with Nats-Msg-Id from their keys and cleared
// by the account's next change; whoever loads an account with events
// listed publishes them first. A crash between the commit and the publish
// delays them until the next change of the account; it never loses one,
// and billing consumers never see an event of a change that was not
// committed. An account written by the previous version may carry an
// outbox whose writes were not done; loading it does them (writer.go).

// maxAttempts bounds the retries of one change.
const maxAttempts = 64

type store struct {
	credits jetstream.KeyValue
	js      jetstream.JetStream
	log     *slog.Logger
	now     func() time.Time
	metrics *meteringMetrics
	// beforeCommit, when set, is called before each batch's commit
	// (tests cut a batch short there).
	beforeCommit atomic.Pointer[func()]
	// failCommit, when set, makes every commit fail (tests).
	failCommit atomic.Bool

	// slots bounds the batches this process has in flight on the
	// stream: the server takes 50 at once across every instance.
	slots chan struct{}
	// direct is set while the credits stream has one replica: its one
	// server is its leader, and a direct get, far cheaper for the server
	// than a JetStream API request, reads what the leader holds
	// ([store.watchReplicas]).
	direct atomic.Bool

	mu sync.Mutex
	// writers has one writer per account this process changed, kept for
	// its cache: the account document and its open holds read so far
	// (a few hundred bytes each).
	writers map[string]*writer
	wg      sync.WaitGroup // running writers
}

// commitSlots is how many batches one process has in flight at once.
const commitSlots = 16

func newStore(js jetstream.JetStream, credits jetstream.KeyValue, log *slog.Logger, now func() time.Time, mm *meteringMetrics) *store {
	return &store{credits: credits, js: js, log: log, now: now, metrics: mm, slots: make(chan struct{}, commitSlots)}
}

// ledgerKey is the key of ledger entry key in the credits bucket.
func ledgerKey(key string) string { return bus.LedgerPrefix + key }

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
	// next batch must create their keys.
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
// ([bus.LeaderLastMsg]), never from a follower. Every commit is guarded
// by what it read, so a stale read cannot apply a change twice, but a
// direct get (what [jetstream.KeyValue.Get] sends) may be answered by a
// replica that has not applied this process's own last commit, and each
// such read costs a refused batch and another attempt; a batch that
// writes nothing answers on what it read alone. (make chaos, on the
// outbox design before atomic batches: a follower said a release just
// written was not in the ledger, and the release was applied again.)
// A deleted or purged key is [jetstream.ErrKeyNotFound].
//
// While the stream has one replica the read is a direct get
// ([bus.LastMsg]): there is no follower to answer it, and the server
// spends on it a fraction of what an API request costs (a tenth of
// metering's CPU went to parsing the API requests' client information in
// a profile of `sandboxer bench --only metering`).
func (s *store) get(ctx context.Context, kv jetstream.KeyValue, key string) (entry, error) {
	read := bus.LeaderLastMsg
	if s.direct.Load() {
		read = bus.LastMsg
	}
	m, err := read(ctx, s.js.Conn(), bus.KVStream(kv.Bucket()), "$KV."+kv.Bucket()+"."+key)
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

// replicasEvery is how often [store.watchReplicas] reads the credits
// stream's replica count.
const replicasEvery = 30 * time.Second

// watchReplicas sets s.direct from the credits stream's replica count now
// and every replicasEvery until ctx ends. A stream scaled up meanwhile is
// read by direct gets for up to that long; any of them a follower answers
// stale costs a refused batch and a reload, never a change applied twice
// (every commit is guarded by what it read).
func (s *store) watchReplicas(ctx context.Context) {
	check := func() {
		st, err := s.js.Stream(ctx, bus.KVStream(s.credits.Bucket()))
		if err != nil {
			s.direct.Store(false)
			if ctx.Err() == nil {
				s.log.Warn("reading the credits stream's replicas; reading from its leader", "err", err)
			}
			return
		}
		s.direct.Store(st.CachedInfo().Config.Replicas <= 1)
	}
	check()
	go func() {
		t := time.NewTicker(replicasEvery)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				check()
			}
		}
	}()
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

// recordUsage writes usage record u, only if its key never existed, and
// publishes its usage event with the caller's trace. A record written
// before (by an earlier delivery, or by a settlement) is published as it
// was written: the event's Nats-Msg-Id, from its key, makes a second
// publish within the de-duplication window store nothing.
func (s *store) recordUsage(ctx context.Context, u *credits.UsageRecord, trace string) error {
	b, err := json.Marshal(u)
	if err != nil {
		return fmt.Errorf("encoding usage record %s: %w", u.Key, err)
	}
	_, err = bus.KVWrite(ctx, s.js, s.credits.Bucket(), u.Key, b, 0, 0)
	if errors.Is(err, jetstream.ErrKeyExists) {
		e, gerr := s.get(ctx, s.credits, u.Key)
		if gerr != nil {
			return fmt.Errorf("reading usage record %s: %w", u.Key, gerr)
		}
		var was credits.UsageRecord
		if err := json.Unmarshal(e.Value(), &was); err != nil {
			return fmt.Errorf("decoding usage record %s: %w", u.Key, err)
		}
		u, err = &was, nil
	}
	if err != nil {
		return fmt.Errorf("writing usage record %s: %w", u.Key, err)
	}
	return s.publish(ctx, []*Item{{Usage: u, Trace: trace}})
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

// inLedger reports whether ledger entry key exists.
func (s *store) inLedger(ctx context.Context, key string) (bool, error) {
	_, err := s.get(ctx, s.credits, ledgerKey(key))
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, jetstream.ErrKeyNotFound):
		return false, nil
	}
	return false, fmt.Errorf("reading ledger entry %s: %w", key, err)
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

// read returns consumer's account without changing it, publishing its
// pending events and expiring credit on the way, and its open holds.
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
func (s *store) entries(ctx context.Context, consumer string) ([]credits.Entry, error) {
	var out []credits.Entry
	err := watchAll(ctx, s.credits, ledgerKey(consumer+".>"), func(b []byte) error {
		var e credits.Entry
		if err := json.Unmarshal(b, &e); err != nil {
			return fmt.Errorf("decoding ledger entry: %w", err)
		}
		out = append(out, e)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("reading ledger of %s: %w", consumer, err)
	}
	slices.SortFunc(out, func(x, y credits.Entry) int {
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
func (s *store) usage(ctx context.Context, consumer string) ([]credits.UsageRecord, error) {
	filter := "usage.>"
	if consumer != "" {
		filter = "usage." + consumer + ".>"
	}
	var out []credits.UsageRecord
	err := watchAll(ctx, s.credits, filter, func(b []byte) error {
		var u credits.UsageRecord
		if err := json.Unmarshal(b, &u); err != nil {
			return fmt.Errorf("decoding usage record: %w", err)
		}
		out = append(out, u)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("reading usage records: %w", err)
	}
	slices.SortFunc(out, func(x, y credits.UsageRecord) int {
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
