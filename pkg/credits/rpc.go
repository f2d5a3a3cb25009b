package credits

import (
	"time"

	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// HoldRequest asks admission for a quote and a credit hold for one sandbox
// ([event.SubjectMeteringHold]). Asking again for the same sandbox returns
// the same hold.
type HoldRequest struct {
	SandboxID string `json:"sandbox_id"`
	Consumer  string `json:"consumer"`
	Profile   string `json:"profile"`
	Extension string `json:"extension"`
	// TTLSeconds is the duration to hold credit for; 0 means the profile's
	// default TTL, or the service's default hold duration.
	TTLSeconds int64 `json:"ttl_seconds,omitempty"`
	// PricingModel is the extension's; empty means look it up in the
	// catalog.
	PricingModel extension.PricingModel `json:"pricing_model,omitempty"`
}

// HoldReply is admission's yes: the hold id (the create command carries
// it) and the amount held, in credit minor units.
type HoldReply struct {
	Hold   string `json:"hold"`
	Amount int64  `json:"amount"`
	// Quote is the price the amount comes from.
	Quote Quote `json:"quote"`
	// Available is what the account has left besides.
	Available int64 `json:"available"`
}

// ErrorReply is the body of every refusal; the same code and detail are
// in the Nats-Service-Error-Code and Nats-Service-Error headers.
type ErrorReply struct {
	Code   string `json:"code"`
	Detail string `json:"detail"`
}

// GrantRequest adds credit to an account ([event.SubjectMeteringGrant]).
type GrantRequest struct {
	Consumer string `json:"consumer"`
	// Amount is in credit minor units, more than 0.
	Amount int64 `json:"amount"`
	// Priority orders spending, lower first: 0 to 1000. Default 0.
	Priority int `json:"priority,omitempty"`
	// ExpiresAt, when set, is when the unspent rest expires.
	ExpiresAt time.Time `json:"expires_at,omitzero"`
	// Promo marks promotional credit.
	Promo bool `json:"promo,omitempty"`
	// ID makes the grant idempotent: a second grant with the same id for
	// the same consumer changes nothing. Empty: a fresh id.
	ID string `json:"id,omitempty"`
}

// GrantReply answers a grant with the account after it.
type GrantReply struct {
	// Grant is the grant of the request's id.
	Grant Grant `json:"grant"`
	// Duplicate is true when the id was granted before.
	Duplicate bool         `json:"duplicate,omitempty"`
	Balance   BalanceReply `json:"balance"`
}

// BalanceRequest asks for an account ([event.SubjectMeteringBalance]).
type BalanceRequest struct {
	Consumer string `json:"consumer"`
}

// HoldView is an open hold as the balance shows it.
type HoldView struct {
	Hold      string    `json:"hold"`
	Sandbox   string    `json:"sandbox_id"`
	Profile   string    `json:"profile"`
	Extension string    `json:"extension"`
	Amount    int64     `json:"amount"`
	Debited   int64     `json:"debited"`
	ReadyAt   time.Time `json:"ready_at,omitzero"`
}

// BalanceReply is an account: balance = held + available.
type BalanceReply struct {
	Consumer  string `json:"consumer"`
	Balance   int64  `json:"balance"`
	Held      int64  `json:"held"`
	Available int64  `json:"available"`
	// Seq is the sequence of the last ledger entry.
	Seq uint64 `json:"seq"`
	// Grants are the grants with credit left, in spending order.
	Grants []Grant `json:"grants"`
	// Holds are the open holds, by hold id.
	Holds []HoldView `json:"holds"`
}

// LedgerRequest asks for ledger entries ([event.SubjectMeteringLedger]).
type LedgerRequest struct {
	Consumer string `json:"consumer"`
	// Since keeps entries at or after this time.
	Since time.Time `json:"since,omitzero"`
	// AfterSeq keeps entries with a higher sequence: pages through a
	// long ledger.
	AfterSeq uint64 `json:"after_seq,omitempty"`
	// Limit bounds the entries returned. Default and maximum 1000.
	Limit int `json:"limit,omitempty"`
}

// LedgerReply lists entries in sequence order.
type LedgerReply struct {
	Consumer string  `json:"consumer"`
	Entries  []Entry `json:"entries"`
	// More is true when Limit cut the list: ask again with AfterSeq set to
	// the last entry's sequence.
	More bool `json:"more,omitempty"`
}

// UsageRequest asks for usage records ([event.SubjectMeteringUsage]).
type UsageRequest struct {
	// Consumer keeps one consumer's records; empty means every consumer.
	Consumer string `json:"consumer,omitempty"`
	// From and To keep records destroyed in [From, To).
	From time.Time `json:"from,omitzero"`
	To   time.Time `json:"to,omitzero"`
	// Limit bounds the records returned. Default and maximum 1000.
	Limit int `json:"limit,omitempty"`
}

// UsageReply lists usage records, oldest first.
type UsageReply struct {
	Records []UsageRecord `json:"records"`
	More    bool          `json:"more,omitempty"`
}
