package metering

import (
	"fmt"
	"slices"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/credits"
	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// Amounts are int64 counts of the credit minor unit, the smallest amount the
// ledger records. sand-boxer never divides a minor unit: prices are integers
// per second or per started minute, so every charge is an integer.

// Grant is credit added to an account, as the account document keeps it:
// the contract's [credits.Grant] (its fields inline in the document) and
// the count of open holds that may refund to it.
type Grant struct {
	credits.Grant
	// Holds counts the open holds whose debits drew from this grant and
	// may be refunded to it: a spent grant is forgotten once none is.
	Holds int `json:"holds,omitempty"`
}

// Hold is the credit reserved for one sandbox and the sandbox's meter. An
// open hold is one value in the credits bucket under
// hold.<consumer>.<sandbox>, written only in an atomic batch with its
// account; it is deleted when released.
type Hold struct {
	// ID is the hold id admission returns; it is the sandbox id.
	ID           string                 `json:"id"`
	Sandbox      string                 `json:"sandbox_id"`
	Profile      string                 `json:"profile"`
	Extension    string                 `json:"extension"`
	Host         string                 `json:"host,omitempty"`
	PricingModel extension.PricingModel `json:"pricing_model"`
	// Price is the self-hosted price list, fixed at admission.
	Price *extension.Price `json:"price,omitempty"`
	// Amount is what is on hold now.
	Amount int64 `json:"amount"`
	// Reserved is everything ever reserved (hold and extensions).
	Reserved int64 `json:"reserved"`
	// Debited is everything charged to the sandbox so far.
	Debited int64 `json:"debited"`
	// Quote is admission's quote.
	Quote     credits.Quote `json:"quote"`
	CreatedAt time.Time     `json:"created_at"`
	// ReadyAt starts the meter; zero until the sandbox is ready.
	ReadyAt time.Time `json:"ready_at,omitzero"`
	// ThroughSeconds is the usage the debits cover, in seconds from ready.
	ThroughSeconds int64 `json:"through_seconds,omitempty"`
	// Debits and Extends count entries, to derive their keys.
	Debits  int `json:"debits,omitempty"`
	Extends int `json:"extends,omitempty"`
	// Draws are the grants the debits were taken from, net of refunds.
	Draws []credits.Draw `json:"draws,omitempty"`
	// Low is set once the low-credit notice went out; Exhausted once the
	// destroy did.
	Low       bool `json:"low,omitempty"`
	Exhausted bool `json:"exhausted,omitempty"`
	// Implicit marks a hold opened at ready for a sandbox that was never
	// admitted.
	Implicit bool `json:"implicit,omitempty"`
	// Free marks the hold of a free sandbox ([terms.free]): it holds
	// nothing, and is opened and closed without ledger entries. It is
	// the sandbox's meter (when it became ready) until settlement, whose
	// usage record is the only trace the sandbox leaves.
	Free bool `json:"free,omitempty"`
}

// view is g as the credits API shows it.
func (g *Grant) view() credits.Grant { return g.Grant }

// accrues reports whether running costs anything: a free sandbox (no
// price, or a price of zero, and not metered by its backend) has nothing
// to accrue, so it gets no accrual schedule.
func (h *Hold) accrues() bool {
	return h.PricingModel == extension.PricingMetered || !h.Price.Free()
}

// Account is one consumer's credit: the balance projection of its ledger
// and its grants. It is one value in the credits bucket under
// account.<consumer>, changed only by compare-and-swap, and its size does
// not grow with the consumer's sandboxes: open holds are values of their
// own (hold.<consumer>.<sandbox>), and spent grants no open hold may
// refund to are forgotten (the ledger keeps them).
type Account struct {
	Consumer string `json:"consumer"`
	// Balance is the sum of the grants' remaining credit, and the fold of
	// the ledger's Amount.
	Balance int64 `json:"balance"`
	// Held is the sum of the open holds, and the fold of the ledger's Held.
	Held int64 `json:"held"`
	// Seq is the sequence of the last ledger entry.
	Seq    uint64   `json:"seq"`
	Grants []*Grant `json:"grants,omitempty"`
	// Open counts the open holds.
	Open int `json:"open_holds,omitempty"`
	// LowHolds counts the open holds whose low or exhausted notice went
	// out: the account is low on credit while it is not zero.
	LowHolds int `json:"low_holds,omitempty"`
	// LegacyHolds are the open holds of an account written before holds
	// had keys of their own; the next change moves them out.
	LegacyHolds map[string]*Hold `json:"holds,omitempty"`
	// Events lists the metering events the last change must still
	// publish: one per ledger entry, usage record and notice it made.
	// Everything else the change wrote (its ledger entries, usage records
	// and hold values) went to the credits stream in the same atomic
	// batch as this document, so only the publish can be left to do:
	// whoever loads the account next publishes them first. Published
	// items may stay listed until the next change: each publish carries
	// Nats-Msg-Id from the item's key.
	Events []*Item `json:"events,omitempty"`
	// Outbox is the outbox of an account written before ledger commits
	// were atomic batches: items whose writes may not have been done
	// yet. Whoever loads such an account writes and publishes them
	// (every write is idempotent) before changing anything, and the next
	// change clears it.
	Outbox    []*Item   `json:"outbox,omitempty"`
	UpdatedAt time.Time `json:"updated_at"`
}

// Available is the credit neither spent nor on hold.
func (a *Account) Available() int64 { return a.Balance - a.Held }

// Item is one thing an account change publishes (and, in the outbox of
// an account of the previous version, writes).
type Item struct {
	Entry  *credits.Entry       `json:"entry,omitempty"`
	Notice *credits.Notice      `json:"notice,omitempty"`
	Usage  *credits.UsageRecord `json:"usage,omitempty"`
	Hold   *HoldWrite           `json:"hold,omitempty"`
	// Trace is the W3C traceparent of what caused the item (the
	// lifecycle event, tick or request handled): the event the item
	// publishes joins that trace, however late the outbox is finished.
	// Empty: the event starts a trace of its own.
	Trace string `json:"trace,omitempty"`
}

// HoldWrite is a write, in the outbox of an account of the previous
// version, of one hold's value: its new state, or its
// deletion when the hold closed. Rev is the revision the key must be at
// (0: the key must never have existed), so a late or repeated write of an
// older state fails instead of overwriting a newer one.
type HoldWrite struct {
	Key    string `json:"key"`
	Rev    uint64 `json:"rev"`
	Hold   *Hold  `json:"value,omitempty"`
	Delete bool   `json:"delete,omitempty"`
}

// newAccount is the account of a consumer with no history.
func newAccount(consumer string) *Account {
	return &Account{Consumer: consumer}
}

// clone returns a copy of a that shares nothing a change may modify.
func (a *Account) clone() *Account {
	c := *a
	c.Grants = make([]*Grant, len(a.Grants))
	for i, g := range a.Grants {
		cp := *g
		c.Grants[i] = &cp
	}
	c.Events = slices.Clone(a.Events)
	c.Outbox = slices.Clone(a.Outbox)
	return &c
}

// check verifies the account's invariants.
func (a *Account) check() error {
	var sum int64
	for _, g := range a.Grants {
		if g.Remaining < 0 {
			return fmt.Errorf("grant %s remaining %d < 0", g.ID, g.Remaining)
		}
		sum += g.Remaining
	}
	if sum != a.Balance {
		return fmt.Errorf("balance %d != sum of grants %d", a.Balance, sum)
	}
	if a.Held < 0 || a.Open < 0 {
		return fmt.Errorf("held %d, %d open holds", a.Held, a.Open)
	}
	if a.Held > a.Balance {
		return fmt.Errorf("held %d > balance %d", a.Held, a.Balance)
	}
	return nil
}

// record completes e with the account's next sequence and state, and adds
// it to the change's events.
func (a *Account) record(e *credits.Entry) *credits.Entry {
	a.Seq++
	e.Seq = a.Seq
	e.Consumer = a.Consumer
	e.BalanceAfter, e.HeldAfter = a.Balance, a.Held
	a.Events = append(a.Events, &Item{Entry: e})
	return e
}

// prune forgets grants that are spent or expired to nothing and that no
// open hold may refund to, so the account stays small. The ledger keeps
// them, and a grant's id stays taken: the ledger key decides.
func (a *Account) prune() {
	a.Grants = slices.DeleteFunc(a.Grants, func(g *Grant) bool { return g.Remaining == 0 && g.Holds <= 0 })
}

// Ledger key derivations. Consumer names, sandbox ids and grant ids are
// names without dots, so keys never collide.
func grantKey(consumer, id string) string { return consumer + ".grant." + id }
func expireKey(consumer, id string, n int) string {
	return fmt.Sprintf("%s.grant.%s.expire.%d", consumer, id, n)
}
func holdKey(consumer, sb string) string    { return consumer + ".sb." + sb + ".hold" }
func releaseKey(consumer, sb string) string { return consumer + ".sb." + sb + ".release" }
func extendKey(consumer, sb string, n int) string {
	return fmt.Sprintf("%s.sb.%s.extend.%d", consumer, sb, n)
}
func debitKey(consumer, sb string, n int) string {
	return fmt.Sprintf("%s.sb.%s.debit.%d", consumer, sb, n)
}
func settleKey(consumer, sb string) string { return consumer + ".sb." + sb + ".settle" }
func refundKey(consumer, sb string) string { return consumer + ".sb." + sb + ".refund" }

// spendingOrder returns the grants with credit left in the order they are
// spent: priority (lower first), then earliest expiry (none last), then
// oldest.
func (a *Account) spendingOrder() []*Grant {
	out := make([]*Grant, 0, len(a.Grants))
	for _, g := range a.Grants {
		if g.Remaining > 0 {
			out = append(out, g)
		}
	}
	slices.SortStableFunc(out, func(x, y *Grant) int {
		if x.Priority != y.Priority {
			return x.Priority - y.Priority
		}
		switch {
		case x.ExpiresAt.IsZero() && !y.ExpiresAt.IsZero():
			return 1
		case !x.ExpiresAt.IsZero() && y.ExpiresAt.IsZero():
			return -1
		case !x.ExpiresAt.Equal(y.ExpiresAt):
			return x.ExpiresAt.Compare(y.ExpiresAt)
		}
		if c := x.GrantedAt.Compare(y.GrantedAt); c != 0 {
			return c
		}
		if x.ID < y.ID {
			return -1
		}
		return 1
	})
	return out
}

func (a *Account) grant(id string) *Grant {
	for _, g := range a.Grants {
		if g.ID == id {
			return g
		}
	}
	return nil
}

// take removes amount from the balance in spending order. The caller has
// checked amount <= balance.
func (a *Account) take(amount int64) []credits.Draw {
	var draws []credits.Draw
	for _, g := range a.spendingOrder() {
		if amount == 0 {
			break
		}
		n := min(amount, g.Remaining)
		g.Remaining -= n
		a.Balance -= n
		amount -= n
		draws = append(draws, credits.Draw{Grant: g.ID, Amount: n})
	}
	return draws
}

// addGrant applies a grant. The caller has checked the key is new.
func (a *Account) addGrant(g Grant, cause string, now time.Time) *credits.Entry {
	g.Remaining = g.Amount
	if g.GrantedAt.IsZero() {
		g.GrantedAt = now
	}
	a.Grants = append(a.Grants, &g)
	a.Balance += g.Amount
	reason := "paid credit"
	if g.Promo {
		reason = "promotional credit"
	}
	return a.record(&credits.Entry{Key: grantKey(a.Consumer, g.ID), Kind: credits.EntryGrant, Amount: g.Amount, Grant: g.ID, Cause: cause, Reason: reason, At: now})
}

// expire removes the unspent, unreserved rest of every grant past its
// expiry. Credit on hold is not taken: a grant's rest that backs a hold
// expires once the hold lets it go.
func (a *Account) expire(now time.Time) {
	for _, g := range a.Grants {
		if g.ExpiresAt.IsZero() || now.Before(g.ExpiresAt) || g.Remaining == 0 {
			continue
		}
		n := min(g.Remaining, a.Available())
		if n <= 0 {
			continue
		}
		g.Remaining -= n
		a.Balance -= n
		g.Expiries++
		a.record(&credits.Entry{
			Key: expireKey(a.Consumer, g.ID, g.Expiries), Kind: credits.EntryExpire, Amount: -n, Grant: g.ID,
			Draws: []credits.Draw{{Grant: g.ID, Amount: n}}, Cause: "grant." + g.ID + ".expiry", Reason: "grant expired", At: now,
		})
	}
}

// reserve opens hold h for amount. It refuses with
// [credits.ErrInsufficientCredits] when amount exceeds the available credit.
func (a *Account) reserve(h *Hold, amount int64, cause string, now time.Time) error {
	if amount < 0 {
		return fmt.Errorf("reserving %d: negative amount", amount)
	}
	if amount > a.Available() {
		return fmt.Errorf("%w: hold of %d for sandbox %s, available %d", credits.ErrInsufficientCredits, amount, h.Sandbox, a.Available())
	}
	h.Amount, h.Reserved = amount, amount
	a.Open++
	a.Held += amount
	reason := "admission"
	if h.Implicit {
		reason = "ready without admission"
	}
	a.record(&credits.Entry{Key: holdKey(a.Consumer, h.Sandbox), Kind: credits.EntryHold, Held: amount, Sandbox: h.Sandbox, Hold: h.ID, Cause: cause, Reason: reason, At: now})
	return nil
}

// openFree opens hold h of a free sandbox: it holds nothing and records
// no ledger entry.
func (a *Account) openFree(h *Hold) {
	h.Free, h.Amount, h.Reserved = true, 0, 0
	a.Open++
}

// flagLow counts h among the holds short of credit, the first time it is
// flagged low or exhausted; the caller flags it.
func (a *Account) flagLow(h *Hold) {
	if !h.Low && !h.Exhausted {
		a.LowHolds++
	}
}

// extend adds up to amount to hold h, as far as the available credit
// allows, and returns what it added.
func (a *Account) extend(h *Hold, amount int64, cause string, now time.Time) int64 {
	n := min(amount, a.Available())
	if n <= 0 {
		return 0
	}
	h.Amount += n
	h.Reserved += n
	a.Held += n
	h.Extends++
	a.record(&credits.Entry{Key: extendKey(a.Consumer, h.Sandbox, h.Extends), Kind: credits.EntryExtend, Held: n, Sandbox: h.Sandbox, Hold: h.ID, Cause: cause, Reason: "running sandbox", At: now})
	return n
}

// debit charges up to amount for hold h's sandbox: from the hold first,
// then from the available credit, never below zero. It returns what it
// charged; less than amount means the consumer could not pay the rest.
func (a *Account) debit(h *Hold, key string, amount int64, cause, reason string, now time.Time) int64 {
	fromHold := min(amount, h.Amount)
	extra := min(amount-fromHold, a.Available())
	total := fromHold + max(extra, 0)
	if total <= 0 {
		return 0
	}
	h.Amount -= fromHold
	a.Held -= fromHold
	draws := a.take(total)
	h.Debited += total
	h.Draws = a.mergeDraws(h.Draws, draws)
	a.record(&credits.Entry{Key: key, Kind: credits.EntryDebit, Amount: -total, Held: -fromHold, Sandbox: h.Sandbox, Hold: h.ID, Draws: draws, Cause: cause, Reason: reason, At: now})
	return total
}

// refund gives amount back to the grants h's debits were drawn from, the
// last spent first.
func (a *Account) refund(h *Hold, amount int64, cause string, now time.Time) {
	if amount <= 0 {
		return
	}
	left := amount
	var draws []credits.Draw
	for i := len(h.Draws) - 1; i >= 0 && left > 0; i-- {
		d := &h.Draws[i]
		n := min(left, d.Amount)
		if n <= 0 {
			continue
		}
		g := a.grant(d.Grant)
		if g == nil {
			continue
		}
		g.Remaining += n
		d.Amount -= n
		left -= n
		draws = append(draws, credits.Draw{Grant: g.ID, Amount: n})
	}
	given := amount - left
	a.Balance += given
	h.Debited -= given
	a.record(&credits.Entry{Key: refundKey(a.Consumer, h.Sandbox), Kind: credits.EntryRefund, Amount: given, Sandbox: h.Sandbox, Hold: h.ID, Draws: draws, Cause: cause, Reason: "charged beyond actual usage", At: now})
}

// release frees what is left of hold h and closes it. The hold of a free
// sandbox that was charged nothing closes without a ledger entry, as it
// opened.
func (a *Account) release(h *Hold, cause, reason string, now time.Time) {
	a.Held -= h.Amount
	freed := h.Amount
	h.Amount = 0
	a.Open--
	if h.Low || h.Exhausted {
		a.LowHolds = max(a.LowHolds-1, 0) // holds flagged before LowHolds was counted: not counted
	}
	for _, d := range h.Draws {
		if g := a.grant(d.Grant); g != nil {
			g.Holds--
		}
	}
	if h.Free && freed == 0 && h.Debited == 0 && len(h.Draws) == 0 {
		return
	}
	a.record(&credits.Entry{Key: releaseKey(a.Consumer, h.Sandbox), Kind: credits.EntryRelease, Held: -freed, Sandbox: h.Sandbox, Hold: h.ID, Cause: cause, Reason: reason, At: now})
}

// mergeDraws adds draws to a hold's, counting the hold on each grant it
// draws from for the first time.
func (a *Account) mergeDraws(into, add []credits.Draw) []credits.Draw {
	for _, d := range add {
		found := false
		for i := range into {
			if into[i].Grant == d.Grant {
				into[i].Amount += d.Amount
				found = true
				break
			}
		}
		if !found {
			into = append(into, d)
			if g := a.grant(d.Grant); g != nil {
				g.Holds++
			}
		}
	}
	return into
}
