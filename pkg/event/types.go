// Package event is sand-boxer's event contract: the CloudEvents types every
// service publishes, the NATS subjects they travel on, the JSON payloads they
// carry and the mapping of a CloudEvent onto a NATS message.
//
// The package owns the wire format and nothing else. It must never import a
// service package, the bus or an extension: everything that speaks to
// sand-boxer, including code outside this repository, can depend on it alone.
package event

import (
	"fmt"
	"regexp"
)

// Type is a reverse-DNS, versioned CloudEvents type.
type Type string

// Command types. Commands travel on the commands stream and are consumed by
// exactly one worker of the addressed extension.
const (
	TypeCreate  Type = "dev.sandboxer.command.create.v1"
	TypeDestroy Type = "dev.sandboxer.command.destroy.v1"
)

// Request types. A tenant publishes them on its own request subject
// ([RequestSubject]); the gateway's bus intake answers each, as it answers
// the HTTP API.
const (
	TypeRequestCreate  Type = "dev.sandboxer.request.create.v1"
	TypeRequestDestroy Type = "dev.sandboxer.request.destroy.v1"
	TypeRequestGet     Type = "dev.sandboxer.request.get.v1"
)

// Lifecycle types, one per state a sandbox enters. They travel on the
// lifecycle stream.
const (
	// TypeRequested is the sandbox's record as its create asked for it:
	// the first event of every sandbox the gateway accepted, stored
	// before its create command.
	TypeRequested    Type = "dev.sandboxer.sandbox.requested.v1"
	TypeProvisioning Type = "dev.sandboxer.sandbox.provisioning.v1"
	TypeReady        Type = "dev.sandboxer.sandbox.ready.v1"
	TypeFailed       Type = "dev.sandboxer.sandbox.failed.v1"
	TypeDestroying   Type = "dev.sandboxer.sandbox.destroying.v1"
	TypeDestroyed    Type = "dev.sandboxer.sandbox.destroyed.v1"
	TypeRejected     Type = "dev.sandboxer.sandbox.rejected.v1"
	TypeExpired      Type = "dev.sandboxer.sandbox.expired.v1"
	TypeOrphaned     Type = "dev.sandboxer.sandbox.orphaned.v1"
)

// TypeExpiry is the internal timer message the registry schedules on the bus
// when a sandbox with a TTL becomes ready. When it fires, the registry emits
// [TypeExpired] and a destroy command.
const TypeExpiry Type = "dev.sandboxer.timer.expiry.v1"

// TypeRetry is the internal timer message the registry schedules on the bus
// when a sandbox's teardown failed on every delivery of its destroy command
// (a [Destroying] event with an Error says so). When it fires, the registry
// sends a fresh destroy command, the retry's [Destroy.Attempt].
const TypeRetry Type = "dev.sandboxer.timer.retry.v1"

// State is a sandbox lifecycle state. The last token of every lifecycle
// subject is a State.
type State string

// The states of the sandbox state machine:
//
//	requested -> rejected
//	requested -> provisioning -> ready -> destroying -> destroyed
//	                          \-> failed -> destroying -> destroyed
//	ready -> expired -> destroying -> destroyed
//
// [StateOrphaned] is outside the machine: it follows the last event of a
// sandbox (destroyed, rejected, orphaned, or none at all) when its
// backend still holds something of it, and announces that a provisioner
// claimed that leftover and tears it down. No transition enters or
// leaves it.
const (
	StateRequested    State = "requested"
	StateRejected     State = "rejected"
	StateProvisioning State = "provisioning"
	StateReady        State = "ready"
	StateFailed       State = "failed"
	StateExpired      State = "expired"
	StateDestroying   State = "destroying"
	StateDestroyed    State = "destroyed"
	StateOrphaned     State = "orphaned"
)

// States lists every state in the order a sandbox normally passes them,
// then [StateOrphaned].
var States = []State{
	StateRequested, StateProvisioning, StateReady, StateFailed, StateExpired,
	StateDestroying, StateDestroyed, StateRejected, StateOrphaned,
}

// LifecycleType returns the event type announcing state s, or "" for a
// state that is not one.
func LifecycleType(s State) Type {
	switch s {
	case StateRequested:
		return TypeRequested
	case StateProvisioning:
		return TypeProvisioning
	case StateReady:
		return TypeReady
	case StateFailed:
		return TypeFailed
	case StateDestroying:
		return TypeDestroying
	case StateDestroyed:
		return TypeDestroyed
	case StateRejected:
		return TypeRejected
	case StateExpired:
		return TypeExpired
	case StateOrphaned:
		return TypeOrphaned
	}
	return ""
}

// StateOf returns the state a lifecycle event type announces, and false for
// any other type.
func StateOf(t Type) (State, bool) {
	for _, s := range States {
		if LifecycleType(s) == t && t != "" {
			return s, true
		}
	}
	return "", false
}

// Valid reports whether s is a known state.
func (s State) Valid() bool {
	for _, k := range States {
		if k == s {
			return true
		}
	}
	return false
}

// Terminal reports whether no transition leaves s: destroyed, rejected,
// and orphaned, which only ever follows a sandbox that ended (or never
// had a record).
func (s State) Terminal() bool {
	return s == StateDestroyed || s == StateRejected || s == StateOrphaned
}

// Rank orders states along the state machine. A projection applies an event
// only when it moves a sandbox to a higher rank, which makes applying events
// idempotent and safe under reordering.
func (s State) Rank() int {
	switch s {
	case StateRequested:
		return 0
	case StateProvisioning:
		return 1
	case StateReady, StateFailed:
		return 2
	case StateExpired:
		return 3
	case StateDestroying:
		return 4
	case StateDestroyed, StateRejected:
		return 5
	case StateOrphaned:
		return 6
	}
	return -1
}

// CanTransition reports whether the state machine allows from -> to.
// Nothing enters [StateOrphaned] by a transition: it is not a step of a
// sandbox's life but a note on what its backend left.
func CanTransition(from, to State) bool {
	switch from {
	case StateRequested:
		return to == StateProvisioning || to == StateRejected || to == StateDestroying ||
			to == StateDestroyed || to == StateFailed || to == StateReady
	case StateProvisioning:
		return to == StateReady || to == StateFailed || to == StateDestroying || to == StateDestroyed
	case StateReady:
		return to == StateExpired || to == StateDestroying || to == StateDestroyed
	case StateFailed, StateExpired:
		return to == StateDestroying || to == StateDestroyed
	case StateDestroying:
		return to == StateDestroyed
	}
	return false
}

var (
	// namePattern is what extension names, consumer names, profile slugs and
	// sandbox ids may look like: safe as a NATS subject token, a directory
	// name, a compose project name and a shell word.
	namePattern = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,62}$`)
)

// ValidName reports whether s may be used as an extension name, consumer
// name, profile slug or sandbox id: 1 to 63 characters of lower-case letters,
// digits, '-' and '_', starting with a letter or digit.
func ValidName(s string) bool { return namePattern.MatchString(s) }

// CheckName returns a descriptive error when s is not a [ValidName].
func CheckName(kind, s string) error {
	if !ValidName(s) {
		return fmt.Errorf("invalid %s %q: want 1-63 of [a-z0-9_-], starting with a letter or digit", kind, s)
	}
	return nil
}
