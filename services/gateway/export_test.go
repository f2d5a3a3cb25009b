package gateway

import "net/http"

// Routes returns the mux of g's API, unwrapped, and the patterns
// registered on it in order: for the test that compares them with the
// OpenAPI document.
func Routes(g *Gateway) (*http.ServeMux, []string) {
	m := g.mux()
	return m.ServeMux, m.patterns
}
