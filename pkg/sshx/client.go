package sshx

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/agent"
)

// Client is one SSH connection. Its methods are safe for concurrent use:
// every command runs in its own session. Close it when done; a [Pool]
// closes the clients it hands out.
type Client struct {
	cfg      Config
	conn     *ssh.Client
	sessions chan struct{} // one token per running command

	done      chan struct{} // closed when the connection has ended
	closeOnce sync.Once
	wg        sync.WaitGroup
}

// ConnError is a failure to reach the host or to open a session on it:
// the remote command, if any, never started.
type ConnError struct {
	// Target is user@host:port.
	Target string
	// Op is what failed: "connecting", "opening session", "starting command".
	Op  string
	Err error
}

// Error says which host and which step.
func (e *ConnError) Error() string { return "ssh " + e.Target + ": " + e.Op + ": " + e.Err.Error() }

// Unwrap returns the cause: a [*HostKeyError], a context error, a network
// error.
func (e *ConnError) Unwrap() error { return e.Err }

// Dial connects to cfg.Target, verifies its host key against
// cfg.KnownHostsFile and authenticates. It honours ctx and
// cfg.ConnectTimeout, whichever ends first; a host whose key the file does
// not vouch for fails with a [*HostKeyError] before any credential is sent.
func Dial(ctx context.Context, cfg Config) (*Client, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	target := cfg.Target.String()
	fail := func(err error) (*Client, error) {
		return nil, &ConnError{Target: target, Op: "connecting", Err: err}
	}
	if err := ctx.Err(); err != nil {
		return fail(err)
	}
	addr := cfg.Target.Addr()
	hk, err := loadHostKeys(cfg.KnownHostsFile, addr)
	if err != nil {
		return fail(err)
	}
	auth, closeAuth, err := authMethod(cfg)
	if err != nil {
		return fail(err)
	}
	defer closeAuth()
	ccfg := &ssh.ClientConfig{
		User:              cfg.Target.User,
		Auth:              []ssh.AuthMethod{auth},
		HostKeyCallback:   hk.callback,
		HostKeyAlgorithms: hk.algorithms,
		Timeout:           cfg.ConnectTimeout,
	}

	dctx, cancel := context.WithTimeoutCause(ctx, cfg.ConnectTimeout,
		fmt.Errorf("connect timeout %s exceeded", cfg.ConnectTimeout))
	defer cancel()
	var d net.Dialer
	nc, err := d.DialContext(dctx, "tcp", addr)
	if err != nil {
		if dctx.Err() != nil {
			return fail(dialCause(ctx, dctx))
		}
		return fail(err)
	}
	// The handshake honours dctx: a deadline on the socket, and the socket
	// closed if dctx ends first.
	if dl, ok := dctx.Deadline(); ok {
		_ = nc.SetDeadline(dl)
	}
	stop := context.AfterFunc(dctx, func() { _ = nc.Close() })
	sc, chans, reqs, err := ssh.NewClientConn(nc, addr, ccfg)
	if !stop() {
		if err == nil {
			_ = sc.Close()
		}
		return fail(dialCause(ctx, dctx))
	}
	if err != nil {
		_ = nc.Close()
		var hke *HostKeyError
		switch {
		case errors.As(err, &hke):
			return fail(hke)
		case errors.Is(err, os.ErrDeadlineExceeded):
			if dl, ok := ctx.Deadline(); ctx.Err() != nil || ok && !dl.After(time.Now().Add(time.Millisecond)) {
				return fail(context.DeadlineExceeded) // the caller's deadline, not ours
			}
			return fail(fmt.Errorf("connect timeout %s exceeded during the handshake: %w", cfg.ConnectTimeout, err))
		}
		return fail(err)
	}
	_ = nc.SetDeadline(time.Time{})

	c := &Client{
		cfg:      cfg,
		conn:     ssh.NewClient(sc, chans, reqs),
		sessions: make(chan struct{}, cfg.MaxSessions),
		done:     make(chan struct{}),
	}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		_ = c.conn.Wait()
		close(c.done)
	}()
	if cfg.KeepAliveInterval > 0 {
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			c.keepalive()
		}()
	}
	return c, nil
}

// dialCause is ctx's error when the caller's context ended, else the
// connect-timeout cause of dctx.
func dialCause(ctx, dctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return context.Cause(dctx)
}

