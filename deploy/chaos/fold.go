package main

import (
	"bufio"
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"

	"github.com/sand-boxer/sandboxer/pkg/api"
)

// Account is one consumer's balance and credit on hold, however it was
// obtained: metering's account, the fold of its ledger, or the fold of
// the metering stream by examples/billing-consumer.
type Account struct {
	Consumer string `json:"consumer"`
	Balance  int64  `json:"balance"`
	Held     int64  `json:"held"`
	// Entries is how many ledger entries were folded (0 for metering's
	// account document).
	Entries int `json:"entries"`
}

// LedgerFold is the fold of every consumer's ledger entries.
type LedgerFold struct {
	// Accounts by consumer.
	Accounts map[string]Account
	// Problems are entries that do not follow from the ones before:
	// a gap or repeat in seq, a balance_after or held_after that is not
	// the running sum.
	Problems []string
	// DoubleDebits are debits that share a cause with an earlier debit of
	// the same consumer and sandbox: "<first key> and <second key>: cause".
	DoubleDebits []string
}

// FoldLedger folds entries (in any order) per consumer in seq order: the
// balance is the sum of amount, the credit on hold the sum of held. It
// checks that seq runs 1, 2, 3... without gaps and that every entry's
// balance_after and held_after are the running sums, and it finds debits
// of one sandbox with the same cause: one cause is charged once.
func FoldLedger(entries []api.LedgerEntry) LedgerFold {
	by := map[string][]api.LedgerEntry{}
	for _, e := range entries {
		by[e.Consumer] = append(by[e.Consumer], e)
	}
	f := LedgerFold{Accounts: map[string]Account{}}
	for _, c := range slices.Sorted(maps.Keys(by)) {
		es := by[c]
		slices.SortFunc(es, func(a, b api.LedgerEntry) int { return cmp.Compare(a.Seq, b.Seq) })
		acc := Account{Consumer: c}
		debits := map[string]string{} // sandbox + cause -> key
		for i, e := range es {
			if want := uint64(i + 1); e.Seq != want {
				f.Problems = append(f.Problems, fmt.Sprintf("%s: entry %s has seq %d, want %d", c, e.Key, e.Seq, want))
			}
			acc.Balance += e.Amount
			acc.Held += e.Held
			acc.Entries++
			if e.BalanceAfter != acc.Balance || e.HeldAfter != acc.Held {
				f.Problems = append(f.Problems, fmt.Sprintf("%s: entry %s (seq %d) says balance %d held %d, the fold %d and %d",
					c, e.Key, e.Seq, e.BalanceAfter, e.HeldAfter, acc.Balance, acc.Held))
				// Go on from what the entry says, so one bad entry is one problem.
				acc.Balance, acc.Held = e.BalanceAfter, e.HeldAfter
			}
			if e.Kind == "debit" {
				k := e.Sandbox + "\x00" + e.Cause
				if first, ok := debits[k]; ok {
					f.DoubleDebits = append(f.DoubleDebits, fmt.Sprintf("%s and %s: cause %s", first, e.Key, e.Cause))
				} else {
					debits[k] = e.Key
				}
			}
		}
		f.Accounts[c] = acc
	}
	return f
}

// ParseBillingLines reads examples/billing-consumer's output: one JSON
// object per consumer and line.
func ParseBillingLines(r io.Reader) (map[string]Account, error) {
	out := map[string]Account{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		var a Account
		if err := json.Unmarshal([]byte(line), &a); err != nil {
			return nil, fmt.Errorf("reading billing-consumer line %q: %w", line, err)
		}
		if a.Consumer == "" {
			return nil, fmt.Errorf("reading billing-consumer line %q: no consumer", line)
		}
		out[a.Consumer] = a
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading billing-consumer output: %w", err)
	}
	return out, nil
}

// CompareAccounts returns, sorted, every consumer whose balance or held
// differs between the three views (a consumer missing from one of them
// differs too), each as one line naming the three values.
func CompareAccounts(metering, ledger, stream map[string]Account) []string {
	all := map[string]bool{}
	for _, m := range []map[string]Account{metering, ledger, stream} {
		for c := range m {
			all[c] = true
		}
	}
	var out []string
	for _, c := range slices.Sorted(maps.Keys(all)) {
		m, okm := metering[c]
		l, okl := ledger[c]
		s, oks := stream[c]
		if okm && okl && oks && m.Balance == l.Balance && l.Balance == s.Balance && m.Held == l.Held && l.Held == s.Held {
			continue
		}
		out = append(out, fmt.Sprintf("%s: account %s, ledger %s, stream %s", c, show(m, okm), show(l, okl), show(s, oks)))
	}
	return out
}

func show(a Account, ok bool) string {
	if !ok {
		return "missing"
	}
	return fmt.Sprintf("%d/%d held", a.Balance, a.Held)
}
