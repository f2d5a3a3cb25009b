//go:build e2e

package sshx_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/sand-boxer/sandboxer/pkg/sshx"
	"github.com/sand-boxer/sandboxer/pkg/sshx/sshtest"
)

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// awaitConnections waits until sshd has logged n connections.
func awaitConnections(t *testing.T, srv *sshtest.Server, n int) {
	t.Helper()
	ctx := ctxFor(t, 10*time.Second)
	for srv.Connections() < n {
		if err := srv.WaitLog(ctx, "Connection from"); err != nil {
			t.Fatalf("sshd logged %d connections, want %d: %v", srv.Connections(), n, err)
		}
	}
}

func TestE2E(t *testing.T) {
	srv := sshtest.Start(t, sshtest.Options{})

	t.Run("RunQuotesEveryArgument", func(t *testing.T) {
		t.Parallel()
		var p sshx.Pool
		t.Cleanup(func() { _ = p.Close() })
		args := []string{"it's", "$(id)", "`id`", "a b", "; echo pwned", "*", "", "line\nbreak", "--help", "\\"}
		out, err := p.Run(ctxFor(t, 30*time.Second), srv.Config(), append([]string{"printf", `%s\0`}, args...)...)
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
		got := strings.Split(string(out), "\x00")
		got = got[:len(got)-1]
		if len(got) != len(args) {
			t.Fatalf("remote saw %q, want %q", got, args)
		}
		for i := range args {
			if got[i] != args[i] {
				t.Errorf("word %d: remote saw %q, want %q", i, got[i], args[i])
			}
		}
	})

	t.Run("ExitError", func(t *testing.T) {
		t.Parallel()
		var p sshx.Pool
		t.Cleanup(func() { _ = p.Close() })
		_, err := p.Run(ctxFor(t, 30*time.Second), srv.Config(), "sh", "-c", "echo oops >&2; exit 3")
		var ee *sshx.ExitError
		if !errors.As(err, &ee) || ee.Status != 3 || !strings.Contains(ee.Stderr, "oops") {
			t.Fatalf("Run = %v, want ExitError status 3 with stderr", err)
		}
		if strings.Contains(ee.Error(), "exit 3") {
			t.Errorf("error %q leaks arguments past the first", ee.Error())
		}
	})

	t.Run("Stdin", func(t *testing.T) {
		t.Parallel()
		var p sshx.Pool
		t.Cleanup(func() { _ = p.Close() })
		var out strings.Builder
		err := p.RunCmd(ctxFor(t, 30*time.Second), srv.Config(), sshx.Cmd{Argv: []string{"cat"}, Stdin: strings.NewReader("hello\n"), Stdout: &out})
		if err != nil || out.String() != "hello\n" {
			t.Fatalf("cat = %q, %v", out.String(), err)
		}
	})

	t.Run("CommandTimeout", func(t *testing.T) {
		t.Parallel()
		var p sshx.Pool
		t.Cleanup(func() { _ = p.Close() })
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err := p.Run(ctx, srv.Config(), "sleep", "30.0417")
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Run = %v, want context.DeadlineExceeded", err)
		}
		if d := time.Since(start); d > 10*time.Second {
			t.Fatalf("Run returned after %s, want about the 500ms deadline", d)
		}
		// The remote command itself was stopped, not only abandoned.
		awaitNoProcess(t, "sleep\x0030.0417")
		// The connection is still usable.
		if _, err := p.Run(ctxFor(t, 30*time.Second), srv.Config(), "true"); err != nil {
			t.Fatalf("Run after a timed-out command: %v", err)
		}
	})

	t.Run("AgentAuth", func(t *testing.T) {
		t.Parallel()
		sock := sshtest.StartAgent(t, srv.IdentityFile)
		cfg := srv.Config()
		cfg.IdentityFile = ""
		cfg.Agent, cfg.AgentSocket = true, sock
		c, err := sshx.Dial(ctxFor(t, 30*time.Second), cfg)
		if err != nil {
			t.Fatalf("Dial with the agent: %v", err)
		}
		defer c.Close()
		if out, err := c.Run(ctxFor(t, 30*time.Second), "echo", "agent"); err != nil || string(out) != "agent\n" {
			t.Fatalf("Run = %q, %v", out, err)
		}
	})

	t.Run("WrongKeyIsRefused", func(t *testing.T) {
		t.Parallel()
		cfg := srv.Config()
		cfg.IdentityFile = filepath.Join(t.TempDir(), "other")
		sshtest.WriteKey(t, cfg.IdentityFile)
		_, err := sshx.Dial(ctxFor(t, 30*time.Second), cfg)
		if err == nil || !strings.Contains(err.Error(), "unable to authenticate") {
			t.Fatalf("Dial with an unauthorized key = %v, want an authentication error", err)
		}
	})

	t.Run("EncryptedIdentityIsExplained", func(t *testing.T) {
		t.Parallel()
		cfg := srv.Config()
		cfg.IdentityFile = encryptedIdentity(t)
		_, err := sshx.Dial(ctxFor(t, 30*time.Second), cfg)
		if err == nil || !strings.Contains(err.Error(), "is encrypted") {
			t.Fatalf("Dial with an encrypted key = %v, want an explanation", err)
		}
	})

	t.Run("PoolReusesOneConnection", func(t *testing.T) {
		// Not parallel: it counts sshd's connections.
		var p sshx.Pool
		t.Cleanup(func() { _ = p.Close() })
		before := srv.Connections()
		ctx := ctxFor(t, 30*time.Second)
		var wg sync.WaitGroup
		errs := make(chan error, 12)
		for range 12 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, err := p.Run(ctx, srv.Config(), "true")
				errs <- err
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatalf("Run: %v", err)
			}
		}
		if got := srv.Connections() - before; got != 1 || p.Len() != 1 {
			t.Fatalf("12 concurrent commands opened %d connections (pool holds %d), want 1", got, p.Len())
		}
	})

}

