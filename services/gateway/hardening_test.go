package gateway_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/services/gateway"
)

// TestEchoesAreClipped: whatever of a request a refusal quotes is cut
// short; a label value of a megabyte is not echoed whole.
func TestEchoesAreClipped(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	big := strings.Repeat("v", 1_000_000)
	bigKey := strings.Repeat("k", 100_000)
	cases := []struct {
		name, body string
		hdr        map[string]string
		status     int
	}{
		{"label value", `{"profile":"echo","labels":{"team":"` + big + `!"}}`, nil, http.StatusUnprocessableEntity},
		{"label key", `{"profile":"echo","labels":{"` + bigKey + `":"x"}}`, nil, http.StatusUnprocessableEntity},
		{"profile", `{"profile":"` + big + `"}`, nil, http.StatusUnprocessableEntity},
		{"ttl", `{"profile":"echo","ttl":"` + big + `"}`, nil, http.StatusUnprocessableEntity},
		{"repo input", `{"profile":"git","inputs":{"repo":"https://` + big + `.example/x"}}`, nil, http.StatusUnprocessableEntity},
		{"unknown input", `{"profile":"git","inputs":{"repo":"https://example.com/x","` + bigKey + `":"1"}}`, nil, http.StatusUnprocessableEntity},
		{"unknown field", `{"profile":"echo","` + bigKey + `":1}`, nil, http.StatusBadRequest},
		{"content type", `{"profile":"echo"}`, map[string]string{"Content-Type": "application/" + strings.Repeat("x", 50_000)}, http.StatusUnsupportedMediaType},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			r := e.do(t, http.MethodPost, "/v1/sandboxes", "alice", tc.body, tc.hdr)
			if r.Status != tc.status {
				t.Fatalf("status %d, want %d: %.300s", r.Status, tc.status, r.Body)
			}
			if len(r.Body) > 4096 {
				t.Fatalf("answer of %d bytes echoes the request: %.300s...", len(r.Body), r.Body)
			}
		})
	}
	// A query parameter too.
	r := e.do(t, http.MethodGet, "/v1/sandboxes?state="+strings.Repeat("s", 100_000), "alice", "", nil)
	if r.Status != http.StatusBadRequest || len(r.Body) > 4096 {
		t.Fatalf("long state filter: %d, %d bytes", r.Status, len(r.Body))
	}
}

// TestContentTypes: a request body is application/json (with any
// parameters) or has no content type; another +json type is refused.
func TestContentTypes(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	for _, tc := range []struct {
		ct     string
		status int
	}{
		{"application/json", http.StatusAccepted},
		{"application/json; charset=utf-8", http.StatusAccepted},
		{"Application/JSON", http.StatusAccepted},
		{"application/evil+json", http.StatusUnsupportedMediaType},
		{"application/problem+json", http.StatusUnsupportedMediaType},
		{"application/merge-patch+json", http.StatusUnsupportedMediaType},
		{"text/json", http.StatusUnsupportedMediaType},
		{"text/plain", http.StatusUnsupportedMediaType},
	} {
		r := e.do(t, http.MethodPost, "/v1/sandboxes", "alice", `{"profile":"echo"}`, map[string]string{"Content-Type": tc.ct})
		if r.Status != tc.status {
			t.Errorf("Content-Type %q: status %d, want %d: %s", tc.ct, r.Status, tc.status, r.Body)
		}
	}
}

// TestBearerExact: the Bearer scheme in any case, exactly one space, and
// a token68; anything looser is no credential.
func TestBearerExact(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	tok := e.tokens["alice"]
	for _, tc := range []struct {
		header string
		ok     bool
	}{
		{"Bearer " + tok, true},
		{"bearer " + tok, true},
		{"BEARER " + tok, true},
		{"Bearer  " + tok, false},
		{"Bearer \t" + tok, false},
		{"Bearer\t" + tok, false},
		{"Bearer " + tok + " extra", false},
		{"Bearer " + tok + "\tx", false},
		{"Bearer " + tok + ",x", false},
		{"Bearer=" + tok, false},
		{"Bearer", false},
		{"Bearer =", false},
	} {
		r := e.do(t, http.MethodGet, "/v1/profiles", "", "", map[string]string{"Authorization": tc.header})
		if (r.Status == http.StatusOK) != tc.ok || (!tc.ok && r.Status != http.StatusUnauthorized) {
			t.Errorf("Authorization %q: status %d, want ok=%v", tc.header, r.Status, tc.ok)
		}
	}
}

// TestUnknownFieldNamesTheBodysFields: the grants endpoint's unknown
// field lists the fields of a grant, not those of a create request.
func TestUnknownFieldNamesTheBodysFields(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	r := e.do(t, http.MethodPost, "/v1/credits/grants", "root", `{"consumer":"alice","amount":5,"profile":"echo"}`, nil)
	if r.Status != http.StatusBadRequest || len(r.Problem.Errors) != 1 {
		t.Fatalf("unknown field of a grant: %d %s", r.Status, r.Body)
	}
	fe := r.Problem.Errors[0]
	if want := "unknown field (known: consumer, amount, priority, expires_at, promo, id)"; fe.Field != "profile" || fe.Detail != want {
		t.Fatalf("unknown field of a grant: %+v, want profile: %s", fe, want)
	}
	r = e.do(t, http.MethodPost, "/v1/sandboxes", "alice", `{"profile":"echo","amount":5}`, nil)
	if want := "unknown field (known: profile, inputs, labels, ttl)"; r.Status != http.StatusBadRequest || r.Problem.Errors[0].Detail != want {
		t.Fatalf("unknown field of a create: %d %s, want %s", r.Status, r.Body, want)
	}
}

