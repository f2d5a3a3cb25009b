package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
)

func TestCheckListen(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name          string
		addr          string
		tls, insecure bool
		ok            bool
	}{
		{"in-process only", "", false, false, true},
		{"loopback v4", "127.0.0.1:4222", false, false, true},
		{"loopback v6", "[::1]:4222", false, false, true},
		{"localhost", "localhost:4222", false, false, true},
		{"every address", "0.0.0.0:4222", false, false, false},
		{"all interfaces, empty host", ":4222", false, false, false},
		{"a LAN address", "10.1.2.3:4222", false, false, false},
		{"a LAN address with TLS", "10.1.2.3:4222", true, false, true},
		{"a LAN address, insecure on purpose", "10.1.2.3:4222", false, true, true},
		{"no port", "10.1.2.3", false, false, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			err := checkListen(tc.addr, tc.tls, tc.insecure)
			if (err == nil) != tc.ok {
				t.Fatalf("checkListen(%q, tls %v, insecure %v) = %v, want ok %v", tc.addr, tc.tls, tc.insecure, err, tc.ok)
			}
		})
	}
}

// busSystem is the control plane with a NATS listener, as `sandboxer up`
// runs it, with the local and saas-stub pools.
type busSystem struct {
	sys *system
	dir string
	cfg systemConfig
}

