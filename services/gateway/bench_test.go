package gateway_test

import (
	"testing"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/bus"
)

// BenchmarkCreate measures POST /v1/sandboxes end to end: HTTP, auth
// (cached), validation, the record's create in the sandboxes bucket and
// the create command's publish, on a file-backed in-process nats-server.
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
