package main

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cloudevents/sdk-go/v2/binding"
	cehttp "github.com/cloudevents/sdk-go/v2/protocol/http"
	"github.com/nats-io/nats.go"
	"go.uber.org/goleak"

	"github.com/sand-boxer/sandboxer/cmd/sandboxer/internal/telemetry"
	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
)

func TestMain(m *testing.M) {
	// As in main: W3C trace context on every hop, no exporter.
	if _, err := telemetry.Setup(context.Background(), "sandboxer-test"); err != nil {
		panic(err)
	}
	goleak.VerifyTestMain(m,
		// The OpenCensus-free OTel SDK starts no goroutines, but
		// net/http's idle connections close asynchronously.
		goleak.IgnoreTopFunction("net/http.(*persistConn).writeLoop"),
		goleak.IgnoreTopFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
	)
}

// startTestSystem runs the whole control plane on a temporary data dir,
// with the repository's shipped extensions and profiles, and returns it
// with a client authenticated as consumer dev.
func startTestSystem(t *testing.T) (*system, *api.Client, string) {
	t.Helper()
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	extDir, profDir := shippedCatalog(t)
	sys, err := startSystem(ctx, systemConfig{
		DataDir: dir, HTTPAddr: "127.0.0.1:0", NATSListen: "127.0.0.1:-1",
		ExtensionsDir: extDir, ProfilesDir: profDir,
		Pools: []string{"local"}, Extensions: linkedExtensions(),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		sys.Shutdown(ctx)
	})
	tok, err := os.ReadFile(keyPath(dir, "dev"))
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(keyPath(dir, "dev")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("dev key file mode = %v, %v; want 0600", fi.Mode().Perm(), err)
	}
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	return sys, api.NewClient(sys.URL, strings.TrimSpace(string(tok)), hc), dir
}

