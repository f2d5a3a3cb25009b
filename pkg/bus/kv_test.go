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
	kv, err := js.KeyValue(ctx, bus.BucketSandboxes)
	if err != nil {
		t.Fatal(err)
	}
	w, err := kv.Watch(ctx, "sbx-1")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = w.Stop() }()

	rev, err := bus.KVWrite(ctx, js, bus.BucketSandboxes, "sbx-1", []byte("one"), 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bus.KVWrite(ctx, js, bus.BucketSandboxes, "sbx-1", []byte("again"), 0, 0); !errors.Is(err, jetstream.ErrKeyExists) {
		t.Fatalf("second create: %v, want ErrKeyExists", err)
	}
	if _, err := bus.KVWrite(ctx, js, bus.BucketSandboxes, "sbx-1", []byte("stale"), rev+100, 0); !errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
		t.Fatalf("update at a wrong revision: %v, want ErrKeyRevisionMismatch", err)
	}
	if _, err := bus.KVWrite(ctx, js, bus.BucketSandboxes, "sbx-1", []byte("last"), rev, time.Second); err != nil {
		t.Fatal(err)
	}
	// The watcher sees the initial nil, the first write, the second one
	// unless its second of life ended before a slow watcher was sent it
	// (the stream then holds only the marker), then the removal.
	var ops []jetstream.KeyValueOp
	deadline := time.After(20 * time.Second)
	for len(ops) == 0 || ops[len(ops)-1] == jetstream.KeyValuePut {
		select {
		case e := <-w.Updates():
			if e != nil {
				ops = append(ops, e.Operation())
			}
		case <-deadline:
			t.Fatalf("watcher saw %v within 20s, want put, put, removal", ops)
		}
	}
	if ops[0] != jetstream.KeyValuePut || len(ops) > 3 || len(ops) < 2 {
		t.Fatalf("watcher saw %v, want put, put (unless expired first), removal", ops)
	}
	if _, err := kv.Get(ctx, "sbx-1"); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Fatalf("get after the time to live: %v, want ErrKeyNotFound", err)
	}
	// A removed key is not created again while its marker lives.
	if _, err := bus.KVWrite(ctx, js, bus.BucketSandboxes, "sbx-1", []byte("back"), 0, 0); !errors.Is(err, jetstream.ErrKeyExists) {
		t.Fatalf("create over the removal marker: %v, want ErrKeyExists", err)
	}
}

// TestEnsureEnablesRecordTTL: a sandboxes bucket made before records had a
// time to live gets one from Ensure, its keys kept.
func TestEnsureEnablesRecordTTL(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	js := srv.JetStream(t)
	ctx := testCtx(t)
	if err := js.DeleteKeyValue(ctx, bus.BucketSandboxes); err != nil {
		t.Fatal(err)
	}
	old, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: bus.BucketSandboxes, History: 1})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := old.Put(ctx, "sbx-old", []byte("kept")); err != nil {
		t.Fatal(err)
	}
	if _, err := (bus.Topology{}).Setup(ctx, js, bus.SetupOptions{}); err != nil {
		t.Fatal(err)
	}
	kv, err := js.KeyValue(ctx, bus.BucketSandboxes)
	if err != nil {
		t.Fatal(err)
	}
	st, err := kv.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := st.(*jetstream.KeyValueBucketStatus).LimitMarkerTTL(); got != bus.SandboxesMarkerTTL {
		t.Fatalf("marker TTL %s after Ensure, want %s", got, bus.SandboxesMarkerTTL)
	}
	if e, err := kv.Get(ctx, "sbx-old"); err != nil || string(e.Value()) != "kept" {
		t.Fatalf("key after Ensure: %v", err)
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
