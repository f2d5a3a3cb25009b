// Package bus is sand-boxer's access to NATS JetStream: connecting to a
// cluster, declaring the streams, consumers and key-value buckets of the
// design idempotently, publishing CloudEvents, the one request-reply client
// ([Call]) and the one consume loop (the [Router]) every service uses.
//
// The bus knows the event contract (package event) and nothing about
// sandboxes, extensions or credits. It must never import a service
// package, nor nats-server: the embedded server is package
// bus/embedded, so that clients and contract packages can use the bus
// without linking a server (make lint checks it).
package bus

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/nats-io/nats.go"
)

// ConnConfig says how to reach an external NATS cluster.
type ConnConfig struct {
	// URL is one or more comma-separated server URLs. Default nats.DefaultURL.
	URL string
	// Name is the client connection name shown by the server.
	Name string
	// Options are extra connection options: the identity to connect as
	// (auth.ConnectOptions of a .creds file).
	Options []nats.Option
	// TLSCA, TLSCert and TLSKey are PEM files. With TLSCA alone the server
	// is verified; with a cert and key the client also authenticates.
	TLSCA, TLSCert, TLSKey string
	// ConnectTimeout bounds the first connection. Default 5s.
	ConnectTimeout time.Duration
}

// Connect dials the cluster in cfg. The connection reconnects forever; ctx
// only bounds the first dial.
func Connect(ctx context.Context, cfg ConnConfig) (*nats.Conn, error) {
	url := cfg.URL
	if url == "" {
		url = nats.DefaultURL
	}
	timeout := cfg.ConnectTimeout
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) < timeout {
		timeout = time.Until(dl)
	}
	opts := []nats.Option{
		nats.Name(cfg.Name),
		nats.Timeout(timeout),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(250 * time.Millisecond),
		nats.RetryOnFailedConnect(false),
	}
	opts = append(opts, cfg.Options...)
	if cfg.TLSCA != "" || cfg.TLSCert != "" {
		tc, err := tlsConfig(cfg)
		if err != nil {
			return nil, err
		}
		opts = append(opts, nats.Secure(tc))
	}
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		return nil, fmt.Errorf("connecting to nats at %s: %w", url, err)
	}
	return nc, nil
}

func tlsConfig(cfg ConnConfig) (*tls.Config, error) {
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.TLSCA != "" {
		pem, err := os.ReadFile(cfg.TLSCA)
		if err != nil {
			return nil, fmt.Errorf("reading tls ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("reading tls ca %s: no certificate found", cfg.TLSCA)
		}
		tc.RootCAs = pool
	}
	if (cfg.TLSCert == "") != (cfg.TLSKey == "") {
		return nil, errors.New("tls cert and key must be given together")
	}
	if cfg.TLSCert != "" {
		cert, err := tls.LoadX509KeyPair(cfg.TLSCert, cfg.TLSKey)
		if err != nil {
			return nil, fmt.Errorf("loading tls client certificate: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	return tc, nil
}