// shippedCatalog copies the repository's manifests whose handler this
// binary links, and the profiles bound only to them, into temporary
// directories: a backend still being written elsewhere in the tree does not
// stop the system from starting.
func shippedCatalog(t *testing.T) (extDir, profDir string) {
	t.Helper()
	extDir, profDir = t.TempDir(), t.TempDir()
	reg := linkedExtensions()
	linked := map[string]bool{}
	exts, _ := filepath.Glob("../../extensions/ext.*.yaml")
	for _, f := range exts {
		m, ps := extension.LoadManifestFile(f)
		if m == nil || len(ps) > 0 {
			continue
		}
		if _, err := reg.Lookup(m.Handler); err != nil {
			continue
		}
		linked[m.Name] = true
		copyFile(t, f, filepath.Join(extDir, filepath.Base(f)))
	}
	profs, _ := filepath.Glob("../../profiles/profile.*.yaml")
	for _, f := range profs {
		p, ps := extension.LoadProfileFile(f)
		if p == nil || len(ps) > 0 {
			continue
		}
		ok := true
		for _, name := range p.ExtensionNames() {
			ok = ok && linked[name]
		}
		if ok {
			copyFile(t, f, filepath.Join(profDir, filepath.Base(f)))
		}
	}
	return extDir, profDir
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestEndToEndOverHTTP creates a local sandbox over HTTP, waits until it is
// ready, destroys it, and reads the lifecycle back from the stream with the
// CloudEvents SDK's own binary-mode reader, as an independent party would.
func TestEndToEndOverHTTP(t *testing.T) {
	sys, c, dataDir := startTestSystem(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	s, err := c.Create(ctx, api.CreateRequest{Profile: "local", Labels: map[string]string{"team": "e2e"}, TTL: "10m"}, "")
	if err != nil {
		t.Fatal(err)
	}
	if s.State != event.StateRequested {
		t.Fatalf("create answered state %s, want requested", s.State)
	}
	ready, err := c.Wait(ctx, s.ID, func(st event.State) bool { return st.Rank() >= event.StateReady.Rank() }, nil)
	if err != nil {
		t.Fatal(err)
	}
	if ready.State != event.StateReady || ready.Reachability == nil {
		t.Fatalf("sandbox = %+v, want ready with reachability", ready)
	}
	dir := ready.Reachability.RemoteDir
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		t.Fatalf("remote_dir %q does not exist: %v", dir, err)
	}
	if ready.ExpiresAt.IsZero() {
		t.Error("ready sandbox with a ttl has no expires_at")
	}

	if _, err := c.Destroy(ctx, s.ID); err != nil {
		t.Fatal(err)
	}
	gone, err := c.Wait(ctx, s.ID, event.State.Terminal, nil)
	if err != nil {
		t.Fatal(err)
	}
	if gone.State != event.StateDestroyed {
		t.Fatalf("state after destroy = %s, want destroyed", gone.State)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("workspace %s still exists after destroyed: %v", dir, err)
	}

	// Read the lifecycle back over a plain client connection, with the
	// admin's credentials (a tenant reads its events live, not back from
	// the stream): one direct get per state.
	opts, err := readCreds(filepath.Join(credsDir(dataDir), "admin.creds"))
	if err != nil {
		t.Fatal(err)
	}
	nc, err := nats.Connect(sys.NATS.ClientURL(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	var msgs []*bus.StoredMsg
	for _, st := range event.States {
		m, err := bus.LastMsg(ctx, nc, event.StreamLifecycle, event.LifecycleSubject(DevConsumer, "local", s.ID, st))
		if errors.Is(err, bus.ErrNoMessage) {
			continue
		}
		if err != nil {
			t.Fatalf("reading %s: %v", st, err)
		}
		msgs = append(msgs, m)
	}
	slices.SortFunc(msgs, func(a, b *bus.StoredMsg) int { return cmp.Compare(a.Sequence, b.Sequence) })
	var states []event.State
	for _, msg := range msgs {
		ev := sdkDecode(t, msg.Subject, msg.Header, msg.Data)
		if ev.Subject() != s.ID {
			t.Errorf("event subject %q, want %q", ev.Subject(), s.ID)
		}
		if msg.Header.Get(event.HeaderMsgID) != ev.Source()+"#"+ev.ID() {
			t.Errorf("Nats-Msg-Id %q, want source#id", msg.Header.Get(event.HeaderMsgID))
		}
		if msg.Header.Get("traceparent") == "" {
			t.Errorf("%s carries no traceparent", ev.Type())
		}
		st, ok := event.StateOf(event.Type(ev.Type()))
		if !ok {
			t.Fatalf("unexpected type %s", ev.Type())
		}
		states = append(states, st)
	}
	want := []event.State{event.StateRequested, event.StateProvisioning, event.StateReady, event.StateDestroying, event.StateDestroyed}
	if len(states) != len(want) {
		t.Fatalf("lifecycle = %v, want %v", states, want)
	}
	for i := range want {
		if states[i] != want[i] {
			t.Fatalf("lifecycle = %v, want %v", states, want)
		}
	}
}

// sdkDecode reads a NATS message with the CloudEvents SDK's HTTP binding:
// ce- headers map one to one onto HTTP binary mode, whose percent-encoding
// rule the NATS binding shares, and datacontenttype becomes Content-Type.
func sdkDecode(t *testing.T, subject string, headers nats.Header, data []byte) *event.Event {
	t.Helper()
	h := http.Header{}
	for k, vs := range headers {
		lk := strings.ToLower(k)
		switch {
		case lk == "ce-datacontenttype":
			h.Set("Content-Type", vs[0])
		case strings.HasPrefix(lk, "ce-"):
			h.Set(k, vs[0])
		}
	}
	m := cehttp.NewMessage(h, io.NopCloser(bytes.NewReader(data)))
	if m.ReadEncoding() != binding.EncodingBinary {
		t.Fatalf("message is not binary mode: %v", h)
	}
	ev, err := binding.ToEvent(context.Background(), m)
	if err != nil {
		t.Fatalf("CloudEvents SDK cannot read %s: %v", subject, err)
	}
	if err := ev.Validate(); err != nil {
		t.Fatal(err)
	}
	return ev
}

// TestMalformedRequestPublishesNothing sends bad requests and checks the
// answer is problem+json and no command reached the bus.
func TestMalformedRequestPublishesNothing(t *testing.T) {
	sys, c, dir := startTestSystem(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cases := []struct {
		name string
		req  api.CreateRequest
	}{
		{"unknown profile", api.CreateRequest{Profile: "nope"}},
		{"shell metacharacters", api.CreateRequest{Profile: "local", Inputs: map[string]string{"repo": "/tmp/x; rm -rf /"}}},
		{"option injection", api.CreateRequest{Profile: "local", Inputs: map[string]string{"repo": "--upload-pack=touch /tmp/pwned"}}},
		{"ttl beyond max", api.CreateRequest{Profile: "local", TTL: "9999h"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := c.Create(ctx, tc.req, "")
			if st := api.StatusOf(err); st < 400 || st >= 500 {
				t.Fatalf("status %d (%v), want 4xx", st, err)
			}
		})
	}
	st, err := sys.JS.Stream(ctx, event.StreamCommands)
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != 0 || info.State.LastSeq != 0 {
		t.Fatalf("commands stream holds %d messages (last seq %d) after bad requests", info.State.Msgs, info.State.LastSeq)
	}

	// A raw malformed body gets problem+json too.
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, sys.URL+"/v1/sandboxes", strings.NewReader(`{"profile": "local", "bogus": 1}`))
	tok, _ := os.ReadFile(keyPath(dir, "dev"))
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest && resp.StatusCode != http.StatusUnprocessableEntity {
		t.Fatalf("unknown field: status %d", resp.StatusCode)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, api.ContentTypeProblem) {
		t.Fatalf("content type %q, want %s", ct, api.ContentTypeProblem)
	}
}
