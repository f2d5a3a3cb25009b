package sshx

import (
	"context"
	"errors"
	"io"
	"sync"
)

// Pool keeps one connection per user@host:port and hands it to every
// caller for that target, dialling again when it has died. Its zero value
// is ready to use; Close it to close every connection.
type Pool struct {
	mu      sync.Mutex
	clients map[string]*Client
	dialing map[string]*dialCall
	closed  bool
}

type dialCall struct {
	done chan struct{}
	c    *Client
	err  error
}

// Get returns the live connection to cfg.Target, dialling one if there is
// none. Concurrent callers for one target share one dial. The first config
// that connects a target is the one its connection was made with.
func (p *Pool) Get(ctx context.Context, cfg Config) (*Client, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	key := cfg.Target.String()
	for {
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return nil, ErrClosed
		}
		if c := p.clients[key]; c != nil {
			if c.Alive() {
				p.mu.Unlock()
				return c, nil
			}
			delete(p.clients, key)
			p.mu.Unlock()
			_ = c.Close() // dead already: Close reaps its goroutines
			continue
		}
		if call := p.dialing[key]; call != nil {
			p.mu.Unlock()
			select {
			case <-call.done:
			case <-ctx.Done():
				return nil, &ConnError{Target: key, Op: "connecting", Err: ctx.Err()}
			}
			if call.err != nil && ctx.Err() == nil &&
				(errors.Is(call.err, context.Canceled) || errors.Is(call.err, context.DeadlineExceeded)) {
				continue // the dialling caller's context ended, not ours: dial ourselves
			}
			if call.err != nil {
				return nil, call.err
			}
			continue // take it from the map, checking it is alive
		}
		call := &dialCall{done: make(chan struct{})}
		if p.dialing == nil {
			p.dialing = make(map[string]*dialCall)
		}
		p.dialing[key] = call
		p.mu.Unlock()

		call.c, call.err = Dial(ctx, cfg)

		p.mu.Lock()
		delete(p.dialing, key)
		if call.err == nil {
			if p.closed {
				p.mu.Unlock()
				_ = call.c.Close()
				close(call.done)
				return nil, ErrClosed
			}
			if p.clients == nil {
				p.clients = make(map[string]*Client)
			}
			p.clients[key] = call.c
		}
		p.mu.Unlock()
		close(call.done)
		return call.c, call.err
	}
}

// Run runs argv on cfg's host over the pooled connection, as
// [Client.Run] does. When the pooled connection turns out dead before the
// command started, it is dropped and the command tried once more on a new
// one; a command that started is never run twice, and a live connection
// that refused a session is kept.
func (p *Pool) Run(ctx context.Context, cfg Config, argv ...string) ([]byte, error) {
	var out []byte
	err := p.do(ctx, cfg, func(c *Client) error {
		var err error
		out, err = c.Run(ctx, argv...)
		return err
	})
	return out, err
}

// RunCmd runs cmd on cfg's host, as [Pool.Run] does. The retry is safe
// for a Stdin too: a command that never started has read none of it.
func (p *Pool) RunCmd(ctx context.Context, cfg Config, cmd Cmd) error {
	return p.do(ctx, cfg, func(c *Client) error { return c.RunCmd(ctx, cmd) })
}

func (p *Pool) do(ctx context.Context, cfg Config, f func(*Client) error) error {
	for attempt := 0; ; attempt++ {
		c, err := p.Get(ctx, cfg)
		if err != nil {
			return err
		}
		err = f(c)
		var ce *ConnError
		if attempt > 0 || !errors.As(err, &ce) || ctx.Err() != nil {
			return err
		}
		if c.Alive() && !errors.Is(err, io.EOF) {
			return err // the connection is up; the server refused the session
		}
		p.drop(c)
	}
}

// drop closes c and forgets it, if it is still the pooled connection.
func (p *Pool) drop(c *Client) {
	key := c.cfg.Target.String()
	p.mu.Lock()
	if p.clients[key] == c {
		delete(p.clients, key)
	}
	p.mu.Unlock()
	_ = c.Close()
}

// Len returns how many connections the pool holds.
func (p *Pool) Len() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.clients)
}

// Close closes every connection. Get fails with [ErrClosed] afterwards.
func (p *Pool) Close() error {
	p.mu.Lock()
	p.closed = true
	clients := p.clients
	p.clients = nil
	p.mu.Unlock()
	var errs []error
	for _, c := range clients {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}
