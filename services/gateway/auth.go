package gateway

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/apikey"
)

// caller is the authenticated client of a request.
type caller struct {
	Consumer string
	// Scopes are what the caller may do; without any, its Role's (the
	// first version's keys, and request events on the bus, whose caller
	// is a consumer).
	Scopes []apikey.Scope
	Role   string
	// KeyID names the API key, when the caller has one.
	KeyID string
}

// can reports whether the caller may do what scope s covers.
func (c caller) can(s apikey.Scope) bool {
	return apikey.Key{Scopes: c.Scopes, Role: c.Role}.Allows(s)
}

// admin reports whether the caller sees every consumer's sandboxes.
func (c caller) admin() bool { return c.can(apikey.ScopeAdmin) }

// owns reports whether the caller may see and destroy a sandbox of
// consumer.
func (c caller) owns(consumer string) bool { return c.admin() || c.Consumer == consumer }

// authed authenticates the bearer token of a request and checks its key
// has scope before h runs: without a token, or with one that maps to no
// key or to an expired one, the answer is 401; without the scope, 403.
func (g *Gateway) authed(scope apikey.Scope, h func(http.ResponseWriter, *http.Request, caller)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		token, ok := bearer(r.Header.Get("Authorization"))
		if !ok {
			g.writeProblem(w, r, newProblem(http.StatusUnauthorized, "missing bearer token: send Authorization: Bearer <api key>"))
			return
		}
		k, err := g.keys.lookup(r.Context(), token)
		switch {
		case errors.Is(err, apikey.ErrExpired):
			g.writeProblem(w, r, newProblem(http.StatusUnauthorized, "api key expired"))
			return
		case errors.Is(err, apikey.ErrUnknown):
			g.writeProblem(w, r, newProblem(http.StatusUnauthorized, "unknown api key"))
			return
		case err != nil:
			g.log.WarnContext(r.Context(), "checking api key", "err", err)
			g.writeProblem(w, r, newProblem(http.StatusServiceUnavailable, "cannot check api keys right now"))
			return
		}
		c := caller{Consumer: k.Consumer, Scopes: k.Scopes, Role: k.Role, KeyID: k.ID}
		if !c.can(scope) {
			g.writeProblem(w, r, newProblem(http.StatusForbidden, fmt.Sprintf("this api key does not have the %s scope (it has %s)", scope, scopeList(k.Grants()))))
			return
		}
		h(w, r, c)
	})
}

// scopeList names scopes for a message.
func scopeList(scopes []apikey.Scope) string {
	if len(scopes) == 0 {
		return "none"
	}
	names := make([]string, len(scopes))
	for i, s := range scopes {
		names[i] = string(s)
	}
	return strings.Join(names, ", ")
}

// bearer extracts the token of an Authorization header of the Bearer
// scheme, exactly as RFC 6750 (section 2.1) writes it: the scheme in any
// case, one space, and a token68 (letters, digits and -._~+/, then any
// =). Anything else (two spaces, a tab, a second word) is no bearer token.
func bearer(h string) (string, bool) {
	scheme, token, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") || !isToken68(token) {
		return "", false
	}
	return token, true
}

// isToken68 reports whether s is an RFC 7235 token68.
func isToken68(s string) bool {
	i := 0
	for ; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("-._~+/", c) >= 0) {
			break
		}
	}
	if i == 0 {
		return false
	}
	for i < len(s) && s[i] == '=' {
		i++
	}
	return i == len(s)
}

// keyCache remembers successful key lookups for a while, keyed by the
// token's hash so no token is kept in memory. Failed lookups are not
// remembered: a key issued a moment ago works at once. A remembered key
// is forgotten at its expiry (an expired key never works), and at once
// when it is revoked through this gateway ([keyCache.forget]); revoked
// anywhere else, it keeps working here for at most ttl.
type keyCache struct {
	store *apikey.Store
	ttl   time.Duration
	size  int
	now   func() time.Time

	mu sync.Mutex
	m  map[string]cachedKey
}

type cachedKey struct {
	key apikey.Key
	// until is when the entry is forgotten: ttl after the lookup, or the
	// key's expiry if that is sooner.
	until time.Time
}

func newKeyCache(store *apikey.Store, ttl time.Duration, size int, now func() time.Time) *keyCache {
	return &keyCache{store: store, ttl: ttl, size: size, now: now, m: make(map[string]cachedKey)}
}

// lookup returns the key of token, from memory when a lookup succeeded
// less than ttl ago. The error wraps apikey.ErrUnknown for unknown
// tokens, apikey.ErrExpired for a key that expired by the cache's clock
// or the store's.
func (c *keyCache) lookup(ctx context.Context, token string) (apikey.Key, error) {
	h := apikey.Hash(token)
	now := c.now()
	c.mu.Lock()
	e, ok := c.m[h]
	c.mu.Unlock()
	if ok && now.Before(e.until) {
		return e.key, nil
	}
	k, err := c.store.Lookup(ctx, token)
	if err != nil {
		return apikey.Key{}, err
	}
	if k.Expired(now) {
		return apikey.Key{}, apikey.ErrExpired
	}
	until := now.Add(c.ttl)
	if !k.ExpiresAt.IsZero() && k.ExpiresAt.Before(until) {
		until = k.ExpiresAt
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.m[h]; !ok && len(c.m) >= c.size {
		c.evict(now)
	}
	c.m[h] = cachedKey{key: k, until: until}
	return k, nil
}

// forget drops the key with id, revoked.
func (c *keyCache) forget(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for h, e := range c.m {
		if e.key.ID == id {
			delete(c.m, h)
		}
	}
}

// evict drops expired entries, and when none has expired, an arbitrary
// tenth of the cache, so an insert never waits on more than one sweep.
func (c *keyCache) evict(now time.Time) {
	for h, e := range c.m {
		if !now.Before(e.until) {
			delete(c.m, h)
		}
	}
	if len(c.m) < c.size {
		return
	}
	drop := max(1, c.size/10)
	for h := range c.m {
		if drop == 0 {
			break
		}
		delete(c.m, h)
		drop--
	}
}
