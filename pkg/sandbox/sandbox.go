// Package sandbox is the record of one sandbox and the state machine that
// moves it: the fold of the sandbox's lifecycle events, and the pure
// function that applies one event to it.
//
// The package holds no I/O. It must never import the bus or a service.
package sandbox

import (
	"crypto/rand"
	"encoding/base32"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/event"
)

// DefaultRetention is how long a sandbox that ended stays in the listings
// by default: a day, as long as an Idempotency-Key is remembered. The
// lifecycle stream keeps the sandbox's events, and so its record for a
// GET, for longer (its max age), and metering its usage record for good.
const DefaultRetention = 24 * time.Hour

// Listed reports whether r is still listed at now when sandboxes that
// ended are listed for retention: always while it has not ended, for
// retention after its last event once it has. A negative retention lists
// every sandbox for as long as the lifecycle stream keeps its events.
func (r *Record) Listed(now time.Time, retention time.Duration) bool {
	return retention <= 0 || !r.State.Terminal() || now.Sub(r.UpdatedAt) < retention
}

// Record is everything the lifecycle events of a sandbox say of it: their
// fold.
type Record struct {
	ID         string            `json:"id"`
	Consumer   string            `json:"consumer"`
	Profile    string            `json:"profile"`
	Extension  string            `json:"extension"`
	Host       string            `json:"host,omitempty"`
	State      event.State       `json:"state"`
	Labels     map[string]string `json:"labels,omitempty"`
	Inputs     map[string]string `json:"inputs,omitempty"`
	TTLSeconds int64             `json:"ttl_seconds,omitempty"`
	// Hold is the credit hold admission reserved, if any.
	Hold string `json:"hold,omitempty"`
	// Request is the request event the sandbox was asked for with, when it
	// was asked for on the bus.
	Request *event.Origin `json:"request,omitempty"`
	// Trace is the W3C traceparent of the sandbox's create: the trace
	// every later step of the sandbox (its destroy) continues, so one
	// trace covers its life. Empty when the create was not traced.
	Trace string `json:"trace,omitempty"`

	// Handle is what the backend needs for teardown.
	Handle       *event.Handle       `json:"handle,omitempty"`
	Reachability *event.Reachability `json:"reachability,omitempty"`
	// Reason says why the sandbox failed, was rejected or was destroyed.
	Reason string `json:"reason,omitempty"`
	// Code is the machine-readable cause of a rejection.
	Code string `json:"code,omitempty"`

	CreatedAt   time.Time `json:"created_at"`
	UpdatedAt   time.Time `json:"updated_at"`
	ReadyAt     time.Time `json:"ready_at,omitzero"`
	ExpiresAt   time.Time `json:"expires_at,omitzero"`
	DestroyedAt time.Time `json:"destroyed_at,omitzero"`

	// DestroyAttempt is the latest destroy attempt the sandbox's events
	// told of ([event.Destroy.Attempt]): 0 for the first, n for the nth
	// fresh one after a teardown failed.
	DestroyAttempt int `json:"destroy_attempt,omitempty"`
	// TeardownError is why the teardown of attempt TeardownFailedAttempt
	// failed on every delivery of its command, at TeardownFailedAt: the
	// last teardown failure, kept until the sandbox is destroyed.
	TeardownError         string    `json:"teardown_error,omitempty"`
	TeardownFailedAttempt int       `json:"teardown_failed_attempt,omitempty"`
	TeardownFailedAt      time.Time `json:"teardown_failed_at,omitzero"`

	// History is every state the sandbox entered, in order.
	History []Transition `json:"history,omitempty"`

	// Seq is the lifecycle stream sequence of the last event folded into
	// r: what a transition decided on r expects of the sandbox's subjects
	// (Nats-Expected-Last-Subject-Sequence). Whoever folds sets it.
	Seq uint64 `json:"seq,omitempty"`
}

// Transition records one state change.
type Transition struct {
	State event.State `json:"state"`
	At    time.Time   `json:"at"`
}

// TeardownStuck reports whether r is destroying and the latest attempt
// it heard of failed: nothing tears it down until a fresh attempt goes
// out (the registry's retry, a re-drive).
func (r *Record) TeardownStuck() bool {
	return r.State == event.StateDestroying && r.TeardownError != "" && r.TeardownFailedAttempt >= r.DestroyAttempt
}

// NextAttempt is the number of the next destroy attempt of r. Its claim
// is a destroying event of that attempt published with the expected last
// subject sequence r.Seq: of two re-drives decided on the same record, one
// is stored and the other finds the sandbox moved on.
func (r *Record) NextAttempt() int { return r.DestroyAttempt + 1 }

