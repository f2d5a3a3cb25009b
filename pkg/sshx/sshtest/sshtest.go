// Package sshtest runs a real OpenSSH server for tests: /usr/sbin/sshd on a
// random loopback port, with a host key, a client key, an authorized_keys
// and a known_hosts file generated in the test's temporary directory. It
// never touches the system's sshd or its configuration. A missing sshd
// fails the test: it is never skipped.
//
// It also runs a real ssh-agent holding a key ([StartAgent]).
package sshtest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"

	"github.com/sand-boxer/sandboxer/pkg/sshx"
)

// SSHD is the OpenSSH server binary the tests run.
const SSHD = "/usr/sbin/sshd"

// Options tune a server. The zero value is a server for the current user
// with public-key authentication only.
type Options struct {
	// ExtraConfig lines are appended to the generated sshd_config.
	ExtraConfig []string
	// StartTimeout bounds waiting for sshd to listen. Default 20s.
	StartTimeout time.Duration
}

// Server is a running sshd. Its fields are what a test needs to connect.
type Server struct {
	// Host and Port are where it listens (127.0.0.1 and a random port).
	Host string
	Port int
	// User is the user it lets in: the current user.
	User string
	// Dir holds its config, keys and log.
	Dir string
	// KnownHostsFile lists the server's host key for Host:Port.
	KnownHostsFile string
	// IdentityFile is an unencrypted client private key the server accepts.
	IdentityFile string
	// HostKey and ClientKey are the public halves of the two keys.
	HostKey   ssh.PublicKey
	ClientKey ssh.PublicKey

	cmd     *exec.Cmd
	logPipe *os.File
	exited  chan struct{}
	logDone chan struct{}
	log     *logBuffer
	stop    sync.Once
}

// Start starts an sshd and stops it in t.Cleanup. It fails t when sshd is
// missing or does not come up.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	if _, err := os.Stat(SSHD); err != nil {
		t.Fatalf("sshtest: %s not found (%v): install openssh-server (.ci/install-e2e.sh)", SSHD, err)
	}
	if opts.StartTimeout <= 0 {
		opts.StartTimeout = 20 * time.Second
	}
	u, err := user.Current()
	if err != nil {
		t.Fatalf("sshtest: current user: %v", err)
	}
	if u.Uid == "0" {
		// sshd running as root insists on its privilege-separation
		// directory, which systemd makes when it starts the service.
		if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
			t.Fatalf("sshtest: creating /run/sshd: %v", err)
		}
	}
	dir := t.TempDir()
	s := &Server{Host: "127.0.0.1", User: u.Username, Dir: dir}
	hostKeyFile := filepath.Join(dir, "ssh_host_ed25519_key")
	s.HostKey = WriteKey(t, hostKeyFile)
	s.IdentityFile = filepath.Join(dir, "id_ed25519")
	s.ClientKey = WriteKey(t, s.IdentityFile)
	authKeys := filepath.Join(dir, "authorized_keys")
	if err := os.WriteFile(authKeys, ssh.MarshalAuthorizedKey(s.ClientKey), 0o600); err != nil {
		t.Fatalf("sshtest: %v", err)
	}

	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		port := freePort(t)
		err := s.start(t, port, hostKeyFile, authKeys, opts)
		if err == nil {
			s.KnownHostsFile = filepath.Join(dir, "known_hosts")
			WriteKnownHosts(t, s.KnownHostsFile, s.Addr(), s.HostKey)
			t.Cleanup(s.Stop)
			return s
		}
		lastErr = err
	}
	t.Fatalf("sshtest: starting sshd: %v", lastErr)
	return nil
}

