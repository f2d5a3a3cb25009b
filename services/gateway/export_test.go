package gateway

import (
	"encoding/json"
	"net/http"

	"github.com/sand-boxer/sandboxer/pkg/api"
)

// Routes returns the mux of g's API, unwrapped, and the patterns
// registered on it in order: for the test that compares them with the
// OpenAPI document.
func Routes(g *Gateway) (*http.ServeMux, []string) {
	m := g.mux()
	return m.ServeMux, m.patterns
}

// IdempotencyEntry is the bucket key and value that claim an
// Idempotency-Key of consumer for sandbox id and request req: what a
// gateway writes before it records the sandbox.
func IdempotencyEntry(consumer, key, id string, req api.CreateRequest) (string, []byte) {
	val, _ := json.Marshal(idemRecord{SandboxID: id, RequestHash: requestHash(req)})
	return idemBucketKey(consumer, key), val
}
