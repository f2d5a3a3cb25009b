// Package apikey issues and checks the API keys of the gateway. A key is a
// random bearer token shown once; the apikeys bucket keeps only its
// SHA-256, mapped to what the key may do: the consumer it acts for, its
// scopes, its expiry, and an id to list and revoke it by.
//
// A key of the first version has a role instead of scopes (consumer: every
// scope but admin; admin: admin) and no id; it keeps working, and is
// listed under an id derived from its bucket key.
package apikey

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base32"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/event"
)

// Prefix starts every token, so leaked keys are easy to find.
const Prefix = "sbx_"

// Roles of the first version's keys, and what [Store.Issue] takes.
const (
	RoleAdmin    = "admin"
	RoleConsumer = "consumer"
)

// Scope is something a key may do.
type Scope string

// Scopes.
const (
	// ScopeRead reads the consumer's sandboxes and their events, the
	// profiles, the extensions and the worker pools.
	ScopeRead Scope = "read"
	// ScopeCreate asks for sandboxes.
	ScopeCreate Scope = "create"
	// ScopeDestroy destroys the consumer's sandboxes.
	ScopeDestroy Scope = "destroy"
	// ScopeCredits reads the consumer's own credits: balance, ledger and
	// usage.
	ScopeCredits Scope = "credits"
	// ScopeAdmin is everything, for any consumer: granting credit and
	// managing keys included.
	ScopeAdmin Scope = "admin"
)

// Scopes are every scope, in order.
var Scopes = []Scope{ScopeRead, ScopeCreate, ScopeDestroy, ScopeCredits, ScopeAdmin}

// ConsumerScopes are the scopes of a consumer's key: every scope but
// admin. A key issued without scopes gets them.
var ConsumerScopes = []Scope{ScopeRead, ScopeCreate, ScopeDestroy, ScopeCredits}

// ParseScope checks s is a scope.
func ParseScope(s string) (Scope, error) {
	if slices.Contains(Scopes, Scope(s)) {
		return Scope(s), nil
	}
	names := make([]string, len(Scopes))
	for i, sc := range Scopes {
		names[i] = string(sc)
	}
	return "", fmt.Errorf("unknown scope %q (known: %s)", s, strings.Join(names, ", "))
}

