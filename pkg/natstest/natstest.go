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
	"github.com/sand-boxer/sandboxer/pkg/bus/embedded"
)

// Server is a running test server.
type Server struct {
	*embedded.Server
	DataDir string
	// Auth is the authority the server trusts.
	Auth *auth.Authority
	users
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
	e, err := embedded.Start(embedded.Options{
		DataDir: filepath.Join(dir, "jetstream"), Listen: "127.0.0.1:-1", ServerName: "test",
		Auth: a.ServerConfig(filepath.Join(dir, "jwt")),
	})
	if err != nil {
		tb.Fatalf("starting nats: %v", err)
	}
	tb.Cleanup(e.Shutdown)
	s := &Server{Server: e, DataDir: dir, Auth: a}
	s.users = newUsers(a, "server", e.ClientURL)
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
	ensureConsumers(tb, s.JetStream(tb), specs)
}

// ensureConsumers declares specs on js.
func ensureConsumers(tb TB, js jetstream.JetStream, specs []bus.ConsumerSpec) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, spec := range specs {
		if _, err := bus.EnsureSpec(ctx, js, spec); err != nil {
			tb.Fatalf("setting up consumer: %v", err)
		}
	}
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
