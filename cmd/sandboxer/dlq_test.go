package main

import (
	"bytes"
	"context"
	"encoding/json"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
)

// TestDLQVerbs dead-letters a malformed command for real, lists and
// shows it, discards it, and replays a dead-lettered create, which the
// pool then builds.
func TestDLQVerbs(t *testing.T) {
	b := startBusSystem(t, t.TempDir())
	admin := filepath.Join(credsDir(b.dir), "admin.creds")
	cli := func(args ...string) (string, error) {
		t.Helper()
		root := newRoot()
		var out bytes.Buffer
		root.SetOut(&out)
		root.SetErr(&out)
		root.SetArgs(args)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		err := root.ExecuteContext(ctx)
		return out.String(), err
	}
	ls := func() []deadLetter {
		t.Helper()
		out, err := cli("dlq", "ls", "--nats", b.sys.NATS.ClientURL(), "--creds", admin, "-o", "json")
		if err != nil {
			t.Fatalf("dlq ls: %v\n%s", err, out)
		}
		var list []deadLetter
		if err := json.Unmarshal([]byte(out), &list); err != nil {
			t.Fatalf("dlq ls -o json: %v\n%s", err, out)
		}
		return list
	}
	ctx := testContext(t)

	// A command the pool cannot read: dead-lettered at once.
	bad := event.CommandSubject("local", event.VerbCreate, DevConsumer, "sbx-bad")
	if _, err := b.sys.JS.Publish(ctx, bad, []byte("not an event")); err != nil {
		t.Fatal(err)
	}
	var list []deadLetter
	awaitCond(t, "the malformed command's dead letter", func() bool { list = ls(); return len(list) == 1 })
	d := list[0]
	if d.Subject != bad || d.Consumer != bus.DurableProvisioner("local") || d.Stream != event.StreamCommands || !strings.Contains(d.Reason, "malformed") {
		t.Fatalf("dead letter %+v", d)
	}
	out, err := cli("dlq", "show", strconv.FormatUint(d.Seq, 10), "--nats", b.sys.NATS.ClientURL(), "--creds", admin)
	if err != nil || !strings.Contains(out, "not an event") || !strings.Contains(out, bad) {
		t.Fatalf("dlq show: %v\n%s", err, out)
	}
	if out, err := cli("dlq", "discard", strconv.FormatUint(d.Seq, 10), "--nats", b.sys.NATS.ClientURL(), "--creds", admin); err != nil {
		t.Fatalf("dlq discard: %v\n%s", err, out)
	}
	if list := ls(); len(list) != 0 {
		t.Fatalf("after discard: %+v", list)
	}

	// A create that was dead-lettered (as the router parks one whose
	// deliveries ran out), replayed: the pool builds the sandbox.
	id := sandbox.NewID()
	cr := event.Create{Ref: event.Ref{SandboxID: id, Consumer: DevConsumer, Profile: "local", Extension: "local", Host: "localhost"}, RequestedAt: time.Now().UTC()}
	ev, err := event.New(event.TypeCreate, "/sandboxer/gateway", id, id+".create", cr)
	if err != nil {
		t.Fatal(err)
	}
	msg, err := event.Encode(ctx, cr.Ref.CommandSubject(event.VerbCreate), ev)
	if err != nil {
		t.Fatal(err)
	}
	dl := &nats.Msg{Subject: event.DLQSubject(event.StreamCommands, bus.DurableProvisioner("local")), Header: msg.Header, Data: msg.Data}
	dl.Header.Set(bus.HeaderDLQReason, "exhausted 5 deliveries: backend unreachable")
	dl.Header.Set(bus.HeaderDLQSubject, msg.Subject)
	dl.Header.Set(bus.HeaderDLQStream, event.StreamCommands)
	dl.Header.Set(bus.HeaderDLQConsumer, bus.DurableProvisioner("local"))
	dl.Header.Set(bus.HeaderDLQStreamSeq, "7")
	dl.Header.Set(bus.HeaderDLQDelivered, "5")
	dl.Header.Set(event.HeaderMsgID, "dlq:"+event.StreamCommands+":7")
	ack, err := b.sys.JS.PublishMsg(ctx, dl)
	if err != nil {
		t.Fatal(err)
	}
	nc := b.connect(t, "dev.creds")
	evs := listen(t, nc, DevConsumer)
	if out, err := cli("dlq", "replay", strconv.FormatUint(ack.Sequence, 10), "--nats", b.sys.NATS.ClientURL(), "--creds", admin); err != nil || !strings.Contains(out, "replayed") {
		t.Fatalf("dlq replay: %v\n%s", err, out)
	}
	evs.await(t, id, event.StateReady)
	if list := ls(); len(list) != 0 {
		t.Fatalf("after replay: %+v", list)
	}
	// Sequence arguments are checked.
	if _, err := cli("dlq", "show", "nope", "--nats", b.sys.NATS.ClientURL(), "--creds", admin); err == nil {
		t.Fatal("dlq show nope succeeded")
	}
}