// authMethod is one publickey method offering the identity file's key and
// then the agent's keys. The returned func closes the agent connection,
// once the handshake is over.
func authMethod(cfg Config) (ssh.AuthMethod, func(), error) {
	var signers []ssh.Signer
	if cfg.IdentityFile != "" {
		pem, err := os.ReadFile(cfg.IdentityFile)
		if err != nil {
			return nil, nil, fmt.Errorf("reading identity file: %w", err)
		}
		s, err := ssh.ParsePrivateKey(pem)
		if err != nil {
			var pme *ssh.PassphraseMissingError
			if errors.As(err, &pme) {
				return nil, nil, fmt.Errorf("identity file %s is encrypted: use an unencrypted key or the ssh-agent", cfg.IdentityFile)
			}
			return nil, nil, fmt.Errorf("parsing identity file %s: %w", cfg.IdentityFile, err)
		}
		signers = append(signers, s)
	}
	closeAuth := func() {}
	var ag agent.ExtendedAgent
	if cfg.Agent {
		sock := cfg.AgentSocket
		if sock == "" {
			sock = os.Getenv("SSH_AUTH_SOCK")
		}
		if sock == "" {
			return nil, nil, errors.New("ssh-agent authentication requested but SSH_AUTH_SOCK is not set")
		}
		conn, err := net.Dial("unix", sock)
		if err != nil {
			return nil, nil, fmt.Errorf("connecting to ssh-agent: %w", err)
		}
		closeAuth = func() { _ = conn.Close() }
		ag = agent.NewClient(conn)
	}
	return ssh.PublicKeysCallback(func() ([]ssh.Signer, error) {
		if ag == nil {
			return signers, nil
		}
		as, err := ag.Signers()
		if err != nil {
			return nil, fmt.Errorf("listing ssh-agent keys: %w", err)
		}
		return append(signers[:len(signers):len(signers)], as...), nil
	}), closeAuth, nil
}

// keepalive probes the connection every interval and closes it when
// KeepAliveMax probes in a row go unanswered, so that a dead host is
// noticed by the pool instead of hanging the next command.
func (c *Client) keepalive() {
	t := time.NewTicker(c.cfg.KeepAliveInterval)
	defer t.Stop()
	missed := 0
	for {
		select {
		case <-c.done:
			return
		case <-t.C:
		}
		reply := make(chan error, 1)
		c.wg.Add(1) // the counter is above zero: keepalive itself holds one
		go func() {
			defer c.wg.Done()
			_, _, err := c.conn.SendRequest("keepalive@openssh.com", true, nil)
			reply <- err
		}()
		select {
		case <-c.done:
			return
		case err := <-reply:
			if err != nil {
				_ = c.conn.Close()
				return
			}
			missed = 0
		case <-t.C:
			missed++
			if missed >= c.cfg.KeepAliveMax {
				_ = c.conn.Close()
				return
			}
		}
	}
}

// Target returns user@host:port.
func (c *Client) Target() Target { return c.cfg.Target }

// Alive reports whether the connection is still up, as far as the client
// knows.
func (c *Client) Alive() bool {
	select {
	case <-c.done:
		return false
	default:
		return true
	}
}

// Done returns a channel closed when the connection ends.
func (c *Client) Done() <-chan struct{} { return c.done }

// Close closes the connection and waits for the client's goroutines.
func (c *Client) Close() error {
	var err error
	c.closeOnce.Do(func() {
		err = c.conn.Close()
		c.wg.Wait()
		if errors.Is(err, net.ErrClosed) || errors.Is(err, io.EOF) {
			err = nil
		}
	})
	return err
}

// Cmd is one remote command.
type Cmd struct {
	// Argv is the program and its arguments. Each is quoted with [Quote]:
	// the remote shell sees exactly these words.
	Argv []string
	// Stdin, when set, is the command's standard input. A command without
	// one runs under a watchdog (a constant sh script) that stops it when
	// ctx ends or the connection drops; a command with one is only sent
	// a signal, which OpenSSH ignores for root, so keep such commands short.
	Stdin io.Reader
	// Stdout and Stderr, when set, receive the command's output. The last
	// few KiB of stderr also go into an [*ExitError].
	Stdout, Stderr io.Writer
}

// MaxOutput bounds the standard output [Client.Run] collects.
const MaxOutput = 4 << 20

