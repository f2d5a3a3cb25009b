package workers_test

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/goleak"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
	"github.com/sand-boxer/sandboxer/pkg/workers"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestID(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, host string
		pid        int
		want       string
	}{
		{"plain", "worker1", 42, "worker1-42"},
		{"fqdn", "Build-01.Example.COM", 7, "build-01-example-com-7"},
		{"leading punctuation", "_-.host", 1, "host-1"},
		{"empty", "", 3, "worker-3"},
		{"non-ascii", "hôte", 5, "h-te-5"},
		{"long", strings.Repeat("a", 100), 123456, strings.Repeat("a", 56) + "-123456"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got := workers.ID(tc.host, tc.pid)
			if got != tc.want {
				t.Errorf("ID(%q, %d) = %q, want %q", tc.host, tc.pid, got, tc.want)
			}
			if !event.ValidName(got) {
				t.Errorf("ID(%q, %d) = %q is not a valid name", tc.host, tc.pid, got)
			}
		})
	}
}

func TestValidate(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		hb      workers.Heartbeat
		wantErr string
	}{
		{"valid", workers.Heartbeat{Extension: "local", Worker: "w1"}, ""},
		{"no extension", workers.Heartbeat{Worker: "w1"}, "invalid extension name"},
		{"dotted worker", workers.Heartbeat{Extension: "local", Worker: "host.example"}, "invalid worker id"},
		{"wildcard worker", workers.Heartbeat{Extension: "local", Worker: "*"}, "invalid worker id"},
		{"negative in flight", workers.Heartbeat{Extension: "local", Worker: "w1", InFlight: -1}, "must not be negative"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			err := tc.hb.Validate()
			switch {
			case tc.wantErr == "" && err != nil:
				t.Errorf("unexpected error: %v", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Errorf("error %v, want one containing %q", err, tc.wantErr)
			}
		})
	}
}

func TestPutListDelete(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	js := srv.JetStream(t)
	ctx := testCtx(t)
	kv, err := js.KeyValue(ctx, bus.BucketWorkers)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := workers.List(ctx, kv); err != nil || len(got) != 0 {
		t.Fatalf("empty bucket: %v, %v", got, err)
	}
	start := time.Now().UTC()
	for _, h := range []workers.Heartbeat{
		{Extension: "local", Worker: "w2", Host: "h", PID: 2, StartedAt: start, Concurrency: 8},
		{Extension: "echo", Worker: "w1", Host: "h", PID: 1, StartedAt: start, Concurrency: 4, InFlight: 3},
		{Extension: "local", Worker: "w1", Host: "h", PID: 3, StartedAt: start, Concurrency: 8},
	} {
		if err := workers.Put(ctx, kv, h); err != nil {
			t.Fatal(err)
		}
	}
	if err := workers.Put(ctx, kv, workers.Heartbeat{Extension: "local", Worker: "a.b"}); err == nil {
		t.Error("Put accepted a worker id with a dot")
	}
	got, err := workers.List(ctx, kv)
	if err != nil {
		t.Fatal(err)
	}
	if keys := keysOf(got); !slices.Equal(keys, []string{"echo.w1", "local.w1", "local.w2"}) {
		t.Errorf("List = %v", keys)
	}
	for _, h := range got {
		if h.SeenAt.IsZero() || !h.StartedAt.Equal(start) {
			t.Errorf("heartbeat %s: seen_at %v, started_at %v", h.Key(), h.SeenAt, h.StartedAt)
		}
	}
	if got[0].InFlight != 3 || got[0].Concurrency != 4 {
		t.Errorf("echo.w1 = %+v", got[0])
	}

	if err := workers.Delete(ctx, kv, "local", "w1"); err != nil {
		t.Fatal(err)
	}
	if err := workers.Delete(ctx, kv, "local", "never-was"); err != nil {
		t.Errorf("deleting a missing heartbeat: %v", err)
	}
	got, err = workers.List(ctx, kv)
	if err != nil {
		t.Fatal(err)
	}
	if keys := keysOf(got); !slices.Equal(keys, []string{"echo.w1", "local.w2"}) {
		t.Errorf("List after delete = %v", keys)
	}

	if _, err := kv.Put(ctx, "local.junk", []byte("not json")); err != nil {
		t.Fatal(err)
	}
	got, err = workers.List(ctx, kv)
	if err == nil || !strings.Contains(err.Error(), "local.junk") {
		t.Errorf("List with an undecodable value: err %v", err)
	}
	if len(got) != 2 {
		t.Errorf("List with an undecodable value returned %d heartbeats, want the 2 good ones", len(got))
	}
}

// TestCache follows puts and deletes, and drops a heartbeat that outlived
// the bucket's TTL (which the server expires without a delete marker).
func TestCache(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	js := srv.JetStream(t)
	ctx := testCtx(t)
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "workers_ttl", TTL: time.Second, Storage: jetstream.MemoryStorage})
	if err != nil {
		t.Fatal(err)
	}
	if err := workers.Put(ctx, kv, workers.Heartbeat{Extension: "local", Worker: "early"}); err != nil {
		t.Fatal(err)
	}
	wctx, stop := context.WithCancel(ctx)
	c, err := workers.Watch(wctx, kv)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { stop(); <-c.Done() }()
	<-c.Ready()
	if keys := keysOf(c.List("")); !slices.Equal(keys, []string{"local.early"}) {
		t.Errorf("initial List = %v", keys)
	}

	if err := workers.Put(ctx, kv, workers.Heartbeat{Extension: "echo", Worker: "w1"}); err != nil {
		t.Fatal(err)
	}
	await(t, func() bool { return slices.Contains(keysOf(c.List("")), "echo.w1") }, "echo.w1 to appear")
	if keys := keysOf(c.List("echo")); !slices.Equal(keys, []string{"echo.w1"}) {
		t.Errorf("List(echo) = %v", keys)
	}
	if err := workers.Delete(ctx, kv, "echo", "w1"); err != nil {
		t.Fatal(err)
	}
	await(t, func() bool { return !slices.Contains(keysOf(c.List("")), "echo.w1") }, "echo.w1 to go on delete")

	// Nobody beats any more: after one TTL the bucket and the cache are
	// empty.
	await(t, func() bool { return len(c.List("")) == 0 }, "the cache to drop expired heartbeats")
	await(t, func() bool {
		got, err := workers.List(ctx, kv)
		return err == nil && len(got) == 0
	}, "the bucket to expire heartbeats")
}

func keysOf(hs []workers.Heartbeat) []string {
	out := make([]string, len(hs))
	for i, h := range hs {
		out[i] = h.Key()
	}
	return out
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// await polls cond until it holds, for at most 10s.
func await(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.NewTimer(10 * time.Second)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-deadline.C:
			t.Fatalf("waited 10s for %s", what)
		case <-tick.C:
		}
	}
}