func startBusSystem(t *testing.T, dir string) *busSystem {
	t.Helper()
	extDir, profDir := shippedCatalog(t)
	cfg := systemConfig{
		DataDir: dir, HTTPAddr: "127.0.0.1:0", NATSListen: "127.0.0.1:-1",
		ExtensionsDir: extDir, ProfilesDir: profDir,
		Pools: []string{"local", "saas-stub"}, Extensions: linkedExtensions(),
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	sys, err := startSystem(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	b := &busSystem{sys: sys, dir: dir, cfg: cfg}
	t.Cleanup(b.stop)
	return b
}

func (b *busSystem) stop() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	b.sys.Shutdown(ctx)
}

// connect connects over TCP with a credentials file of the data dir.
func (b *busSystem) connect(t *testing.T, file string, opts ...nats.Option) *nats.Conn {
	t.Helper()
	co, err := readCreds(filepath.Join(credsDir(b.dir), file))
	if err != nil {
		t.Fatal(err)
	}
	nc, err := nats.Connect(b.sys.NATS.ClientURL(), append(co, opts...)...)
	if err != nil {
		t.Fatalf("connecting with %s: %v", file, err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// TestUpWritesCredentials checks what `sandboxer up` hands out: a .creds
// file per identity, mode 0600, each connecting as its own user; no
// anonymous client gets in; a restart keeps the files.
func TestUpWritesCredentials(t *testing.T) {
	dir := t.TempDir()
	b := startBusSystem(t, dir)
	want := map[string]string{
		"admin.creds": "admin", "dev.creds": "tenant-dev", "billing.creds": "billing",
		"provisioner-local.creds": "provisioner-local", "provisioner-saas-stub.creds": "provisioner-saas-stub",
	}
	before := map[string][]byte{}
	for file, user := range want {
		path := filepath.Join(credsDir(dir), file)
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s mode %v, want 0600", file, fi.Mode().Perm())
		}
		c, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		before[file] = c
		uc, err := auth.UserOf(c)
		if err != nil || uc.Name != user {
			t.Errorf("%s is user %v (%v), want %s", file, uc, err, user)
		}
		b.connect(t, file)
	}
	if fi, err := os.Stat(credsDir(dir)); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("creds dir mode %v, %v; want 0700", fi.Mode().Perm(), err)
	}
	if nc, err := nats.Connect(b.sys.NATS.ClientURL()); err == nil {
		nc.Close()
		t.Fatal("an anonymous client connected")
	} else if !strings.Contains(strings.ToLower(err.Error()), "authorization violation") {
		t.Fatalf("anonymous connect: %v, want an authorization violation", err)
	}

	b.stop()
	b = startBusSystem(t, dir)
	for file, c := range before {
		after, err := os.ReadFile(filepath.Join(credsDir(dir), file))
		if err != nil || !bytes.Equal(after, c) {
			t.Errorf("%s changed across a restart", file)
		}
		b.connect(t, file)
	}
}

// request sends a request event as a tenant and decodes the answer.
func busRequest(t *testing.T, nc *nats.Conn, consumer, verb, id string, data any) api.BusReply {
	t.Helper()
	typ := map[string]event.Type{event.VerbCreate: event.TypeRequestCreate, event.VerbDestroy: event.TypeRequestDestroy, event.VerbGet: event.TypeRequestGet}[verb]
	ev, err := event.New(typ, "/test/bus", "", id, data)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	msg, err := event.Encode(ctx, event.RequestSubject(consumer, verb), ev)
	if err != nil {
		t.Fatal(err)
	}
	reply, err := nc.RequestMsgWithContext(ctx, msg)
	if err != nil {
		t.Fatalf("request %s: %v", verb, err)
	}
	var r api.BusReply
	if err := json.Unmarshal(reply.Data, &r); err != nil {
		t.Fatalf("reply %q: %v", reply.Data, err)
	}
	return r
}

// events collects a tenant's lifecycle events by sandbox and state.
type events struct {
	ch chan *nats.Msg
}

func listen(t *testing.T, nc *nats.Conn, consumer string) *events {
	t.Helper()
	e := &events{ch: make(chan *nats.Msg, 256)}
	sub, err := nc.ChanSubscribe(event.ConsumerLifecycleFilter(consumer), e.ch)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return e
}

// await waits for sandbox id's event announcing state, skipping others,
// and fails on a failed or rejected one.
func (e *events) await(t *testing.T, id string, want event.State) *event.Event {
	t.Helper()
	timeout := time.After(45 * time.Second)
	for {
		select {
		case m := <-e.ch:
			lr, err := event.ParseLifecycleSubject(m.Subject)
			if err != nil || lr.Sandbox != id {
				continue
			}
			_, ev, err := event.Decode(context.Background(), m.Header, m.Data)
			if err != nil {
				t.Fatal(err)
			}
			if lr.State == want {
				return ev
			}
			if lr.State == event.StateFailed || lr.State == event.StateRejected {
				t.Fatalf("sandbox %s %s while waiting for %s: %s", id, lr.State, want, ev.Data())
			}
		case <-timeout:
			t.Fatalf("no %s event for %s", want, id)
		}
	}
}

// TestBusRequestsEndToEnd asks for a real local sandbox with request
// events, as the dev tenant with the credentials up wrote: it becomes
// ready with its workspace, a repeated request is the same sandbox, and a
// destroy request removes it. A request beyond credit is rejected with an
// event and nothing is provisioned.
func TestBusRequestsEndToEnd(t *testing.T) {
	b := startBusSystem(t, t.TempDir())
	nc := b.connect(t, "dev.creds")
	evs := listen(t, nc, DevConsumer)

	r := busRequest(t, nc, DevConsumer, event.VerbCreate, "e2e-1", event.CreateRequest{Profile: "local", Labels: map[string]string{"via": "bus"}})
	if r.Problem != nil || r.Sandbox == nil || r.Sandbox.State != event.StateRequested || r.Sandbox.Consumer != DevConsumer {
		t.Fatalf("create reply %+v %+v", r.Sandbox, r.Problem)
	}
	id := r.Sandbox.ID
	ready := evs.await(t, id, event.StateReady)
	var rd event.Ready
	if err := event.DataAs(ready, &rd); err != nil {
		t.Fatal(err)
	}
	if rd.Request == nil || rd.Request.ID != "e2e-1" || rd.Request.Source != "/test/bus" {
		t.Errorf("ready names request %+v, want the request event", rd.Request)
	}
	if _, err := os.Stat(rd.Reachability.RemoteDir); err != nil {
		t.Fatalf("workspace of the ready sandbox: %v", err)
	}
	if again := busRequest(t, nc, DevConsumer, event.VerbCreate, "e2e-1", event.CreateRequest{Profile: "local", Labels: map[string]string{"via": "bus"}}); again.Sandbox == nil || again.Sandbox.ID != id {
		t.Fatalf("repeated request: %+v, want sandbox %s", again, id)
	}
	// The tenant reads it through the gateway, as it is now.
	if got := busRequest(t, nc, DevConsumer, event.VerbGet, "e2e-1-get", event.GetRequest{SandboxID: id}); got.Sandbox == nil || got.Sandbox.ID != id {
		t.Fatalf("get: %+v", got)
	}

	if r := busRequest(t, nc, DevConsumer, event.VerbDestroy, "e2e-1-destroy", event.DestroyRequest{SandboxID: id}); r.Problem != nil {
		t.Fatalf("destroy reply %+v", r.Problem)
	}
	evs.await(t, id, event.StateDestroyed)
	if _, err := os.Stat(rd.Reachability.RemoteDir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("workspace after destroyed: %v", err)
	}

	// Beyond credit: dev has none, and saas is metered.
	r = busRequest(t, nc, DevConsumer, event.VerbCreate, "e2e-2", event.CreateRequest{Profile: "saas"})
	if r.Problem == nil || r.Problem.Status != http.StatusPaymentRequired {
		t.Fatalf("create beyond credit: %+v %+v", r.Sandbox, r.Problem)
	}
	poor := strings.TrimPrefix(r.Problem.Instance, "/v1/sandboxes/")
	rj := evs.await(t, poor, event.StateRejected)
	var rjd event.Rejected
	if err := event.DataAs(rj, &rjd); err != nil || rjd.Code != "insufficient_credits" || rjd.Request == nil || rjd.Request.ID != "e2e-2" {
		t.Fatalf("rejected %+v (%v)", rjd, err)
	}
	for _, st := range []event.State{event.StateProvisioning, event.StateReady} {
		if _, err := bus.LastMsg(context.Background(), b.sys.NC, event.StreamLifecycle, event.LifecycleSubject(DevConsumer, "*", poor, st)); !errors.Is(err, bus.ErrNoMessage) {
			t.Fatalf("%s of a sandbox refused for credit: %v", st, err)
		}
	}
	cmds, err := b.sys.JS.Stream(context.Background(), event.StreamCommands)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cmds.GetLastMsgForSubject(context.Background(), event.CommandSubject("*", event.VerbCreate, DevConsumer, poor)); err == nil {
		t.Fatal("a create command was published for a sandbox refused for credit")
	}
}

// TestCredsRevokeLive issues a tenant with the CLI, connects as it, and
// revokes it with the CLI while the system runs: the server closes the
// connection at once and refuses the credentials from then on.
func TestCredsRevokeLive(t *testing.T) {
	b := startBusSystem(t, t.TempDir())
	cli := func(args ...string) string {
		t.Helper()
		root := newRoot()
		var out bytes.Buffer
		root.SetOut(&out)
		root.SetErr(&out)
		root.SetArgs(append([]string{"--data-dir", b.dir}, args...))
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := root.ExecuteContext(ctx); err != nil {
			t.Fatalf("sandboxer %s: %v\n%s", strings.Join(args, " "), err, out.String())
		}
		return out.String()
	}
	file := filepath.Join(credsDir(b.dir), "eve.creds")
	cli("creds", "issue", "--role", "tenant", "--consumer", "eve", "--note", "revoked in a test", "--out", file)
	if ls := cli("creds", "ls"); !strings.Contains(ls, "tenant-eve") || !strings.Contains(ls, "revoked in a test") {
		t.Fatalf("creds ls does not list eve:\n%s", ls)
	}
	closed := make(chan struct{})
	nc := b.connect(t, "eve.creds", nats.NoReconnect(), nats.ClosedHandler(func(*nats.Conn) { close(closed) }))
	other := b.connect(t, "dev.creds")
	cli("creds", "revoke", "tenant-eve", "--nats", b.sys.NATS.ClientURL())
	select {
	case <-closed:
	case <-time.After(15 * time.Second):
		t.Fatal("the revoked user's connection is still open")
	}
	if nc.IsConnected() {
		t.Fatal("revoked connection still connected")
	}
	co, err := readCreds(file)
	if err != nil {
		t.Fatal(err)
	}
	if nc2, err := nats.Connect(b.sys.NATS.ClientURL(), co...); err == nil {
		nc2.Close()
		t.Fatal("revoked credentials connected again")
	}
	if !other.IsConnected() {
		t.Fatal("revoking eve disconnected dev")
	}
	var users []auth.User
	if err := json.Unmarshal([]byte(cli("creds", "ls", "-o", "json")), &users); err != nil {
		t.Fatal(err)
	}
	for _, u := range users {
		if u.Name == "tenant-eve" && u.RevokedAt.IsZero() {
			t.Fatalf("creds ls shows eve not revoked: %+v", u)
		}
	}
}
