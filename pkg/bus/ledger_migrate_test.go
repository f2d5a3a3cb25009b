package bus_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
)

// TestSetupMigratesLedger starts from the previous version's bus, where
// the ledger had a bucket of its own. Setup copies every entry into the
// credits bucket under ledger.<key> (one copied before is left as it is),
// deletes the old bucket, and turns on atomic batches for the credits
// stream; a second setup finds nothing to move or change.
func TestSetupMigratesLedger(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	js := srv.JetStream(t)
	ctx := testCtx(t)
	old, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "ledger", History: 1})
	if err != nil {
		t.Fatal(err)
	}
	entries := map[string]string{
		"dev.grant.g1":       `{"key":"dev.grant.g1","seq":1,"amount":100}`,
		"dev.sb.s1.hold":     `{"key":"dev.sb.s1.hold","seq":2,"held":30}`,
		"ops.grant.promo-07": `{"key":"ops.grant.promo-07","seq":1,"amount":5}`,
	}
	for k, v := range entries {
		if _, err := old.Create(ctx, k, []byte(v)); err != nil {
			t.Fatal(err)
		}
	}
	credits, err := js.KeyValue(ctx, bus.BucketCredits)
	if err != nil {
		t.Fatal(err)
	}
	// A setup cut short after copying one entry.
	if _, err := credits.Create(ctx, bus.LedgerPrefix+"dev.grant.g1", []byte(entries["dev.grant.g1"])); err != nil {
		t.Fatal(err)
	}
	// The previous version's credits stream took no atomic batches.
	cs, err := js.Stream(ctx, bus.KVStream(bus.BucketCredits))
	if err != nil {
		t.Fatal(err)
	}
	cfg := cs.CachedInfo().Config
	cfg.AllowAtomicPublish = false
	if _, err := js.UpdateStream(ctx, cfg); err != nil {
		t.Fatal(err)
	}

	rep, err := bus.Topology{}.Setup(ctx, js, bus.SetupOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var migrated, atomic bool
	for _, c := range rep {
		if c.Kind == "bucket" && c.Name == bus.BucketCredits {
			atomic = c.Action == bus.ActionUpdated && c.Detail == "allow_atomic false -> true"
		}
		if c.Kind == "migration" && c.Name == "ledger" {
			migrated = true
			if c.Detail != "2 ledger entries moved into credits under ledger. (1 already there); bucket ledger deleted" {
				t.Errorf("migration reported %q", c.Detail)
			}
		}
	}
	if !migrated || !atomic {
		t.Fatalf("setup reported no ledger migration or no atomic batches for credits: %+v", rep)
	}
	for k, v := range entries {
		e, err := credits.Get(ctx, bus.LedgerPrefix+k)
		if err != nil || string(e.Value()) != v {
			t.Fatalf("entry %s after the migration: %v; want %s", k, err, v)
		}
	}
	if _, err := js.KeyValue(ctx, "ledger"); !errors.Is(err, jetstream.ErrBucketNotFound) {
		t.Fatalf("the old ledger bucket after the migration: %v; want it deleted", err)
	}
	s, err := js.Stream(ctx, bus.KVStream(bus.BucketCredits))
	if err != nil {
		t.Fatal(err)
	}
	if !s.CachedInfo().Config.AllowAtomicPublish {
		t.Fatal("the credits stream does not take atomic batches")
	}
	again, err := bus.Topology{}.Setup(ctx, js, bus.SetupOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range again {
		if c.Kind == "migration" || c.Action != bus.ActionUnchanged {
			t.Errorf("second setup: %+v", c)
		}
	}
}

// TestPublishAtomic: an atomic batch is stored whole, under consecutive
// sequences, or not at all when one message's guard is refused.
func TestPublishAtomic(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	js := srv.JetStream(t)
	ctx := testCtx(t)
	nc := js.Conn()
	msgs := func(keys ...string) []*nats.Msg {
		var out []*nats.Msg
		for _, k := range keys {
			out = append(out, bus.KVMsg(bus.BucketCredits, k, []byte(k), 0))
		}
		return out
	}
	ack, err := bus.PublishAtomic(ctx, nc, msgs("t.a", "t.b", "t.c"))
	if err != nil {
		t.Fatal(err)
	}
	credits, err := js.KeyValue(ctx, bus.BucketCredits)
	if err != nil {
		t.Fatal(err)
	}
	for i, k := range []string{"t.a", "t.b", "t.c"} {
		e, err := credits.Get(ctx, k)
		if err != nil || e.Revision() != ack.First()+uint64(i) {
			t.Fatalf("%s: %v at %d; batch acknowledged %+v", k, err, e.Revision(), ack)
		}
	}
	// t.b exists: the batch is refused whole, t.d not stored.
	if _, err := bus.PublishAtomic(ctx, nc, msgs("t.d", "t.b")); err == nil {
		t.Fatal("a batch creating an existing key was stored")
	}
	if _, err := credits.Get(ctx, "t.d"); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Fatalf("t.d of a refused batch: %v; want none", err)
	}
	// A batch of one, published plainly, keeps its guard.
	one, err := bus.PublishAtomic(ctx, nc, msgs("t.e"))
	if err != nil || one.Count != 1 || one.First() != one.Sequence {
		t.Fatalf("a batch of one: %+v, %v", one, err)
	}
	if _, err := bus.PublishAtomic(ctx, nc, msgs("t.e")); !errors.Is(err, jetstream.ErrKeyExists) && (err == nil || !strings.Contains(err.Error(), "wrong last sequence")) {
		t.Fatalf("a batch of one creating an existing key: %v", err)
	}
}
