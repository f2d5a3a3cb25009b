package gateway_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/services/gateway"
)

// tenant is a consumer talking to the gateway on the bus, under its own
// identity.
type tenant struct {
	name string
	nc   *nats.Conn
}

func (e *env) tenant(t *testing.T, consumer string) *tenant {
	t.Helper()
	return &tenant{name: consumer, nc: e.srv.ConnAs(t, auth.Identity{Role: auth.RoleTenant, Consumer: consumer})}
}

// request publishes msg as a request and decodes the gateway's answer.
func (tn *tenant) request(t *testing.T, msg *nats.Msg) api.BusReply {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	reply, err := tn.nc.RequestMsgWithContext(ctx, msg)
	if err != nil {
		t.Fatalf("request on %s: %v", msg.Subject, err)
	}
	if ct := reply.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("reply content type %q, want application/json", ct)
	}
	var r api.BusReply
	if err := json.Unmarshal(reply.Data, &r); err != nil {
		t.Fatalf("reply %q: %v", reply.Data, err)
	}
	if (r.Sandbox == nil) == (r.Problem == nil) {
		t.Fatalf("reply %s: want exactly one of sandbox and problem", reply.Data)
	}
	return r
}

// requestEvent builds a request event in binary mode.
func requestEvent(t *testing.T, consumer, verb, source, id string, data any) *nats.Msg {
	t.Helper()
	typ := map[string]event.Type{event.VerbCreate: event.TypeRequestCreate, event.VerbDestroy: event.TypeRequestDestroy, event.VerbGet: event.TypeRequestGet}[verb]
	ev, err := event.New(typ, source, "", id, data)
	if err != nil {
		t.Fatal(err)
	}
	msg, err := event.Encode(context.Background(), event.RequestSubject(consumer, verb), ev)
	if err != nil {
		t.Fatal(err)
	}
	return msg
}

// structured builds a request event in structured mode, as raw JSON.
func structured(consumer, verb, source, id, data string) *nats.Msg {
	typ := event.TypeRequestCreate
	if verb == event.VerbDestroy {
		typ = event.TypeRequestDestroy
	}
	body := fmt.Sprintf(`{"specversion":"1.0","id":%q,"source":%q,"type":%q,"datacontenttype":"application/json","data":%s}`, id, source, typ, data)
	return &nats.Msg{Subject: event.RequestSubject(consumer, verb), Header: nats.Header{"Content-Type": []string{"application/cloudevents+json"}}, Data: []byte(body)}
}

func TestIntakeCreateAndDestroy(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	alice := e.tenant(t, "alice")
	r := alice.request(t, requestEvent(t, "alice", event.VerbCreate, "/alice/ci", "build-1",
		event.CreateRequest{Profile: "echo", Labels: map[string]string{"team": "a"}, TTL: "30m"}))
	if r.Problem != nil {
		t.Fatalf("create refused: %+v", r.Problem)
	}
	sb := r.Sandbox
	if sb.State != event.StateRequested || sb.Consumer != "alice" || sb.Labels["team"] != "a" || sb.TTLSeconds != 1800 {
		t.Fatalf("created %+v", sb)
	}
	cmds := e.messages(t, event.StreamCommands, event.CommandSubject("echo", event.VerbCreate, "alice", sb.ID))
	var c event.Create
	if len(cmds) != 1 || event.DataAs(cmds[0].Event, &c) != nil {
		t.Fatalf("create commands %+v", cmds)
	}
	if c.Consumer != "alice" || c.Request == nil || *c.Request != (event.Origin{Source: "/alice/ci", ID: "build-1"}) {
		t.Fatalf("create command %+v, want alice's, naming the request event", c)
	}
	rec, _ := e.record(t, sb.ID)
	if rec.Request == nil || rec.Request.ID != "build-1" {
		t.Fatalf("record %+v does not name its request", rec)
	}

	// Alice reads it on the bus; to bob, as over HTTP, it does not exist.
	got := alice.request(t, requestEvent(t, "alice", event.VerbGet, "/alice/ci", "get-1", event.GetRequest{SandboxID: sb.ID}))
	if got.Problem != nil || got.Sandbox.ID != sb.ID || got.Sandbox.State != event.StateRequested {
		t.Fatalf("get: %+v", got)
	}
	bob := e.tenant(t, "bob")
	if r := bob.request(t, requestEvent(t, "bob", event.VerbGet, "/bob", "g-1", event.GetRequest{SandboxID: sb.ID})); r.Problem == nil || r.Problem.Status != http.StatusNotFound {
		t.Fatalf("bob reading alice's sandbox: %+v", r)
	}
	if r := bob.request(t, requestEvent(t, "bob", event.VerbDestroy, "/bob", "d-1", event.DestroyRequest{SandboxID: sb.ID})); r.Problem == nil || r.Problem.Status != http.StatusNotFound {
		t.Fatalf("bob destroying alice's sandbox: %+v", r)
	}
	if n := len(e.messages(t, event.StreamCommands, event.CommandSubject("echo", event.VerbDestroy, "alice", sb.ID))); n != 0 {
		t.Fatalf("%d destroy commands after bob's request, want none", n)
	}
	// Alice can, in structured mode.
	r = alice.request(t, structured("alice", event.VerbDestroy, "/alice/ci", "destroy-1", fmt.Sprintf(`{"sandbox_id":%q}`, sb.ID)))
	if r.Problem != nil || r.Sandbox.ID != sb.ID {
		t.Fatalf("destroy: %+v", r)
	}
	if n := len(e.messages(t, event.StreamCommands, event.CommandSubject("echo", event.VerbDestroy, "alice", sb.ID))); n != 1 {
		t.Fatalf("%d destroy commands, want one", n)
	}
}

