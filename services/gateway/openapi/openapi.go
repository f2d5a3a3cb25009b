// Package openapi is the OpenAPI 3.1 document of the gateway's HTTP API:
// openapi.json beside this file, embedded in the binary and served as it
// is at [Path], so the document a client downloads is byte for byte the
// one in the repository. The gateway's tests validate every request and
// response they make against it.
//
// The package owns the document and how it is served. It must never
// import the gateway or any other service: it describes the API, it does
// not implement it.
package openapi

import (
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"net/http"
	"slices"
	"strings"
)

//go:embed openapi.json
var document []byte

// Path is where the gateway serves the document.
const Path = "/v1/openapi.json"

// JSON returns the document: a copy of the embedded openapi.json.
func JSON() []byte { return slices.Clone(document) }

// etag is the entity tag of the document: a hash of its bytes, so it
// changes exactly when the document does.
func etag() string {
	sum := sha256.Sum256(document)
	return `"` + hex.EncodeToString(sum[:16]) + `"`
}

// Handler serves the document as application/json to anyone: it needs no
// API key. Answers are cacheable for an hour (public) and carry an ETag; a
// request whose If-None-Match names it is answered 304 without a body.
func Handler() http.Handler {
	tag := etag()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Cache-Control", "public, max-age=3600")
		h.Set("ETag", tag)
		if matches(r.Header.Get("If-None-Match"), tag) {
			w.WriteHeader(http.StatusNotModified)
			return
		}
		h.Set("Content-Type", "application/json")
		h.Set("X-Content-Type-Options", "nosniff")
		if r.Method == http.MethodHead {
			return
		}
		_, _ = w.Write(document)
	})
}

// matches reports whether an If-None-Match header names tag (or is *),
// comparing weakly as RFC 9110 (section 13.1.2) says.
func matches(header, tag string) bool {
	for c := range strings.SplitSeq(header, ",") {
		c = strings.TrimPrefix(strings.TrimSpace(c), "W/")
		if c == "*" || c == tag {
			return true
		}
	}
	return false
}