func (s *Server) start(t testing.TB, port int, hostKeyFile, authKeys string, opts Options) error {
	cfgFile := filepath.Join(s.Dir, "sshd_config")
	lines := []string{
		"ListenAddress " + net.JoinHostPort(s.Host, strconv.Itoa(port)),
		"HostKey " + hostKeyFile,
		"PidFile none",
		"AuthorizedKeysFile " + authKeys,
		"AllowUsers " + s.User,
		"PubkeyAuthentication yes",
		"PasswordAuthentication no",
		"KbdInteractiveAuthentication no",
		"PermitRootLogin prohibit-password",
		"UsePAM no",
		"StrictModes no",
		"LogLevel VERBOSE",
		"AllowTcpForwarding local",
		"AllowAgentForwarding no",
		"X11Forwarding no",
		"PrintMotd no",
		"MaxSessions 16",
		"MaxStartups 64:30:128",
	}
	lines = append(lines, opts.ExtraConfig...)
	if err := os.WriteFile(cfgFile, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		t.Fatalf("sshtest: %v", err)
	}
	cmd := exec.Command(SSHD, "-D", "-e", "-f", cfgFile)
	// sshd's per-connection processes inherit its stderr and outlive it
	// while their connections last: read the log from a pipe of our own,
	// so that waiting for sshd does not wait for them.
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatalf("sshtest: %v", err)
	}
	cmd.Stderr = w
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	err = cmd.Start()
	w.Close()
	if err != nil {
		r.Close()
		return fmt.Errorf("running %s: %w", SSHD, err)
	}
	s.cmd, s.logPipe, s.exited, s.logDone, s.log = cmd, r, make(chan struct{}), make(chan struct{}), newLogBuffer()
	go func() {
		defer close(s.logDone)
		s.log.readFrom(r)
	}()
	go func() {
		_ = cmd.Wait()
		close(s.exited)
	}()
	s.Port = port
	ctx, cancel := context.WithTimeout(context.Background(), opts.StartTimeout)
	defer cancel()
	want := fmt.Sprintf("Server listening on %s port %d", s.Host, port)
	if err := s.log.waitFor(ctx, s.exited, func(l string) bool { return strings.Contains(l, want) }); err != nil {
		s.Stop()
		return fmt.Errorf("%w; sshd log:\n%s", err, s.log.String())
	}
	return nil
}

// Addr returns host:port.
func (s *Server) Addr() string { return net.JoinHostPort(s.Host, strconv.Itoa(s.Port)) }

// Target returns user@host:port.
func (s *Server) Target() sshx.Target { return sshx.Target{User: s.User, Host: s.Host, Port: s.Port} }

// Config returns what sshx needs to connect with the identity file.
func (s *Server) Config() sshx.Config {
	return sshx.Config{Target: s.Target(), KnownHostsFile: s.KnownHostsFile, IdentityFile: s.IdentityFile}
}

// Connections counts the TCP connections sshd has accepted so far.
func (s *Server) Connections() int {
	return s.log.count(func(l string) bool { return strings.HasPrefix(l, "Connection from ") })
}

// Log returns what sshd has logged so far.
func (s *Server) Log() string { return s.log.String() }

// WaitLog waits until sshd logs a line containing substr, or ctx ends.
func (s *Server) WaitLog(ctx context.Context, substr string) error {
	return s.log.waitFor(ctx, s.exited, func(l string) bool { return strings.Contains(l, substr) })
}

// Stop stops sshd, waits for it and stops reading its log. Connections
// already open keep their own sshd process until they close (their log
// lines are no longer read). Stop is idempotent.
func (s *Server) Stop() {
	s.stop.Do(func() {
		if s.cmd == nil || s.cmd.Process == nil {
			return
		}
		_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGTERM)
		t := time.NewTimer(10 * time.Second)
		defer t.Stop()
		select {
		case <-s.exited:
		case <-t.C:
			_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
			<-s.exited
		}
		_ = s.logPipe.Close()
		<-s.logDone
	})
}

// WriteKey writes a new ed25519 private key to file (mode 0600) and its
// public key to file.pub, and returns the public key.
func WriteKey(t testing.TB, file string) ssh.PublicKey {
	t.Helper()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatalf("sshtest: %v", err)
	}
	block, err := ssh.MarshalPrivateKey(priv, "sshtest")
	if err != nil {
		t.Fatalf("sshtest: %v", err)
	}
	if err := os.WriteFile(file, pem.EncodeToMemory(block), 0o600); err != nil {
		t.Fatalf("sshtest: %v", err)
	}
	sp, err := ssh.NewPublicKey(pub)
	if err != nil {
		t.Fatalf("sshtest: %v", err)
	}
	if err := os.WriteFile(file+".pub", ssh.MarshalAuthorizedKey(sp), 0o644); err != nil {
		t.Fatalf("sshtest: %v", err)
	}
	return sp
}

