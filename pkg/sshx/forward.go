package sshx

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
)

// Tunnel is a local port forward: every connection accepted on its local
// address is carried over SSH to a remote address, as the host sees it.
// It stays up until Close, whatever happens to the SSH connection under
// it: each new local connection takes the live connection at the time.
type Tunnel struct {
	ln     net.Listener
	remote string
	client func(ctx context.Context) (*Client, error)

	ctx    context.Context // ends at Close
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	conns   map[net.Conn]struct{}
	lastErr error
	once    sync.Once
}

// Forward opens a tunnel from localAddr (such as "127.0.0.1:0") to
// remoteAddr on cfg's host, over the pool's connection. ctx bounds setting
// it up, including the first connection to the host; the tunnel outlives
// ctx until Close.
func (p *Pool) Forward(ctx context.Context, cfg Config, localAddr, remoteAddr string) (*Tunnel, error) {
	return forward(ctx, func(ctx context.Context) (*Client, error) { return p.Get(ctx, cfg) }, localAddr, remoteAddr)
}

// Forward opens a tunnel from localAddr to remoteAddr over c, as
// [Pool.Forward] does. It ends working when c closes.
func (c *Client) Forward(ctx context.Context, localAddr, remoteAddr string) (*Tunnel, error) {
	return forward(ctx, func(context.Context) (*Client, error) {
		if !c.Alive() {
			return nil, ErrClosed
		}
		return c, nil
	}, localAddr, remoteAddr)
}

func forward(ctx context.Context, client func(context.Context) (*Client, error), localAddr, remoteAddr string) (*Tunnel, error) {
	if _, _, err := net.SplitHostPort(remoteAddr); err != nil {
		return nil, fmt.Errorf("forwarding to %q: %w", remoteAddr, err)
	}
	if _, err := client(ctx); err != nil {
		return nil, fmt.Errorf("forwarding to %s: %w", remoteAddr, err)
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", localAddr)
	if err != nil {
		return nil, fmt.Errorf("forwarding to %s: listening: %w", remoteAddr, err)
	}
	tctx, cancel := context.WithCancel(context.Background())
	t := &Tunnel{ln: ln, remote: remoteAddr, client: client, ctx: tctx, cancel: cancel, conns: map[net.Conn]struct{}{}}
	t.wg.Add(1)
	go t.accept()
	return t, nil
}

// Addr returns the local address connections are accepted on.
func (t *Tunnel) Addr() net.Addr { return t.ln.Addr() }

// Remote returns the address forwarded to, as the host sees it.
func (t *Tunnel) Remote() string { return t.remote }

// Err returns the last error met carrying a connection, if any: the
// tunnel itself keeps accepting.
func (t *Tunnel) Err() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.lastErr
}

// Done returns a channel closed when the tunnel is closed.
func (t *Tunnel) Done() <-chan struct{} { return t.ctx.Done() }

func (t *Tunnel) accept() {
	defer t.wg.Done()
	for {
		lc, err := t.ln.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				t.setErr(fmt.Errorf("accepting: %w", err))
			}
			return
		}
		if !t.track(lc) {
			_ = lc.Close()
			return
		}
		t.wg.Add(1)
		go t.carry(lc)
	}
}

func (t *Tunnel) carry(lc net.Conn) {
	defer t.wg.Done()
	defer t.untrack(lc)
	defer lc.Close()
	c, err := t.client(t.ctx)
	if err != nil {
		t.setErr(err)
		return
	}
	rc, err := c.DialContext(t.ctx, t.remote)
	if err != nil {
		t.setErr(err)
		return
	}
	if !t.track(rc) {
		_ = rc.Close()
		return
	}
	defer t.untrack(rc)
	defer rc.Close()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); pipe(rc, lc) }()
	go func() { defer wg.Done(); pipe(lc, rc) }()
	wg.Wait()
}

// pipe copies src to dst, then half-closes dst so the other side sees
// EOF. On an error both are closed, which ends the other direction too.
func pipe(dst, src net.Conn) {
	if _, err := io.Copy(dst, src); err != nil {
		_ = dst.Close()
		_ = src.Close()
		return
	}
	if cw, ok := dst.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	} else {
		_ = dst.Close()
	}
}

func (t *Tunnel) track(c net.Conn) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ctx.Err() != nil {
		return false
	}
	t.conns[c] = struct{}{}
	return true
}

func (t *Tunnel) untrack(c net.Conn) {
	t.mu.Lock()
	delete(t.conns, c)
	t.mu.Unlock()
}

func (t *Tunnel) setErr(err error) {
	t.mu.Lock()
	t.lastErr = err
	t.mu.Unlock()
}

// Close stops accepting, closes every carried connection and waits for
// the tunnel's goroutines. It does not close the SSH connection.
func (t *Tunnel) Close() error {
	var err error
	t.once.Do(func() {
		t.mu.Lock()
		t.cancel()
		conns := make([]net.Conn, 0, len(t.conns))
		for c := range t.conns {
			conns = append(conns, c)
		}
		t.mu.Unlock()
		err = t.ln.Close()
		for _, c := range conns {
			_ = c.Close()
		}
		t.wg.Wait()
	})
	return err
}