// ExitError is a remote command that ran and failed.
type ExitError struct {
	// Command is the program and, when it has one, its first argument
	// (later arguments are left out: they may carry credentials).
	Command string
	// Status is the exit status; -1 when the command ended without one
	// (killed by a signal, or the connection dropped).
	Status int
	// Signal is the signal that ended the command, if any.
	Signal string
	// Stderr is the end of the command's standard error.
	Stderr string
}

// Error names the command, its status and what it said.
func (e *ExitError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "remote %q ", e.Command)
	switch {
	case e.Signal != "":
		fmt.Fprintf(&b, "killed by signal %s", e.Signal)
	case e.Status < 0:
		b.WriteString("ended without an exit status")
	default:
		fmt.Fprintf(&b, "exited with status %d", e.Status)
	}
	if s := strings.TrimSpace(e.Stderr); s != "" {
		b.WriteString(": ")
		b.WriteString(s)
	}
	return b.String()
}

// Run runs argv on the host and returns its standard output. Each argument
// is quoted, so none can be read by the remote shell as anything but one
// word. A command that fails returns an [*ExitError]; a command that never
// started returns a [*ConnError]. When ctx ends first the command is
// stopped (see [Cmd]) and ctx's error returned.
func (c *Client) Run(ctx context.Context, argv ...string) ([]byte, error) {
	var out capped
	err := c.RunCmd(ctx, Cmd{Argv: argv, Stdout: &out})
	if err == nil && out.over {
		err = fmt.Errorf("running %s: output exceeds %d bytes", commandName(argv), MaxOutput)
	}
	return out.b.Bytes(), err
}

// watchdog runs "$@" with its standard input closed and watches the
// session's standard input instead: when the client closes it (its ctx
// ended) or the connection drops, the command gets SIGTERM, then SIGKILL
// after stopGrace. OpenSSH does not deliver "signal" requests to sessions
// of root, so closing stdin is the one way to stop a remote command that
// works for every user. The script is a constant: the command reaches it
// only as quoted positional arguments.
const watchdog = `exec 3<&0
"$@" </dev/null 3<&- &
pid=$!
{ while read -r line <&3; do :; done; kill -TERM "$pid"; sleep 5; kill -KILL "$pid"; } >/dev/null 2>&1 &
wd=$!
exec 3<&-
wait "$pid"
st=$?
kill "$wd" 2>/dev/null
exit "$st"`

// stopGrace bounds how long a cancelled command is waited for before its
// session is abandoned (the command then ends with the connection).
const stopGrace = 10 * time.Second

// RunCmd runs cmd on the host, as [Client.Run] does, in a client span
// ("ssh <program>") naming the program, the target and the outcome (exit
// status, signal): never the arguments, which may carry credentials, nor
// anything the command wrote.
func (c *Client) RunCmd(ctx context.Context, cmd Cmd) error {
	ctx, span := c.startRun(ctx, cmd.Argv)
	err := c.runCmd(ctx, cmd)
	endRun(span, err)
	return err
}

// startRun starts the span of one remote command.
func (c *Client) startRun(ctx context.Context, argv []string) (context.Context, trace.Span) {
	program := ""
	if len(argv) > 0 {
		program = argv[0]
	}
	t := c.cfg.Target
	return otel.Tracer("github.com/sand-boxer/sandboxer/pkg/sshx").Start(ctx, "ssh "+program,
		trace.WithSpanKind(trace.SpanKindClient),
		trace.WithAttributes(
			attribute.String("process.executable.name", program),
			attribute.Int("process.args_count", len(argv)),
			attribute.String("server.address", t.Host),
			attribute.Int("server.port", t.Port),
			attribute.String("sandboxer.ssh.user", t.User),
		))
}

// endRun records how a remote command ended and ends its span. Only what
// carries no output of the command is recorded.
func endRun(span trace.Span, err error) {
	defer span.End()
	var ee *ExitError
	var ce *ConnError
	switch {
	case err == nil:
		span.SetAttributes(attribute.Int("process.exit.code", 0))
	case errors.As(err, &ee):
		span.SetAttributes(attribute.Int("process.exit.code", ee.Status))
		what := "exit status " + strconv.Itoa(ee.Status)
		if ee.Signal != "" {
			span.SetAttributes(attribute.String("sandboxer.ssh.signal", ee.Signal))
			what = "killed by signal " + ee.Signal
		}
		span.SetStatus(codes.Error, what)
	case errors.As(err, &ce):
		span.SetStatus(codes.Error, ce.Error())
	case errors.Is(err, context.DeadlineExceeded):
		span.SetStatus(codes.Error, "stopped: deadline exceeded")
	case errors.Is(err, context.Canceled):
		span.SetStatus(codes.Error, "stopped: cancelled")
	default:
		span.SetStatus(codes.Error, "command failed")
	}
}

