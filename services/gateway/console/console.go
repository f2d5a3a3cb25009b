// Package console is the gateway's web console: a page, a style sheet and
// a script, embedded in the binary, that speak to the HTTP API from the
// browser with the API key the user signs in with. The console holds no
// state and no secret of its own; every call it makes carries the key in
// an Authorization header, never in a URL.
//
// The package owns the assets and the headers they are served with. It
// must never import the gateway or any other service: it knows the API
// only as the browser does.
package console

import (
	"embed"
	"io/fs"
	"net/http"
	"strings"
)

//go:embed assets
var assets embed.FS

// Prefix is where the console is mounted: the page at Prefix and
// Prefix + "/", its assets under Prefix + "/".
const Prefix = "/console"

// ContentSecurityPolicy is the policy of every console response: scripts,
// styles, images and API calls from the gateway's own origin only, no
// inline script or style, no plug-ins, no framing.
const ContentSecurityPolicy = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; " +
	"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// Handler serves the console under [Prefix]: GET and HEAD only, Prefix
// itself redirected to Prefix + "/", which is the page. It needs no
// authentication: the assets are public; what the page shows comes from
// the API with the user's key.
func Handler() http.Handler {
	sub, err := fs.Sub(assets, "assets")
	if err != nil {
		panic("console: embedded assets missing: " + err.Error()) // the build embeds them
	}
	files := http.StripPrefix(Prefix+"/", http.FileServerFS(sub))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", ContentSecurityPolicy)
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("X-Frame-Options", "DENY")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cache-Control", "no-cache")
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			h.Set("Allow", "GET, HEAD")
			http.Error(w, r.Method+" is not allowed here (allowed: GET, HEAD)", http.StatusMethodNotAllowed)
			return
		}
		switch {
		case r.URL.Path == Prefix:
			target := Prefix + "/"
			if r.URL.RawQuery != "" {
				target += "?" + r.URL.RawQuery
			}
			http.Redirect(w, r, target, http.StatusMovedPermanently)
		case strings.HasPrefix(r.URL.Path, Prefix+"/"):
			files.ServeHTTP(w, r)
		default:
			http.NotFound(w, r)
		}
	})
}
