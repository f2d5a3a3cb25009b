package gateway_test

import (
	"maps"
	"net/http"
	"slices"
	"strings"
	"testing"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/services/gateway"
)

func TestCreate(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	ctx := testCtx(t)
	alice := e.client("alice")

	sb, err := alice.Create(ctx, api.CreateRequest{
		Profile: "echo", Inputs: map[string]string{"delay": "1s"}, Labels: map[string]string{"team": "a"}, TTL: "30m",
	}, "")
	if err != nil {
		t.Fatal(err)
	}
	if sb.State != event.StateRequested || !event.ValidName(sb.ID) || sb.Consumer != "alice" || sb.Profile != "echo" || sb.Extension != "echo" {
		t.Fatalf("created %+v", sb)
	}
	wantLabels := map[string]string{"tier": "test", "team": "a"}
	if !maps.Equal(sb.Labels, wantLabels) || sb.TTLSeconds != 1800 || sb.Host != "h1" {
		t.Fatalf("labels %v ttl %d host %q: want %v, 1800, h1", sb.Labels, sb.TTLSeconds, sb.Host, wantLabels)
	}

	rec, _ := e.record(t, sb.ID)
	if rec.State != event.StateRequested || rec.Consumer != "alice" || rec.Inputs["delay"] != "1s" {
		t.Fatalf("record %+v", rec)
	}

	cmds := e.messages(t, event.StreamCommands, event.SubjectCommands)
	if len(cmds) != 1 {
		t.Fatalf("%d commands on the stream, want 1", len(cmds))
	}
	c := cmds[0]
	if c.Subject != event.CommandSubject("echo", event.VerbCreate, sb.Consumer, sb.ID) {
		t.Fatalf("command subject %s", c.Subject)
	}
	ev := c.Event
	if ev.Type() != string(event.TypeCreate) || ev.Subject() != sb.ID || ev.ID() != sb.ID+".create" || ev.Source() != gateway.Source {
		t.Fatalf("command event type=%s subject=%s id=%s source=%s", ev.Type(), ev.Subject(), ev.ID(), ev.Source())
	}
	if got := c.Header[event.HeaderMsgID]; len(got) != 1 || got[0] != event.MsgID(ev) {
		t.Fatalf("Nats-Msg-Id %v", got)
	}
	var data event.Create
	if err := event.DataAs(ev, &data); err != nil {
		t.Fatal(err)
	}
	wantRef := event.Ref{SandboxID: sb.ID, Consumer: "alice", Profile: "echo", Extension: "echo", Host: "h1"}
	if data.Ref != wantRef || data.Inputs["delay"] != "1s" || !maps.Equal(data.Labels, wantLabels) || data.TTLSeconds != 1800 || data.RequestedAt.IsZero() {
		t.Fatalf("create data %+v", data)
	}
	// The record, stored before the command, which names its sequence.
	evs := e.messages(t, event.StreamLifecycle, event.SubjectLifecycle)
	if len(evs) != 1 || evs[0].Subject != event.LifecycleSubject("alice", "echo", sb.ID, event.StateRequested) {
		t.Fatalf("lifecycle events %+v, want the requested event", evs)
	}
	var req event.Requested
	if err := event.DataAs(evs[0].Event, &req); err != nil {
		t.Fatal(err)
	}
	if req.Ref != wantRef || req.Inputs["delay"] != "1s" || !maps.Equal(req.Labels, wantLabels) || req.TTLSeconds != 1800 || data.RecordSeq != evs[0].Seq {
		t.Fatalf("requested data %+v, command's record sequence %d (event's %d)", req, data.RecordSeq, evs[0].Seq)
	}

	got, err := alice.Get(ctx, sb.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != sb.ID || got.State != event.StateRequested || !got.CreatedAt.Equal(sb.CreatedAt) {
		t.Fatalf("get %+v, want %+v", got, sb)
	}
	list, err := alice.List(ctx, api.ListFilter{})
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0].ID != sb.ID {
		t.Fatalf("list right after create: %+v", list)
	}

	// The next sandbox goes to the other host.
	sb2, err := alice.Create(ctx, api.CreateRequest{Profile: "echo"}, "")
	if err != nil {
		t.Fatal(err)
	}
	if sb2.Host != "h2" || sb2.TTLSeconds != 3600 {
		t.Fatalf("second sandbox host %q ttl %d, want h2 and the profile's default 3600", sb2.Host, sb2.TTLSeconds)
	}
}

