package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os/exec"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
)

// Checker runs the end-of-run checks against the cluster.
type Checker struct {
	Cluster *Cluster
	Start   time.Time
	// Consumers are the consumers the load ran as; Label the k=v label
	// on every sandbox of the run.
	Consumers []string
	Label     string
	// Settle bounds the wait for every sandbox to end and for metering
	// to catch up.
	Settle time.Duration
	// Busybox is an image with /bin/busybox, to list the pools' volumes.
	Busybox string
	// LocalDir and SessionDir are where a local workspace and a
	// saas-stub session live in their pools' containers.
	LocalDir, SessionDir string
	// BillingConsumer is the examples/billing-consumer command and its
	// arguments.
	BillingConsumer []string
	Log             func(format string, args ...any)
}

// sandboxes lists every sandbox of the run by id, as the admin.
func (k *Checker) sandboxes(ctx context.Context) (map[string]api.Sandbox, error) {
	out := map[string]api.Sandbox{}
	for _, c := range k.Consumers {
		lctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		list, err := k.Cluster.Admin.List(lctx, api.ListFilter{Consumer: c, Labels: []string{k.Label}})
		cancel()
		if err != nil {
			return nil, fmt.Errorf("listing sandboxes of %s: %w", c, err)
		}
		for _, s := range list {
			out[s.ID] = s
		}
	}
	return out, nil
}

