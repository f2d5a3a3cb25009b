package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/event"
)

// Gateways calls every gateway as one consumer: calls alternate between
// them, and a call that cannot reach one (a connection error, a timeout)
// goes at once to the next with the same arguments, a create with the
// same Idempotency-Key, so a retry never makes a second sandbox.
type Gateways struct {
	clients []*api.Client
	mu      sync.Mutex
	next    int
	// Attempt bounds one attempt; Budget all the attempts of one call.
	Attempt, Budget time.Duration
}

// NewGateways returns a client of every base URL with token.
func NewGateways(urls []string, token string, hc *http.Client) *Gateways {
	g := &Gateways{Attempt: 15 * time.Second, Budget: 90 * time.Second}
	for _, u := range urls {
		g.clients = append(g.clients, api.NewClient(u, token, hc))
	}
	return g
}

// Call runs fn against the gateways, starting with the next in turn,
// until it succeeds, fails for good, or the budget is spent. A connection
// error or a timeout moves to the next gateway at once; a 409 (the same
// Idempotency-Key still in progress), 5xx, or a status retry accepts
// (e.g. a 404 just after a create) retries after a short, growing pause.
// It returns how many attempts went to another gateway after a
// connection error.
func (g *Gateways) Call(ctx context.Context, retry func(status int) bool, fn func(context.Context, *api.Client) error) (failovers int, err error) {
	g.mu.Lock()
	start := g.next
	g.next = (g.next + 1) % len(g.clients)
	g.mu.Unlock()
	deadline := time.Now().Add(g.Budget)
	pause := 250 * time.Millisecond
	for i := 0; ; i++ {
		c := g.clients[(start+i)%len(g.clients)]
		actx, cancel := context.WithTimeout(ctx, g.Attempt)
		err = fn(actx, c)
		cancel()
		if err == nil || ctx.Err() != nil {
			return failovers, err
		}
		status := api.StatusOf(err)
		switch {
		case status == 0:
			failovers++
			if i%len(g.clients) != len(g.clients)-1 {
				continue // the other gateway, now
			}
		case status == http.StatusConflict || status >= 500 || (retry != nil && retry(status)):
		default:
			return failovers, err
		}
		if !time.Now().Add(pause).Before(deadline) {
			return failovers, fmt.Errorf("after %d attempts: %w", i+1, err)
		}
		if err := sleepCtx(ctx, pause); err != nil {
			return failovers, err
		}
		pause = min(pause*2, 4*time.Second)
	}
}

// sleepCtx waits d or until ctx ends.
func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// Lifecycle is one sandbox the load asked for and what became of it.
type Lifecycle struct {
	N        int
	Profile  string
	Consumer string
	// Key is the create's Idempotency-Key.
	Key string
	// ID is the sandbox, once a create was accepted.
	ID string
	// Ready is true once the sandbox was seen ready; Last is the last
	// state seen.
	Ready bool
	Last  event.State
	// DestroyAccepted is true once a destroy was answered 202.
	DestroyAccepted bool
	// Err is the first step that went wrong, if any.
	Err       string
	Failovers int
	Start     time.Time
	End       time.Time
}

// Accepted reports whether a create was accepted.
func (l *Lifecycle) Accepted() bool { return l.ID != "" }

// Op is one client step of a lifecycle, for the effect of a fault: when it
// ended, how long it took, whether it failed, and how many attempts
// it moved to another gateway.
type Op struct {
	At        time.Time
	Took      time.Duration
	Failed    bool
	Failovers int
}

// Load runs lifecycles of its profiles in turn at a steady rate with
// bounded concurrency.
type Load struct {
	// Profiles are run in turn, each with its consumer's gateways.
	Profiles []ProfileLoad
	// Interval between starts; Concurrency bounds the lifecycles at once.
	Interval    time.Duration
	Concurrency int
	// Min lifecycles are started, then more until Done is closed, up to Max.
	Min, Max int
	Done     <-chan struct{}
	// Until is when no lifecycle starts any more, whatever the count.
	Until time.Time
	// WaitReady and WaitGone bound waiting for ready and for a terminal state.
	WaitReady, WaitGone time.Duration
	// Labels go on every sandbox.
	Labels map[string]string

	mu   sync.Mutex
	ops  []Op
	runs []*Lifecycle
}

// ProfileLoad is a profile and the gateways of the consumer it runs as.
type ProfileLoad struct {
	Profile  string
	Consumer string
	TTL      string
	GW       *Gateways
}