// TestE2EPoolReconnects drops the connection under the pool (a proxy
// closes it) and expects the next command to run on a new one.
func TestE2EPoolReconnects(t *testing.T) {
	srv := sshtest.Start(t, sshtest.Options{})
	proxy := newFreezingProxy(t, srv.Addr())
	cfg := proxied(t, srv, proxy)
	var p sshx.Pool
	t.Cleanup(func() { _ = p.Close() })
	ctx := ctxFor(t, 30*time.Second)
	before := srv.Connections()
	c, err := p.Get(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Run(ctx, "true"); err != nil {
		t.Fatal(err)
	}
	proxy.dropAll()
	select {
	case <-c.Done():
	case <-ctx.Done():
		t.Fatal("the client did not notice its connection died")
	}
	if out, err := p.Run(ctx, cfg, "echo", "again"); err != nil || string(out) != "again\n" {
		t.Fatalf("Run after the connection died = %q, %v", out, err)
	}
	awaitConnections(t, srv, before+2)
	if p.Len() != 1 {
		t.Fatalf("pool holds %d connections, want 1", p.Len())
	}
}

// awaitNoProcess waits until no process's command line contains needle
// (arguments separated by NUL, as in /proc/<pid>/cmdline).
func awaitNoProcess(t *testing.T, needle string) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	tick := time.NewTicker(50 * time.Millisecond) // polling /proc: there is nothing to watch
	defer tick.Stop()
	for {
		found := ""
		dirs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
		for _, f := range dirs {
			if b, err := os.ReadFile(f); err == nil && strings.Contains(string(b), needle) {
				found = f
				break
			}
		}
		if found == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %s (%q) still runs", found, needle)
		}
		<-tick.C
	}
}

