// Package workers is worker liveness: the heartbeat each provisioner worker
// keeps in the workers key-value bucket, the helpers that write and read it,
// and a watching cache of the live workers.
//
// A heartbeat lives under the key "<extension>.<worker>". The bucket's TTL
// removes the heartbeat of a worker that stopped beating, so the bucket only
// ever holds workers seen within one TTL.
//
// The package knows the key-value bucket and nothing else. It must never
// import the bus or a service.
package workers

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/event"
)

// Heartbeat is one worker's liveness record.
type Heartbeat struct {
	// Extension is the extension whose commands the worker consumes.
	Extension string `json:"extension"`
	// Worker identifies the worker within its extension; see [ID].
	Worker string `json:"worker"`
	// Host is the machine the worker runs on.
	Host string `json:"host"`
	// PID is the worker's process id on Host.
	PID int `json:"pid"`
	// StartedAt is when the worker started.
	StartedAt time.Time `json:"started_at"`
	// Concurrency is how many commands the worker handles at once.
	Concurrency int `json:"concurrency"`
	// InFlight is how many commands it was handling when it beat.
	InFlight int `json:"in_flight"`
	// SeenAt is when the worker last beat.
	SeenAt time.Time `json:"seen_at"`
}

// Key is the bucket key of a worker's heartbeat: "<extension>.<worker>".
func Key(extension, worker string) string { return extension + "." + worker }

// Key is the bucket key of h.
func (h Heartbeat) Key() string { return Key(h.Extension, h.Worker) }

// Validate reports what is wrong with h: both names must be
// [event.ValidName] (so the key has exactly two tokens) and the counts must
// not be negative.
func (h Heartbeat) Validate() error {
	var errs []error
	if err := event.CheckName("extension name", h.Extension); err != nil {
		errs = append(errs, err)
	}
	if err := event.CheckName("worker id", h.Worker); err != nil {
		errs = append(errs, err)
	}
	if h.Concurrency < 0 || h.InFlight < 0 || h.PID < 0 {
		errs = append(errs, errors.New("pid, concurrency and in_flight must not be negative"))
	}
	return errors.Join(errs...)
}

// ID returns a worker id for a process: the host name lower-cased, with
// every character outside [a-z0-9_-] replaced by '-', then "-<pid>",
// shortened to a valid name.
func ID(host string, pid int) string {
	suffix := "-" + strconv.Itoa(pid)
	var b strings.Builder
	for _, c := range strings.ToLower(host) {
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '_', c == '-':
			b.WriteRune(c)
		default:
			b.WriteByte('-')
		}
	}
	base := strings.TrimLeft(b.String(), "-_")
	if base == "" {
		base = "worker"
	}
	if limit := 63 - len(suffix); len(base) > limit {
		base = base[:limit]
	}
	return base + suffix
}

// Put writes h to kv, the workers bucket, stamping SeenAt with the current
// time when it is zero. Workers call it every beat, well within the
// bucket's TTL.
func Put(ctx context.Context, kv jetstream.KeyValue, h Heartbeat) error {
	if err := h.Validate(); err != nil {
		return fmt.Errorf("putting heartbeat: %w", err)
	}
	if h.SeenAt.IsZero() {
		h.SeenAt = time.Now().UTC()
	}
	b, err := json.Marshal(h)
	if err != nil {
		return fmt.Errorf("encoding heartbeat: %w", err)
	}
	if _, err := kv.Put(ctx, h.Key(), b); err != nil {
		return fmt.Errorf("putting heartbeat %s: %w", h.Key(), err)
	}
	return nil
}

// Delete removes a worker's heartbeat from kv, for a clean shutdown. A
// heartbeat that is already gone is not an error.
func Delete(ctx context.Context, kv jetstream.KeyValue, extension, worker string) error {
	if err := kv.Delete(ctx, Key(extension, worker)); err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
		return fmt.Errorf("deleting heartbeat %s: %w", Key(extension, worker), err)
	}
	return nil
}

// Decode reads a heartbeat from a bucket value, strictly.
func Decode(b []byte) (Heartbeat, error) {
	var h Heartbeat
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&h); err != nil {
		return Heartbeat{}, fmt.Errorf("decoding heartbeat: %w", err)
	}
	return h, nil
}

