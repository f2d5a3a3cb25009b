package event

import (
	"encoding/json"
	"fmt"
	"time"
)

// Ref names the sandbox an event is about. Every command and lifecycle
// payload starts with it.
type Ref struct {
	SandboxID string `json:"sandbox_id"`
	Consumer  string `json:"consumer"`
	Profile   string `json:"profile"`
	Extension string `json:"extension"`
	Host      string `json:"host,omitempty"`
	// Request names the request event a sandbox was asked for with, when
	// it was asked for on the bus; every later event of the sandbox
	// carries it, so a requester that did not wait for the reply can
	// tell its sandbox.
	Request *Origin `json:"request,omitempty"`
}

// RefOf reads the [Ref] at the top of a command or lifecycle event's data,
// leniently: it is for checking who and what an event is about before its
// payload is decoded strictly with [DataAs].
func RefOf(e *Event) (Ref, error) {
	var r Ref
	if err := json.Unmarshal(e.Data(), &r); err != nil {
		return Ref{}, fmt.Errorf("%w: reading the sandbox an event is about: %v", ErrMalformed, err)
	}
	return r, nil
}

// Origin names a CloudEvent by its source and id, which together identify
// it.
type Origin struct {
	Source string `json:"source"`
	ID     string `json:"id"`
}

// Create is the data of a [TypeCreate] command.
type Create struct {
	Ref
	Inputs      map[string]string `json:"inputs,omitempty"`
	Labels      map[string]string `json:"labels,omitempty"`
	TTLSeconds  int64             `json:"ttl_seconds,omitempty"`
	RequestedAt time.Time         `json:"requested_at"`
	// Hold is the credit hold admission reserved for this sandbox, if any.
	Hold string `json:"hold,omitempty"`
}

// Destroy reasons.
const (
	ReasonRequested        = "requested"
	ReasonExpired          = "expired"
	ReasonCreditsExhausted = "credits_exhausted"
	ReasonFailed           = "failed"
)

// Destroy is the data of a [TypeDestroy] command.
type Destroy struct {
	Ref
	Reason      string    `json:"reason"`
	RequestedBy string    `json:"requested_by,omitempty"`
	RequestedAt time.Time `json:"requested_at"`
}

// Handle is what an extension returns from Provision and needs for
// Teardown. SandboxID and Host are always set; Data holds extension-specific
// string values (a directory, a compose project, a tunnel port).
type Handle struct {
	SandboxID string            `json:"sandbox_id"`
	Host      string            `json:"host"`
	Data      map[string]string `json:"data,omitempty"`
}

// Reachability says where a ready sandbox is.
type Reachability struct {
	// SSH is an ssh destination (user@host or user@host:port) where one exists.
	SSH string `json:"ssh,omitempty"`
	// RemoteDir is the workspace directory on Host.
	RemoteDir string `json:"remote_dir,omitempty"`
	// Host is the machine the sandbox runs on.
	Host string `json:"host"`
	// ComposeProject is the compose project name, for compose backends.
	ComposeProject string `json:"compose_project,omitempty"`
	// Ports maps a name to a reachable host:port, such as a tunnel.
	Ports map[string]string `json:"ports,omitempty"`
}

// CleanupReport lists what a teardown removed.
type CleanupReport struct {
	Removed []string `json:"removed,omitempty"`
	// AlreadyGone is true when nothing was left to remove.
	AlreadyGone bool `json:"already_gone,omitempty"`
}

// Provisioning is the data of a [TypeProvisioning] event.
type Provisioning struct {
	Ref
	Worker  string `json:"worker"`
	Attempt int    `json:"attempt"`
}

// Ready is the data of a [TypeReady] event.
type Ready struct {
	Ref
	Handle       Handle       `json:"handle"`
	Reachability Reachability `json:"reachability"`
	TTLSeconds   int64        `json:"ttl_seconds,omitempty"`
	ReadyAt      time.Time    `json:"ready_at"`
	// ExpiresAt is ReadyAt plus the TTL; zero when the sandbox has no TTL.
	ExpiresAt time.Time `json:"expires_at,omitzero"`
}

// Failed is the data of a [TypeFailed] event.
type Failed struct {
	Ref
	// Phase is provision or wait_ready.
	Phase  string `json:"phase"`
	Reason string `json:"reason"`
	// Handle is whatever Provision made before failing, so the destroy that
	// follows can clean it up.
	Handle *Handle `json:"handle,omitempty"`
}

// Destroying is the data of a [TypeDestroying] event.
type Destroying struct {
	Ref
	Reason string `json:"reason"`
}

// Destroyed is the data of a [TypeDestroyed] event.
type Destroyed struct {
	Ref
	Reason  string        `json:"reason"`
	Cleanup CleanupReport `json:"cleanup"`
	// Meter is a metered backend's own account of what the sandbox used,
	// read after Teardown. Metering settles to it when present and to the
	// lifecycle timestamps otherwise.
	Meter *MeterReading `json:"meter,omitempty"`
}

// MeterReading is a backend's own account of what a sandbox used, as it
// travels on the bus. Amounts are integers in the credit minor unit.
type MeterReading struct {
	// Amount is the cost in credit minor units.
	Amount int64 `json:"amount"`
	// Quantity and Unit say what was measured (for example 3 minute).
	Quantity int64  `json:"quantity"`
	Unit     string `json:"unit"`
	// Breakdown explains the amount, line by line.
	Breakdown []string `json:"breakdown,omitempty"`
}

// Rejected is the data of a [TypeRejected] event. A request refused before
// an extension was chosen names the extension [Unrouted], and its profile
// too when the profile it named is not a [ValidName].
type Rejected struct {
	Ref
	// Code is a short machine-readable cause: insufficient_credits,
	// no_route, invalid_request.
	Code   string `json:"code"`
	Reason string `json:"reason"`
}

// CreateRequest is the data of a [TypeRequestCreate] event: what a tenant
// asks for, as the body of POST /v1/sandboxes.
type CreateRequest struct {
	Profile string            `json:"profile"`
	Inputs  map[string]string `json:"inputs,omitempty"`
	Labels  map[string]string `json:"labels,omitempty"`
	// TTL is a Go duration such as 30m; empty: the profile's default.
	TTL string `json:"ttl,omitempty"`
}

// DestroyRequest is the data of a [TypeRequestDestroy] event.
type DestroyRequest struct {
	SandboxID string `json:"sandbox_id"`
}

// GetRequest is the data of a [TypeRequestGet] event: read one sandbox,
// as GET /v1/sandboxes/{id} does.
type GetRequest struct {
	SandboxID string `json:"sandbox_id"`
}

// Expired is the data of a [TypeExpired] event.
type Expired struct {
	Ref
	Reason    string    `json:"reason"`
	ExpiredAt time.Time `json:"expired_at"`
}

// Expiry is the data of a [TypeExpiry] timer.
type Expiry struct {
	Ref
	ExpiresAt time.Time `json:"expires_at"`
}