// proxied returns srv's config with the target moved to proxy's port.
func proxied(t *testing.T, srv *sshtest.Server, proxy *freezingProxy) sshx.Config {
	cfg := srv.Config()
	cfg.Target.Port = proxy.port
	cfg.KnownHostsFile = filepath.Join(t.TempDir(), "known_hosts")
	sshtest.WriteKnownHosts(t, cfg.KnownHostsFile, net.JoinHostPort("127.0.0.1", itoa(proxy.port)), srv.HostKey)
	return cfg
}

func TestE2EHostKeys(t *testing.T) {
	srv := sshtest.Start(t, sshtest.Options{})
	for _, tc := range []struct {
		name       string
		knownHosts func(t *testing.T) string
		want       error
	}{
		{"unknown", func(t *testing.T) string { return sshtest.EmptyKnownHosts(t) }, sshx.ErrHostKeyUnknown},
		{"changed", func(t *testing.T) string { return srv.ChangedKnownHosts(t) }, sshx.ErrHostKeyChanged},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cfg := srv.Config()
			cfg.KnownHostsFile = tc.knownHosts(t)
			c, err := sshx.Dial(ctxFor(t, 30*time.Second), cfg)
			if err == nil {
				c.Close()
				t.Fatal("Dial succeeded against a host the known_hosts file does not vouch for")
			}
			var hke *sshx.HostKeyError
			if !errors.As(err, &hke) || !errors.Is(err, tc.want) {
				t.Fatalf("Dial = %v, want a HostKeyError %v", err, tc.want)
			}
			msg := err.Error()
			for _, want := range []string{srv.Addr(), hke.Fingerprint, cfg.KnownHostsFile} {
				if !strings.Contains(msg, want) {
					t.Errorf("error %q does not name %q", msg, want)
				}
			}
			if !strings.HasPrefix(hke.Fingerprint, "SHA256:") {
				t.Errorf("fingerprint %q is not a SHA256 fingerprint", hke.Fingerprint)
			}
		})
	}
	t.Run("no credential sent to an unverified host", func(t *testing.T) {
		cfg := srv.Config()
		cfg.KnownHostsFile = srv.ChangedKnownHosts(t)
		_, _ = sshx.Dial(ctxFor(t, 30*time.Second), cfg)
		if strings.Contains(srv.Log(), "Accepted publickey") {
			t.Fatalf("sshd accepted a key from a client that should have refused the host:\n%s", srv.Log())
		}
	})
}

// TestE2EConnectTimeout dials a listener that accepts and never speaks SSH.
func TestE2EConnectTimeout(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	held := make(chan net.Conn, 4)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			held <- c
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
		close(held)
		for c := range held {
			c.Close()
		}
	})
	port := ln.Addr().(*net.TCPAddr).Port
	cfg := sshx.Config{
		Target:         sshx.Target{User: "u", Host: "127.0.0.1", Port: port},
		KnownHostsFile: sshtest.EmptyKnownHosts(t),
		IdentityFile:   filepath.Join(t.TempDir(), "id"),
	}
	sshtest.WriteKey(t, cfg.IdentityFile)
	for _, tc := range []struct {
		name           string
		connectTimeout time.Duration
		ctxTimeout     time.Duration
		want           string
	}{
		{"connect timeout", 300 * time.Millisecond, time.Minute, "connect timeout 300ms exceeded"},
		{"ctx deadline", time.Minute, 300 * time.Millisecond, context.DeadlineExceeded.Error()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			start := time.Now()
			c := cfg
			c.ConnectTimeout = tc.connectTimeout
			_, err := sshx.Dial(ctxFor(t, tc.ctxTimeout), c)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Dial = %v, want %q", err, tc.want)
			}
			if d := time.Since(start); d > 10*time.Second {
				t.Fatalf("Dial took %s", d)
			}
		})
	}
}

