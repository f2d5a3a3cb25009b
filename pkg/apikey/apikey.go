// Package apikey issues and checks the API keys of the gateway. A key is a
// random bearer token shown once; the apikeys bucket keeps only its
// SHA-256, mapped to the consumer and role it stands for.
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
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/event"
)

// Prefix starts every token, so leaked keys are easy to find.
const Prefix = "sbx_"

// Roles.
const (
	RoleAdmin    = "admin"
	RoleConsumer = "consumer"
)

// Key is what a token stands for.
type Key struct {
	Consumer  string    `json:"consumer"`
	Role      string    `json:"role"`
	Name      string    `json:"name,omitempty"`
	CreatedAt time.Time `json:"created_at"`
}

// ErrUnknown is returned for a token that maps to no key.
var ErrUnknown = errors.New("unknown api key")

// Hash returns the bucket key of a token: hex SHA-256. Tokens carry 160
// random bits, so a fast hash is enough.
func Hash(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

// Store keeps keys in the apikeys bucket.
type Store struct {
	kv jetstream.KeyValue
}

// NewStore returns a store on kv.
func NewStore(kv jetstream.KeyValue) *Store { return &Store{kv: kv} }

// Issue creates a key for consumer with role and returns its token, which
// is not stored anywhere and cannot be recovered.
func (s *Store) Issue(ctx context.Context, consumer, role, name string) (string, error) {
	if err := event.CheckName("consumer", consumer); err != nil {
		return "", err
	}
	if role != RoleAdmin && role != RoleConsumer {
		return "", fmt.Errorf("unknown role %q (known: %s, %s)", role, RoleAdmin, RoleConsumer)
	}
	b := make([]byte, 20)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("generating api key: %w", err)
	}
	token := Prefix + strings.ToLower(base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(b))
	k := Key{Consumer: consumer, Role: role, Name: name, CreatedAt: time.Now().UTC()}
	v, _ := json.Marshal(k)
	if _, err := s.kv.Create(ctx, Hash(token), v); err != nil {
		return "", fmt.Errorf("storing api key: %w", err)
	}
	return token, nil
}

// Lookup returns the key a token stands for.
func (s *Store) Lookup(ctx context.Context, token string) (Key, error) {
	if !strings.HasPrefix(token, Prefix) {
		return Key{}, ErrUnknown
	}
	e, err := s.kv.Get(ctx, Hash(token))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return Key{}, ErrUnknown
	}
	if err != nil {
		return Key{}, fmt.Errorf("looking up api key: %w", err)
	}
	var k Key
	if err := json.Unmarshal(e.Value(), &k); err != nil {
		return Key{}, fmt.Errorf("decoding api key: %w", err)
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
