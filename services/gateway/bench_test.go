package gateway_test

import (
	"fmt"
	"io"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
)

// BenchmarkCreate measures POST /v1/sandboxes end to end: HTTP, auth
// (cached), validation, the record's requested event (guarded) and the
// create command's publish, on a file-backed in-process nats-server.
func BenchmarkCreate(b *testing.B) {
	e := newEnv(b, envConfig{topo: &bus.Topology{CommandsMaxMsgs: 10_000_000}})
	ctx := testCtx(b)
	alice := e.client("alice")
	req := api.CreateRequest{Profile: "git", Inputs: map[string]string{"repo": "https://example.com/r.git"}, Labels: map[string]string{"team": "a"}}
	b.ReportAllocs()
	b.SetParallelism(8) // requests in flight per CPU, as many clients would
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := alice.Create(ctx, req, ""); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkGet measures GET /v1/sandboxes/{id}: a read of the bucket.
func BenchmarkGet(b *testing.B) {
	e := newEnv(b, envConfig{})
	ctx := testCtx(b)
	alice := e.client("alice")
	sb, err := alice.Create(ctx, api.CreateRequest{Profile: "echo"}, "")
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := alice.Get(ctx, sb.ID); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkList measures GET /v1/sandboxes over 10,000 sandboxes of 100
// consumers, served from the gateway's inventory: the first page of an
// admin's listing, a page deep into it, and a consumer's own first page.
func BenchmarkList(b *testing.B) {
	const n = 10_000
	e := newEnv(b, envConfig{})
	ctx := testCtx(b)
	ids := make([]string, n)
	recs := make([]*sandbox.Record, n)
	now := time.Now().UTC()
	for i := range ids {
		consumer := fmt.Sprintf("c%02d", i%100)
		if i%100 == 0 {
			consumer = "alice"
		}
		ids[i] = sandbox.NewID()
		rec := &sandbox.Record{ID: ids[i], Consumer: consumer, Profile: "echo", Extension: "echo", Host: "h1",
			State: event.StateReady, Labels: map[string]string{"team": "a", "tier": "test"}, TTLSeconds: 3600,
			Reachability: &event.Reachability{Host: "h1", RemoteDir: "/tmp/" + ids[i]},
			CreatedAt:    now, UpdatedAt: now, ReadyAt: now,
			History: []sandbox.Transition{{State: event.StateRequested, At: now}, {State: event.StateReady, At: now}}}
		recs[i] = rec
	}
	e.seed(b, recs...)
	slices.Sort(ids)
	// The inventory follows the lifecycle stream.
	root := e.client("root")
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		l, err := root.List(ctx, api.ListFilter{})
		if err != nil {
			b.Fatal(err)
		}
		if len(l) == n {
			break
		}
		select {
		case <-ctx.Done():
			b.Fatalf("the listing shows %d of %d sandboxes", len(l), n)
		case <-tick.C:
		}
	}
	for _, bc := range []struct {
		name, consumer, query string
	}{
		{"admin first page", "root", "?limit=100"},
		{"admin deep page", "root", "?limit=100&after=" + ids[9000]},
		{"consumer first page", "alice", "?limit=100"},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, e.hs.URL+"/v1/sandboxes"+bc.query, nil)
				req.Header.Set("Authorization", "Bearer "+e.tokens[bc.consumer])
				resp, err := e.hs.Client().Do(req)
				if err != nil {
					b.Fatal(err)
				}
				nb, _ := io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					b.Fatalf("status %d", resp.StatusCode)
				}
				b.ReportMetric(float64(nb), "B/response")
			}
		})
	}
}