// TestE2EKeepAlive freezes a proxy between client and sshd: keepalives go
// unanswered and the client closes the connection by itself.
func TestE2EKeepAlive(t *testing.T) {
	srv := sshtest.Start(t, sshtest.Options{})
	proxy := newFreezingProxy(t, srv.Addr())
	cfg := proxied(t, srv, proxy)
	cfg.KeepAliveInterval, cfg.KeepAliveMax = 100*time.Millisecond, 2
	c, err := sshx.Dial(ctxFor(t, 30*time.Second), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Run(ctxFor(t, 30*time.Second), "true"); err != nil {
		t.Fatal(err)
	}
	proxy.freeze()
	select {
	case <-c.Done():
	case <-time.After(20 * time.Second):
		t.Fatal("the client kept a connection whose keepalives went unanswered")
	}
}

func TestE2ETunnel(t *testing.T) {
	srv := sshtest.Start(t, sshtest.Options{})
	// An echo server on the "remote" side.
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() { defer wg.Done(); defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()
	t.Cleanup(func() { echo.Close(); wg.Wait() })

	var p sshx.Pool
	t.Cleanup(func() { _ = p.Close() })
	tun, err := p.Forward(ctxFor(t, 30*time.Second), srv.Config(), "127.0.0.1:0", echo.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		conn, err := net.DialTimeout("tcp", tun.Addr().String(), 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		msg := "through the tunnel " + itoa(i)
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := conn.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		_ = conn.(*net.TCPConn).CloseWrite()
		got, err := io.ReadAll(conn)
		conn.Close()
		if err != nil || string(got) != msg {
			t.Fatalf("echo through the tunnel = %q, %v; want %q", got, err, msg)
		}
	}
	if err := tun.Close(); err != nil {
		t.Fatal(err)
	}
	if c, err := net.DialTimeout("tcp", tun.Addr().String(), time.Second); err == nil {
		c.Close()
		t.Fatal("the tunnel still accepts after Close")
	}
}

func itoa(i int) string { return strconv.Itoa(i) }

// encryptedIdentity writes a passphrase-protected private key.
func encryptedIdentity(t *testing.T) string {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	block, err := ssh.MarshalPrivateKeyWithPassphrase(priv, "enc", []byte("secret"))
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "enc")
	if err := os.WriteFile(file, pem.EncodeToMemory(block), 0o600); err != nil {
		t.Fatal(err)
	}
	return file
}

// freezingProxy forwards TCP to a target until frozen; then it swallows
// everything, as a dead network path does.
type freezingProxy struct {
	port   int
	ln     net.Listener
	frozen atomic.Bool
	mu     sync.Mutex
	conns  []net.Conn
	wg     sync.WaitGroup
}

func newFreezingProxy(t *testing.T, target string) *freezingProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &freezingProxy{port: ln.Addr().(*net.TCPAddr).Port, ln: ln}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, u)
			p.mu.Unlock()
			p.wg.Add(2)
			go p.copy(u, c)
			go p.copy(c, u)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		p.mu.Lock()
		for _, c := range p.conns {
			c.Close()
		}
		p.mu.Unlock()
		p.wg.Wait()
	})
	return p
}

func (p *freezingProxy) copy(dst, src net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !p.frozen.Load() {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (p *freezingProxy) freeze() { p.frozen.Store(true) }

// dropAll closes every proxied connection; new ones are still accepted.
func (p *freezingProxy) dropAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
}

// TestE2EStopWithOpenConnection stops sshd while a client is connected:
// Stop must not wait for the connection's own sshd process, and a new
// connection must then fail.
func TestE2EStopWithOpenConnection(t *testing.T) {
	srv := sshtest.Start(t, sshtest.Options{})
	c, err := sshx.Dial(ctxFor(t, 30*time.Second), srv.Config())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	stopped := make(chan struct{})
	go func() { srv.Stop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(15 * time.Second):
		t.Fatal("Stop waits for an open connection")
	}
	if _, err := sshx.Dial(ctxFor(t, 10*time.Second), srv.Config()); err == nil {
		t.Fatal("Dial succeeded after Stop")
	}
}
