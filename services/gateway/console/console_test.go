package console_test

import (
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"regexp"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/sand-boxer/sandboxer/services/gateway/console"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestHandler serves every asset with the console's headers, redirects the
// bare prefix, and refuses what is not a read.
func TestHandler(t *testing.T) {
	t.Parallel()
	hs := httptest.NewServer(console.Handler())
	t.Cleanup(hs.Close)
	noRedirect := *hs.Client()
	noRedirect.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	cases := []struct {
		name, method, path string
		status             int
		contentType        string // prefix
		location           string
		body               string // substring
	}{
		{"bare prefix redirects", http.MethodGet, "/console", http.StatusMovedPermanently, "", "/console/", ""},
		{"the page", http.MethodGet, "/console/", http.StatusOK, "text/html", "", `<script src="console.js" defer></script>`},
		{"the page by name redirects", http.MethodGet, "/console/index.html", http.StatusMovedPermanently, "", "./", ""},
		{"the script", http.MethodGet, "/console/console.js", http.StatusOK, "text/javascript", "", "'use strict'"},
		{"the style sheet", http.MethodGet, "/console/console.css", http.StatusOK, "text/css", "", "[hidden]"},
		{"the icon", http.MethodGet, "/console/favicon.svg", http.StatusOK, "image/svg+xml", "", "<svg"},
		{"head", http.MethodHead, "/console/", http.StatusOK, "text/html", "", ""},
		{"missing asset", http.MethodGet, "/console/nope.js", http.StatusNotFound, "text/plain", "", ""},
		{"post", http.MethodPost, "/console/", http.StatusMethodNotAllowed, "text/plain", "", "allowed: GET, HEAD"},
		{"delete", http.MethodDelete, "/console/console.js", http.StatusMethodNotAllowed, "text/plain", "", ""},
		{"outside the prefix", http.MethodGet, "/consolex", http.StatusNotFound, "text/plain", "", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			req, err := http.NewRequest(tc.method, hs.URL+tc.path, nil)
			if err != nil {
				t.Fatal(err)
			}
			resp, err := noRedirect.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			b, err := io.ReadAll(resp.Body)
			if err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != tc.status {
				t.Fatalf("%s %s = %d, want %d (%s)", tc.method, tc.path, resp.StatusCode, tc.status, b)
			}
			h := resp.Header
			if got := h.Get("Content-Security-Policy"); got != console.ContentSecurityPolicy {
				t.Errorf("Content-Security-Policy = %q, want %q", got, console.ContentSecurityPolicy)
			}
			if got := h.Get("X-Content-Type-Options"); got != "nosniff" {
				t.Errorf("X-Content-Type-Options = %q, want nosniff", got)
			}
			if tc.contentType != "" && !strings.HasPrefix(h.Get("Content-Type"), tc.contentType) {
				t.Errorf("Content-Type = %q, want %s", h.Get("Content-Type"), tc.contentType)
			}
			if tc.location != "" && h.Get("Location") != tc.location {
				t.Errorf("Location = %q, want %q", h.Get("Location"), tc.location)
			}
			if !strings.Contains(string(b), tc.body) {
				t.Errorf("body does not contain %q:\n%s", tc.body, clip(b))
			}
		})
	}
}

// TestPolicy checks the policy itself: nothing but the gateway's own
// origin, and no inline code.
func TestPolicy(t *testing.T) {
	t.Parallel()
	for _, want := range []string{"default-src 'self'", "script-src 'self'", "style-src 'self'", "object-src 'none'", "frame-ancestors 'none'"} {
		if !strings.Contains(console.ContentSecurityPolicy, want) {
			t.Errorf("policy %q lacks %q", console.ContentSecurityPolicy, want)
		}
	}
	for _, bad := range []string{"unsafe-inline", "unsafe-eval", "*", "data:", "http:", "https:"} {
		if strings.Contains(console.ContentSecurityPolicy, bad) {
			t.Errorf("policy %q allows %q", console.ContentSecurityPolicy, bad)
		}
	}
}

// TestAssetsAreStatic keeps the assets what the policy expects and what
// the escaping rule needs: no inline script, style or handler in the page,
// nothing loaded from elsewhere, and a script that never parses strings
// as HTML or code, nor puts the key in a URL.
func TestAssetsAreStatic(t *testing.T) {
	t.Parallel()
	page := read(t, "assets/index.html")
	for _, tag := range regexp.MustCompile(`<script[^>]*>`).FindAllString(page, -1) {
		if !strings.Contains(tag, " src=") {
			t.Errorf("index.html has an inline script: %s", tag)
		}
	}
	for _, re := range []string{
		`<script[^>]*>\s*[^<\s]`, // a script with a body
		`\sstyle\s*=`, `<style`, `\son[a-z]+\s*=`, `javascript:`,
		`(?:src|href)\s*=\s*"(?:https?:)?//`, // another origin
	} {
		if m := regexp.MustCompile(re).FindString(page); m != "" {
			t.Errorf("index.html has %q (pattern %s)", m, re)
		}
	}
	js := read(t, "assets/console.js")
	for _, bad := range []string{"innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
		"setAttribute('style'", ".style.", "new EventSource", "?token", "&token", "localStorage"} {
		if strings.Contains(js, bad) {
			t.Errorf("console.js uses %q", bad)
		}
	}
	if !strings.Contains(js, "'Authorization': 'Bearer ' + ") {
		t.Error("console.js does not send the key as an Authorization header")
	}
	if m := regexp.MustCompile(`https?://[^'"\s]+`).FindAllString(js, -1); len(m) != 1 || m[0] != "http://www.w3.org/2000/svg" {
		t.Errorf("console.js names URLs %v; want only the SVG namespace", m)
	}
}

func read(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func clip(b []byte) string {
	if len(b) > 300 {
		return string(b[:300]) + "…"
	}
	return string(b)
}
