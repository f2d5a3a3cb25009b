package main

import (
	"encoding/csv"
	"fmt"
	"io"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/sand-boxer/sandboxer/pkg/api"
)

// newCreditsCmd is `sandboxer credits`: balances, grants, the ledger and
// usage records, through the gateway's /v1/credits API. Amounts are
// credit minor units.
func newCreditsCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "credits balance|grant|ledger|usage",
		Short: "Prepaid credits: balances, grants, the ledger and usage records",
	}
	cmd.AddCommand(newCreditsBalanceCmd(g), newCreditsGrantCmd(g), newCreditsLedgerCmd(g), newCreditsUsageCmd(g))
	return cmd
}

// Directions of a duration given to a time flag.
const (
	ago     = -1 // --since 24h: a day before now
	fromNow = +1 // --expires 720h: thirty days after now
)

// parseWhen reads a time flag: an RFC 3339 time, a date (midnight UTC), or
// a duration meaning that long before now (dir ago) or after now (dir
// fromNow).
func parseWhen(flag, s string, now time.Time, dir int) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
		return t, nil
	}
	if t, err := time.Parse(time.DateOnly, s); err == nil {
		return t, nil
	}
	if d, err := time.ParseDuration(s); err == nil && d >= 0 {
		return now.Add(time.Duration(dir) * d), nil
	}
	return time.Time{}, &exitError{2, fmt.Errorf("--%s %q: want an RFC 3339 time (2025-01-02T15:04:05Z), a date (2025-01-02) or %s", flag, s, durationUsage(dir))}
}

// durationUsage says what a duration means for a time flag of direction
// dir.
func durationUsage(dir int) string {
	if dir == fromNow {
		return "a duration from now (720h: in 30 days)"
	}
	return "a duration ago (24h: a day ago)"
}

func newCreditsBalanceCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "balance [CONSUMER]",
		Short: "Show an account: balance, held and available (default: your own)",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			format, err := g.outputFormat("table", "json")
			if err != nil {
				return err
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			who := ""
			if len(args) == 1 {
				who = args[0]
			}
			b, err := c.CreditBalance(cmd.Context(), who)
			if err != nil {
				return err
			}
			if format == "json" {
				return printJSON(cmd.OutOrStdout(), b)
			}
			printBalance(cmd.OutOrStdout(), b)
			return nil
		},
	}
}

func printBalance(w io.Writer, b *api.CreditBalance) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "consumer\t%s\n", b.Consumer)
	fmt.Fprintf(tw, "balance\t%d\n", b.Balance)
	fmt.Fprintf(tw, "held\t%d\n", b.Held)
	fmt.Fprintf(tw, "available\t%d\n", b.Available)
	for _, gr := range b.Grants {
		exp := "never"
		if !gr.ExpiresAt.IsZero() {
			exp = gr.ExpiresAt.Local().Format(time.DateTime)
		}
		kind := "paid"
		if gr.Promo {
			kind = "promo"
		}
		fmt.Fprintf(tw, "grant %s\t%d of %d left, priority %d, %s, expires %s\n", gr.ID, gr.Remaining, gr.Amount, gr.Priority, kind, exp)
	}
	for _, h := range b.Holds {
		fmt.Fprintf(tw, "hold %s\t%d held, %d debited (%s on %s)\n", h.Hold, h.Amount, h.Debited, h.Profile, h.Extension)
	}
	_ = tw.Flush()
}

func newCreditsGrantCmd(g *globals) *cobra.Command {
	var (
		expires  string
		priority int
		promo    bool
		id       string
	)
	cmd := &cobra.Command{
		Use:   "grant CONSUMER AMOUNT [--expires T] [--priority N] [--promo]",
		Short: "Add credit to an account (admin; uses the admin key unless --as or --token says otherwise)",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			format, err := g.outputFormat("table", "json")
			if err != nil {
				return err
			}
			amount, err := strconv.ParseInt(args[1], 10, 64)
			if err != nil || amount <= 0 {
				return &exitError{2, fmt.Errorf("AMOUNT %q: want a positive integer of credit minor units", args[1])}
			}
			req := api.GrantRequest{Consumer: args[0], Amount: amount, Priority: priority, Promo: promo, ID: id}
			if req.ExpiresAt, err = parseWhen("expires", expires, time.Now(), fromNow); err != nil {
				return err
			}
			c, err := g.adminClient(cmd)
			if err != nil {
				return err
			}
			res, err := c.Grant(cmd.Context(), req)
			if err != nil {
				return err
			}
			if format == "json" {
				return printJSON(cmd.OutOrStdout(), res)
			}
			w := cmd.OutOrStdout()
			if res.Duplicate {
				fmt.Fprintf(w, "grant %s was made before; nothing changed\n", res.Grant.ID)
			} else {
				fmt.Fprintf(w, "granted %d to %s (grant %s)\n", res.Grant.Amount, res.Balance.Consumer, res.Grant.ID)
			}
			printBalance(w, &res.Balance)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&expires, "expires", "", "when the unspent rest expires: an RFC 3339 time, a date or "+durationUsage(fromNow))
	f.IntVar(&priority, "priority", 0, "spending order, lower first (0 to 1000)")
	f.BoolVar(&promo, "promo", false, "promotional (unpaid) credit")
	f.StringVar(&id, "id", "", "grant id: granting again with the same id changes nothing (default: a fresh id)")
	return cmd
}

