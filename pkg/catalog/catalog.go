// Package catalog keeps the validated catalog of extensions and profiles in
// the catalog key-value bucket: the registry publishes it, every other
// service reads it from there through a watching cache, so a worker on
// another machine needs no copy of the YAML files.
package catalog

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// Key prefixes in the catalog bucket.
const (
	prefixExtension = "extension."
	prefixProfile   = "profile."
)

// Publish writes c to kv: one key per extension and profile, and removes
// the keys of entries c no longer has. Unchanged entries are not rewritten,
// so publishing the same catalog twice changes nothing.
func Publish(ctx context.Context, kv jetstream.KeyValue, c *extension.Catalog) error {
	want := map[string][]byte{}
	for name, m := range c.Extensions {
		b, err := json.Marshal(m)
		if err != nil {
			return fmt.Errorf("encoding extension %s: %w", name, err)
		}
		want[prefixExtension+name] = b
	}
	for slug, p := range c.Profiles {
		b, err := json.Marshal(p)
		if err != nil {
			return fmt.Errorf("encoding profile %s: %w", slug, err)
		}
		want[prefixProfile+slug] = b
	}
	lister, err := kv.ListKeys(ctx)
	if err != nil && !errors.Is(err, jetstream.ErrNoKeysFound) {
		return fmt.Errorf("listing catalog: %w", err)
	}
	if lister != nil {
		for k := range lister.Keys() {
			if _, ok := want[k]; !ok {
				if err := kv.Delete(ctx, k); err != nil {
					return fmt.Errorf("removing catalog entry %s: %w", k, err)
				}
			}
		}
	}
	for k, b := range want {
		if e, err := kv.Get(ctx, k); err == nil && string(e.Value()) == string(b) {
			continue
		}
		if _, err := kv.Put(ctx, k, b); err != nil {
			return fmt.Errorf("publishing catalog entry %s: %w", k, err)
		}
	}
	return nil
}

// Cache is a live copy of the catalog bucket.
type Cache struct {
	mu      sync.Mutex
	cur     *extension.Catalog
	changed chan struct{} // closed and replaced at every change
	ready   chan struct{}
	once    sync.Once
}

// Watch starts a cache of kv that follows every change until ctx ends.
// Wait for [Cache.Ready] before reading.
func Watch(ctx context.Context, kv jetstream.KeyValue) (*Cache, error) {
	w, err := kv.WatchAll(ctx)
	if err != nil {
		return nil, fmt.Errorf("watching catalog: %w", err)
	}
	c := &Cache{
		cur:     &extension.Catalog{Extensions: map[string]*extension.Manifest{}, Profiles: map[string]*extension.Profile{}},
		changed: make(chan struct{}),
		ready:   make(chan struct{}),
	}
	go c.run(ctx, w)
	return c, nil
}

func (c *Cache) run(ctx context.Context, w jetstream.KeyWatcher) {
	defer func() { _ = w.Stop() }()
	work := &extension.Catalog{Extensions: map[string]*extension.Manifest{}, Profiles: map[string]*extension.Profile{}}
	initial := true
	for {
		select {
		case <-ctx.Done():
			return
		case e, ok := <-w.Updates():
			if !ok {
				return
			}
			if e == nil { // end of the initial values
				initial = false
				c.publish(work)
				continue
			}
			apply(work, e)
			if !initial {
				c.publish(work)
			}
		}
	}
}

func apply(work *extension.Catalog, e jetstream.KeyValueEntry) {
	applyKey(work, e.Key(), e.Operation() != jetstream.KeyValuePut, e.Value())
}

func applyKey(work *extension.Catalog, k string, del bool, value []byte) {
	switch {
	case strings.HasPrefix(k, prefixExtension):
		name := strings.TrimPrefix(k, prefixExtension)
		if del {
			delete(work.Extensions, name)
			return
		}
		var m extension.Manifest
		if json.Unmarshal(value, &m) == nil {
			work.Extensions[name] = &m
		}
	case strings.HasPrefix(k, prefixProfile):
		slug := strings.TrimPrefix(k, prefixProfile)
		if del {
			delete(work.Profiles, slug)
			return
		}
		var p extension.Profile
		if json.Unmarshal(value, &p) == nil {
			work.Profiles[slug] = &p
		}
	}
}

