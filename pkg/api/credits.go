package api

import "time"

// The credits API: /v1/credits/... Amounts are int64 counts of the credit
// minor unit, never fractions. A consumer key reads only its own account;
// an admin key reads any and grants.

// CreditBalance is the body of GET /v1/credits/balance: an account, where
// Balance = Held + Available.
type CreditBalance struct {
	Consumer  string `json:"consumer"`
	Balance   int64  `json:"balance"`
	Held      int64  `json:"held"`
	Available int64  `json:"available"`
	// Seq is the sequence of the account's last ledger entry.
	Seq uint64 `json:"seq"`
	// Grants are the grants with credit left, in spending order.
	Grants []CreditGrant `json:"grants"`
	// Holds are the open holds, by hold id.
	Holds []CreditHold `json:"holds"`
}

// CreditGrant is credit added to an account.
type CreditGrant struct {
	ID string `json:"id"`
	// Amount is what was granted; Remaining what is left unspent.
	Amount    int64 `json:"amount"`
	Remaining int64 `json:"remaining"`
	// Priority orders spending: lower first, then the earliest expiry.
	Priority  int       `json:"priority"`
	ExpiresAt time.Time `json:"expires_at,omitzero"`
	// Promo marks promotional (unpaid) credit.
	Promo     bool      `json:"promo,omitempty"`
	GrantedAt time.Time `json:"granted_at"`
	Expiries  int       `json:"expiries,omitempty"`
}

// CreditHold is an open hold: credit reserved for one sandbox.
type CreditHold struct {
	Hold      string    `json:"hold"`
	Sandbox   string    `json:"sandbox_id"`
	Profile   string    `json:"profile"`
	Extension string    `json:"extension"`
	Amount    int64     `json:"amount"`
	Debited   int64     `json:"debited"`
	ReadyAt   time.Time `json:"ready_at,omitzero"`
}

// GrantRequest is the body of POST /v1/credits/grants (admin only).
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
	// ID makes the grant idempotent: the same id for the same consumer
	// grants once. Empty: a fresh id.
	ID string `json:"id,omitempty"`
}

// GrantResult is the answer to a grant: the grant and the account after
// it. Duplicate is true when the id had been granted before.
type GrantResult struct {
	Grant     CreditGrant   `json:"grant"`
	Duplicate bool          `json:"duplicate,omitempty"`
	Balance   CreditBalance `json:"balance"`
}

// LedgerQuery selects ledger entries: one consumer's, at or after Since.
type LedgerQuery struct {
	// Consumer is the account; empty means the caller's own.
	Consumer string
	Since    time.Time
}

// CreditDraw is the part of a debit taken from, or a refund given to, one
// grant.
type CreditDraw struct {
	Grant  string `json:"grant"`
	Amount int64  `json:"amount"`
}

// LedgerEntry is one entry of the append-only ledger. Amount is the change
// of the balance, Held the change of the credit on hold; folding them over
// the entries gives the balance and the credit on hold.
type LedgerEntry struct {
	Key          string       `json:"key"`
	Seq          uint64       `json:"seq"`
	Consumer     string       `json:"consumer"`
	Kind         string       `json:"kind"`
	Amount       int64        `json:"amount"`
	Held         int64        `json:"held"`
	BalanceAfter int64        `json:"balance_after"`
	HeldAfter    int64        `json:"held_after"`
	Sandbox      string       `json:"sandbox_id,omitempty"`
	Hold         string       `json:"hold,omitempty"`
	Grant        string       `json:"grant,omitempty"`
	Draws        []CreditDraw `json:"draws,omitempty"`
	Cause        string       `json:"cause"`
	Reason       string       `json:"reason,omitempty"`
	At           time.Time    `json:"at"`
}

// Ledger is the body of GET /v1/credits/ledger: entries in sequence order.
type Ledger struct {
	Consumer string        `json:"consumer"`
	Entries  []LedgerEntry `json:"entries"`
}

// UsageQuery selects usage records: destroyed in [From, To).
type UsageQuery struct {
	// Consumer keeps one consumer's records. Empty means the caller's own
	// for a consumer key, and every consumer's for an admin key.
	Consumer string
	From, To time.Time
}

// UsageQuote is admission's price for a sandbox.
type UsageQuote struct {
	Amount          int64    `json:"amount"`
	DurationSeconds int64    `json:"duration_seconds"`
	Breakdown       []string `json:"breakdown,omitempty"`
}

// UsageActual is a sandbox's settled usage. Source is meter (the
// backend's own meter) or lifecycle (ready to destroyed with the
// profile's price).
type UsageActual struct {
	Source    string   `json:"source"`
	Amount    int64    `json:"amount"`
	Quantity  int64    `json:"quantity"`
	Unit      string   `json:"unit"`
	Breakdown []string `json:"breakdown,omitempty"`
}

// UsageRecord is the settlement of one sandbox: quote and actual side by
// side, and what was charged.
type UsageRecord struct {
	Key          string      `json:"key"`
	Consumer     string      `json:"consumer"`
	Sandbox      string      `json:"sandbox_id"`
	Hold         string      `json:"hold"`
	Profile      string      `json:"profile"`
	Extension    string      `json:"extension"`
	PricingModel string      `json:"pricing_model"`
	ReadyAt      time.Time   `json:"ready_at,omitzero"`
	DestroyedAt  time.Time   `json:"destroyed_at"`
	Seconds      int64       `json:"seconds"`
	Quote        UsageQuote  `json:"quote"`
	Actual       UsageActual `json:"actual"`
	Charged      int64       `json:"charged"`
	Refunded     int64       `json:"refunded"`
	Unpaid       int64       `json:"unpaid"`
	Reserved     int64       `json:"reserved"`
	Reason       string      `json:"reason"`
	Cause        string      `json:"cause"`
}

// UsageList is the body of GET /v1/credits/usage: records oldest first.
// More is true when the list was cut at the service's limit; narrow the
// window to see the rest.
type UsageList struct {
	Records []UsageRecord `json:"records"`
	More    bool          `json:"more,omitempty"`
}
