package credits

import (
	"fmt"
	"time"
)

// MaxBalance is the most credit an account holds, and so the largest
// grant: 2^53 minor units, which every JSON number holds exactly. A grant
// that would take a balance beyond it is refused ([ErrInvalidRequest]);
// nothing else adds to a balance but refunds of what was debited, so no
// sum of amounts ever wraps around.
const MaxBalance int64 = 1 << 53

// EntryKind is the kind of a ledger entry.
type EntryKind string

// Ledger entry kinds. Amount is the change of the balance, Held the change
// of the credit on hold; available = balance - held.
const (
	// EntryGrant adds credit: Amount > 0.
	EntryGrant EntryKind = "grant"
	// EntryHold reserves credit for a sandbox at admission: Held > 0.
	EntryHold EntryKind = "hold"
	// EntryExtend reserves more credit for a running sandbox: Held > 0.
	EntryExtend EntryKind = "extend"
	// EntryDebit charges usage: Amount < 0, Held <= 0 (charged from the
	// hold first).
	EntryDebit EntryKind = "debit"
	// EntryRefund gives back what was charged beyond the actual usage at
	// settlement: Amount > 0.
	EntryRefund EntryKind = "refund"
	// EntryRelease frees the rest of a hold: Held <= 0. Every hold is
	// released exactly once.
	EntryRelease EntryKind = "release"
	// EntryExpire removes the unspent rest of an expired grant: Amount < 0.
	EntryExpire EntryKind = "expire"
)

// Draw is the part of an amount taken from, or given back to, one grant.
type Draw struct {
	Grant  string `json:"grant"`
	Amount int64  `json:"amount"`
}

// Entry is one ledger entry. Its key is derived from the event or request
// that caused it and is written once, ever: a second write of the same key
// fails, so redelivery never records twice. Folding Amount over a
// consumer's entries gives the balance; folding Held gives the credit on
// hold.
type Entry struct {
	// Key is the ledger key: <consumer>.<derivation of the cause>.
	Key string `json:"key"`
	// Seq numbers a consumer's entries from 1, without gaps, in the order
	// they were applied.
	Seq      uint64    `json:"seq"`
	Consumer string    `json:"consumer"`
	Kind     EntryKind `json:"kind"`
	// Amount is the change of the balance.
	Amount int64 `json:"amount"`
	// Held is the change of the credit on hold.
	Held int64 `json:"held"`
	// BalanceAfter and HeldAfter are the account after the entry.
	BalanceAfter int64 `json:"balance_after"`
	HeldAfter    int64 `json:"held_after"`
	// Sandbox and Hold name the sandbox an entry is about, if any.
	Sandbox string `json:"sandbox_id,omitempty"`
	Hold    string `json:"hold,omitempty"`
	// Grant names the grant a grant or expire entry is about.
	Grant string `json:"grant,omitempty"`
	// Draws are the grants a debit was taken from or a refund given to.
	Draws []Draw `json:"draws,omitempty"`
	// Cause is the id of the event or request that caused the entry.
	Cause string `json:"cause"`
	// Reason explains the entry in words.
	Reason string    `json:"reason,omitempty"`
	At     time.Time `json:"at"`
}

// Quote is a price for a duration, with its breakdown.
type Quote struct {
	Amount          int64    `json:"amount"`
	DurationSeconds int64    `json:"duration_seconds"`
	Breakdown       []string `json:"breakdown,omitempty"`
}

// Fold folds a consumer's ledger entries into the balance and the credit
// on hold they add up to. It checks that the entries are one consumer's,
// numbered 1, 2, 3... without gap or repeat in the order given (sort them
// by Seq first), and that no entry leaves anything below zero; it returns
// the first violation.
func Fold(entries []Entry) (balance, held int64, err error) {
	for i := range entries {
		e := &entries[i]
		if e.Seq != uint64(i+1) {
			return 0, 0, fmt.Errorf("folding ledger: entry %s has seq %d, want %d", e.Key, e.Seq, i+1)
		}
		if e.Consumer != entries[0].Consumer {
			return 0, 0, fmt.Errorf("folding ledger: entry %s is of consumer %s, not %s", e.Key, e.Consumer, entries[0].Consumer)
		}
		balance += e.Amount
		held += e.Held
		if balance != e.BalanceAfter || held != e.HeldAfter {
			return 0, 0, fmt.Errorf("folding ledger: entry %s leaves balance %d held %d, the fold gives %d and %d", e.Key, e.BalanceAfter, e.HeldAfter, balance, held)
		}
		if balance < 0 || held < 0 || held > balance {
			return 0, 0, fmt.Errorf("folding ledger: entry %s leaves balance %d, held %d", e.Key, balance, held)
		}
	}
	return balance, held, nil
}

// Grant is credit added to an account, as the account shows it.
type Grant struct {
	ID string `json:"id"`
	// Amount is what was granted; Remaining what is left unspent.
	Amount    int64 `json:"amount"`
	Remaining int64 `json:"remaining"`
	// Priority orders spending: lower first. Among equal priorities, the
	// earliest expiry is spent first.
	Priority int `json:"priority"`
	// ExpiresAt, when set, is when the unspent rest expires.
	ExpiresAt time.Time `json:"expires_at,omitzero"`
	// Promo marks promotional (unpaid) credit.
	Promo     bool      `json:"promo,omitempty"`
	GrantedAt time.Time `json:"granted_at"`
	// Expiries counts the expire entries of this grant.
	Expiries int `json:"expiries,omitempty"`
}