func TestCreateAnswer(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	r := e.do(t, http.MethodPost, "/v1/sandboxes", "alice", `{"profile":"git","inputs":{"repo":"https://example.com/r.git"}}`, nil)
	if r.Status != http.StatusAccepted {
		t.Fatalf("status %d: %s", r.Status, r.Body)
	}
	if ct := r.Header.Get("Content-Type"); ct != "application/json" {
		t.Fatalf("content type %q", ct)
	}
	var sb api.Sandbox
	mustUnmarshal(t, r.Body, &sb)
	if loc := r.Header.Get("Location"); loc != "/v1/sandboxes/"+sb.ID {
		t.Fatalf("Location %q", loc)
	}
	// The profile's default for ref and no TTL (the profile has none).
	if sb.Inputs["ref"] != "main" || sb.Inputs["repo"] != "https://example.com/r.git" || sb.TTLSeconds != 0 || sb.Host != "localhost" {
		t.Fatalf("sandbox %+v", sb)
	}
}

func TestCreateValidation(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	baseline := e.lastSeqs(t)

	cases := []struct {
		name   string
		body   string
		hdr    map[string]string
		status int
		fields []string // each must be among the problem's field errors
	}{
		{"unknown profile", `{"profile":"nope"}`, nil, 422, []string{"profile"}},
		{"missing profile", `{}`, nil, 422, []string{"profile"}},
		{"profile bound to a missing extension", `{"profile":"orphan"}`, nil, 422, []string{"profile"}},
		{"missing required input", `{"profile":"git"}`, nil, 422, []string{"inputs.repo"}},
		{"input of the wrong type", `{"profile":"git","inputs":{"repo":"https://x.org/r","depth":"deep"}}`, nil, 422, []string{"inputs.depth"}},
		{"input out of range", `{"profile":"git","inputs":{"repo":"https://x.org/r","depth":"500"}}`, nil, 422, []string{"inputs.depth"}},
		{"bad duration input", `{"profile":"echo","inputs":{"delay":"soon"}}`, nil, 422, []string{"inputs.delay"}},
		{"input not a string in JSON", `{"profile":"echo","inputs":{"delay":5,"fail":null}}`, nil, 400, []string{"inputs.delay", "inputs.fail"}},
		{"label not a string in JSON", `{"profile":"echo","labels":{"team":["a"]}}`, nil, 400, []string{"labels.team"}},
		{"profile not a string", `{"profile":7}`, nil, 400, []string{"profile"}},
		{"value outside enum", `{"profile":"echo","inputs":{"fail":"everything"}}`, nil, 422, []string{"inputs.fail"}},
		{"shell semicolon", `{"profile":"git","inputs":{"repo":"https://x.org/r;rm -rf /"}}`, nil, 422, []string{"inputs.repo"}},
		{"password in the repo URL", `{"profile":"git","inputs":{"repo":"https://user:secret@x.org/r"}}`, nil, 422, []string{"inputs.repo"}},
		{"token as the repo URL's user", `{"profile":"git","inputs":{"repo":"https://ghp_token@x.org/r"}}`, nil, 422, []string{"inputs.repo"}},
		{"local path the extension does not allow", `{"profile":"git","inputs":{"repo":"/etc"}}`, nil, 422, []string{"inputs.repo"}},
		{"file URL the extension does not allow", `{"profile":"git","inputs":{"repo":"file:///proc/self/cwd"}}`, nil, 422, []string{"inputs.repo"}},
		{"git scheme the extension does not allow", `{"profile":"git","inputs":{"repo":"git://127.0.0.1:9418/x"}}`, nil, 422, []string{"inputs.repo"}},
		{"command substitution", `{"profile":"git","inputs":{"repo":"https://x.org/r","ref":"$(id)"}}`, nil, 422, []string{"inputs.ref"}},
		{"backticks", "{\"profile\":\"git\",\"inputs\":{\"repo\":\"https://x.org/r\",\"ref\":\"`id`\"}}", nil, 422, []string{"inputs.ref"}},
		{"pipe", `{"profile":"git","inputs":{"repo":"https://x.org/r","ref":"main|cat /etc/passwd"}}`, nil, 422, []string{"inputs.ref"}},
		{"newline", `{"profile":"git","inputs":{"repo":"https://x.org/r","ref":"main\nid"}}`, nil, 422, []string{"inputs.ref"}},
		{"upload-pack option", `{"profile":"git","inputs":{"repo":"https://x.org/r","ref":"--upload-pack=touch /tmp/x"}}`, nil, 422, []string{"inputs.ref"}},
		{"ssh option as repo", `{"profile":"git","inputs":{"repo":"-oProxyCommand=touch /tmp/x"}}`, nil, 422, []string{"inputs.repo"}},
		{"git transport helper", `{"profile":"git","inputs":{"repo":"ext::sh -c touch% /tmp/x"}}`, nil, 422, []string{"inputs.repo"}},
		{"reserved sandbox_id", `{"profile":"echo","inputs":{"sandbox_id":"sbx-other"}}`, nil, 422, []string{"inputs.sandbox_id"}},
		{"unknown input", `{"profile":"echo","inputs":{"colour":"red"}}`, nil, 422, []string{"inputs.colour"}},
		{"bad label key", `{"profile":"echo","labels":{"Bad Key":"v"}}`, nil, 422, []string{"labels.Bad Key"}},
		{"bad label value", `{"profile":"echo","labels":{"team":"a;b"}}`, nil, 422, []string{"labels.team"}},
		{"ttl too long", `{"profile":"echo","ttl":"3h"}`, nil, 422, []string{"ttl"}},
		{"ttl negative", `{"profile":"echo","ttl":"-5m"}`, nil, 422, []string{"ttl"}},
		{"ttl zero", `{"profile":"echo","ttl":"0s"}`, nil, 422, []string{"ttl"}},
		{"ttl garbage", `{"profile":"echo","ttl":"soon"}`, nil, 422, []string{"ttl"}},
		{"every problem at once", `{"profile":"git","inputs":{"ref":"$(id)","bogus":"x"},"labels":{"A":"b"},"ttl":"x"}`, nil, 422,
			[]string{"inputs.repo", "inputs.ref", "inputs.bogus", "labels.A", "ttl"}},
		{"unknown JSON field", `{"profile":"echo","colour":"red"}`, nil, 400, []string{"colour"}},
		{"malformed JSON", `{"profile":`, nil, 400, []string{"body"}},
		{"not an object", `["echo"]`, nil, 400, []string{"body"}},
		{"two JSON values", `{"profile":"echo"} {"profile":"echo"}`, nil, 400, []string{"body"}},
		{"empty body", ``, nil, 400, []string{"body"}},
		{"body too large", `{"profile":"echo","labels":{"a":"` + strings.Repeat("x", 1<<20) + `"}}`, nil, 413, []string{"body"}},
		{"not JSON", `profile=echo`, map[string]string{"Content-Type": "application/x-www-form-urlencoded"}, 415, nil},
		{"idempotency key too long", `{"profile":"echo"}`, map[string]string{"Idempotency-Key": strings.Repeat("k", 256)}, 400, []string{"header.Idempotency-Key"}},
		{"idempotency key not printable", `{"profile":"echo"}`, map[string]string{"Idempotency-Key": "clé"}, 400, []string{"header.Idempotency-Key"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			r := e.do(t, http.MethodPost, "/v1/sandboxes", "alice", tc.body, tc.hdr)
			if r.Status != tc.status {
				t.Fatalf("status %d, want %d: %s", r.Status, tc.status, r.Body)
			}
			got := fields(r.Problem)
			for _, f := range tc.fields {
				if !slices.Contains(got, f) {
					t.Errorf("field errors %v lack %q: %s", got, f, r.Body)
				}
			}
			if tc.fields != nil && len(got) != len(tc.fields) {
				t.Errorf("field errors %v, want exactly %v", got, tc.fields)
			}
			// Nothing was published anywhere: no command, no event, no
			// record, no idempotency key.
			if now := e.lastSeqs(t); !maps.Equal(now, baseline) {
				t.Fatalf("streams moved: %v, before %v", now, baseline)
			}
		})
	}
}