// WriteKnownHosts writes a known_hosts file listing key for addr
// (host:port).
func WriteKnownHosts(t testing.TB, file, addr string, key ssh.PublicKey) {
	t.Helper()
	line := knownhosts.Line([]string{knownhosts.Normalize(addr)}, key) + "\n"
	if err := os.WriteFile(file, []byte(line), 0o644); err != nil {
		t.Fatalf("sshtest: %v", err)
	}
}

// ChangedKnownHosts writes a known_hosts file in a new temporary directory
// that lists another key for the server: what a client sees of a host
// whose key changed. It returns the file.
func (s *Server) ChangedKnownHosts(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	other := WriteKey(t, filepath.Join(dir, "other_host_key"))
	file := filepath.Join(dir, "known_hosts")
	WriteKnownHosts(t, file, s.Addr(), other)
	return file
}

// EmptyKnownHosts writes a known_hosts file that knows no host.
func EmptyKnownHosts(t testing.TB) string {
	t.Helper()
	file := filepath.Join(t.TempDir(), "known_hosts")
	if err := os.WriteFile(file, []byte("# knows no host\n"), 0o644); err != nil {
		t.Fatalf("sshtest: %v", err)
	}
	return file
}

// StartAgent runs a real ssh-agent on a socket in a temporary directory,
// adds the private keys of keyFiles to it, stops it in t.Cleanup, and
// returns its socket.
func StartAgent(t testing.TB, keyFiles ...string) string {
	t.Helper()
	agentBin, err := exec.LookPath("ssh-agent")
	if err != nil {
		t.Fatalf("sshtest: ssh-agent not found (%v): install openssh-client", err)
	}
	addBin, err := exec.LookPath("ssh-add")
	if err != nil {
		t.Fatalf("sshtest: ssh-add not found (%v): install openssh-client", err)
	}
	// Unix socket paths are short: keep it out of a long TempDir path.
	dir, err := os.MkdirTemp("", "sshtest-agent-")
	if err != nil {
		t.Fatalf("sshtest: %v", err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	sock := filepath.Join(dir, "agent.sock")
	cmd := exec.Command(agentBin, "-D", "-a", sock)
	out := newLogBuffer()
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatalf("sshtest: %v", err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("sshtest: starting ssh-agent: %v", err)
	}
	readDone, exited := make(chan struct{}), make(chan struct{})
	go func() { defer close(readDone); out.readFrom(stdout) }()
	go func() { <-readDone; _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		<-exited
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// ssh-agent -D prints the SSH_AUTH_SOCK line once it listens.
	if err := out.waitFor(ctx, exited, func(l string) bool { return strings.Contains(l, "SSH_AUTH_SOCK") }); err != nil {
		t.Fatalf("sshtest: ssh-agent did not start: %v: %s", err, out.String())
	}
	for _, k := range keyFiles {
		add := exec.Command(addBin, "-q", k)
		add.Env = append(os.Environ(), "SSH_AUTH_SOCK="+sock)
		if b, err := add.CombinedOutput(); err != nil {
			t.Fatalf("sshtest: ssh-add %s: %v: %s", k, err, b)
		}
	}
	return sock
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("sshtest: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// logBuffer collects lines and wakes waiters on each new one.
type logBuffer struct {
	mu      sync.Mutex
	lines   []string
	changed chan struct{}
}

func newLogBuffer() *logBuffer { return &logBuffer{changed: make(chan struct{})} }

func (b *logBuffer) readFrom(r io.Reader) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		b.mu.Lock()
		b.lines = append(b.lines, sc.Text())
		close(b.changed)
		b.changed = make(chan struct{})
		b.mu.Unlock()
	}
}

func (b *logBuffer) count(match func(string) bool) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := 0
	for _, l := range b.lines {
		if match(l) {
			n++
		}
	}
	return n
}

// waitFor waits until a line matches, the process exits or ctx ends.
func (b *logBuffer) waitFor(ctx context.Context, exited <-chan struct{}, match func(string) bool) error {
	seen := 0
	for {
		b.mu.Lock()
		for ; seen < len(b.lines); seen++ {
			if match(b.lines[seen]) {
				b.mu.Unlock()
				return nil
			}
		}
		changed := b.changed
		b.mu.Unlock()
		select {
		case <-changed:
		case <-exited:
			if b.count(match) > 0 {
				return nil
			}
			return errors.New("process exited")
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	var buf bytes.Buffer
	for _, l := range b.lines {
		buf.WriteString(l)
		buf.WriteByte('\n')
	}
	return buf.String()
}