// publish stores a copy of work, so readers never see a map in change.
func (c *Cache) publish(work *extension.Catalog) {
	cp := &extension.Catalog{Extensions: make(map[string]*extension.Manifest, len(work.Extensions)), Profiles: make(map[string]*extension.Profile, len(work.Profiles))}
	for k, v := range work.Extensions {
		cp.Extensions[k] = v
	}
	for k, v := range work.Profiles {
		cp.Profiles[k] = v
	}
	c.mu.Lock()
	c.cur = cp
	close(c.changed)
	c.changed = make(chan struct{})
	c.mu.Unlock()
	c.once.Do(func() { close(c.ready) })
}

// followRefresh is how often a followed catalog is read again without a
// change seen: the bound on how long a replica's lag can hide one.
const followRefresh = 5 * time.Second

// Follow starts a cache of the catalog bucket that needs no consumer, for
// workers, which may not create one: it reads the bucket with one batched
// direct get, and again whenever a plain subscription to the bucket's
// subjects sees a change. It follows until ctx ends. Wait for
// [Cache.Ready] before reading.
func Follow(ctx context.Context, nc *nats.Conn) (*Cache, error) {
	changed := make(chan struct{}, 1)
	sub, err := nc.Subscribe("$KV."+bus.BucketCatalog+".>", func(*nats.Msg) {
		select {
		case changed <- struct{}{}:
		default:
		}
	})
	if err != nil {
		return nil, fmt.Errorf("following catalog: %w", err)
	}
	c := &Cache{
		cur:     &extension.Catalog{Extensions: map[string]*extension.Manifest{}, Profiles: map[string]*extension.Profile{}},
		changed: make(chan struct{}),
		ready:   make(chan struct{}),
	}
	go func() {
		defer func() { _ = sub.Unsubscribe() }()
		retry := time.NewTimer(0)
		defer retry.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-changed:
			case <-retry.C:
			}
			if err := c.reload(ctx, nc); err != nil && ctx.Err() == nil {
				retry.Reset(time.Second) // a bus that is not there yet
			} else {
				// On a cluster the read may come from a replica that has
				// not applied the change yet: read again a little later,
				// and every so often anyway.
				retry.Reset(followRefresh)
			}
		}
	}()
	return c, nil
}

// reload reads the whole bucket and publishes it.
func (c *Cache) reload(ctx context.Context, nc *nats.Conn) error {
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	msgs, _, err := bus.LastPerSubject(rctx, nc, bus.KVStream(bus.BucketCatalog), []string{"$KV." + bus.BucketCatalog + ".>"})
	if err != nil {
		return err
	}
	work := &extension.Catalog{Extensions: map[string]*extension.Manifest{}, Profiles: map[string]*extension.Profile{}}
	for _, m := range msgs {
		op := m.Header.Get("KV-Operation")
		applyKey(work, strings.TrimPrefix(m.Subject, "$KV."+bus.BucketCatalog+"."), op == "DEL" || op == "PURGE", m.Data)
	}
	c.publish(work)
	return nil
}

// Ready is closed once the cache holds the bucket's contents.
func (c *Cache) Ready() <-chan struct{} { return c.ready }

// Current returns the catalog as last seen. Callers must not modify it.
func (c *Cache) Current() *extension.Catalog {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cur
}

// WaitFor blocks until the catalog has extension name or ctx ends.
func (c *Cache) WaitFor(ctx context.Context, name string) (*extension.Manifest, error) {
	for {
		c.mu.Lock()
		cur, changed := c.cur, c.changed
		c.mu.Unlock()
		if m, err := cur.Extension(name); err == nil {
			return m, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for extension %s in catalog: %w", name, ctx.Err())
		case <-changed:
		}
	}
}
