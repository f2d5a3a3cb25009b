package natstest

import (
	"sync"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/auth"
)

// users connects a test to a server or a cluster as the identities it
// plays: the shared part of [Server] and [Cluster].
type users struct {
	authority *auth.Authority
	url       func() string // the client URL(s) to dial
	what      string        // "server" or "cluster", for messages

	mu    sync.Mutex
	creds map[auth.Identity][]byte
}

func newUsers(a *auth.Authority, what string, url func() string) users {
	return users{authority: a, url: url, what: what, creds: map[auth.Identity][]byte{}}
}

// Creds returns credentials for id, issued once per server or cluster.
func (u *users) Creds(tb TB, id auth.Identity) []byte {
	tb.Helper()
	u.mu.Lock()
	defer u.mu.Unlock()
	if c, ok := u.creds[id]; ok {
		return c
	}
	c, _, err := u.authority.Issue(id, auth.IssueOptions{Unlisted: true, Note: "test"})
	if err != nil {
		tb.Fatalf("issuing credentials for %+v: %v", id, err)
	}
	u.creds[id] = c
	return c
}

// Conn opens an admin connection over TCP, closed by t.Cleanup: for a
// test's own declarations and inspections, never for the code under test.
func (u *users) Conn(tb TB) *nats.Conn {
	tb.Helper()
	nc, _ := u.dial(tb, Admin)
	return nc
}

// ConnAs opens a connection as id, closed by t.Cleanup. The test fails if
// the server refuses anything the connection does: the code under test
// must need no more than id's permissions.
func (u *users) ConnAs(tb TB, id auth.Identity) *nats.Conn {
	tb.Helper()
	nc, v := u.dial(tb, id)
	tb.Cleanup(func() {
		if errs := v.Errors(); len(errs) > 0 {
			tb.Errorf("%s was refused %d time(s) by the %s: %v", id.UserName(), len(errs), u.what, errs)
		}
	})
	return nc
}

// ConnRefusable opens a connection as id whose refusals are the test's to
// check, with [Violations].
func (u *users) ConnRefusable(tb TB, id auth.Identity) (*nats.Conn, *Violations) {
	tb.Helper()
	return u.dial(tb, id)
}

func (u *users) dial(tb TB, id auth.Identity) (*nats.Conn, *Violations) {
	tb.Helper()
	opts, err := auth.ConnectOptions(u.Creds(tb, id))
	if err != nil {
		tb.Fatal(err)
	}
	v := &Violations{}
	opts = append(opts, nats.Name("test as "+id.UserName()), nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
		v.add(err)
	}))
	nc, err := nats.Connect(u.url(), opts...)
	if err != nil {
		tb.Fatalf("connecting to the %s as %s: %v", u.what, id.UserName(), err)
	}
	tb.Cleanup(nc.Close)
	return nc, v
}

// JetStream opens an admin connection and returns its JetStream context.
func (u *users) JetStream(tb TB) jetstream.JetStream {
	tb.Helper()
	js, err := jetstream.New(u.Conn(tb))
	if err != nil {
		tb.Fatalf("jetstream: %v", err)
	}
	return js
}

// JetStreamAs opens a connection as id (ConnAs) and returns its JetStream
// context.
func (u *users) JetStreamAs(tb TB, id auth.Identity) jetstream.JetStream {
	tb.Helper()
	js, err := jetstream.New(u.ConnAs(tb, id))
	if err != nil {
		tb.Fatalf("jetstream: %v", err)
	}
	return js
}