// List returns the heartbeats in kv, sorted by extension then worker. The
// bucket's TTL has already dropped dead workers. A value that does not
// decode is skipped and reported in the joined error, along with the
// heartbeats that did decode.
func List(ctx context.Context, kv jetstream.KeyValue) ([]Heartbeat, error) {
	lister, err := kv.ListKeys(ctx)
	if err != nil {
		if errors.Is(err, jetstream.ErrNoKeysFound) {
			return nil, nil
		}
		return nil, fmt.Errorf("listing workers: %w", err)
	}
	var (
		out  []Heartbeat
		errs []error
	)
	for k := range lister.Keys() {
		e, err := kv.Get(ctx, k)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			continue // expired or deleted since listed
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("reading heartbeat %s: %w", k, err))
			continue
		}
		h, err := Decode(e.Value())
		if err != nil {
			errs = append(errs, fmt.Errorf("heartbeat %s: %w", k, err))
			continue
		}
		out = append(out, h)
	}
	sortHeartbeats(out)
	return out, errors.Join(errs...)
}

func sortHeartbeats(hs []Heartbeat) {
	slices.SortFunc(hs, func(a, b Heartbeat) int { return strings.Compare(a.Key(), b.Key()) })
}

// Cache is a live view of the workers bucket.
type Cache struct {
	ttl time.Duration
	now func() time.Time

	mu    sync.Mutex
	beats map[string]entry
	ready chan struct{}
	once  sync.Once
	done  chan struct{}
}

type entry struct {
	hb     Heartbeat
	stored time.Time
}

// Watch starts a cache of kv that follows every change until ctx ends;
// [Cache.Done] is closed then. Wait for [Cache.Ready] before reading.
//
// A heartbeat that ages past the bucket's TTL is removed from the bucket
// without a delete marker, so the cache also drops every heartbeat stored
// longer than one TTL ago.
func Watch(ctx context.Context, kv jetstream.KeyValue) (*Cache, error) {
	st, err := kv.Status(ctx)
	if err != nil {
		return nil, fmt.Errorf("reading workers bucket status: %w", err)
	}
	w, err := kv.WatchAll(ctx)
	if err != nil {
		return nil, fmt.Errorf("watching workers: %w", err)
	}
	c := &Cache{
		ttl:   st.TTL(),
		now:   time.Now,
		beats: map[string]entry{},
		ready: make(chan struct{}),
		done:  make(chan struct{}),
	}
	go c.run(ctx, w)
	return c, nil
}

func (c *Cache) run(ctx context.Context, w jetstream.KeyWatcher) {
	defer close(c.done)
	defer func() { _ = w.Stop() }()
	for {
		select {
		case <-ctx.Done():
			return
		case e, ok := <-w.Updates():
			if !ok {
				return
			}
			if e == nil { // end of the initial values
				c.once.Do(func() { close(c.ready) })
				continue
			}
			c.apply(e)
		}
	}
}

func (c *Cache) apply(e jetstream.KeyValueEntry) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e.Operation() != jetstream.KeyValuePut {
		delete(c.beats, e.Key())
		return
	}
	h, err := Decode(e.Value())
	if err != nil || h.Key() != e.Key() {
		delete(c.beats, e.Key())
		return
	}
	c.beats[e.Key()] = entry{hb: h, stored: e.Created()}
}

// Ready is closed once the cache holds the bucket's contents.
func (c *Cache) Ready() <-chan struct{} { return c.ready }

// Done is closed when the cache stops following the bucket.
func (c *Cache) Done() <-chan struct{} { return c.done }

// List returns the live heartbeats, sorted by extension then worker. With
// extension set, only that extension's workers.
func (c *Cache) List(extension string) []Heartbeat {
	now := c.now()
	c.mu.Lock()
	out := make([]Heartbeat, 0, len(c.beats))
	for k, e := range c.beats {
		if c.ttl > 0 && now.Sub(e.stored) > c.ttl {
			delete(c.beats, k)
			continue
		}
		if extension != "" && e.hb.Extension != extension {
			continue
		}
		out = append(out, e.hb)
	}
	c.mu.Unlock()
	sortHeartbeats(out)
	return out
}
