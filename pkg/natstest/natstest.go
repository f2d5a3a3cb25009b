// Package natstest starts a real, in-process nats-server with JetStream for
// tests: a fresh data directory and a random port per call, shut down by
// t.Cleanup. It is the only way sand-boxer tests get a bus; there is no fake.
package natstest

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/bus"
)

// Server is a running test server.
type Server struct {
	*bus.Embedded
	DataDir string
}

// Start starts a server with JetStream on a temporary directory, listening
// on a random loopback port, and declares the sand-boxer topology on it.
func Start(tb testing.TB) *Server {
	tb.Helper()
	dir := tb.TempDir()
	return StartAt(tb, dir)
}

// StartAt starts a server on dir, which may hold the streams of an earlier
// server (a restart).
func StartAt(tb testing.TB, dir string) *Server {
	tb.Helper()
	e, err := bus.StartEmbedded(bus.EmbeddedOptions{DataDir: dir, Listen: "127.0.0.1:-1", ServerName: "test"})
	if err != nil {
		tb.Fatalf("starting nats: %v", err)
	}
	tb.Cleanup(e.Shutdown)
	s := &Server{Embedded: e, DataDir: dir}
	js := s.JetStream(tb)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := (bus.Topology{}).Ensure(ctx, js); err != nil {
		tb.Fatalf("ensuring topology: %v", err)
	}
	return s
}

// Conn opens a client connection over TCP, closed by t.Cleanup.
func (s *Server) Conn(tb testing.TB) *nats.Conn {
	tb.Helper()
	nc, err := nats.Connect(s.ClientURL(), nats.Name(tb.Name()))
	if err != nil {
		tb.Fatalf("connecting to nats: %v", err)
	}
	tb.Cleanup(nc.Close)
	return nc
}

// JetStream opens a connection and returns its JetStream context.
func (s *Server) JetStream(tb testing.TB) jetstream.JetStream {
	tb.Helper()
	js, err := jetstream.New(s.Conn(tb))
	if err != nil {
		tb.Fatalf("jetstream: %v", err)
	}
	return js
}
