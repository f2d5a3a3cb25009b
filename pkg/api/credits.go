package api

import (
	"time"

	"github.com/sand-boxer/sandboxer/pkg/credits"
)

// The credits API: /v1/credits/... Amounts are int64 counts of the credit
// minor unit, never fractions. A consumer key reads only its own account;
// an admin key reads any and grants. The bodies are the credits contract
// (pkg/credits), which the metering service answers with and the gateway
// passes on as they are: these names are its types, not copies.

// CreditBalance is the body of GET /v1/credits/balance: an account, where
// Balance = Held + Available.
type CreditBalance = credits.BalanceReply

// CreditGrant is credit added to an account.
type CreditGrant = credits.Grant

// CreditHold is an open hold: credit reserved for one sandbox.
type CreditHold = credits.HoldView

// GrantRequest is the body of POST /v1/credits/grants (admin only).
type GrantRequest = credits.GrantRequest

// GrantResult is the answer to a grant: the grant and the account after
// it. Duplicate is true when the id had been granted before.
type GrantResult = credits.GrantReply

// LedgerQuery selects ledger entries: one consumer's, at or after Since.
type LedgerQuery struct {
	// Consumer is the account; empty means the caller's own.
	Consumer string
	Since    time.Time
}

// CreditDraw is the part of a debit taken from, or a refund given to, one
// grant.
type CreditDraw = credits.Draw

// LedgerEntry is one entry of the append-only ledger. Amount is the change
// of the balance, Held the change of the credit on hold; folding them over
// the entries gives the balance and the credit on hold.
type LedgerEntry = credits.Entry

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
type UsageQuote = credits.Quote

// UsageActual is a sandbox's settled usage. Source is meter (the
// backend's own meter) or lifecycle (ready to destroyed with the
// profile's price).
type UsageActual = credits.Actual

// UsageRecord is the settlement of one sandbox: quote and actual side by
// side, and what was charged.
type UsageRecord = credits.UsageRecord

// UsageList is the body of GET /v1/credits/usage: records oldest first.
// More is true when the list was cut at the service's limit; narrow the
// window to see the rest.
type UsageList = credits.UsageReply