// Run settles the run and checks it: nothing lost, nothing stuck, no
// unasked-for sandbox, no backend resource left, no debit twice, and the
// three views of every account agreeing.
func (k *Checker) Run(ctx context.Context, runs []*Lifecycle) []Row {
	var rows []Row
	row := func(name, found, outcome string, failed bool) {
		rows = append(rows, Row{Fault: name, When: time.Since(k.Start), Effect: found, Outcome: outcome, Failed: failed})
	}
	// every logs a check's whole list (the table shows five).
	every := func(name string, items []string) {
		for _, it := range items {
			k.Log("%s: %s", name, it)
		}
	}
	accepted := map[string]*Lifecycle{}
	for _, l := range runs {
		if l.Accepted() {
			accepted[l.ID] = l
		}
	}

	// Settle: every sandbox ends. One whose destroy was never accepted
	// (the client gave up) or that no client learned of is destroyed now,
	// as its client would have; one whose destroy was accepted is left
	// alone, so that a lost destroy shows as stuck.
	var all map[string]api.Sandbox
	destroyed := map[string]bool{}
	unlabelled := map[string]bool{} // accepted, found by id only
	var last error
	start := time.Now()
	err := poll(ctx, k.Settle, time.Second, func() error {
		var err error
		if all, err = k.sandboxes(ctx); err != nil {
			last = err
			return err
		}
		// An accepted sandbox the labelled listing lacks is read by id:
		// its record may have lost the run's label (checked below).
		for id := range accepted {
			if _, ok := all[id]; ok {
				continue
			}
			gctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			if s, err := k.Cluster.Admin.Get(gctx, id); err == nil {
				all[id] = *s
				unlabelled[id] = true
			}
			cancel()
		}
		open := 0
		for id, s := range all {
			if s.State.Terminal() {
				continue
			}
			open++
			if l := accepted[id]; (l == nil || !l.DestroyAccepted) && !destroyed[id] && s.State != event.StateDestroying && s.State != event.StateExpired {
				dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				if _, err := k.Cluster.Admin.Destroy(dctx, id); err == nil {
					destroyed[id] = true
				}
				cancel()
			}
		}
		for id := range accepted {
			if _, ok := all[id]; !ok {
				open++
			}
		}
		if open > 0 {
			return fmt.Errorf("%d sandboxes not ended", open)
		}
		return nil
	})
	k.Log("settled in %.1fs: %v", time.Since(start).Seconds(), err)
	if all == nil {
		row("settle", "cannot list the run's sandboxes", fmt.Sprint(last), true)
		return rows
	}
	var lost, stuck, unasked []string
	for id, l := range accepted {
		s, ok := all[id]
		switch {
		case !ok:
			lost = append(lost, id+" ("+k.describe(ctx, id)+")")
		case !s.State.Terminal() && !l.Ready && s.ReadyAt.IsZero() && !reached(s, event.StateReady):
			lost = append(lost, fmt.Sprintf("%s (%s, never ready, %s)", id, s.State, l.Profile))
		}
		if ok && !s.State.Terminal() {
			stuck = append(stuck, fmt.Sprintf("%s (%s, %s)", id, s.State, l.Profile))
		}
	}
	// Every accepted sandbox's record is the one its create wrote: the
	// run's label, and a history from requested.
	label, value, _ := strings.Cut(k.Label, "=")
	var rewritten []string
	for id := range accepted {
		s, ok := all[id]
		if !ok {
			continue
		}
		if s.Labels[label] != value || len(s.History) == 0 || s.History[0].State != event.StateRequested {
			rewritten = append(rewritten, fmt.Sprintf("%s (labels %v, %s)", id, s.Labels, summary(s)))
		}
	}
	for id := range all {
		if accepted[id] == nil {
			unasked = append(unasked, fmt.Sprintf("%s (%s)", id, summary(all[id])))
		}
	}
	every("lost", lost)
	every("stuck", stuck)
	every("no answer", unasked)
	row("0 lost", fmt.Sprintf("%d accepted, %d lost", len(accepted), len(lost)), verdict(lost), len(lost) > 0)
	row("0 stuck", fmt.Sprintf("%d not ended within %s of the load's end (%d destroyed by the settle)", len(stuck), k.Settle, len(destroyed)), verdict(stuck), len(stuck) > 0)
	every("record rewritten", rewritten)
	row("records as created", fmt.Sprintf("%d accepted sandboxes whose record lacks the create's labels or its requested state", len(rewritten)), verdict(rewritten), len(rewritten) > 0)
	row("one sandbox per create", fmt.Sprintf("%d sandboxes no client got an answer for", len(unasked)), verdictNote(unasked, "a create with no answer; not a failure"), false)

	// Backend resources of the sandboxes that ended.
	ended := map[string]bool{}
	for id, s := range all {
		if s.State.Terminal() {
			ended[id] = true
		}
	}
	for _, p := range []struct{ service, dir, suffix, what string }{
		{"provisioner-local", k.LocalDir, "", "workspaces"},
		{"provisioner-saas-stub", k.SessionDir, ".json", "open sessions"},
	} {
		left, n, err := k.leftovers(ctx, p.service, p.dir, p.suffix, ended)
		if err != nil {
			row("0 leaked "+p.what, "cannot list "+p.dir, err.Error(), true)
			continue
		}
		every("leaked "+p.what, left)
		row("0 leaked "+p.what, fmt.Sprintf("%d of %d ended sandboxes still have one (%d in the directory)", len(left), len(ended), n), verdict(left), len(left) > 0)
	}

	// Metering caught up: every account is at the seq of its last ledger
	// entry, and no hold is open for a sandbox that ended.
	var fold LedgerFold
	var accounts map[string]Account
	var openHolds []string
	start = time.Now()
	read := func() error {
		entries, err := k.ledger(ctx)
		if err != nil {
			return err
		}
		fold = FoldLedger(entries)
		accounts, openHolds = map[string]Account{}, nil
		var behind []string
		for _, c := range slices.Sorted(maps.Keys(fold.Accounts)) {
			bctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			b, err := k.Cluster.Admin.CreditBalance(bctx, c)
			cancel()
			if err != nil {
				return fmt.Errorf("balance of %s: %w", c, err)
			}
			accounts[c] = Account{Consumer: c, Balance: b.Balance, Held: b.Held, Entries: int(b.Seq)}
			if int(b.Seq) != fold.Accounts[c].Entries {
				behind = append(behind, fmt.Sprintf("%s: account at seq %d, %d ledger entries", c, b.Seq, fold.Accounts[c].Entries))
			}
			for _, h := range b.Holds {
				if ended[h.Sandbox] {
					openHolds = append(openHolds, fmt.Sprintf("%s of %s (%d held)", h.Sandbox, c, h.Amount))
				}
			}
		}
		if len(behind) > 0 || len(openHolds) > 0 {
			return fmt.Errorf("%s", verdict(append(behind, openHolds...)))
		}
		return nil
	}
	err = poll(ctx, k.Settle/2, time.Second, read)
	k.Log("metering caught up in %.1fs: %v", time.Since(start).Seconds(), err)
	if accounts == nil {
		row("metering settled", "reading the ledger and the accounts", err.Error(), true)
		return rows
	}
	row("metering settled", fmt.Sprintf("accounts at their ledger's last seq; %d holds open for ended sandboxes", len(openHolds)), verdictNote(openHolds, ""), err != nil)
	n := 0
	for _, a := range fold.Accounts {
		n += a.Entries
	}
	every("debit twice", fold.DoubleDebits)
	every("ledger", fold.Problems)
	row("0 debits twice for one cause", fmt.Sprintf("%d ledger entries of %d consumers", n, len(fold.Accounts)), verdict(fold.DoubleDebits), len(fold.DoubleDebits) > 0)
	row("ledger folds", "seq without gaps, balance_after and held_after the running sums", verdict(fold.Problems), len(fold.Problems) > 0)

	stream, err := k.billing(ctx)
	if err != nil {
		row("balance = ledger = stream", "examples/billing-consumer", err.Error(), true)
		return rows
	}
	diff := CompareAccounts(accounts, fold.Accounts, stream)
	every("accounts differ", diff)
	var shown []string
	for _, c := range k.Consumers {
		a := accounts[c]
		shown = append(shown, fmt.Sprintf("%s %d", c, a.Balance))
	}
	row("balance = ledger = stream", fmt.Sprintf("%d consumers (%s)", len(accounts), strings.Join(shown, ", ")), verdict(diff), len(diff) > 0)
	return rows
}