// Clone returns a copy of r that shares nothing with it.
func (r *Record) Clone() *Record {
	c := *r
	c.Labels, c.Inputs = maps.Clone(r.Labels), maps.Clone(r.Inputs)
	c.History = slices.Clone(r.History)
	if r.Request != nil {
		o := *r.Request
		c.Request = &o
	}
	if r.Handle != nil {
		h := *r.Handle
		h.Data = maps.Clone(r.Handle.Data)
		c.Handle = &h
	}
	if r.Reachability != nil {
		reach := *r.Reachability
		reach.Ports = maps.Clone(r.Reachability.Ports)
		c.Reachability = &reach
	}
	return &c
}

// Ref returns the event reference of r.
func (r *Record) Ref() event.Ref {
	return event.Ref{SandboxID: r.ID, Consumer: r.Consumer, Profile: r.Profile, Extension: r.Extension, Host: r.Host, Request: r.Request}
}

// Marshal encodes r as JSON.
func (r *Record) Marshal() []byte {
	b, err := json.Marshal(r)
	if err != nil {
		panic(fmt.Sprintf("sandbox: marshalling record: %v", err)) // only plain types: cannot fail
	}
	return b
}

// Unmarshal decodes a record Marshal encoded.
func Unmarshal(b []byte) (*Record, error) {
	var r Record
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("decoding sandbox record: %w", err)
	}
	return &r, nil
}

// NewRequested returns the record of a sandbox just requested.
func NewRequested(c event.Create) *Record {
	at := c.RequestedAt
	if at.IsZero() {
		at = time.Now().UTC()
	}
	return &Record{
		ID: c.SandboxID, Consumer: c.Consumer, Profile: c.Profile, Extension: c.Extension, Host: c.Host,
		State: event.StateRequested, Labels: c.Labels, Inputs: c.Inputs, TTLSeconds: c.TTLSeconds, Hold: c.Hold, Request: c.Request,
		CreatedAt: at, UpdatedAt: at,
		History: []Transition{{State: event.StateRequested, At: at}},
	}
}