// Key is what a token stands for.
type Key struct {
	// ID names the key for listing and revoking; it is not derived from
	// the token.
	ID       string  `json:"id,omitempty"`
	Consumer string  `json:"consumer"`
	Scopes   []Scope `json:"scopes,omitempty"`
	// Role is the first version's: a key without scopes has the role's
	// ([Key.Grants]).
	Role      string    `json:"role,omitempty"`
	Name      string    `json:"name,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	// ExpiresAt, when set, is when the key stops working.
	ExpiresAt time.Time `json:"expires_at,omitzero"`
}

// Grants returns the scopes of k: its own, or those of its role for a
// key of the first version (consumer: [ConsumerScopes]; admin: admin).
func (k Key) Grants() []Scope {
	switch {
	case len(k.Scopes) > 0:
		return k.Scopes
	case k.Role == RoleAdmin:
		return []Scope{ScopeAdmin}
	case k.Role == RoleConsumer:
		return ConsumerScopes
	}
	return nil
}

// Allows reports whether k may do what scope s covers: admin allows
// everything.
func (k Key) Allows(s Scope) bool {
	g := k.Grants()
	return slices.Contains(g, ScopeAdmin) || slices.Contains(g, s)
}

// Expired reports whether k no longer works at now.
func (k Key) Expired(now time.Time) bool { return !k.ExpiresAt.IsZero() && !now.Before(k.ExpiresAt) }

// ErrInvalidSpec is wrapped by IssueKey's refusals of what it was asked
// for.
var ErrInvalidSpec = errors.New("invalid api key request")

// Errors of lookups.
var (
	// ErrUnknown is returned for a token that maps to no key, or to a
	// key that expired ([ErrExpired] wraps it).
	ErrUnknown = errors.New("unknown api key")
	// ErrExpired is returned for a token whose key expired.
	ErrExpired = fmt.Errorf("%w: expired", ErrUnknown)
)

// Hash returns the bucket key of a token: hex SHA-256. Tokens carry 160
// random bits, so a fast hash is enough.
func Hash(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

// legacyID is the id a key of the first version, which has none, is
// listed and revoked under: k and the first 16 hex digits of its bucket
// key (64 bits of a hash of 160 random bits: they tell nothing of the
// token).
func legacyID(hash string) string { return "k" + hash[:16] }

// Store keeps keys in the apikeys bucket. Issuing and revoking write the
// bucket; looking up, listing and revoking by id read it by key and with
// direct gets, which need no consumer.
type Store struct {
	kv jetstream.KeyValue
	nc *nats.Conn
}

// NewStore returns a store on kv. Listing keys and revoking them by id
// need the bucket's connection: [Store.WithConn].
func NewStore(kv jetstream.KeyValue) *Store { return &Store{kv: kv} }

// WithConn returns the store reading the bucket's stream with direct gets
// on nc, which lists keys and revokes them by id.
func (s *Store) WithConn(nc *nats.Conn) *Store { return &Store{kv: s.kv, nc: nc} }

// Spec says what a key to issue may do.
type Spec struct {
	Consumer string
	// Scopes default to [ConsumerScopes].
	Scopes []Scope
	Name   string
	// ExpiresAt, when set, is when the key stops working; it must be
	// after now.
	ExpiresAt time.Time
}

// Issue creates a key for consumer with role (consumer or admin) and
// returns its token, which is not stored anywhere and cannot be
// recovered.
func (s *Store) Issue(ctx context.Context, consumer, role, name string) (string, error) {
	var scopes []Scope
	switch role {
	case RoleAdmin:
		scopes = []Scope{ScopeAdmin}
	case RoleConsumer:
		scopes = ConsumerScopes
	default:
		return "", fmt.Errorf("unknown role %q (known: %s, %s)", role, RoleAdmin, RoleConsumer)
	}
	tok, _, err := s.IssueKey(ctx, Spec{Consumer: consumer, Scopes: scopes, Name: name})
	return tok, err
}

// MaxNameLen bounds a key's name.
const MaxNameLen = 200

// IssueKey creates a key as spec says and returns its token, which is not
// stored anywhere and cannot be recovered, and the key.
func (s *Store) IssueKey(ctx context.Context, spec Spec) (string, Key, error) {
	if err := event.CheckName("consumer", spec.Consumer); err != nil {
		return "", Key{}, fmt.Errorf("%w: %w", ErrInvalidSpec, err)
	}
	scopes := spec.Scopes
	if len(scopes) == 0 {
		scopes = ConsumerScopes
	}
	for _, sc := range scopes {
		if _, err := ParseScope(string(sc)); err != nil {
			return "", Key{}, fmt.Errorf("%w: %w", ErrInvalidSpec, err)
		}
	}
	if len(spec.Name) > MaxNameLen || strings.ContainsFunc(spec.Name, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return "", Key{}, fmt.Errorf("%w: name: want at most %d printable characters", ErrInvalidSpec, MaxNameLen)
	}
	now := time.Now().UTC()
	if !spec.ExpiresAt.IsZero() && !spec.ExpiresAt.After(now) {
		return "", Key{}, fmt.Errorf("%w: expiry %s is past", ErrInvalidSpec, spec.ExpiresAt.Format(time.RFC3339))
	}
	token, err := random(20)
	if err != nil {
		return "", Key{}, err
	}
	token = Prefix + token
	id, err := random(10)
	if err != nil {
		return "", Key{}, err
	}
	k := Key{
		ID: "k" + id, Consumer: spec.Consumer, Scopes: dedupe(scopes), Name: spec.Name, CreatedAt: now,
		ExpiresAt: spec.ExpiresAt.UTC(),
	}
	v, _ := json.Marshal(k)
	if _, err := s.kv.Create(ctx, Hash(token), v); err != nil {
		return "", Key{}, fmt.Errorf("storing api key: %w", err)
	}
	return token, k, nil
}

// random returns n random bytes in lower-case base32.
func random(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("generating api key: %w", err)
	}
	return strings.ToLower(base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(b)), nil
}

func dedupe(scopes []Scope) []Scope {
	out := make([]Scope, 0, len(scopes))
	for _, sc := range Scopes { // in order
		if slices.Contains(scopes, sc) {
			out = append(out, sc)
		}
	}
	return out
}

// Lookup returns the key a token stands for. A key that expired is
// [ErrExpired].
func (s *Store) Lookup(ctx context.Context, token string) (Key, error) {
	if !strings.HasPrefix(token, Prefix) {
		return Key{}, ErrUnknown
	}
	h := Hash(token)
	e, err := s.kv.Get(ctx, h)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return Key{}, ErrUnknown
	}
	if err != nil {
		return Key{}, fmt.Errorf("looking up api key: %w", err)
	}
	k, err := decode(h, e.Value())
	if err != nil {
		return Key{}, err
	}
	if k.Expired(time.Now()) {
		return k, ErrExpired
	}
	return k, nil
}

func decode(hash string, b []byte) (Key, error) {
	var k Key
	if err := json.Unmarshal(b, &k); err != nil {
		return Key{}, fmt.Errorf("decoding api key: %w", err)
	}
	if k.ID == "" {
		k.ID = legacyID(hash)
	}
	return k, nil
}

// Revoke removes a token's key.
func (s *Store) Revoke(ctx context.Context, token string) error {
	if err := s.kv.Purge(ctx, Hash(token)); err != nil {
		return fmt.Errorf("revoking api key: %w", err)
	}
	return nil
}

// RevokeID removes the key with id and returns it; no such key is
// [ErrUnknown].
func (s *Store) RevokeID(ctx context.Context, id string) (Key, error) {
	var (
		found Key
		hash  string
	)
	err := s.scan(ctx, func(h string, k Key) bool {
		if k.ID == id {
			found, hash = k, h
			return false
		}
		return true
	})
	if err != nil {
		return Key{}, err
	}
	if hash == "" {
		return Key{}, fmt.Errorf("%w: no key %q", ErrUnknown, id)
	}
	if err := s.kv.Purge(ctx, hash); err != nil {
		return Key{}, fmt.Errorf("revoking api key %s: %w", id, err)
	}
	return found, nil
}

// List returns the keys of consumer, or every key when consumer is empty,
// by consumer then creation. Expired keys are listed (until revoked).
func (s *Store) List(ctx context.Context, consumer string) ([]Key, error) {
	var out []Key
	err := s.scan(ctx, func(_ string, k Key) bool {
		if consumer == "" || k.Consumer == consumer {
			out = append(out, k)
		}
		return true
	})
	if err != nil {
		return nil, err
	}
	slices.SortFunc(out, func(a, b Key) int {
		if c := strings.Compare(a.Consumer, b.Consumer); c != 0 {
			return c
		}
		if c := a.CreatedAt.Compare(b.CreatedAt); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out, nil
}

// scanBatch is how many keys one direct get of a scan returns at most.
const scanBatch = 256

// scan calls fn with every key of the bucket, in stream order, until fn
// returns false. It reads the bucket's stream with batched direct gets
// (the bucket keeps one message per key): no consumer.
func (s *Store) scan(ctx context.Context, fn func(hash string, k Key) bool) error {
	if s.nc == nil {
		return errors.New("listing api keys: the store has no connection (Store.WithConn)")
	}
	stream := "KV_" + s.kv.Bucket()
	prefix := "$KV." + s.kv.Bucket() + "."
	next := uint64(1)
	for {
		msgs, err := directBatch(ctx, s.nc, stream, prefix+">", next, scanBatch)
		if err != nil {
			return fmt.Errorf("listing api keys: %w", err)
		}
		for _, m := range msgs {
			next = m.seq + 1
			if op := m.header.Get("KV-Operation"); op == "DEL" || op == "PURGE" || len(m.data) == 0 {
				continue
			}
			h := strings.TrimPrefix(m.subject, prefix)
			k, err := decode(h, m.data)
			if err != nil {
				return err
			}
			if !fn(h, k) {
				return nil
			}
		}
		if len(msgs) < scanBatch {
			return nil
		}
	}
}

// stored is one message of a direct get.
type stored struct {
	subject string
	seq     uint64
	header  nats.Header
	data    []byte
}

// directBatch reads up to batch messages of stream on subjects matching
// filter from sequence from on, with one batched direct get.
func directBatch(ctx context.Context, nc *nats.Conn, stream, filter string, from uint64, batch int) ([]stored, error) {
	inbox := nc.NewInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		return nil, err
	}
	defer func() { _ = sub.Unsubscribe() }()
	req, _ := json.Marshal(struct {
		Seq    uint64 `json:"seq"`
		NextBy string `json:"next_by_subj"`
		Batch  int    `json:"batch"`
	}{from, filter, batch})
	if err := nc.PublishRequest("$JS.API.DIRECT.GET."+stream, inbox, req); err != nil {
		return nil, err
	}
	var out []stored
	for {
		msg, err := sub.NextMsgWithContext(ctx)
		if err != nil {
			return nil, err
		}
		switch st := msg.Header.Get("Status"); st {
		case "":
		case "204": // end of batch
			return out, nil
		case "404": // nothing at or after from
			return out, nil
		default:
			return nil, fmt.Errorf("server answered %s %s", st, msg.Header.Get("Description"))
		}
		var seq uint64
		if _, err := fmt.Sscan(msg.Header.Get("Nats-Sequence"), &seq); err != nil {
			return nil, fmt.Errorf("direct get answer without a sequence: %w", err)
		}
		out = append(out, stored{subject: msg.Header.Get("Nats-Subject"), seq: seq, header: msg.Header, data: msg.Data})
		if len(out) == batch {
			// The server ends a full batch with an end-of-batch
			// message too; it is read and dropped with the
			// subscription.
			return out, nil
		}
	}
}
