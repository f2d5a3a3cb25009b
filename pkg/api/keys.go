package api

import "time"

// The key API: /v1/keys, for admin keys only. A key acts for one
// consumer with scopes:
//
//   - read: GET the consumer's sandboxes and their events, the profiles,
//     the extensions and the worker pools;
//   - create: POST /v1/sandboxes;
//   - destroy: DELETE /v1/sandboxes/{id};
//   - credits: read the consumer's own credits (the grants endpoint is for
//     admin keys);
//   - admin: everything, for any consumer.
//
// Keys of the first version have a role instead: consumer has every scope
// but admin, admin has admin.
const (
	ScopeRead    = "read"
	ScopeCreate  = "create"
	ScopeDestroy = "destroy"
	ScopeCredits = "credits"
	ScopeAdmin   = "admin"
)

// KeyRequest is the body of POST /v1/keys.
type KeyRequest struct {
	// Consumer is who the key acts for.
	Consumer string `json:"consumer"`
	// Scopes default to every scope but admin.
	Scopes []string `json:"scopes,omitempty"`
	// ExpiresIn is a Go duration ("720h") from now after which the key
	// stops working; empty: until revoked.
	ExpiresIn string `json:"expires_in,omitempty"`
	// Name is a note on what the key is for.
	Name string `json:"name,omitempty"`
}

// APIKey is a key as the API shows it: never its token.
type APIKey struct {
	// ID names the key, to revoke it (DELETE /v1/keys/{id}).
	ID        string    `json:"id"`
	Consumer  string    `json:"consumer"`
	Scopes    []string  `json:"scopes"`
	Name      string    `json:"name,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	ExpiresAt time.Time `json:"expires_at,omitzero"`
	// Expired is true once ExpiresAt passed: the key is refused, and
	// listed until revoked.
	Expired bool `json:"expired,omitempty"`
}

// IssuedKey is the answer to POST /v1/keys (201): the key, and its token,
// shown this once and stored nowhere.
type IssuedKey struct {
	Token string `json:"token"`
	APIKey
}

// KeyList is the body of GET /v1/keys: by consumer, then creation.
type KeyList struct {
	Keys []APIKey `json:"keys"`
}
