package event

import (
	"encoding/json"
	"fmt"
	"strconv"
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
	// RecordSeq is the lifecycle stream sequence of the sandbox's
	// requested event, its record, stored before this command: the
	// sequence the first provisioning expects of the sandbox's subjects.
	// 0 when the sandbox has no requested event (it then expects none).
	RecordSeq uint64 `json:"record_seq,omitempty"`
}

// RequestedOf is the data of the requested event of the sandbox c
// creates, with the traceparent of its create.
func RequestedOf(c Create, trace string) Requested {
	return Requested{Ref: c.Ref, Inputs: c.Inputs, Labels: c.Labels, TTLSeconds: c.TTLSeconds, RequestedAt: c.RequestedAt, Hold: c.Hold, Trace: trace}
}

// Requested is the data of a [TypeRequested] event: what the create asked
// for (its command's data, but RecordSeq) and the trace it started.
type Requested struct {
	Ref
	Inputs      map[string]string `json:"inputs,omitempty"`
	Labels      map[string]string `json:"labels,omitempty"`
	TTLSeconds  int64             `json:"ttl_seconds,omitempty"`
	RequestedAt time.Time         `json:"requested_at"`
	// Hold is the credit hold admission reserved for this sandbox, if any.
	Hold string `json:"hold,omitempty"`
	// Trace is the W3C traceparent of the sandbox's create: the trace
	// every later step of the sandbox continues. Empty when untraced.
	Trace string `json:"trace,omitempty"`
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
	// Attempt numbers the destroy commands a sandbox got after a teardown
	// failed on every delivery of a command: 0 (absent) for the first, n
	// for the nth fresh one (a retry the registry scheduled, a re-drive,
	// a destroy asked for again). Each has its own id ([DestroyID]).
	Attempt int `json:"attempt,omitempty"`
}

// DestroyID is the event id of sandbox's destroy command of attempt n:
// "<sandbox>.destroy", then "<sandbox>.destroy.<n>". One id per attempt, so
// a fresh attempt is not dropped as a duplicate of the last one, and two
// publishers of the same attempt (a retry timer and a re-drive) send it
// once.
func DestroyID(sandbox string, n int) string {
	if n <= 0 {
		return sandbox + ".destroy"
	}
	return sandbox + ".destroy." + strconv.Itoa(n)
}

// DestroyingID is the event id of the destroying event a worker announces
// when it starts attempt n's teardown: "<sandbox>.destroying", then
// "<sandbox>.destroying.<n>".
func DestroyingID(sandbox string, n int) string {
	if n <= 0 {
		return sandbox + ".destroying"
	}
	return sandbox + ".destroying." + strconv.Itoa(n)
}

// TeardownFailedID is the event id of the destroying event that says
// attempt n's teardown failed on every delivery of its command:
// "<sandbox>.teardown_failed.<n>".
func TeardownFailedID(sandbox string, n int) string {
	return sandbox + ".teardown_failed." + strconv.Itoa(max(n, 0))
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
	// Hold is the credit hold admission reserved for this sandbox, as its
	// create command said; empty when it was admitted without one (a
	// free sandbox), which is what lets metering keep nothing for it.
	Hold string `json:"hold,omitempty"`
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

// Destroying is the data of a [TypeDestroying] event. A worker announces
// one when it starts a teardown, and another with Error set when that
// teardown failed on every delivery of the destroy command: the sandbox
// stays destroying, and the registry schedules a retry ([TypeRetry]).
type Destroying struct {
	Ref
	Reason string `json:"reason"`
	// Attempt is the destroy command's [Destroy.Attempt].
	Attempt int `json:"attempt,omitempty"`
	// Error, when set, is why the teardown of this attempt failed on its
	// last delivery.
	Error string `json:"error,omitempty"`
	// Deliveries is how many deliveries of the command failed, with Error.
	Deliveries int `json:"deliveries,omitempty"`
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
	// ReadyAt is when the sandbox became ready, as its ready event said;
	// zero when it never was. Metering prices a sandbox it keeps no hold
	// for (a free one) from it and this event's time.
	ReadyAt time.Time `json:"ready_at,omitzero"`
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

// ReasonNoEvents is the reason of an [Orphaned] event when the sandbox
// has no lifecycle event at all on its extension's subjects.
const ReasonNoEvents = "no_events"

// Orphaned is the data of a [TypeOrphaned] event: a provisioner found
// something of the sandbox on its backend that no live record owns, and
// claimed it to tear it down. The event is published before the
// teardown, guarded on the sandbox's last event, so that one worker of
// the pool claims each leftover. Its consumer and profile are those of
// the sandbox's last event, or [Unrouted] when it has none.
type Orphaned struct {
	Ref
	// Reason is why no live record owns it: the state of the sandbox's
	// last event (destroyed, rejected, or orphaned when an earlier
	// teardown of the leftover did not remove it), or [ReasonNoEvents].
	Reason string `json:"reason"`
	// Handle is what the teardown is given, as the backend listed it.
	Handle Handle `json:"handle"`
	// Held lists what the backend holds of the sandbox, as it named it.
	Held []string `json:"held,omitempty"`
	// HeldSince is when the backend made the oldest of it, by its own
	// clock; absent when it does not know.
	HeldSince time.Time `json:"held_since,omitzero"`
	// Worker is the worker that claimed it and tears it down.
	Worker string `json:"worker"`
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

// Retry is the data of a [TypeRetry] timer: when it fires, the destroy
// command of Attempt goes out with Reason.
type Retry struct {
	Ref
	// Reason is the destroy reason, as the failed attempt had it.
	Reason string `json:"reason"`
	// Attempt is the fresh destroy command's [Destroy.Attempt], from 1.
	Attempt int       `json:"attempt"`
	RetryAt time.Time `json:"retry_at"`
}
