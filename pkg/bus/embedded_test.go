package bus_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/bus/embedded"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
)

// TestEmbeddedRestartKeepsStreams stops the embedded server and starts a
// new one on the same data directory: streams, their messages, consumers
// and key-value entries are all still there.
func TestEmbeddedRestartKeepsStreams(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	ctx := testCtx(t)

	first := natstest.StartAt(t, dir)
	js := first.JetStream(t)
	ack, err := bus.NewPublisher(js).Publish(ctx, event.LifecycleSubject("dev", "local", "sbx-1", event.StateReady), readyEvent(t, "sbx-1"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bus.EnsureConsumer(ctx, js, event.StreamCommands, "local", event.CommandFilter("local"), testPolicy); err != nil {
		t.Fatal(err)
	}
	kv, err := js.KeyValue(ctx, bus.BucketCatalog)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, "sbx-1", []byte("ready")); err != nil {
		t.Fatal(err)
	}
	first.Shutdown()

	second := natstest.StartAt(t, dir)
	js2 := second.JetStream(t)
	names := js2.StreamNames(ctx)
	var got []string
	for n := range names.Name() {
		got = append(got, n)
	}
	if err := names.Err(); err != nil {
		t.Fatal(err)
	}
	for _, cfg := range (bus.Topology{}).Streams() {
		if !strings.Contains(strings.Join(got, ","), cfg.Name) {
			t.Errorf("stream %s lost across the restart (have %v)", cfg.Name, got)
		}
	}
	s, err := js2.Stream(ctx, event.StreamLifecycle)
	if err != nil {
		t.Fatal(err)
	}
	m, err := s.GetMsg(ctx, ack.Sequence)
	if err != nil {
		t.Fatalf("event lost across the restart: %v", err)
	}
	if m.Header.Get("ce-id") != "sbx-1.ready" {
		t.Errorf("restored event headers %v", m.Header)
	}
	if _, err := js2.Consumer(ctx, event.StreamCommands, "local"); err != nil {
		t.Errorf("consumer lost across the restart: %v", err)
	}
	kv2, err := js2.KeyValue(ctx, bus.BucketCatalog)
	if err != nil {
		t.Fatal(err)
	}
	if e, err := kv2.Get(ctx, "sbx-1"); err != nil || string(e.Value()) != "ready" {
		t.Errorf("key lost across the restart: %v", err)
	}
}

// TestEmbeddedInProcess starts a server without a listener: only
// in-process connections reach it, and the topology can live in memory.
func TestEmbeddedInProcess(t *testing.T) {
	t.Parallel()
	e, err := embedded.Start(embedded.Options{DataDir: filepath.Join(t.TempDir(), "nested", "js")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Shutdown)
	if e.ClientURL() != "" {
		t.Errorf("ClientURL = %q without a listener", e.ClientURL())
	}
	if e.NATS() == nil || e.NATS().Name() != "sandboxer" {
		t.Errorf("server name %q, want the default sandboxer", e.NATS().Name())
	}
	nc, err := e.Connect("test")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := testCtx(t)
	if _, err := (bus.Topology{MemoryStorage: true}).Setup(ctx, js, bus.SetupOptions{}); err != nil {
		t.Fatal(err)
	}
	s, err := js.Stream(ctx, event.StreamCommands)
	if err != nil {
		t.Fatal(err)
	}
	if s.CachedInfo().Config.Storage != jetstream.MemoryStorage {
		t.Errorf("storage %v, want memory", s.CachedInfo().Config.Storage)
	}
}

func TestStartEmbeddedErrors(t *testing.T) {
	t.Parallel()
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		opts embedded.Options
		want string
	}{
		{"no data dir", embedded.Options{}, "data dir is required"},
		{"data dir is a file", embedded.Options{DataDir: filepath.Join(file, "js")}, "starting embedded nats"},
		{"listen without port", embedded.Options{DataDir: t.TempDir(), Listen: "localhost"}, "listen address"},
		{"listen with a named port", embedded.Options{DataDir: t.TempDir(), Listen: "localhost:http"}, "listen port"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e, err := embedded.Start(tc.opts)
			if err == nil {
				e.Shutdown()
				t.Fatal("embedded.Start succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q, want it to contain %q", err, tc.want)
			}
		})
	}
}

func TestConnect(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	creds, err := auth.ConnectOptions(srv.Creds(t, natstest.Admin))
	if err != nil {
		t.Fatal(err)
	}
	nc, err := bus.Connect(testCtx(t), bus.ConnConfig{URL: srv.ClientURL(), Name: "bus-test", Options: creds})
	if err != nil {
		t.Fatal(err)
	}
	if !nc.IsConnected() || nc.Opts.Name != "bus-test" {
		t.Errorf("connected %v as %q", nc.IsConnected(), nc.Opts.Name)
	}
	nc.Close()

	// A port nothing listens on.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := "nats://" + l.Addr().String()
	_ = l.Close()

	dir := t.TempDir()
	notPEM := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(notPEM, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		cfg  bus.ConnConfig
		want string
	}{
		{"nothing listening", bus.ConnConfig{URL: closed, ConnectTimeout: time.Second}, "connecting to nats"},
		{"no credentials", bus.ConnConfig{URL: srv.ClientURL()}, "Authorization Violation"},
		{"missing CA", bus.ConnConfig{URL: srv.ClientURL(), TLSCA: filepath.Join(dir, "none.pem")}, "reading tls ca"},
		{"CA without a certificate", bus.ConnConfig{URL: srv.ClientURL(), TLSCA: notPEM}, "no certificate found"},
		{"cert without key", bus.ConnConfig{URL: srv.ClientURL(), TLSCert: notPEM}, "must be given together"},
		{"unreadable key pair", bus.ConnConfig{URL: srv.ClientURL(), TLSCert: notPEM, TLSKey: notPEM}, "loading tls client certificate"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			nc, err := bus.Connect(ctx, tc.cfg)
			if err == nil {
				nc.Close()
				t.Fatal("Connect succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q, want it to contain %q", err, tc.want)
			}
		})
	}
}
