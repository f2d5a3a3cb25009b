// Package embedded runs the real nats-server in-process, with JetStream:
// the bus of `sandboxer up`, the benchmark, and every test (through
// pkg/natstest). It is the one package of the bus that links nats-server,
// so that package bus, and the contract packages that use it, never do.
package embedded

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// Options configures an in-process nats-server with JetStream.
type Options struct {
	// DataDir is where JetStream keeps its streams. Required.
	DataDir string
	// Listen is host:port for a client listener, so workers on other machines
	// can join. Empty means no listener: only in-process connections. Port
	// -1 picks a free port (tests).
	Listen string
	// ServerName names the server. Default "sandboxer".
	ServerName string
	// Logs turns on the server's own logging to stderr.
	Logs bool
	// ReadyTimeout bounds start-up. Default 10s.
	ReadyTimeout time.Duration
	// Auth is nats-server configuration that sets who may connect: the
	// operator, system account and account resolver of package auth
	// (auth.Authority.ServerConfig). Empty: anyone may, for tests of the
	// bus alone.
	Auth string
	// TLSCert and TLSKey are PEM files: when set, the client listener
	// speaks TLS only.
	TLSCert, TLSKey string
}

// Server is a running in-process nats-server: the real server, not a fake.
type Server struct {
	srv *server.Server
}

// Start starts a nats-server with JetStream on opts.DataDir and waits
// until it accepts connections.
func Start(opts Options) (*Server, error) {
	if opts.DataDir == "" {
		return nil, errors.New("starting embedded nats: data dir is required")
	}
	if err := os.MkdirAll(opts.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("starting embedded nats: %w", err)
	}
	name := opts.ServerName
	if name == "" {
		name = "sandboxer"
	}
	so := &server.Options{}
	if opts.Auth != "" {
		if err := so.ProcessConfigString(opts.Auth); err != nil {
			return nil, fmt.Errorf("starting embedded nats: reading auth configuration: %w", err)
		}
	}
	so.ServerName = name
	so.JetStream = true
	so.StoreDir = opts.DataDir
	so.NoSigs = true
	so.NoLog = !opts.Logs
	so.DontListen = opts.Listen == ""
	// JetStream's own limits: the whole machine's. Streams carry their own.
	so.JetStreamMaxMemory, so.JetStreamMaxStore = -1, -1
	if (opts.TLSCert == "") != (opts.TLSKey == "") {
		return nil, errors.New("starting embedded nats: tls cert and key must be given together")
	}
	if opts.TLSCert != "" {
		tc, err := server.GenTLSConfig(&server.TLSConfigOpts{CertFile: opts.TLSCert, KeyFile: opts.TLSKey})
		if err != nil {
			return nil, fmt.Errorf("starting embedded nats: loading tls certificate: %w", err)
		}
		so.TLSConfig, so.TLS = tc, true
	}
	if opts.Listen != "" {
		host, port, err := net.SplitHostPort(opts.Listen)
		if err != nil {
			return nil, fmt.Errorf("starting embedded nats: listen address %q: %w", opts.Listen, err)
		}
		p, err := strconv.Atoi(port)
		if err != nil {
			return nil, fmt.Errorf("starting embedded nats: listen port %q: %w", port, err)
		}
		so.Host, so.Port = host, p
		if p > 0 {
			// nats-server reports a taken port only in its log, after it
			// gave up: try the address first, to say so at once.
			ln, err := net.Listen("tcp", opts.Listen)
			if err != nil {
				return nil, fmt.Errorf("starting embedded nats: cannot listen on %s: %w", opts.Listen, err)
			}
			_ = ln.Close()
		}
	}
	srv, err := server.NewServer(so)
	if err != nil {
		return nil, fmt.Errorf("starting embedded nats: %w", err)
	}
	if opts.Logs {
		srv.ConfigureLogger()
	}
	srv.Start()
	timeout := opts.ReadyTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	if !srv.ReadyForConnections(timeout) {
		srv.Shutdown()
		return nil, fmt.Errorf("starting embedded nats: not ready after %s", timeout)
	}
	return &Server{srv: srv}, nil
}

// ClientURL is the nats:// URL of the client listener, or "" when the
// server only accepts in-process connections.
func (e *Server) ClientURL() string {
	if e.srv.Addr() == nil {
		return ""
	}
	return e.srv.ClientURL()
}

// Connect opens a client connection to the embedded server, in-process (no
// TCP) whatever the listener.
func (e *Server) Connect(name string, opts ...nats.Option) (*nats.Conn, error) {
	opts = append([]nats.Option{nats.Name(name), nats.InProcessServer(e.srv), nats.MaxReconnects(-1)}, opts...)
	nc, err := nats.Connect("", opts...)
	if err != nil {
		return nil, fmt.Errorf("connecting to embedded nats: %w", err)
	}
	return nc, nil
}

// NATS exposes the running nats-server, for tests and metrics.
func (e *Server) NATS() *server.Server { return e.srv }

// Shutdown stops the server and waits until it has stopped. Streams are
// flushed to the data directory.
func (e *Server) Shutdown() {
	e.srv.Shutdown()
	e.srv.WaitForShutdown()
}