func newCreditsLedgerCmd(g *globals) *cobra.Command {
	var since string
	cmd := &cobra.Command{
		Use:   "ledger CONSUMER [--since T]",
		Short: "List an account's ledger entries (another consumer's needs --as admin)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			format, err := g.outputFormat("table", "json", "csv")
			if err != nil {
				return err
			}
			t, err := parseWhen("since", since, time.Now(), ago)
			if err != nil {
				return err
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			l, err := c.Ledger(cmd.Context(), api.LedgerQuery{Consumer: args[0], Since: t})
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			switch format {
			case "json":
				return printJSON(w, l)
			case "csv":
				return writeLedgerCSV(w, l.Entries)
			}
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "SEQ\tTIME\tKIND\tAMOUNT\tHELD\tBALANCE\tHELD AFTER\tSANDBOX\tREASON")
			for _, e := range l.Entries {
				fmt.Fprintf(tw, "%d\t%s\t%s\t%d\t%d\t%d\t%d\t%s\t%s\n", e.Seq, e.At.Local().Format(time.DateTime), e.Kind,
					e.Amount, e.Held, e.BalanceAfter, e.HeldAfter, e.Sandbox, e.Reason)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVar(&since, "since", "", "only entries at or after: an RFC 3339 time, a date or "+durationUsage(ago))
	return cmd
}

// ledgerCSVHeader are the columns of `credits ledger -o csv`.
var ledgerCSVHeader = []string{"seq", "at", "kind", "amount", "held", "balance_after", "held_after", "sandbox_id", "hold", "grant", "cause", "reason", "key"}

func writeLedgerCSV(w io.Writer, es []api.LedgerEntry) error {
	cw := csv.NewWriter(w)
	_ = cw.Write(ledgerCSVHeader)
	for _, e := range es {
		_ = cw.Write([]string{
			strconv.FormatUint(e.Seq, 10), e.At.UTC().Format(time.RFC3339Nano), string(e.Kind),
			strconv.FormatInt(e.Amount, 10), strconv.FormatInt(e.Held, 10),
			strconv.FormatInt(e.BalanceAfter, 10), strconv.FormatInt(e.HeldAfter, 10),
			e.Sandbox, e.Hold, e.Grant, e.Cause, e.Reason, e.Key,
		})
	}
	cw.Flush()
	if err := cw.Error(); err != nil {
		return fmt.Errorf("writing csv: %w", err)
	}
	return nil
}

func newCreditsUsageCmd(g *globals) *cobra.Command {
	var consumer, from, to string
	cmd := &cobra.Command{
		Use:   "usage [--consumer C] [--from T] [--to T]",
		Short: "List usage records: each sandbox's quote and actual usage side by side",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			format, err := g.outputFormat("table", "json", "csv")
			if err != nil {
				return err
			}
			now := time.Now()
			q := api.UsageQuery{Consumer: consumer}
			if q.From, err = parseWhen("from", from, now, ago); err != nil {
				return err
			}
			if q.To, err = parseWhen("to", to, now, ago); err != nil {
				return err
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			u, err := c.Usage(cmd.Context(), q)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			switch format {
			case "json":
				return printJSON(w, u)
			case "csv":
				return writeUsageCSV(w, u.Records)
			}
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "SANDBOX\tCONSUMER\tPROFILE\tEXTENSION\tDESTROYED\tSECONDS\tQUOTE\tACTUAL\tSOURCE\tCHARGED\tREASON")
			for _, r := range u.Records {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%d\t%d\t%s\t%d\t%s\n", r.Sandbox, r.Consumer, r.Profile, r.Extension,
					r.DestroyedAt.Local().Format(time.DateTime), r.Seconds, r.Quote.Amount, r.Actual.Amount, r.Actual.Source, r.Charged, r.Reason)
			}
			if u.More {
				fmt.Fprintln(tw, "(more records: narrow --from/--to)")
			}
			return tw.Flush()
		},
	}
	f := cmd.Flags()
	f.StringVar(&consumer, "consumer", "", "only this consumer's records (default: your own; every consumer's for an admin key)")
	f.StringVar(&from, "from", "", "only sandboxes destroyed at or after: an RFC 3339 time, a date or "+durationUsage(ago))
	f.StringVar(&to, "to", "", "only sandboxes destroyed before: an RFC 3339 time, a date or "+durationUsage(ago))
	return cmd
}

// usageCSVHeader are the columns of `credits usage -o csv`.
var usageCSVHeader = []string{"sandbox_id", "consumer", "profile", "extension", "pricing_model", "ready_at", "destroyed_at", "seconds",
	"quote_amount", "quote_seconds", "actual_source", "actual_amount", "actual_quantity", "actual_unit",
	"charged", "refunded", "unpaid", "reserved", "reason"}

func writeUsageCSV(w io.Writer, rs []api.UsageRecord) error {
	cw := csv.NewWriter(w)
	_ = cw.Write(usageCSVHeader)
	for _, r := range rs {
		ready := ""
		if !r.ReadyAt.IsZero() {
			ready = r.ReadyAt.UTC().Format(time.RFC3339Nano)
		}
		i := func(n int64) string { return strconv.FormatInt(n, 10) }
		_ = cw.Write([]string{
			r.Sandbox, r.Consumer, r.Profile, r.Extension, r.PricingModel, ready, r.DestroyedAt.UTC().Format(time.RFC3339Nano), i(r.Seconds),
			i(r.Quote.Amount), i(r.Quote.DurationSeconds), r.Actual.Source, i(r.Actual.Amount), i(r.Actual.Quantity), r.Actual.Unit,
			i(r.Charged), i(r.Refunded), i(r.Unpaid), i(r.Reserved), r.Reason,
		})
	}
	cw.Flush()
	if err := cw.Error(); err != nil {
		return fmt.Errorf("writing csv: %w", err)
	}
	return nil
}