// TestIntakeDuplicateRequest repeats one request event: the same source
// and id yield the same sandbox and one create command; the same id with
// another request is refused.
func TestIntakeDuplicateRequest(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	alice := e.tenant(t, "alice")
	req := event.CreateRequest{Profile: "echo"}
	first := alice.request(t, requestEvent(t, "alice", event.VerbCreate, "/alice/ci", "once", req))
	again := alice.request(t, requestEvent(t, "alice", event.VerbCreate, "/alice/ci", "once", req))
	structuredAgain := alice.request(t, structured("alice", event.VerbCreate, "/alice/ci", "once", `{"profile":"echo"}`))
	if first.Sandbox == nil || again.Sandbox == nil || structuredAgain.Sandbox == nil ||
		again.Sandbox.ID != first.Sandbox.ID || structuredAgain.Sandbox.ID != first.Sandbox.ID {
		t.Fatalf("repeated request: %+v, %+v, %+v; want one sandbox", first, again, structuredAgain)
	}
	if n := len(e.messages(t, event.StreamCommands, "sandboxer.cmd.*.create.alice.*")); n != 1 {
		t.Fatalf("%d create commands, want one", n)
	}
	// Another source with the same id is another request.
	other := alice.request(t, requestEvent(t, "alice", event.VerbCreate, "/alice/other", "once", req))
	if other.Sandbox == nil || other.Sandbox.ID == first.Sandbox.ID {
		t.Fatalf("same id from another source: %+v", other)
	}
	// The same source and id for a different request is a conflict.
	diff := alice.request(t, requestEvent(t, "alice", event.VerbCreate, "/alice/ci", "once", event.CreateRequest{Profile: "echo", TTL: "5m"}))
	if diff.Problem == nil || diff.Problem.Status != http.StatusUnprocessableEntity {
		t.Fatalf("reused id with another request: %+v", diff)
	}
	// An HTTP Idempotency-Key spelled like the event's id is a key of its
	// own.
	h, err := e.client("alice").Create(testCtx(t), api.CreateRequest{Profile: "echo"}, "once")
	if err != nil || h.ID == first.Sandbox.ID {
		t.Fatalf("HTTP create with key once: %+v %v", h, err)
	}
}

