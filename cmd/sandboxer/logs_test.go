package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/cmd/sandboxer/internal/telemetry"
	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/event"
)

// logBuffer collects what a logger writes, safe for the concurrent writes
// of every service.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// lines decodes every line as one JSON object, failing t on a line that
// is not one.
func (l *logBuffer) lines(t *testing.T) []map[string]any {
	t.Helper()
	var out []map[string]any
	sc := bufio.NewScanner(strings.NewReader(l.String()))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("log line is not one JSON object: %v\n%s", err, sc.Text())
		}
		out = append(out, m)
	}
	return out
}

// startLoggedSystem runs the control plane (local pool) logging JSON at
// level into the returned buffer, and a client for consumer dev, with
// the token it sends.
func startLoggedSystem(t *testing.T, level string) (*system, *api.Client, string, *logBuffer) {
	t.Helper()
	logs := &logBuffer{}
	log, err := telemetry.NewLogger(logs, level, telemetry.LogJSON)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	extDir, profDir := shippedCatalog(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	sys, err := startSystem(ctx, systemConfig{
		DataDir: dir, HTTPAddr: "127.0.0.1:0", ExtensionsDir: extDir, ProfilesDir: profDir,
		Pools: []string{"local"}, Extensions: linkedExtensions(), Logger: log,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		sys.Shutdown(ctx)
	})
	b, err := os.ReadFile(keyPath(dir, "dev"))
	if err != nil {
		t.Fatal(err)
	}
	tok := strings.TrimSpace(string(b))
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	return sys, api.NewClient(sys.URL, tok, hc), tok, logs
}

// TestLogsCarryTrace: with --log-format json, every line about a sandbox
// names it ("sandbox") and carries the trace_id and span_id of the work
// it is about, and the lines of one sandbox's life (requested, ready,
// destroy requested, destroyed) share one trace id, the sandbox's.
func TestLogsCarryTrace(t *testing.T) {
	t.Parallel()
	_, c, _, logs := startLoggedSystem(t, "info")
	ctx := testContext(t)
	s, err := c.Create(ctx, api.CreateRequest{Profile: "local"}, "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Wait(ctx, s.ID, func(st event.State) bool { return st.Rank() >= event.StateReady.Rank() }, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Destroy(ctx, s.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Wait(ctx, s.ID, event.State.Terminal, nil); err != nil {
		t.Fatal(err)
	}
	want := []string{"sandbox requested", "sandbox ready", "sandbox destroy requested", "sandbox destroyed"}
	var lines []map[string]any
	awaitCond(t, "the log lines of "+s.ID, func() bool {
		lines = nil
		for _, l := range logs.lines(t) {
			if l["sandbox"] == s.ID {
				lines = append(lines, l)
			}
		}
		for _, w := range want {
			found := false
			for _, l := range lines {
				found = found || l["msg"] == w
			}
			if !found {
				return false
			}
		}
		return true
	})
	traceID := ""
	for _, l := range lines {
		tid, _ := l["trace_id"].(string)
		if len(tid) != 32 || len(l["span_id"].(string)) != 16 {
			t.Errorf("line about %s without trace_id and span_id: %v", s.ID, l)
			continue
		}
		if traceID == "" {
			traceID = tid
		}
		if tid != traceID {
			t.Errorf("line %q in trace %s, want the sandbox's %s", l["msg"], tid, traceID)
		}
	}
}

// TestLogsKeepSecrets: what a client sends that is secret (a repository
// URL's password, refused at validation; its API key, good or bad) is in
// no log line, even at debug level.
func TestLogsKeepSecrets(t *testing.T) {
	t.Parallel()
	sys, c, tok, logs := startLoggedSystem(t, "debug")
	ctx := testContext(t)
	const secret = "hunter2-s3cr3t"
	_, err := c.Create(ctx, api.CreateRequest{Profile: "local", Inputs: map[string]string{"repo": "https://user:" + secret + "@example.com/r.git"}}, "")
	if st := api.StatusOf(err); st != http.StatusUnprocessableEntity {
		t.Fatalf("create with credentials in the repo URL: status %d (%v), want 422", st, err)
	}
	if strings.Contains(err.Error(), secret) {
		t.Errorf("the refusal quotes the password: %v", err)
	}
	// A good key, through a sandbox's whole life.
	s, err := c.Create(ctx, api.CreateRequest{Profile: "local"}, "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Destroy(ctx, s.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Wait(ctx, s.ID, event.State.Terminal, nil); err != nil {
		t.Fatal(err)
	}
	// A bad one.
	const bad = "sbx_not-a-key-but-secret-all-the-same"
	if _, err := api.NewClient(sys.URL, bad, nil).List(ctx, api.ListFilter{}); api.StatusOf(err) != http.StatusUnauthorized {
		t.Fatalf("list with an unknown key: %v, want 401", err)
	}
	out := logs.String()
	if len(logs.lines(t)) == 0 {
		t.Fatal("nothing logged: the test proves nothing")
	}
	for what, s := range map[string]string{"repository password": secret, "API key": tok, "unknown API key": bad} {
		if strings.Contains(out, s) {
			t.Errorf("the logs hold the %s:\n%s", what, out)
		}
	}
}
