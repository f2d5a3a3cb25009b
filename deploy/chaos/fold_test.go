package main

import (
	"reflect"
	"strings"
	"testing"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/credits"
)

// entry is a ledger entry of consumer c with the running sums filled in
// by the caller.
func entry(c string, seq uint64, kind string, amount, held, balance, heldAfter int64, sb, cause string) api.LedgerEntry {
	return api.LedgerEntry{Key: c + "." + kind + "." + string(rune('0'+seq)), Seq: seq, Consumer: c, Kind: credits.EntryKind(kind), Amount: amount, Held: held,
		BalanceAfter: balance, HeldAfter: heldAfter, Sandbox: sb, Cause: cause}
}

func TestFoldLedger(t *testing.T) {
	t.Parallel()
	// A grant, a hold, an accrual, a settlement and a release, given out
	// of order; and another consumer's grant.
	a := []api.LedgerEntry{
		entry("a", 3, "debit", -20, -20, 980, 130, "sb1", "tick@1"),
		entry("a", 1, "grant", 1000, 0, 1000, 0, "", "g1"),
		entry("a", 2, "hold", 0, 150, 1000, 150, "sb1", "create1"),
		entry("a", 4, "debit", -50, -50, 930, 80, "sb1", "destroyed1"),
		entry("a", 5, "release", 0, -80, 930, 0, "sb1", "destroyed1"),
		entry("b", 1, "grant", 5, 0, 5, 0, "", "g2"),
	}
	tests := []struct {
		name     string
		entries  []api.LedgerEntry
		accounts map[string]Account
		problems int
		doubles  []string
	}{
		{
			name:    "consistent",
			entries: a,
			accounts: map[string]Account{
				"a": {Consumer: "a", Balance: 930, Held: 0, Entries: 5},
				"b": {Consumer: "b", Balance: 5, Entries: 1},
			},
		},
		{
			name:     "a gap",
			entries:  []api.LedgerEntry{a[1], a[2], a[3]},
			accounts: map[string]Account{"a": {Consumer: "a", Balance: 930, Held: 80, Entries: 3}},
			problems: 2, // the seq, and the sums it lacks
		},
		{
			name:     "a wrong balance_after",
			entries:  []api.LedgerEntry{a[1], entry("a", 2, "grant", 10, 0, 1011, 0, "", "g3")},
			accounts: map[string]Account{"a": {Consumer: "a", Balance: 1011, Entries: 2}},
			problems: 1,
		},
		{
			name: "a second debit for one cause",
			entries: []api.LedgerEntry{a[1], a[2], a[0],
				{Key: "a.sb.sb1.debit.2", Seq: 4, Consumer: "a", Kind: "debit", Amount: -20, Held: -20, BalanceAfter: 960, HeldAfter: 110, Sandbox: "sb1", Cause: "tick@1"}},
			accounts: map[string]Account{"a": {Consumer: "a", Balance: 960, Held: 110, Entries: 4}},
			doubles:  []string{"a.debit.3 and a.sb.sb1.debit.2: cause tick@1"},
		},
		{
			name: "one cause, two sandboxes",
			entries: []api.LedgerEntry{a[1], a[2], a[0],
				{Key: "a.sb.sb2.debit.1", Seq: 4, Consumer: "a", Kind: "debit", Amount: -20, Held: 0, BalanceAfter: 960, HeldAfter: 130, Sandbox: "sb2", Cause: "tick@1"}},
			accounts: map[string]Account{"a": {Consumer: "a", Balance: 960, Held: 130, Entries: 4}},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := FoldLedger(tc.entries)
			if !reflect.DeepEqual(f.Accounts, tc.accounts) {
				t.Errorf("accounts = %+v, want %+v", f.Accounts, tc.accounts)
			}
			if len(f.Problems) != tc.problems {
				t.Errorf("problems = %q, want %d", f.Problems, tc.problems)
			}
			if !reflect.DeepEqual(f.DoubleDebits, tc.doubles) {
				t.Errorf("double debits = %q, want %q", f.DoubleDebits, tc.doubles)
			}
		})
	}
}

func TestParseBillingLines(t *testing.T) {
	t.Parallel()
	out := `{"consumer":"dev","balance":985,"held":0,"available":985,"entries":4,"first_seq":1,"last_seq":4}

{"consumer":"x","balance":10,"held":3,"available":7,"entries":2,"first_seq":1,"last_seq":2,"duplicates":1}
`
	got, err := ParseBillingLines(strings.NewReader(out))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]Account{
		"dev": {Consumer: "dev", Balance: 985, Entries: 4},
		"x":   {Consumer: "x", Balance: 10, Held: 3, Entries: 2},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v, want %+v", got, want)
	}
	for _, bad := range []string{"not json\n", `{"balance":1}` + "\n"} {
		if _, err := ParseBillingLines(strings.NewReader(bad)); err == nil {
			t.Errorf("ParseBillingLines(%q): no error", bad)
		}
	}
}

func TestCompareAccounts(t *testing.T) {
	t.Parallel()
	acc := func(b, h int64) Account { return Account{Balance: b, Held: h} }
	m := map[string]Account{"a": acc(10, 0), "b": acc(5, 1), "c": acc(1, 0)}
	l := map[string]Account{"a": acc(10, 0), "b": acc(5, 0), "c": acc(1, 0)}
	s := map[string]Account{"a": acc(10, 0), "b": acc(5, 1)}
	got := CompareAccounts(m, l, s)
	want := []string{
		"b: account 5/1 held, ledger 5/0 held, stream 5/1 held",
		"c: account 1/0 held, ledger 1/0 held, stream missing",
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %q, want %q", got, want)
	}
	if got := CompareAccounts(l, l, l); got != nil {
		t.Errorf("equal views: %q", got)
	}
}