// rawRequest writes head (the request line and headers, CRLF-separated,
// without the blank line) and then body on a fresh connection to addr,
// and returns the connection, the answer's reader and its status line.
func rawRequest(t *testing.T, addr, head, body string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := fmt.Fprintf(c, "%s\r\n\r\n%s", head, body); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(20 * time.Second)) // bounds the test only
	return c, bufio.NewReader(c)
}

// TestSlowBody: a body that does not arrive within BodyReadTimeout is
// answered 408, and the connection is given up; a body that arrives in
// time is served, however long the handling after it takes.
func TestSlowBody(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{opts: func(o *gateway.Options) { o.BodyReadTimeout = 300 * time.Millisecond }})
	addr := strings.TrimPrefix(e.hs.URL, "http://")
	head := "POST /v1/sandboxes HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + e.tokens["alice"] +
		"\r\nContent-Type: application/json\r\nContent-Length: 100"
	before := e.lastSeqs(t)
	_, rd := rawRequest(t, addr, head, `{"profile":"ec`) // and then nothing
	resp, err := http.ReadResponse(rd, nil)
	if err != nil {
		t.Fatalf("no answer to a stalled body: %v", err)
	}
	defer resp.Body.Close()
	var p api.Problem
	if err := json.NewDecoder(resp.Body).Decode(&p); err != nil || resp.StatusCode != http.StatusRequestTimeout || p.Status != http.StatusRequestTimeout {
		t.Fatalf("stalled body: %d %+v %v, want 408", resp.StatusCode, p, err)
	}
	if after := e.lastSeqs(t); after["SANDBOXER_COMMANDS"] != before["SANDBOXER_COMMANDS"] {
		t.Fatal("a stalled request published a command")
	}
	// On time, the deadline does not outlive the body.
	if _, err := e.client("alice").Create(testCtx(t), api.CreateRequest{Profile: "echo"}, ""); err != nil {
		t.Fatal(err)
	}
}

// TestEventStreamOutlivesServerTimeouts serves the gateway with an
// http.Server whose ReadTimeout and WriteTimeout are short: requests are
// bounded by them, an event stream is not (it keeps sending keep-alives
// long after).
func TestEventStreamOutlivesServerTimeouts(t *testing.T) {
	t.Parallel()
	const writeTimeout = 100 * time.Millisecond
	e := newEnv(t, envConfig{opts: func(o *gateway.Options) { o.KeepAlive = 10 * time.Millisecond }})
	hs := httptest.NewUnstartedServer(e.gw.Handler())
	hs.Config.WriteTimeout = writeTimeout
	hs.Config.ReadTimeout = writeTimeout
	hs.Start()
	t.Cleanup(hs.Close)
	hs.Client().Transport = checkedTransport(t, hs.Client().Transport)
	sb, err := e.client("alice").Create(testCtx(t), api.CreateRequest{Profile: "echo"}, "")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(testCtx(t))
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, hs.URL+"/v1/sandboxes/"+sb.ID+"/events?follow=true", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+e.tokens["alice"])
	resp, err := hs.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("stream: %d", resp.StatusCode)
	}
	start := time.Now()
	sc := bufio.NewScanner(resp.Body)
	keepalives := 0
	for sc.Scan() {
		if sc.Text() == ": keepalive" {
			keepalives++
		}
		if keepalives >= 5 && time.Since(start) > 3*writeTimeout {
			return // well past the write deadline, still streaming
		}
	}
	t.Fatalf("the stream ended after %s and %d keep-alives (server timeouts %s): %v", time.Since(start), keepalives, writeTimeout, sc.Err())
}

// TestStreamsPerConsumer: a consumer has at most MaxStreamsPerConsumer
// event streams open; one more is answered 429, and a stream that ends
// gives its place back. Other consumers are not counted against it.
func TestStreamsPerConsumer(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{opts: func(o *gateway.Options) { o.MaxStreamsPerConsumer = 2 }})
	ctx := testCtx(t)
	sb, err := e.client("alice").Create(ctx, api.CreateRequest{Profile: "echo"}, "")
	if err != nil {
		t.Fatal(err)
	}
	bobs, err := e.client("bob").Create(ctx, api.CreateRequest{Profile: "echo"}, "")
	if err != nil {
		t.Fatal(err)
	}
	path := func(id string) string { return "/v1/sandboxes/" + id + "/events?follow=true" }
	open := func(consumer, id string) (context.CancelFunc, int) {
		t.Helper()
		sctx, cancel := context.WithCancel(ctx)
		_, resp := e.sseLines(t, sctx, path(id), consumer, nil)
		if resp.StatusCode != http.StatusOK {
			cancel()
		}
		return cancel, resp.StatusCode
	}
	var cancels []context.CancelFunc
	for range 2 {
		c, st := open("alice", sb.ID)
		if st != http.StatusOK {
			t.Fatalf("stream within the limit: %d", st)
		}
		cancels = append(cancels, c)
	}
	r := e.do(t, http.MethodGet, path(sb.ID), "alice", "", nil)
	if r.Status != http.StatusTooManyRequests || r.Header.Get("Retry-After") == "" || !strings.Contains(r.Problem.Detail, "2 event streams") {
		t.Fatalf("a third stream: %d %s (Retry-After %q), want 429", r.Status, r.Body, r.Header.Get("Retry-After"))
	}
	if c, st := open("bob", bobs.ID); st != http.StatusOK {
		t.Fatalf("another consumer's stream: %d", st)
	} else {
		defer c()
	}
	cancels[0]()
	await(t, "a closed stream's place given back", func() bool {
		c, st := open("alice", sb.ID)
		if st == http.StatusOK {
			cancels[0] = c
			return true
		}
		return false
	})
	for _, c := range cancels {
		c()
	}
}
