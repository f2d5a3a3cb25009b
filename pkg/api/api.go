// Package api is the HTTP API of the gateway as Go types, and a client for
// it. The CLI, the benchmarks and the end-to-end tests speak to the gateway
// only through this package.
package api

import (
	"time"

	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
)

// CreateRequest is the body of POST /v1/sandboxes.
type CreateRequest struct {
	Profile string            `json:"profile"`
	Inputs  map[string]string `json:"inputs,omitempty"`
	Labels  map[string]string `json:"labels,omitempty"`
	// TTL is a Go duration ("30m"); empty means the profile's default.
	TTL string `json:"ttl,omitempty"`
}

// Sandbox is a sandbox as the API shows it.
type Sandbox struct {
	ID           string              `json:"id"`
	State        event.State         `json:"state"`
	Consumer     string              `json:"consumer"`
	Profile      string              `json:"profile"`
	Extension    string              `json:"extension"`
	Host         string              `json:"host,omitempty"`
	Labels       map[string]string   `json:"labels,omitempty"`
	Inputs       map[string]string   `json:"inputs,omitempty"`
	TTLSeconds   int64               `json:"ttl_seconds,omitempty"`
	Reachability *event.Reachability `json:"reachability,omitempty"`
	Reason       string              `json:"reason,omitempty"`
	Code         string              `json:"code,omitempty"`
	CreatedAt    time.Time           `json:"created_at"`
	UpdatedAt    time.Time           `json:"updated_at"`
	ReadyAt      time.Time           `json:"ready_at,omitzero"`
	ExpiresAt    time.Time           `json:"expires_at,omitzero"`
	DestroyedAt  time.Time           `json:"destroyed_at,omitzero"`
	// DestroyAttempt is the latest destroy attempt under way: 0 for the
	// first, n for the nth fresh one after a teardown failed.
	DestroyAttempt int `json:"destroy_attempt,omitempty"`
	// TeardownError is why the last failed teardown failed on every
	// delivery of its destroy command, at TeardownFailedAt.
	TeardownError    string               `json:"teardown_error,omitempty"`
	TeardownFailedAt time.Time            `json:"teardown_failed_at,omitzero"`
	History          []sandbox.Transition `json:"history,omitempty"`
}

// FromRecord returns the API view of an inventory record. The backend
// handle and the credit hold stay internal, and a sandbox that ended
// (destroyed or rejected) has no expiry.
func FromRecord(r *sandbox.Record) Sandbox {
	expires := r.ExpiresAt
	if r.State.Terminal() {
		expires = time.Time{}
	}
	return Sandbox{
		ID: r.ID, State: r.State, Consumer: r.Consumer, Profile: r.Profile, Extension: r.Extension,
		Host: r.Host, Labels: r.Labels, Inputs: r.Inputs, TTLSeconds: r.TTLSeconds,
		Reachability: r.Reachability, Reason: r.Reason, Code: r.Code,
		CreatedAt: r.CreatedAt, UpdatedAt: r.UpdatedAt, ReadyAt: r.ReadyAt, ExpiresAt: expires,
		DestroyedAt: r.DestroyedAt, History: r.History,
		DestroyAttempt: r.DestroyAttempt, TeardownError: r.TeardownError, TeardownFailedAt: r.TeardownFailedAt,
	}
}

// Page sizes of GET /v1/sandboxes.
const (
	DefaultPageSize = 100
	MaxPageSize     = 1000
)

// SandboxList is the body of GET /v1/sandboxes: one page of sandboxes in
// id order, which is creation order to the millisecond.
type SandboxList struct {
	Sandboxes []Sandbox `json:"sandboxes"`
	// Next is the after of the next page, set only when more sandboxes
	// match after this page.
	Next string `json:"next,omitempty"`
}

// ProfileList is the body of GET /v1/profiles.
type ProfileList struct {
	Profiles []*extension.Profile `json:"profiles"`
}

// ExtensionList is the body of GET /v1/extensions.
type ExtensionList struct {
	Extensions []*extension.Manifest `json:"extensions"`
}

// Problem is an RFC 9457 problem detail, the body of every error response
// (Content-Type application/problem+json).
type Problem struct {
	Type     string                 `json:"type,omitempty"`
	Title    string                 `json:"title"`
	Status   int                    `json:"status"`
	Detail   string                 `json:"detail,omitempty"`
	Instance string                 `json:"instance,omitempty"`
	Errors   []extension.FieldError `json:"errors,omitempty"`
}

// Error renders the problem.
func (p *Problem) Error() string {
	s := p.Title
	if p.Detail != "" {
		s += ": " + p.Detail
	}
	for _, e := range p.Errors {
		s += "; " + e.Field + ": " + e.Detail
	}
	return s
}

// BusReply is the answer to a request event on sandboxer.req.<consumer>.<verb>
// (JSON): the sandbox, as a 202 answer over HTTP would carry it, or the
// problem a refused request gets over HTTP.
type BusReply struct {
	Sandbox *Sandbox `json:"sandbox,omitempty"`
	Problem *Problem `json:"problem,omitempty"`
}

// ContentTypeProblem is the media type of error bodies.
const ContentTypeProblem = "application/problem+json"

// HeaderIdempotencyKey makes a create request repeatable: the same key from
// the same consumer returns the same sandbox.
const HeaderIdempotencyKey = "Idempotency-Key"

// Roles of API keys.
const (
	RoleAdmin    = "admin"
	RoleConsumer = "consumer"
)

// StreamEvent is one server-sent event of GET /v1/sandboxes/{id}/events:
// the SSE id is the lifecycle stream sequence, the SSE event name the
// CloudEvents type, and the data the event in structured JSON.
type StreamEvent struct {
	Seq   uint64
	Type  string
	Event *event.Event
}