// Apply moves r to the state e announces, taking what e says about the
// sandbox. It reports false, changing nothing, when e would not move r
// forward (a redelivered or reordered event): applying an event twice is
// the same as applying it once. An orphaned event never changes a record.
// e must be a lifecycle event about r.
func Apply(r *Record, e *event.Event) (bool, error) {
	to, ok := event.StateOf(event.Type(e.Type()))
	if !ok {
		return false, fmt.Errorf("%w: %s is not a lifecycle event", event.ErrMalformed, e.Type())
	}
	if to == event.StateOrphaned {
		// What a backend left of a sandbox that ended, or that never had
		// a record: the record, if any, stays as its own events left it.
		var d event.Orphaned
		if err := event.DataAs(e, &d); err != nil {
			return false, err
		}
		return false, nil
	}
	if to == event.StateDestroying && r.State == event.StateDestroying {
		// Another attempt of the teardown, or the failure of one: the
		// state stays, the record says how teardown goes.
		var d event.Destroying
		if err := event.DataAs(e, &d); err != nil {
			return false, err
		}
		if d.SandboxID != r.ID || d.Consumer != r.Consumer || d.Extension != r.Extension {
			return false, fmt.Errorf("%w: event for sandbox %q of %q on %q applied to %q", event.ErrMalformed, d.SandboxID, d.Consumer, d.Extension, r.ID)
		}
		if !r.teardownProgress(d, e.Time().UTC()) {
			return false, nil
		}
		if at := e.Time().UTC(); at.After(r.UpdatedAt) {
			r.UpdatedAt = at
		}
		return true, nil
	}
	if r.State != "" && (r.State.Terminal() || to.Rank() <= r.State.Rank()) {
		return false, nil
	}
	at := e.Time().UTC()
	// Decode and check everything before touching r: a refused event
	// changes nothing.
	var (
		ref    event.Ref
		update func()
	)
	// A failed sandbox keeps its failure as the reason through teardown.
	failed := slices.ContainsFunc(r.History, func(t Transition) bool { return t.State == event.StateFailed })
	switch to {
	case event.StateRequested:
		var d event.Requested
		if err := event.DataAs(e, &d); err != nil {
			return false, err
		}
		ref = d.Ref
		update = func() {
			r.Labels, r.Inputs, r.TTLSeconds, r.Hold, r.Trace = d.Labels, d.Inputs, d.TTLSeconds, d.Hold, d.Trace
			if !d.RequestedAt.IsZero() {
				at = d.RequestedAt.UTC()
			}
		}
	case event.StateProvisioning:
		var d event.Provisioning
		if err := event.DataAs(e, &d); err != nil {
			return false, err
		}
		ref, update = d.Ref, func() {}
	case event.StateReady:
		var d event.Ready
		if err := event.DataAs(e, &d); err != nil {
			return false, err
		}
		ref = d.Ref
		update = func() {
			h, reach := d.Handle, d.Reachability
			r.Handle, r.Reachability = &h, &reach
			r.ReadyAt = d.ReadyAt
			r.ExpiresAt = d.ExpiresAt
			if d.TTLSeconds > 0 {
				r.TTLSeconds = d.TTLSeconds
			}
		}
	case event.StateFailed:
		var d event.Failed
		if err := event.DataAs(e, &d); err != nil {
			return false, err
		}
		ref = d.Ref
		update = func() {
			r.Reason = d.Reason
			if d.Handle != nil {
				h := *d.Handle
				r.Handle = &h
			}
		}
	case event.StateExpired:
		var d event.Expired
		if err := event.DataAs(e, &d); err != nil {
			return false, err
		}
		ref, update = d.Ref, func() { r.Reason = d.Reason }
	case event.StateDestroying:
		var d event.Destroying
		if err := event.DataAs(e, &d); err != nil {
			return false, err
		}
		ref = d.Ref
		update = func() {
			if r.Reason == "" || !failed {
				r.Reason = d.Reason
			}
			r.teardownProgress(d, at)
		}
	case event.StateDestroyed:
		var d event.Destroyed
		if err := event.DataAs(e, &d); err != nil {
			return false, err
		}
		ref = d.Ref
		update = func() {
			if r.Reason == "" || !failed {
				r.Reason = d.Reason
			}
			r.DestroyedAt = at
			r.Reachability = nil
		}
	case event.StateRejected:
		var d event.Rejected
		if err := event.DataAs(e, &d); err != nil {
			return false, err
		}
		ref, update = d.Ref, func() { r.Reason, r.Code = d.Reason, d.Code }
	default:
		return false, fmt.Errorf("%w: no event enters state %s", event.ErrMalformed, to)
	}
	if r.ID != "" && ref.SandboxID != r.ID {
		return false, fmt.Errorf("%w: event for sandbox %q applied to %q", event.ErrMalformed, ref.SandboxID, r.ID)
	}
	if r.ID != "" && (ref.Consumer != r.Consumer || ref.Extension != r.Extension) {
		return false, fmt.Errorf("%w: event of sandbox %s names consumer %q on %q, the record %q on %q",
			event.ErrMalformed, r.ID, ref.Consumer, ref.Extension, r.Consumer, r.Extension)
	}
	update()
	if r.ID == "" {
		// The first thing the inventory hears of this sandbox.
		r.ID, r.Consumer, r.Profile, r.Extension = ref.SandboxID, ref.Consumer, ref.Profile, ref.Extension
		r.Request = ref.Request
		r.CreatedAt = at
	}
	if ref.Host != "" {
		r.Host = ref.Host
	}
	r.State = to
	r.UpdatedAt = at
	r.History = append(r.History, Transition{State: to, At: at})
	return true, nil
}

// teardownProgress takes what destroying event d, of time at, says of
// the teardown: a later attempt, or the failure of the latest one. It
// reports whether r changed; an older attempt's news changes nothing.
func (r *Record) teardownProgress(d event.Destroying, at time.Time) bool {
	changed := false
	if d.Attempt > r.DestroyAttempt {
		r.DestroyAttempt, changed = d.Attempt, true
	}
	if d.Error != "" && d.Attempt >= r.DestroyAttempt && (r.TeardownError == "" || d.Attempt > r.TeardownFailedAttempt) {
		r.TeardownError, r.TeardownFailedAttempt, r.TeardownFailedAt, changed = d.Error, d.Attempt, at, true
	}
	return changed
}

var idEncoding = base32.NewEncoding("0123456789abcdefghijklmnopqrstuv").WithPadding(base32.NoPadding)

// NewID returns a new sandbox id: "sbx-" and 26 characters of lower-case
// base32, time-ordered by its first 48 bits, valid as a subject token,
// directory name and compose project name.
func NewID() string {
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], uint64(time.Now().UnixMilli())<<16)
	_, _ = rand.Read(b[6:])
	return "sbx-" + strings.ToLower(idEncoding.EncodeToString(b[:]))
}
