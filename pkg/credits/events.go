package credits

import (
	"time"

	"github.com/sand-boxer/sandboxer/pkg/event"
)

// Kind is the last token of a metering subject,
// sandboxer.meter.<consumer>.<kind>, and names the event type
// dev.sandboxer.credits.<kind>.v1.
type Kind string

// Metering event kinds.
const (
	KindGranted   Kind = "granted"   // a grant entry
	KindReserved  Kind = "reserved"  // a hold or extend entry
	KindDebited   Kind = "debited"   // a debit entry
	KindReleased  Kind = "released"  // a release entry
	KindRefunded  Kind = "refunded"  // a refund entry
	KindExpired   Kind = "expired"   // an expire entry
	KindUsage     Kind = "usage"     // a usage record, at settlement
	KindLow       Kind = "low"       // a running sandbox's hold cannot be extended
	KindExhausted Kind = "exhausted" // a running sandbox is destroyed for lack of credit
)

// Kinds lists every metering event kind.
var Kinds = []Kind{KindGranted, KindReserved, KindDebited, KindReleased, KindRefunded, KindExpired, KindUsage, KindLow, KindExhausted}

// Type is the CloudEvents type of kind k.
func (k Kind) Type() event.Type { return event.Type("dev.sandboxer.credits." + string(k) + ".v1") }

// Notice is the data of a low or exhausted event: a running sandbox whose
// hold ran low and could not be extended, or ran out.
type Notice struct {
	// Key is the notice's id: <consumer>.sb.<sandbox>.<low|exhausted>.
	Key       string `json:"key"`
	Kind      Kind   `json:"kind"`
	Consumer  string `json:"consumer"`
	Sandbox   string `json:"sandbox_id"`
	Hold      string `json:"hold"`
	Profile   string `json:"profile"`
	Extension string `json:"extension"`
	// Held is what is left on the sandbox's hold, Available what the
	// account has besides, Needed what the next interval costs.
	Held      int64 `json:"held"`
	Available int64 `json:"available"`
	Needed    int64 `json:"needed"`
	// Debited is what the sandbox was charged so far.
	Debited int64 `json:"debited"`
	// Cause is the id of the accrual tick that found it.
	Cause string    `json:"cause"`
	At    time.Time `json:"at"`
}

// Actual is what a sandbox used, by the backend's meter or the lifecycle
// timestamps.
type Actual struct {
	// Source is meter (the backend's MeterActual) or lifecycle (the ready
	// and destroyed timestamps with the profile's price).
	Source    string   `json:"source"`
	Amount    int64    `json:"amount"`
	Quantity  int64    `json:"quantity"`
	Unit      string   `json:"unit"`
	Breakdown []string `json:"breakdown,omitempty"`
}

// Actual sources.
const (
	SourceMeter     = "meter"
	SourceLifecycle = "lifecycle"
)

// UsageRecord is the settlement of one sandbox: quote and actual side by
// side, and what was charged.
type UsageRecord struct {
	// Key is the record's id: usage.<consumer>.<sandbox>.
	Key          string `json:"key"`
	Consumer     string `json:"consumer"`
	Sandbox      string `json:"sandbox_id"`
	Hold         string `json:"hold"`
	Profile      string `json:"profile"`
	Extension    string `json:"extension"`
	PricingModel string `json:"pricing_model"`
	// ReadyAt is zero for a sandbox that never became ready.
	ReadyAt     time.Time `json:"ready_at,omitzero"`
	DestroyedAt time.Time `json:"destroyed_at"`
	// Seconds is the lifecycle duration, ready to destroyed.
	Seconds int64 `json:"seconds"`
	// Quote is admission's quote; Actual the settled usage.
	Quote  Quote  `json:"quote"`
	Actual Actual `json:"actual"`
	// Charged is what the consumer paid in the end: debits less refunds.
	Charged int64 `json:"charged"`
	// Refunded is what settlement gave back.
	Refunded int64 `json:"refunded"`
	// Unpaid is what the consumer could not pay.
	Unpaid int64 `json:"unpaid"`
	// Reserved is everything that was put on hold for the sandbox.
	Reserved int64 `json:"reserved"`
	// Reason is why the sandbox ended: the destroy reason, failed or
	// rejected.
	Reason string `json:"reason"`
	// Cause is the id of the lifecycle event that settled it.
	Cause string `json:"cause"`
}