// Run starts lifecycles until the count, Done or Until say stop, waits for
// those started, and returns them all in start order.
func (l *Load) Run(ctx context.Context) []*Lifecycle {
	sem := make(chan struct{}, l.Concurrency)
	var wg sync.WaitGroup
	tick := time.NewTicker(l.Interval)
	defer tick.Stop()
	done := false
loop:
	for n := 0; n < l.Max; n++ {
		select {
		case <-l.Done:
			done = true
		default:
		}
		if (n >= l.Min && done) || time.Now().After(l.Until) {
			break
		}
		select {
		case <-ctx.Done():
			break loop
		case <-tick.C:
		}
		select {
		case <-ctx.Done():
			break loop
		case sem <- struct{}{}:
		}
		p := l.Profiles[n%len(l.Profiles)]
		lc := &Lifecycle{N: n, Profile: p.Profile, Consumer: p.Consumer, Key: randomKey()}
		l.mu.Lock()
		l.runs = append(l.runs, lc)
		l.mu.Unlock()
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			l.lifecycle(ctx, p, lc)
		}()
	}
	wg.Wait()
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.runs
}

// Ops returns the client steps so far.
func (l *Load) Ops() []Op {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]Op(nil), l.ops...)
}

func (l *Load) record(start time.Time, err error, failovers int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.ops = append(l.ops, Op{At: time.Now(), Took: time.Since(start), Failed: err != nil, Failovers: failovers})
}

// lifecycle creates a sandbox, waits until it is ready (or failed, or
// ended), destroys it and waits until it is gone, recording each step.
func (l *Load) lifecycle(ctx context.Context, p ProfileLoad, lc *Lifecycle) {
	lc.Start = time.Now()
	defer func() { lc.End = time.Now() }()
	fail := func(step string, err error) {
		if lc.Err == "" {
			lc.Err = fmt.Sprintf("%s: %v", step, err)
		}
	}
	// Create.
	t := time.Now()
	req := api.CreateRequest{Profile: p.Profile, TTL: p.TTL, Labels: l.Labels}
	fo, err := p.GW.Call(ctx, nil, func(ctx context.Context, c *api.Client) error {
		s, err := c.Create(ctx, req, lc.Key)
		if err == nil {
			lc.ID, lc.Last = s.ID, s.State
		}
		return err
	})
	lc.Failovers += fo
	l.record(t, err, fo)
	if err != nil {
		fail("create", err)
		return
	}
	// Ready, failed or ended.
	t = time.Now()
	fo, err = l.await(ctx, p.GW, lc, l.WaitReady, func(s event.State) bool { return s.Rank() >= event.StateReady.Rank() })
	lc.Failovers += fo
	l.record(t, err, fo)
	if err != nil {
		fail("waiting for ready", err)
	}
	if lc.Last.Terminal() {
		return
	}
	// Destroy.
	t = time.Now()
	fo, err = p.GW.Call(ctx, func(status int) bool { return status == http.StatusNotFound }, func(ctx context.Context, c *api.Client) error {
		_, err := c.Destroy(ctx, lc.ID)
		return err
	})
	lc.Failovers += fo
	l.record(t, err, fo)
	if err != nil {
		fail("destroy", err)
		return
	}
	lc.DestroyAccepted = true
	t = time.Now()
	fo, err = l.await(ctx, p.GW, lc, l.WaitGone, event.State.Terminal)
	lc.Failovers += fo
	l.record(t, err, fo)
	if err != nil {
		fail("waiting for destroyed", err)
	}
}

// await polls the sandbox of lc until its state satisfies until, within d.
func (l *Load) await(ctx context.Context, gw *Gateways, lc *Lifecycle, d time.Duration, until func(event.State) bool) (int, error) {
	failovers := 0
	err := poll(ctx, d, 250*time.Millisecond, func() error {
		var s *api.Sandbox
		fo, err := gw.Call(ctx, func(status int) bool { return status == http.StatusNotFound }, func(ctx context.Context, c *api.Client) error {
			var err error
			s, err = c.Get(ctx, lc.ID)
			return err
		})
		failovers += fo
		if err != nil {
			return err
		}
		lc.Last = s.State
		if s.State == event.StateReady || s.ReadyAt != (time.Time{}) {
			lc.Ready = true
		}
		if !until(s.State) {
			return fmt.Errorf("sandbox %s is %s", lc.ID, s.State)
		}
		return nil
	})
	return failovers, err
}

// randomKey is a fresh Idempotency-Key.
func randomKey() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return "chaos-" + hex.EncodeToString(b)
}
