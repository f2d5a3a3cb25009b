// Package natstest starts a real, in-process nats-server with JetStream for
// tests: a fresh data directory and a random port per call, shut down by
// t.Cleanup. It is the only way sand-boxer tests get a bus; there is no fake.
//
// The server trusts a fresh [auth.Authority], as `sandboxer up` does: no
// anonymous client gets in, and a test connects as the identity it plays
// ([Server.ConnAs]), so the whole suite runs with least privilege. Such a
// connection fails its test on any permissions violation. [Server.Conn]
// is the admin's, for declaring and inspecting what a test needs.
package natstest

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/bus"
)

// Server is a running test server.
type Server struct {
	*bus.Embedded
	DataDir string
	// Auth is the authority the server trusts.
	Auth *auth.Authority

	mu    sync.Mutex
	creds map[auth.Identity][]byte
}

// TB is what the helpers need of a test: a *testing.T, *testing.B or a
// property test's *rapid.T.
type TB interface {
	Helper()
	Fatal(args ...any)
	Fatalf(format string, args ...any)
	Errorf(format string, args ...any)
	Cleanup(func())
}

// Admin is the identity of [Server.Conn].
var Admin = auth.Identity{Role: auth.RoleAdmin}

// Start starts a server with JetStream on a temporary directory, listening
// on a random loopback port, and declares the sand-boxer topology on it
// (streams and buckets; a test declares the durable consumers it needs
// with [Server.Setup]).
func Start(tb testing.TB) *Server {
	tb.Helper()
	dir := tb.TempDir()
	return StartAt(tb, dir)
}

// StartAt starts a server on dir, which may hold the streams and the
// authority of an earlier server (a restart).
func StartAt(tb testing.TB, dir string) *Server {
	tb.Helper()
	a, err := auth.Open(filepath.Join(dir, "auth"))
	if err != nil {
		tb.Fatalf("opening authority: %v", err)
	}
	e, err := bus.StartEmbedded(bus.EmbeddedOptions{
		DataDir: filepath.Join(dir, "jetstream"), Listen: "127.0.0.1:-1", ServerName: "test",
		Auth: a.ServerConfig(filepath.Join(dir, "jwt")),
	})
	if err != nil {
		tb.Fatalf("starting nats: %v", err)
	}
	tb.Cleanup(e.Shutdown)
	s := &Server{Embedded: e, DataDir: dir, Auth: a, creds: map[auth.Identity][]byte{}}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := (bus.Topology{}).Setup(ctx, s.JetStream(tb), bus.SetupOptions{}); err != nil {
		tb.Fatalf("setting up topology: %v", err)
	}
	return s
}

// Setup declares durable consumers, as `sandboxer setup` does.
func (s *Server) Setup(tb TB, specs ...bus.ConsumerSpec) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	js := s.JetStream(tb)
	for _, spec := range specs {
		if _, err := bus.EnsureSpec(ctx, js, spec); err != nil {
			tb.Fatalf("setting up consumer: %v", err)
		}
	}
}

// Creds returns credentials for id, issued once per server.
func (s *Server) Creds(tb TB, id auth.Identity) []byte {
	tb.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if c, ok := s.creds[id]; ok {
		return c
	}
	c, _, err := s.Auth.Issue(id, auth.IssueOptions{Unlisted: true, Note: "test"})
	if err != nil {
		tb.Fatalf("issuing credentials for %+v: %v", id, err)
	}
	s.creds[id] = c
	return c
}

// Conn opens an admin connection over TCP, closed by t.Cleanup: for a
// test's own declarations and inspections, never for the code under test.
func (s *Server) Conn(tb TB) *nats.Conn {
	tb.Helper()
	nc, _ := s.dial(tb, Admin)
	return nc
}

// ConnAs opens a connection as id, closed by t.Cleanup. The test fails if
// the server refuses anything the connection does: the code under test
// must need no more than id's permissions.
func (s *Server) ConnAs(tb TB, id auth.Identity) *nats.Conn {
	tb.Helper()
	nc, v := s.dial(tb, id)
	tb.Cleanup(func() {
		if errs := v.Errors(); len(errs) > 0 {
			tb.Errorf("%s was refused %d time(s) by the server: %v", id.UserName(), len(errs), errs)
		}
	})
	return nc
}

// ConnRefusable opens a connection as id whose refusals are the test's to
// check, with [Violations].
func (s *Server) ConnRefusable(tb TB, id auth.Identity) (*nats.Conn, *Violations) {
	tb.Helper()
	return s.dial(tb, id)
}

func (s *Server) dial(tb TB, id auth.Identity) (*nats.Conn, *Violations) {
	tb.Helper()
	opts, err := auth.ConnectOptions(s.Creds(tb, id))
	if err != nil {
		tb.Fatal(err)
	}
	v := &Violations{}
	opts = append(opts, nats.Name("test as "+id.UserName()), nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
		v.add(err)
	}))
	nc, err := nats.Connect(s.ClientURL(), opts...)
	if err != nil {
		tb.Fatalf("connecting to nats as %s: %v", id.UserName(), err)
	}
	tb.Cleanup(nc.Close)
	return nc, v
}

// JetStream opens an admin connection and returns its JetStream context.
func (s *Server) JetStream(tb TB) jetstream.JetStream {
	tb.Helper()
	js, err := jetstream.New(s.Conn(tb))
	if err != nil {
		tb.Fatalf("jetstream: %v", err)
	}
	return js
}

// JetStreamAs opens a connection as id ([Server.ConnAs]) and returns its
// JetStream context.
func (s *Server) JetStreamAs(tb TB, id auth.Identity) jetstream.JetStream {
	tb.Helper()
	js, err := jetstream.New(s.ConnAs(tb, id))
	if err != nil {
		tb.Fatalf("jetstream: %v", err)
	}
	return js
}

// Violations collects the permissions violations the server reported to a
// connection.
type Violations struct {
	mu      sync.Mutex
	errs    []error
	changed chan struct{} // closed and replaced at every violation
}

func (v *Violations) add(err error) {
	if !IsViolation(err) {
		return
	}
	v.mu.Lock()
	v.errs = append(v.errs, err)
	if v.changed != nil {
		close(v.changed)
		v.changed = nil
	}
	v.mu.Unlock()
}

// Errors returns the violations so far.
func (v *Violations) Errors() []error {
	v.mu.Lock()
	defer v.mu.Unlock()
	return append([]error(nil), v.errs...)
}

// Await waits until a violation whose text contains want arrives, or d
// passes, and reports whether one did.
func (v *Violations) Await(want string, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		v.mu.Lock()
		for _, err := range v.errs {
			if strings.Contains(err.Error(), want) {
				v.mu.Unlock()
				return true
			}
		}
		if v.changed == nil {
			v.changed = make(chan struct{})
		}
		ch := v.changed
		v.mu.Unlock()
		select {
		case <-ch:
		case <-t.C:
			return false
		}
	}
}

// IsViolation reports whether err is the server's permissions violation.
func IsViolation(err error) bool {
	return err != nil && (errors.Is(err, nats.ErrPermissionViolation) || strings.Contains(strings.ToLower(err.Error()), "permissions violation"))
}
