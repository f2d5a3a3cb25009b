package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
)

// fakeCreds is a .creds file whose user JWT carries claims (the signature
// is not checked by the client, only by the server).
func fakeCreds(claims string, enc *base64.Encoding) string {
	h := base64.RawURLEncoding.EncodeToString([]byte(`{"typ":"JWT","alg":"ed25519-nkey"}`))
	p := enc.EncodeToString([]byte(claims))
	return "-----BEGIN NATS USER JWT-----\n" + h + "." + p + ".c2ln\n------END NATS USER JWT------\n\n" +
		"************************* IMPORTANT *************************\n" +
		"-----BEGIN USER NKEY SEED-----\nSUAEXAMPLE\n------END USER NKEY SEED------\n"
}

func TestCredsUserName(t *testing.T) {
	tests := []struct {
		name, creds, want, err string
	}{
		{"tenant", fakeCreds(`{"name":"tenant-dev","sub":"UABC"}`, base64.RawURLEncoding), "tenant-dev", ""},
		{"billing", fakeCreds(`{"name":"billing"}`, base64.RawURLEncoding), "billing", ""},
		{"padded", fakeCreds(`{"name":"tenant-a"}`, base64.URLEncoding), "tenant-a", ""},
		{"crlf", strings.ReplaceAll(fakeCreds(`{"name":"tenant-b"}`, base64.RawURLEncoding), "\n", "\r\n"), "tenant-b", ""},
		{"no block", "just a seed\n", "", "no NATS USER JWT block"},
		{"empty block", "-----BEGIN NATS USER JWT-----\n------END NATS USER JWT------\n", "", "empty"},
		{"two parts", "-----BEGIN NATS USER JWT-----\na.b\n------END NATS USER JWT------\n", "", "three"},
		{"bad base64", "-----BEGIN NATS USER JWT-----\na.!!!.c\n------END NATS USER JWT------\n", "", "decoding"},
		{"not json", fakeCreds(`name`, base64.RawURLEncoding), "", "decoding"},
		{"no name", fakeCreds(`{"sub":"UABC"}`, base64.RawURLEncoding), "", "no name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := credsUserName([]byte(tt.creds))
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("err = %v, want one containing %q", err, tt.err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("credsUserName = %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}

func TestConsumerOf(t *testing.T) {
	tests := []struct{ user, want string }{
		{"tenant-dev", "dev"},
		{"tenant-team-a", "team-a"},
		{"billing", ""},
		{"tenant-", ""},
		{"admin", ""},
	}
	for _, tt := range tests {
		got, err := consumerOf(tt.user)
		if tt.want == "" {
			if err == nil {
				t.Errorf("consumerOf(%q) = %q, want an error", tt.user, got)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("consumerOf(%q) = %q, %v; want %q", tt.user, got, err, tt.want)
		}
	}
}

func TestKVFlag(t *testing.T) {
	f := kvFlag{}
	for _, s := range []string{"repo=/src/x", "q=a=b", "empty="} {
		if err := f.Set(s); err != nil {
			t.Fatalf("Set(%q): %v", s, err)
		}
	}
	if f["repo"] != "/src/x" || f["q"] != "a=b" || f["empty"] != "" {
		t.Fatalf("flag = %v", f)
	}
	if got, want := f.String(), "empty=,q=a=b,repo=/src/x"; got != want {
		t.Fatalf("String = %q, want %q", got, want)
	}
	for _, bad := range []string{"novalue", "=v", "repo=again"} {
		if err := f.Set(bad); err == nil {
			t.Errorf("Set(%q) succeeded, want an error", bad)
		}
	}
}

func TestParseFlags(t *testing.T) {
	t.Setenv("NATS_URL", "nats://example:4222")
	t.Setenv("NATS_CREDS", "")
	t.Setenv("SANDBOXER_DATA_DIR", "/data")
	cfg, err := parseFlags([]string{"--input", "repo=/r", "--label", "team=a", "--ttl", "30m", "--keep"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.natsURL != "nats://example:4222" || cfg.creds != "/data/creds/dev.creds" || cfg.profile != "local" ||
		cfg.inputs["repo"] != "/r" || cfg.labels["team"] != "a" || cfg.ttl != "30m" || !cfg.keep ||
		cfg.timeout != 2*time.Minute || cfg.source != defaultSource {
		t.Fatalf("config = %+v", cfg)
	}
	for _, args := range [][]string{
		{"--ttl", "soon"},
		{"--ttl", "-1m"},
		{"--timeout", "0s"},
		{"--profile", ""},
		{"--source", ""},
		{"extra"},
		{"--input", "noequals"},
		{"--no-such-flag"},
	} {
		if _, err := parseFlags(args, io.Discard); err == nil {
			t.Errorf("parseFlags(%q) succeeded, want an error", args)
		}
	}
}

func TestRunExitStatus(t *testing.T) {
	dir := t.TempDir()
	notTenant := filepath.Join(dir, "billing.creds")
	if err := os.WriteFile(notTenant, []byte(fakeCreds(`{"name":"billing"}`, base64.RawURLEncoding)), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		args []string
		want int
		err  string
	}{
		{"help", []string{"-h"}, 0, ""},
		{"usage", []string{"--ttl", "x"}, 2, "--ttl"},
		{"no creds file", []string{"--creds", filepath.Join(dir, "missing.creds")}, 1, "reading credentials"},
		{"not a tenant", []string{"--creds", notTenant}, 1, "not a tenant"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stderr bytes.Buffer
			if got := run(tt.args, io.Discard, &stderr); got != tt.want {
				t.Fatalf("run = %d, want %d (stderr %q)", got, tt.want, stderr.String())
			}
			if !strings.Contains(stderr.String(), tt.err) {
				t.Fatalf("stderr %q does not say %q", stderr.String(), tt.err)
			}
		})
	}
}

func TestPercentEncoding(t *testing.T) {
	tests := []struct{ in, want string }{
		{"/examples/bus-request", "/examples/bus-request"},
		{"a b", "a%20b"},
		{`say "hi"`, "say%20%22hi%22"},
		{"100%", "100%25"},
		{"caf\u00e9", "caf%C3%A9"},
		{"tab\there", "tab%09here"},
		{"~!", "~!"},
	}
	for _, tt := range tests {
		if got := percentEncode(tt.in); got != tt.want {
			t.Errorf("percentEncode(%q) = %q, want %q", tt.in, got, tt.want)
		}
		if got, err := percentDecode(tt.want); err != nil || got != tt.in {
			t.Errorf("percentDecode(%q) = %q, %v; want %q", tt.want, got, err, tt.in)
		}
	}
	if got, err := percentDecode("caf%c3%a9"); err != nil || got != "caf\u00e9" {
		t.Errorf("lower-case hex: %q, %v", got, err)
	}
	for _, bad := range []string{"%", "%4", "%zz", "%FF"} {
		if got, err := percentDecode(bad); err == nil {
			t.Errorf("percentDecode(%q) = %q, want an error", bad, got)
		}
	}
}

func TestRequestEvent(t *testing.T) {
	at := time.Date(2030, 1, 2, 3, 4, 5, 6000, time.UTC)
	data := createRequest{Profile: "local", Inputs: map[string]string{"repo": "/r"}, TTL: "30m"}
	e, err := newEvent(typeCreate, "/examples/bus-request", "req-1", at, data)
	if err != nil {
		t.Fatal(err)
	}
	// An extension attribute, to see a value that needs percent-encoding.
	e.SetExtension("note", `café "x" 100%`)
	msg, err := toMsg(context.Background(), "sandboxer.req.dev.create", e)
	if err != nil {
		t.Fatal(err)
	}
	if msg.Subject != "sandboxer.req.dev.create" {
		t.Fatalf("subject %q", msg.Subject)
	}
	want := map[string]string{
		"ce-specversion":     "1.0",
		"ce-id":              "req-1",
		"ce-source":          "/examples/bus-request",
		"ce-type":            "dev.sandboxer.request.create.v1",
		"ce-time":            "2030-01-02T03:04:05.000006Z",
		"ce-datacontenttype": "application/json",
		"ce-note":            "caf%C3%A9%20%22x%22%20100%25",
	}
	for k, v := range want {
		if got := msg.Header.Get(k); got != v {
			t.Errorf("header %s = %q, want %q", k, got, v)
		}
	}
	if len(msg.Header) != len(want) {
		t.Errorf("headers %v, want exactly %v", msg.Header, want)
	}
	var body map[string]any
	if err := json.Unmarshal(msg.Data, &body); err != nil {
		t.Fatal(err)
	}
	if body["profile"] != "local" || body["ttl"] != "30m" || body["inputs"].(map[string]any)["repo"] != "/r" {
		t.Fatalf("body %s", msg.Data)
	}
	if _, ok := body["labels"]; ok {
		t.Fatalf("empty labels are sent: %s", msg.Data)
	}

	// And it reads back as the same event.
	back, err := fromMsg(msg)
	if err != nil {
		t.Fatal(err)
	}
	if back.ID() != "req-1" || back.Source() != "/examples/bus-request" || back.Type() != typeCreate ||
		!back.Time().Equal(at) || back.DataContentType() != "application/json" || !bytes.Equal(back.Data(), msg.Data) || back.Extensions()["note"] != `café "x" 100%` {
		t.Fatalf("read back %v", back)
	}

	d, err := newEvent(typeDestroy, defaultSource, "req-2", at, destroyRequest{SandboxID: "sbx-1"})
	if err != nil {
		t.Fatal(err)
	}
	if string(d.Data()) != `{"sandbox_id":"sbx-1"}` {
		t.Fatalf("destroy data %s", d.Data())
	}
	if _, err := newEvent(typeCreate, "", "req-3", at, data); err == nil {
		t.Fatal("an event without a source is valid")
	}
}

// readyMsg is a ready event as the provisioner stores it.
func readyMsg(subject string) *nats.Msg {
	m := nats.NewMsg(subject)
	m.Header.Set("ce-specversion", "1.0")
	m.Header.Set("ce-id", "sbx-1.ready")
	m.Header.Set("ce-source", "/sandboxer/provisioner/local")
	m.Header.Set("ce-type", "dev.sandboxer.sandbox.ready.v1")
	m.Header.Set("ce-subject", "sbx-1")
	m.Header.Set("ce-time", "2030-01-02T03:04:05.123456789Z")
	m.Header.Set("ce-datacontenttype", "application/json")
	m.Header.Set("Nats-Msg-Id", "/sandboxer/provisioner/local#sbx-1.ready")
	m.Header.Set("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
	m.Data = []byte(`{"sandbox_id":"sbx-1","consumer":"dev","profile":"local","extension":"local",` +
		`"host":"h1","request":{"source":"/examples/bus-request","id":"req-1"},` +
		`"handle":{"sandbox_id":"sbx-1","host":"h1","data":{"dir":"/w/sbx-1"}},` +
		`"reachability":{"host":"h1","remote_dir":"/w/sbx-1"},"ready_at":"2030-01-02T03:04:05Z","new_field":1}`)
	return m
}

func TestParseLifecycle(t *testing.T) {
	const subject = "sandboxer.evt.dev.local.sbx-1.ready"
	ev, err := parseLifecycle(subject, readyMsg(subject))
	if err != nil {
		t.Fatal(err)
	}
	if ev.Consumer != "dev" || ev.Extension != "local" || ev.Sandbox != "sbx-1" || ev.State != "ready" ||
		ev.Data.Reachability.RemoteDir != "/w/sbx-1" || ev.Data.Request.ID != "req-1" || ev.Data.ReadyAt == "" {
		t.Fatalf("event %+v", ev)
	}

	// content-type stands in for ce-datacontenttype; header case does not matter.
	m := readyMsg(subject)
	m.Header.Del("ce-datacontenttype")
	m.Header.Set("Content-Type", "application/json")
	m.Header["CE-ID"] = m.Header["ce-id"]
	delete(m.Header, "ce-id")
	if _, err := parseLifecycle(subject, m); err != nil {
		t.Fatalf("content-type and upper-case names: %v", err)
	}

	// Structured mode.
	s := nats.NewMsg(subject)
	s.Header.Set("content-type", "application/cloudevents+json; charset=utf-8")
	s.Data = []byte(`{"specversion":"1.0","id":"sbx-1.failed","source":"/sandboxer/provisioner/local",` +
		`"type":"dev.sandboxer.sandbox.failed.v1","datacontenttype":"application/json",` +
		`"data":{"sandbox_id":"sbx-1","consumer":"dev","profile":"local","extension":"local","phase":"provision","reason":"no disk"}}`)
	ev, err = parseLifecycle("sandboxer.evt.dev.local.sbx-1.failed", s)
	if err != nil {
		t.Fatal(err)
	}
	if ev.State != "failed" || ev.Data.Reason != "no disk" || ev.Data.Phase != "provision" {
		t.Fatalf("structured %+v", ev)
	}

	for name, tc := range map[string]struct {
		subject string
		msg     *nats.Msg
	}{
		"type differs from state": {"sandboxer.evt.dev.local.sbx-1.failed", readyMsg(subject)},
		"not a lifecycle subject": {"sandboxer.meter.dev.granted", readyMsg(subject)},
		"no ce headers":           {subject, &nats.Msg{Subject: subject, Data: []byte(`{}`)}},
		"bad escape": {subject, func() *nats.Msg {
			m := readyMsg(subject)
			m.Header.Set("ce-source", "%zz")
			return m
		}()},
		"no id": {subject, func() *nats.Msg {
			m := readyMsg(subject)
			m.Header.Del("ce-id")
			return m
		}()},
	} {
		if _, err := parseLifecycle(tc.subject, tc.msg); err == nil {
			t.Errorf("%s: parsed, want an error", name)
		}
	}
}

func TestParseLifecycleSubject(t *testing.T) {
	c, x, s, st, err := parseLifecycleSubject("sandboxer.evt.dev._.sbx-9.rejected")
	if err != nil || c != "dev" || x != "_" || s != "sbx-9" || st != "rejected" {
		t.Fatalf("= %q %q %q %q %v", c, x, s, st, err)
	}
	for _, bad := range []string{"sandboxer.evt.dev.local.sbx-1", "sandboxer.cmd.dev.local.sbx-1.ready", "sandboxer.evt.dev..sbx-1.ready", "x.evt.a.b.c.d"} {
		if _, _, _, _, err := parseLifecycleSubject(bad); err == nil {
			t.Errorf("parseLifecycleSubject(%q) succeeded", bad)
		}
	}
}

func TestParseReply(t *testing.T) {
	sb, err := parseReply([]byte(`{"sandbox":{"id":"sbx-1","state":"requested","consumer":"dev","profile":"local","created_at":"2030-01-02T03:04:05Z"}}`))
	if err != nil || sb.ID != "sbx-1" || sb.State != "requested" {
		t.Fatalf("sandbox reply: %+v, %v", sb, err)
	}

	_, err = parseReply([]byte(`{"problem":{"title":"Payment Required","status":402,"detail":"hold of 65 for sandbox sbx-2, available 0","instance":"sbx-2"}}`))
	var p *problem
	if !errors.As(err, &p) || p.Status != 402 {
		t.Fatalf("problem reply: %v", err)
	}
	if got, want := err.Error(), "refused: 402 Payment Required: hold of 65 for sandbox sbx-2, available 0"; got != want {
		t.Fatalf("problem text %q, want %q", got, want)
	}

	_, err = parseReply([]byte(`{"problem":{"title":"Unprocessable Content","status":422,"errors":[{"field":"inputs.repo","detail":"required"},{"field":"ttl","detail":"not a duration"}]}}`))
	if got, want := err.Error(), "refused: 422 Unprocessable Content; inputs.repo: required; ttl: not a duration"; got != want {
		t.Fatalf("problem text %q, want %q", got, want)
	}

	for _, bad := range []string{`not json`, `{}`, `{"sandbox":{}}`, `{"other":1}`} {
		if _, err := parseReply([]byte(bad)); err == nil {
			t.Errorf("parseReply(%s) succeeded", bad)
		}
	}
}

func TestVerdict(t *testing.T) {
	ev := func(state string) *lifecycleEvent {
		return &lifecycleEvent{Sandbox: "sbx-1", State: state, Data: lifecycleData{Reason: "why", Code: "no_route", Phase: "provision"}}
	}
	tests := []struct {
		state, want string
		inOrder     bool
		done        bool
		err         string
	}{
		{"provisioning", "ready", true, false, ""},
		{"ready", "ready", true, true, ""},
		{"ready", "ready", false, true, ""},
		{"failed", "ready", true, true, "failed (provision): why"},
		{"rejected", "ready", false, true, "rejected (no_route): why"},
		{"destroyed", "ready", true, true, "destroyed before it was ready"},
		{"expired", "ready", true, true, "expired before it was ready"},
		// The latest stored event may be past ready while the
		// subscription still holds ready: keep waiting.
		{"destroyed", "ready", false, false, ""},
		{"destroying", "destroyed", true, false, ""},
		{"ready", "destroyed", false, false, ""},
		{"destroyed", "destroyed", true, true, ""},
	}
	for _, tt := range tests {
		done, err := verdict(ev(tt.state), tt.want, tt.inOrder)
		if done != tt.done || (err == nil) != (tt.err == "") || (err != nil && !strings.Contains(err.Error(), tt.err)) {
			t.Errorf("verdict(%s, want %s, inOrder %v) = %v, %v; want %v, %q", tt.state, tt.want, tt.inOrder, done, err, tt.done, tt.err)
		}
	}
}

func TestOutputLines(t *testing.T) {
	var b bytes.Buffer
	if err := printJSON(&b, readyLine{ID: "sbx-1", State: "ready", Reachability: reachability{Host: "h1", SSH: "me@h1:22"}}); err != nil {
		t.Fatal(err)
	}
	if err := printJSON(&b, destroyedLine{ID: "sbx-1", State: "destroyed", Reason: "requested", Cleanup: cleanup{Removed: []string{"/w/sbx-1"}}}); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSuffix(b.String(), "\n"), "\n")
	if len(lines) != 2 {
		t.Fatalf("%d lines: %q", len(lines), b.String())
	}
	for _, l := range lines {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("%q: %v", l, err)
		}
		if m["id"] != "sbx-1" || m["state"] == nil {
			t.Fatalf("line %q lacks id or state", l)
		}
	}
	if !strings.Contains(lines[0], `"reachability":{"host":"h1","ssh":"me@h1:22"}`) {
		t.Fatalf("ready line %q", lines[0])
	}
	if !strings.Contains(lines[1], `"cleanup":{"removed":["/w/sbx-1"]}`) {
		t.Fatalf("destroyed line %q", lines[1])
	}
}