func (c *Client) runCmd(ctx context.Context, cmd Cmd) error {
	name := commandName(cmd.Argv)
	argv := cmd.Argv
	if cmd.Stdin == nil && len(argv) > 0 {
		argv = append([]string{"sh", "-c", watchdog, "sandboxer-run"}, argv...)
	}
	line, err := Join(argv)
	if err != nil {
		return fmt.Errorf("building remote command: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("running %s: %w", name, err)
	}
	target := c.cfg.Target.String()
	select {
	case c.sessions <- struct{}{}:
		defer func() { <-c.sessions }()
	case <-ctx.Done():
		return fmt.Errorf("running %s: waiting for a session: %w", name, ctx.Err())
	case <-c.done:
		return &ConnError{Target: target, Op: "opening session", Err: ErrClosed}
	}
	sess, err := c.conn.NewSession()
	if err != nil {
		return &ConnError{Target: target, Op: "opening session", Err: err}
	}
	defer sess.Close()
	var tail tailBuffer
	var stdin io.WriteCloser
	if cmd.Stdin != nil {
		sess.Stdin = cmd.Stdin
	} else if stdin, err = sess.StdinPipe(); err != nil {
		return &ConnError{Target: target, Op: "opening session", Err: err}
	}
	sess.Stdout = cmd.Stdout
	if sess.Stdout == nil {
		sess.Stdout = io.Discard
	}
	sess.Stderr = &tail
	if cmd.Stderr != nil {
		sess.Stderr = io.MultiWriter(cmd.Stderr, &tail)
	}
	if err := sess.Start(line); err != nil {
		return &ConnError{Target: target, Op: "starting command", Err: err}
	}
	waitc := make(chan error, 1)
	go func() { waitc <- sess.Wait() }()
	select {
	case err = <-waitc:
	case <-ctx.Done():
		_ = sess.Signal(ssh.SIGTERM) // honoured for sessions of users other than root
		if stdin != nil {
			_ = stdin.Close() // the watchdog stops the command
		}
		t := time.NewTimer(stopGrace)
		defer t.Stop()
		select {
		case <-waitc:
		case <-t.C:
			// Abandon the session: Wait returns when the command ends
			// or the connection closes.
			_ = sess.Close()
		}
		return fmt.Errorf("running %s: %w", name, ctx.Err())
	}
	if err == nil {
		return nil
	}
	var ee *ssh.ExitError
	var em *ssh.ExitMissingError
	switch {
	case errors.As(err, &ee):
		return &ExitError{Command: name, Status: ee.ExitStatus(), Signal: ee.Signal(), Stderr: tail.String()}
	case errors.As(err, &em):
		return &ExitError{Command: name, Status: -1, Stderr: tail.String()}
	default:
		return fmt.Errorf("running %s: %w", name, err)
	}
}

// DialContext opens a TCP connection from the host to addr, as the host
// sees it: the remote end of a port forward.
func (c *Client) DialContext(ctx context.Context, addr string) (net.Conn, error) {
	conn, err := c.conn.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("ssh %s: dialing %s: %w", c.cfg.Target, addr, err)
	}
	return conn, nil
}

func commandName(argv []string) string {
	switch len(argv) {
	case 0:
		return ""
	case 1:
		return argv[0]
	default:
		return argv[0] + " " + argv[1]
	}
}

// capped keeps up to MaxOutput bytes.
type capped struct {
	b    bytes.Buffer
	over bool
}

func (c *capped) Write(p []byte) (int, error) {
	if room := MaxOutput - c.b.Len(); len(p) > room {
		c.over = true
		c.b.Write(p[:max(room, 0)])
		return len(p), nil
	}
	return c.b.Write(p)
}

// tailBuffer keeps the last tailSize bytes written to it.
type tailBuffer struct {
	mu sync.Mutex
	b  []byte
}

const tailSize = 4 << 10

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > tailSize {
		t.b = append(t.b[:0:0], t.b[len(t.b)-tailSize:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}
