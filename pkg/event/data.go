package event

import "time"

// Ref names the sandbox an event is about. Every command and lifecycle
// payload starts with it.
type Ref struct {
	SandboxID string `json:"sandbox_id"`
	Consumer  string `json:"consumer"`
	Profile   string `json:"profile"`
	Extension string `json:"extension"`
	Host      string `json:"host,omitempty"`
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

// Rejected is the data of a [TypeRejected] event.
type Rejected struct {
	Ref
	// Code is a short machine-readable cause: insufficient_credits, no_route.
	Code   string `json:"code"`
	Reason string `json:"reason"`
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
