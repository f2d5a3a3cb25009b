package bus_test

import (
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
)

// TestKVWrite: create and update at a revision, conflicts as the KeyValue
// API reports them, and a value with a time to live removed by the server
// with a marker a watcher sees.
func TestKVWrite(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	js := srv.JetStream(t)
	ctx := testCtx(t)
	const bucket = "records"
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: bucket, History: 1, LimitMarkerTTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	w, err := kv.Watch(ctx, "sbx-1")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = w.Stop() }()
	// The watch is live once it says it has no more initial values (its
	// nil): every write after that is seen.
	select {
	case e := <-w.Updates():
		if e != nil {
			t.Fatalf("watcher saw %v before any write", e.Operation())
		}
	case <-ctx.Done():
		t.Fatal("watcher never started")
	}

	rev, err := bus.KVWrite(ctx, js, bucket, "sbx-1", []byte("one"), 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bus.KVWrite(ctx, js, bucket, "sbx-1", []byte("again"), 0, 0); !errors.Is(err, jetstream.ErrKeyExists) {
		t.Fatalf("second create: %v, want ErrKeyExists", err)
	}
	if _, err := bus.KVWrite(ctx, js, bucket, "sbx-1", []byte("stale"), rev+100, 0); !errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
		t.Fatalf("update at a wrong revision: %v, want ErrKeyRevisionMismatch", err)
	}
	if _, err := bus.KVWrite(ctx, js, bucket, "sbx-1", []byte("last"), rev, time.Second); err != nil {
		t.Fatal(err)
	}
	// The watcher sees the writes (the first may be replaced before it is
	// delivered: the bucket keeps one value a key), then the removal.
	var ops []jetstream.KeyValueOp
	deadline := time.After(20 * time.Second)
	for len(ops) == 0 || ops[len(ops)-1] == jetstream.KeyValuePut {
		select {
		case e := <-w.Updates():
			if e != nil {
				ops = append(ops, e.Operation())
			}
		case <-deadline:
			t.Fatalf("watcher saw %v within 20s, want puts, then the removal", ops)
		}
	}
	if len(ops) < 2 || len(ops) > 3 || ops[0] != jetstream.KeyValuePut {
		t.Fatalf("watcher saw %v, want one or two puts, then the removal", ops)
	}
	if _, err := kv.Get(ctx, "sbx-1"); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Fatalf("get after the time to live: %v, want ErrKeyNotFound", err)
	}
	// A removed key is not created again while its marker lives.
	if _, err := bus.KVWrite(ctx, js, bucket, "sbx-1", []byte("back"), 0, 0); !errors.Is(err, jetstream.ErrKeyExists) {
		t.Fatalf("create over the removal marker: %v, want ErrKeyExists", err)
	}
}

// TestLeaderLastMsg reads a key's last value from the stream's leader: the
// value, its revision and headers as the KeyValue API gives them, and no
// message for a key never written.
func TestLeaderLastMsg(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	js := srv.JetStream(t)
	ctx := testCtx(t)
	kv, err := js.KeyValue(ctx, bus.BucketCredits)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, "dev.grant.g1", []byte("one")); err != nil {
		t.Fatal(err)
	}
	rev, err := kv.Put(ctx, "dev.grant.g1", []byte("two"))
	if err != nil {
		t.Fatal(err)
	}
	if err := kv.Delete(ctx, "dev.grant.g2"); err != nil {
		t.Fatal(err)
	}
	stream := bus.KVStream(bus.BucketCredits)
	m, err := bus.LeaderLastMsg(ctx, js.Conn(), stream, "$KV."+bus.BucketCredits+".dev.grant.g1")
	if err != nil {
		t.Fatal(err)
	}
	if string(m.Data) != "two" || m.Sequence != rev || m.Subject != "$KV."+bus.BucketCredits+".dev.grant.g1" {
		t.Fatalf("read %q at %d on %s, want \"two\" at %d", m.Data, m.Sequence, m.Subject, rev)
	}
	d, err := bus.LeaderLastMsg(ctx, js.Conn(), stream, "$KV."+bus.BucketCredits+".dev.grant.g2")
	if err != nil {
		t.Fatal(err)
	}
	if op := d.Header.Get("KV-Operation"); op != "DEL" {
		t.Fatalf("a deleted key's marker has KV-Operation %q, want DEL", op)
	}
	if _, err := bus.LeaderLastMsg(ctx, js.Conn(), stream, "$KV."+bus.BucketCredits+".dev.grant.none"); !errors.Is(err, bus.ErrNoMessage) {
		t.Fatalf("a key never written: %v, want ErrNoMessage", err)
	}
}