// TestIntakeConsumerIsTheSubjects checks that nothing in a request can
// make it another consumer's: an extension attribute naming one is
// ignored, a consumer field in the data is refused like any unknown field,
// and a tenant cannot publish on another's subject at all.
func TestIntakeConsumerIsTheSubjects(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	alice := e.tenant(t, "alice")
	msg := requestEvent(t, "alice", event.VerbCreate, "/alice", "forged-1", event.CreateRequest{Profile: "echo"})
	msg.Header.Set("ce-consumer", "bob")
	r := alice.request(t, msg)
	if r.Problem != nil || r.Sandbox.Consumer != "alice" {
		t.Fatalf("request with a forged consumer attribute: %+v", r)
	}
	r = alice.request(t, structured("alice", event.VerbCreate, "/alice", "forged-2", `{"profile":"echo","consumer":"bob"}`))
	if r.Problem == nil || r.Problem.Status != http.StatusBadRequest || !strings.Contains(r.Problem.Error(), "unknown field") {
		t.Fatalf("request with a consumer in its data: %+v", r)
	}
	if n := len(e.messages(t, event.StreamCommands, "sandboxer.cmd.*.*.bob.*")); n != 0 {
		t.Fatalf("%d commands for bob", n)
	}
	nc, v := e.srv.ConnRefusable(t, auth.Identity{Role: auth.RoleTenant, Consumer: "alice"})
	if err := nc.PublishMsg(requestEvent(t, "bob", event.VerbCreate, "/alice", "forged-3", event.CreateRequest{Profile: "echo"})); err != nil {
		t.Fatal(err)
	}
	if !v.Await("sandboxer.req.bob.create", 5*time.Second) {
		t.Fatal("publishing on bob's request subject as alice was not refused")
	}
}

// TestIntakeRefusals checks that every refusal of the HTTP path is one on
// the bus too, answered with the same problem and announced with a
// rejected event on the tenant's own subjects, and that nothing is
// published for it.
func TestIntakeRefusals(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{opts: func(o *gateway.Options) {
		o.Admitter = gateway.AdmitterFunc(func(_ context.Context, req gateway.AdmitRequest) (string, error) {
			if req.Consumer == "nocredit" {
				return "", fmt.Errorf("balance 0 < quote 60: %w", gateway.ErrInsufficientCredits)
			}
			return "", nil
		})
	}})
	cases := []struct {
		name, consumer string
		msg            func() *nats.Msg
		status         int
		code           string // of the rejected event; "" for none
		field          string
	}{
		{"unknown profile", "alice", func() *nats.Msg {
			return requestEvent(t, "alice", event.VerbCreate, "/a", "r1", event.CreateRequest{Profile: "nope"})
		}, 422, gateway.CodeInvalidRequest, "profile"},
		{"ttl beyond the profile's maximum", "alice", func() *nats.Msg {
			return requestEvent(t, "alice", event.VerbCreate, "/a", "r2", event.CreateRequest{Profile: "echo", TTL: "3h"})
		}, 422, gateway.CodeInvalidRequest, "ttl"},
		{"shell in an input", "alice", func() *nats.Msg {
			return requestEvent(t, "alice", event.VerbCreate, "/a", "r3", event.CreateRequest{Profile: "git", Inputs: map[string]string{"repo": "https://x.org/r;rm -rf /"}})
		}, 422, gateway.CodeInvalidRequest, "inputs.repo"},
		{"password in the repo", "alice", func() *nats.Msg {
			return requestEvent(t, "alice", event.VerbCreate, "/a", "r4", event.CreateRequest{Profile: "git", Inputs: map[string]string{"repo": "https://u:hunter2@x.org/r"}})
		}, 422, gateway.CodeInvalidRequest, "inputs.repo"},
		{"bad label", "alice", func() *nats.Msg {
			return requestEvent(t, "alice", event.VerbCreate, "/a", "r5", event.CreateRequest{Profile: "echo", Labels: map[string]string{"Bad Key": "x"}})
		}, 422, gateway.CodeInvalidRequest, ""},
		{"not a cloudevent", "alice", func() *nats.Msg {
			return &nats.Msg{Subject: event.RequestSubject("alice", event.VerbCreate), Data: []byte("hello")}
		}, 400, gateway.CodeMalformedRequest, "event"},
		{"wrong type for the subject", "alice", func() *nats.Msg {
			m := requestEvent(t, "alice", event.VerbCreate, "/a", "r6", event.CreateRequest{Profile: "echo"})
			m.Subject = event.RequestSubject("alice", event.VerbDestroy)
			return m
		}, 400, "", "type"},
		{"input of the wrong JSON type", "alice", func() *nats.Msg {
			return structured("alice", event.VerbCreate, "/a", "r7", `{"profile":"git","inputs":{"repo":"https://x.org/r","depth":5}}`)
		}, 400, gateway.CodeMalformedRequest, "inputs.depth"},
		{"no credit", "nocredit", func() *nats.Msg {
			return requestEvent(t, "nocredit", event.VerbCreate, "/n", "r8", event.CreateRequest{Profile: "echo"})
		}, 402, gateway.CodeInsufficientCredits, ""},
		{"destroy of nothing", "alice", func() *nats.Msg {
			return requestEvent(t, "alice", event.VerbDestroy, "/a", "r9", event.DestroyRequest{SandboxID: "sbx-nope"})
		}, 404, "", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tn := e.tenant(t, tc.consumer)
			// The tenant listens on its own lifecycle subjects first.
			evs := make(chan *nats.Msg, 16)
			sub, err := tn.nc.ChanSubscribe(event.ConsumerLifecycleFilter(tc.consumer), evs)
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = sub.Unsubscribe() }()
			if err := tn.nc.Flush(); err != nil {
				t.Fatal(err)
			}
			before := e.lastSeqs(t)
			msg := tc.msg()
			r := tn.request(t, msg)
			if r.Problem == nil || r.Problem.Status != tc.status {
				t.Fatalf("reply %+v, want a %d problem", r, tc.status)
			}
			if tc.field != "" && !strings.Contains(r.Problem.Error(), tc.field) {
				t.Errorf("problem %q does not name %s", r.Problem.Error(), tc.field)
			}
			if strings.Contains(r.Problem.Error(), "hunter2") {
				t.Errorf("problem %q echoes the password", r.Problem.Error())
			}
			if after := e.lastSeqs(t); after[event.StreamCommands] != before[event.StreamCommands] {
				t.Fatal("a refused request published a command")
			}
			if tc.code == "" {
				return
			}
			select {
			case m := <-evs:
				lr, err := event.ParseLifecycleSubject(m.Subject)
				if err != nil || lr.State != event.StateRejected || lr.Consumer != tc.consumer {
					t.Fatalf("event on %s, want a rejection on %s's subjects", m.Subject, tc.consumer)
				}
				_, ev, err := event.Decode(context.Background(), m.Header, m.Data)
				if err != nil {
					t.Fatal(err)
				}
				var rj event.Rejected
				if err := event.DataAs(ev, &rj); err != nil {
					t.Fatal(err)
				}
				if rj.Code != tc.code || rj.Reason == "" || strings.Contains(rj.Reason, "hunter2") {
					t.Fatalf("rejected %+v, want code %s and a reason without secrets", rj, tc.code)
				}
				if id := msg.Header.Get("ce-id"); id != "" && (rj.Request == nil || rj.Request.ID != id) {
					t.Fatalf("rejected names request %+v, want the event %s", rj.Request, id)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("no rejected event on the tenant's subjects")
			}
		})
	}
}