// describe says what the admin's GET of a sandbox the run's listing
// lacks finds: its record (state, history, labels), or why none.
func (k *Checker) describe(ctx context.Context, id string) string {
	gctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	s, err := k.Cluster.Admin.Get(gctx, id)
	if err != nil {
		return "not in the listing; GET: " + err.Error()
	}
	return fmt.Sprintf("not in the listing; GET: consumer %s, labels %v, %s", s.Consumer, s.Labels, summary(*s))
}

// summary is a sandbox's state, history and reason in one line.
func summary(s api.Sandbox) string {
	var h []string
	for _, t := range s.History {
		h = append(h, string(t.State)+"@"+t.At.UTC().Format("15:04:05.000"))
	}
	out := fmt.Sprintf("%s, created %s, history %s", s.State, s.CreatedAt.UTC().Format("15:04:05.000"), strings.Join(h, " "))
	if s.Code != "" || s.Reason != "" {
		out += fmt.Sprintf(", %s: %s", s.Code, s.Reason)
	}
	return out
}

// reached reports whether s's history has state st.
func reached(s api.Sandbox, st event.State) bool {
	return slices.ContainsFunc(s.History, func(t sandbox.Transition) bool { return t.State == st })
}

// verdict is "ok", or the first few problems.
func verdict(problems []string) string {
	return verdictNote(problems, "")
}

func verdictNote(problems []string, note string) string {
	if len(problems) == 0 {
		return "ok"
	}
	slices.Sort(problems)
	shown := problems[:min(len(problems), 5)]
	s := strings.Join(shown, "; ")
	if len(problems) > len(shown) {
		s += fmt.Sprintf("; and %d more", len(problems)-len(shown))
	}
	if note != "" {
		s = note + ": " + s
	}
	return s
}

// leftovers lists dir in every container of service (through a throwaway
// container with its volumes) and returns the entries, less suffix, that
// name a sandbox in ended, and how many entries there were.
func (k *Checker) leftovers(ctx context.Context, service, dir, suffix string, ended map[string]bool) ([]string, int, error) {
	names, err := k.Cluster.Containers(ctx, service)
	if err != nil {
		return nil, 0, err
	}
	seen := map[string]bool{}  // container/entry: counted
	found := map[string]bool{} // sandbox ids left
	var left []string
	n := 0
	for _, c := range names {
		out, err := k.Cluster.docker(ctx, "run", "--rm", "--network", "none", "--volumes-from", c+":ro",
			"--entrypoint", "/bin/busybox", k.Busybox, "ls", "-1", dir)
		if err != nil {
			return nil, 0, fmt.Errorf("listing %s of %s: %w", dir, c, err)
		}
		for _, e := range strings.Fields(out) {
			id := strings.TrimSuffix(e, suffix)
			if seen[c+"/"+id] {
				continue
			}
			seen[c+"/"+id] = true
			n++
			if ended[id] && !found[id] {
				found[id] = true
				left = append(left, id+" (in "+c+")")
			}
		}
	}
	return left, n, nil
}

// ledger reads every entry of the ledger, in the credits bucket under
// bus.LedgerPrefix, where metering writes each entry once under its key
// (services/metering/store.go).
func (k *Checker) ledger(ctx context.Context) ([]api.LedgerEntry, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	kv, err := k.Cluster.JS.KeyValue(ctx, bus.BucketCredits)
	if err != nil {
		return nil, fmt.Errorf("opening bucket %s: %w", bus.BucketCredits, err)
	}
	w, err := kv.Watch(ctx, bus.LedgerPrefix+">", jetstream.IgnoreDeletes())
	if err != nil {
		return nil, fmt.Errorf("reading the ledger in bucket %s: %w", bus.BucketCredits, err)
	}
	defer func() { _ = w.Stop() }()
	var out []api.LedgerEntry
	for {
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("reading the ledger in bucket %s: %w", bus.BucketCredits, ctx.Err())
		case e := <-w.Updates():
			if e == nil {
				return out, nil // caught up
			}
			var le api.LedgerEntry
			if err := json.Unmarshal(e.Value(), &le); err != nil {
				return nil, fmt.Errorf("decoding ledger entry %s: %w", e.Key(), err)
			}
			out = append(out, le)
		}
	}
}

// billing runs examples/billing-consumer and returns its fold of the
// metering stream.
func (k *Checker) billing(ctx context.Context) (map[string]Account, error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	var out, errb bytes.Buffer
	cmd := exec.CommandContext(ctx, k.BillingConsumer[0], k.BillingConsumer[1:]...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("%s: %w: %s", strings.Join(k.BillingConsumer, " "), err, strings.TrimSpace(errb.String()))
	}
	return ParseBillingLines(&out)
}