// TestIntakeAnswersInboxesOnly sends a request whose reply subject points
// at a stream's subject: the gateway answers nothing there.
func TestIntakeAnswersInboxesOnly(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	alice := e.tenant(t, "alice")
	before := e.lastSeqs(t)
	msg := requestEvent(t, "alice", event.VerbCreate, "/alice", "reply-elsewhere", event.CreateRequest{Profile: "echo"})
	msg.Reply = event.CommandSubject("echo", event.VerbCreate, "bob", "sbx-forged")
	if err := alice.nc.PublishMsg(msg); err != nil {
		t.Fatal(err)
	}
	// The request itself is handled (its command is the one stored); a
	// second, answered request on the same connection orders the check
	// after it.
	if r := alice.request(t, requestEvent(t, "alice", event.VerbCreate, "/alice", "after", event.CreateRequest{Profile: "echo"})); r.Sandbox == nil {
		t.Fatalf("second request: %+v", r)
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(e.messages(t, event.StreamCommands, "sandboxer.cmd.*.create.alice.*")) < 2 {
		if time.Now().After(deadline) {
			t.Fatal("the first request was not handled")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n := len(e.messages(t, event.StreamCommands, "sandboxer.cmd.*.*.bob.*")); n != 0 {
		t.Fatalf("%d messages on bob's command subjects: the reply went where the requester pointed it", n)
	}
	if after := e.lastSeqs(t); after[event.StreamCommands] != before[event.StreamCommands]+2 {
		t.Fatalf("commands stream moved by %d, want the two creates", after[event.StreamCommands]-before[event.StreamCommands])
	}
}
