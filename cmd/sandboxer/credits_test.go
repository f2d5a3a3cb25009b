package main

import (
	"bytes"
	"context"
	"encoding/csv"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/services/gateway"
)

// creditsSystem is the whole control plane with the local and saas-stub
// pools, and clients for consumer dev and the admin.
type creditsSystem struct {
	sys        *system
	dir        string
	dev, admin *api.Client
}

// startCreditsSystem starts the control plane on the shipped catalog;
// edit, when set, may change the copied files before it starts.
func startCreditsSystem(t *testing.T, edit func(extDir, profDir string)) *creditsSystem {
	t.Helper()
	dir := t.TempDir()
	extDir, profDir := shippedCatalog(t)
	if edit != nil {
		edit(extDir, profDir)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	sys, err := startSystem(ctx, systemConfig{
		DataDir: dir, HTTPAddr: "127.0.0.1:0", ExtensionsDir: extDir, ProfilesDir: profDir,
		Pools: []string{"local", "saas-stub"}, Extensions: linkedExtensions(),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		sys.Shutdown(ctx)
	})
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	key := func(who string) string {
		b, err := os.ReadFile(keyPath(dir, who))
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(b))
	}
	return &creditsSystem{sys: sys, dir: dir,
		dev: api.NewClient(sys.URL, key("dev"), hc), admin: api.NewClient(sys.URL, key("admin"), hc)}
}

// cli runs one sandboxer command line against the system, as the binary
// would, and returns its standard output.
func (cs *creditsSystem) cli(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := newRoot()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(append([]string{"--url", cs.sys.URL, "--data-dir", cs.dir}, args...))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	err := root.ExecuteContext(ctx)
	return out.String(), err
}

func (cs *creditsSystem) mustCLI(t *testing.T, args ...string) string {
	t.Helper()
	out, err := cs.cli(t, args...)
	if err != nil {
		t.Fatalf("sandboxer %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// await polls cond until it holds or the deadline passes.
func awaitCond(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(45 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		timer := time.NewTimer(50 * time.Millisecond)
		<-timer.C
	}
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// usageOf waits for the usage record of sandbox id.
func usageOf(t *testing.T, c *api.Client, id string) api.UsageRecord {
	t.Helper()
	var rec *api.UsageRecord
	awaitCond(t, "the usage record of "+id, func() bool {
		u, err := c.Usage(testContext(t), api.UsageQuery{})
		if err != nil {
			t.Fatal(err)
		}
		for i := range u.Records {
			if u.Records[i].Sandbox == id {
				rec = &u.Records[i]
			}
		}
		return rec != nil
	})
	return *rec
}

// TestInsufficientCredits is the 402 path: a consumer without credit asks
// for a metered sandbox, gets 402 and a non-zero exit from the CLI, the
// sandbox is rejected with the reason, no command is published and the
// balance does not move.
func TestInsufficientCredits(t *testing.T) {
	cs := startCreditsSystem(t, nil)
	ctx := testContext(t)

	before, err := cs.dev.CreditBalance(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if before.Balance != 0 || before.Held != 0 || before.Available != 0 {
		t.Fatalf("dev starts with %+v, want an empty account", before)
	}

	_, err = cs.dev.Create(ctx, api.CreateRequest{Profile: "saas"}, "")
	var p *api.Problem
	if st := api.StatusOf(err); st != http.StatusPaymentRequired || !asProblem(err, &p) {
		t.Fatalf("create without credit: status %d (%v), want 402", st, err)
	}
	if !strings.Contains(p.Detail, "insufficient credits") || !strings.Contains(p.Detail, "available 0") {
		t.Errorf("402 detail %q does not say why", p.Detail)
	}
	id := strings.TrimPrefix(p.Instance, "/v1/sandboxes/")
	sb, err := cs.dev.Get(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if sb.State != event.StateRejected || sb.Code != gateway.CodeInsufficientCredits {
		t.Fatalf("refused sandbox is %s (%s), want rejected (%s)", sb.State, sb.Code, gateway.CodeInsufficientCredits)
	}
	evs := lifecycleOf(t, cs.sys, id, 1)
	if evs[0] != event.TypeRejected {
		t.Fatalf("lifecycle of the refused sandbox: %v", evs)
	}

	// The CLI exits non-zero with the reason.
	out, err := cs.cli(t, "create", "--profile", "saas")
	if err == nil || !strings.Contains(err.Error(), "Payment Required") || !strings.Contains(err.Error(), "insufficient credits") {
		t.Fatalf("sandboxer create without credit: err %v, out %q; want a 402 error", err, out)
	}

	cmds, err := cs.sys.JS.Stream(ctx, event.StreamCommands)
	if err != nil {
		t.Fatal(err)
	}
	info, err := cmds.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State.LastSeq != 0 {
		t.Fatalf("commands stream moved to seq %d after refused creates", info.State.LastSeq)
	}
	after, err := cs.dev.CreditBalance(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if after.Balance != 0 || after.Held != 0 || len(after.Holds) != 0 {
		t.Fatalf("balance after refusals: %+v, want untouched", after)
	}
	l, err := cs.dev.Ledger(ctx, api.LedgerQuery{})
	if err != nil {
		t.Fatal(err)
	}
	if len(l.Entries) != 0 {
		t.Fatalf("ledger after refusals: %+v, want empty", l.Entries)
	}

	// A free profile needs no credit.
	free, err := cs.dev.Create(ctx, api.CreateRequest{Profile: "local", TTL: "1m"}, "")
	if err != nil {
		t.Fatalf("free local sandbox without credit: %v", err)
	}
	if _, err := cs.dev.Destroy(ctx, free.ID); err != nil {
		t.Fatal(err)
	}
}

func asProblem(err error, p **api.Problem) bool {
	q, ok := err.(*api.Problem)
	*p = q
	return ok
}

// lifecycleOf reads the first n lifecycle event types of a sandbox.
func lifecycleOf(t *testing.T, sys *system, id string, n int) []event.Type {
	t.Helper()
	ctx := testContext(t)
	cons, err := sys.JS.OrderedConsumer(ctx, event.StreamLifecycle, jetstream.OrderedConsumerConfig{FilterSubjects: []string{event.SandboxFilter(id)}})
	if err != nil {
		t.Fatal(err)
	}
	var out []event.Type
	for len(out) < n {
		msg, err := cons.Next(jetstream.FetchContext(ctx))
		if err != nil {
			t.Fatalf("reading lifecycle of %s after %v: %v", id, out, err)
		}
		out = append(out, event.Type(msg.Headers().Get("ce-type")))
	}
	return out
}

// TestCreditsAPIAuth: a consumer reads only its own account, and only an
// admin grants.
func TestCreditsAPIAuth(t *testing.T) {
	cs := startCreditsSystem(t, nil)
	ctx := testContext(t)
	if _, err := cs.admin.Grant(ctx, api.GrantRequest{Consumer: "dev", Amount: 500, ID: "seed"}); err != nil {
		t.Fatal(err)
	}
	if _, err := cs.admin.Grant(ctx, api.GrantRequest{Consumer: "other", Amount: 70}); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name   string
		call   func() error
		status int
	}{
		{"own balance", func() error { _, err := cs.dev.CreditBalance(ctx, ""); return err }, 0},
		{"own balance by name", func() error { _, err := cs.dev.CreditBalance(ctx, "dev"); return err }, 0},
		{"another's balance", func() error { _, err := cs.dev.CreditBalance(ctx, "other"); return err }, http.StatusForbidden},
		{"another's ledger", func() error { _, err := cs.dev.Ledger(ctx, api.LedgerQuery{Consumer: "other"}); return err }, http.StatusForbidden},
		{"another's usage", func() error { _, err := cs.dev.Usage(ctx, api.UsageQuery{Consumer: "other"}); return err }, http.StatusForbidden},
		{"grant as consumer", func() error {
			_, err := cs.dev.Grant(ctx, api.GrantRequest{Consumer: "dev", Amount: 1})
			return err
		}, http.StatusForbidden},
		{"admin reads any", func() error { _, err := cs.admin.CreditBalance(ctx, "other"); return err }, 0},
		{"admin ledger of any", func() error { _, err := cs.admin.Ledger(ctx, api.LedgerQuery{Consumer: "other"}); return err }, 0},
		{"bad consumer name", func() error { _, err := cs.admin.CreditBalance(ctx, "No Such"); return err }, http.StatusBadRequest},
		{"zero grant", func() error {
			_, err := cs.admin.Grant(ctx, api.GrantRequest{Consumer: "dev", Amount: 0})
			return err
		}, http.StatusUnprocessableEntity},
		{"grant expired already", func() error {
			_, err := cs.admin.Grant(ctx, api.GrantRequest{Consumer: "dev", Amount: 5, ExpiresAt: time.Now().Add(-time.Hour)})
			return err
		}, http.StatusUnprocessableEntity},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if st := api.StatusOf(tc.call()); st != tc.status {
				t.Fatalf("status %d, want %d", st, tc.status)
			}
		})
	}

	// What a consumer reads is its own: balance and usage.
	b, err := cs.dev.CreditBalance(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if b.Consumer != "dev" || b.Balance != 500 || b.Available != 500 {
		t.Fatalf("dev balance %+v, want 500 available", b)
	}
	// A repeated grant id grants once.
	res, err := cs.admin.Grant(ctx, api.GrantRequest{Consumer: "dev", Amount: 500, ID: "seed"})
	if err != nil || !res.Duplicate || res.Balance.Balance != 500 {
		t.Fatalf("repeated grant: %+v, %v; want a duplicate leaving 500", res, err)
	}
	// A raw request with an unknown field is a problem+json 400.
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, cs.sys.URL+"/v1/credits/grants", strings.NewReader(`{"consumer":"dev","amount":1,"bogus":true}`))
	tok, _ := os.ReadFile(keyPath(cs.dir, "admin"))
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	http.DefaultClient.CloseIdleConnections()
	if resp.StatusCode != http.StatusBadRequest || !strings.HasPrefix(resp.Header.Get("Content-Type"), api.ContentTypeProblem) {
		t.Fatalf("unknown field: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
}

// TestCreditsWalkthrough is the README's walkthrough through the CLI:
// grant 1000 to dev, run a saas sandbox, and check that the ledger's hold,
// debits and release add up to the change of the balance; then the JSON
// and CSV forms of every verb.
func TestCreditsWalkthrough(t *testing.T) {
	cs := startCreditsSystem(t, nil)

	var gr api.GrantResult
	decodeJSON(t, cs.mustCLI(t, "credits", "grant", "dev", "1000", "-o", "json"), &gr)
	if gr.Grant.Amount != 1000 || gr.Balance.Balance != 1000 {
		t.Fatalf("grant: %+v", gr)
	}
	var bal map[string]any
	decodeJSON(t, cs.mustCLI(t, "credits", "balance", "dev", "-o", "json"), &bal)
	for _, k := range []string{"balance", "held", "available"} {
		if _, ok := bal[k]; !ok {
			t.Fatalf("credits balance -o json lacks %q: %v", k, bal)
		}
	}
	if bal["balance"] != 1000.0 || bal["available"] != 1000.0 {
		t.Fatalf("balance after grant: %v", bal)
	}

	var sb api.Sandbox
	decodeJSON(t, cs.mustCLI(t, "create", "--profile", "saas", "--wait", "-o", "json"), &sb)
	if sb.State != event.StateReady || sb.Extension != "saas-stub" {
		t.Fatalf("saas sandbox: %s on %s", sb.State, sb.Extension)
	}
	var held api.CreditBalance
	decodeJSON(t, cs.mustCLI(t, "credits", "balance", "-o", "json"), &held)
	if held.Held <= 0 || held.Available != held.Balance-held.Held || len(held.Holds) != 1 {
		t.Fatalf("balance while running: %+v, want one hold", held)
	}
	cs.mustCLI(t, "destroy", sb.ID, "--wait")
	rec := usageOf(t, cs.dev, sb.ID)
	if rec.Quote.Amount <= 0 || rec.Actual.Source != "meter" || rec.Actual.Amount <= 0 {
		t.Fatalf("usage record %+v: want the stub's quote and meter", rec)
	}

	var end api.CreditBalance
	decodeJSON(t, cs.mustCLI(t, "credits", "balance", "dev", "-o", "json"), &end)
	var l api.Ledger
	decodeJSON(t, cs.mustCLI(t, "credits", "ledger", "dev", "-o", "json"), &l)
	kinds := map[string]int{}
	var sumAmount, sumHeld, afterGrant int64
	for _, e := range l.Entries {
		kinds[string(e.Kind)]++
		sumAmount += e.Amount
		sumHeld += e.Held
		if e.Kind != "grant" {
			afterGrant += e.Amount
		}
	}
	if kinds["grant"] != 1 || kinds["hold"] != 1 || kinds["debit"] < 1 || kinds["release"] != 1 {
		t.Fatalf("ledger kinds %v: want a grant, a hold, debits and a release", kinds)
	}
	if end.Held != 0 || sumHeld != 0 || end.Balance != sumAmount || 1000+afterGrant != end.Balance {
		t.Fatalf("ledger does not add up: balance %d held %d, fold %d held %d, change %d", end.Balance, end.Held, sumAmount, sumHeld, afterGrant)
	}
	if -afterGrant != rec.Charged {
		t.Fatalf("ledger charged %d, usage record %d", -afterGrant, rec.Charged)
	}

	// CSV forms: a header and one row per entry or record.
	rows := readCSV(t, cs.mustCLI(t, "credits", "ledger", "dev", "-o", "csv"))
	if len(rows) != len(l.Entries)+1 || strings.Join(rows[0], ",") != strings.Join(ledgerCSVHeader, ",") {
		t.Fatalf("ledger csv: %d rows, header %v", len(rows), rows[0])
	}
	rows = readCSV(t, cs.mustCLI(t, "credits", "usage", "-o", "csv"))
	if len(rows) != 2 || rows[1][0] != sb.ID || rows[1][10] != "meter" {
		t.Fatalf("usage csv: %v", rows)
	}
	var ul api.UsageList
	decodeJSON(t, cs.mustCLI(t, "credits", "usage", "--consumer", "dev", "--from", "1h", "-o", "json"), &ul)
	if len(ul.Records) != 1 || ul.Records[0].Sandbox != sb.ID {
		t.Fatalf("usage json: %+v", ul)
	}
	decodeJSON(t, cs.mustCLI(t, "credits", "usage", "--to", "1h", "-o", "json"), &ul)
	if len(ul.Records) != 0 {
		t.Fatalf("usage before an hour ago: %+v", ul)
	}
	// Table forms run too.
	for _, args := range [][]string{{"credits", "balance"}, {"credits", "ledger", "dev"}, {"credits", "usage"}} {
		if out := cs.mustCLI(t, args...); out == "" {
			t.Errorf("sandboxer %v printed nothing", args)
		}
	}

	// A create beyond the balance exits non-zero and leaves it untouched.
	if _, err := cs.cli(t, "create", "--profile", "saas", "--ttl", "2h"); err == nil || !strings.Contains(err.Error(), "insufficient credits") {
		t.Fatalf("create beyond the balance: %v", err)
	}
	var again api.CreditBalance
	decodeJSON(t, cs.mustCLI(t, "credits", "balance", "-o", "json"), &again)
	if again.Balance != end.Balance || again.Held != 0 || again.Seq != end.Seq {
		t.Fatalf("balance moved after a refused create: %+v, was %+v", again, end)
	}

	// Bad command lines exit 2.
	for _, args := range [][]string{
		{"credits", "grant", "dev", "ten"},
		{"credits", "balance", "-o", "csv"},
		{"credits", "ledger", "dev", "--since", "yesterday"},
	} {
		var ee *exitError
		if _, err := cs.cli(t, args...); !errorsAs(err, &ee) || ee.code != 2 {
			t.Errorf("sandboxer %v: %v, want exit 2", args, err)
		}
	}
}

func errorsAs(err error, ee **exitError) bool {
	e, ok := err.(*exitError)
	*ee = e
	return ok
}

func decodeJSON(t *testing.T, s string, v any) {
	t.Helper()
	if err := json.Unmarshal([]byte(s), v); err != nil {
		t.Fatalf("decoding %q: %v", s, err)
	}
}

func readCSV(t *testing.T, s string) [][]string {
	t.Helper()
	rows, err := csv.NewReader(strings.NewReader(s)).ReadAll()
	if err != nil {
		t.Fatalf("reading csv %q: %v", s, err)
	}
	return rows
}

// TestBurstOverflow fills ext.local's capacity with burst sandboxes and
// watches the next one land on the SaaS stub and be billed by its meter.
func TestBurstOverflow(t *testing.T) {
	const capacity = 2
	cs := startCreditsSystem(t, func(extDir, _ string) {
		f := filepath.Join(extDir, "ext.local.yaml")
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		s := strings.Replace(string(b), "max_sandboxes: 1000", "max_sandboxes: 2", 1)
		if s == string(b) {
			t.Fatal("ext.local.yaml has no max_sandboxes: 1000 to lower")
		}
		if err := os.WriteFile(f, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	})
	ctx := testContext(t)
	if _, err := cs.admin.Grant(ctx, api.GrantRequest{Consumer: "dev", Amount: 1000}); err != nil {
		t.Fatal(err)
	}

	var local []string
	for i := range capacity {
		s, err := cs.dev.Create(ctx, api.CreateRequest{Profile: "burst"}, "")
		if err != nil {
			t.Fatal(err)
		}
		if s.Extension != "local" || s.Host != "localhost" {
			t.Fatalf("burst sandbox %d went to %s on %q, want local while it has room", i, s.Extension, s.Host)
		}
		local = append(local, s.ID)
	}
	over, err := cs.dev.Create(ctx, api.CreateRequest{Profile: "burst"}, "")
	if err != nil {
		t.Fatal(err)
	}
	if over.Extension != "saas-stub" {
		t.Fatalf("sandbox beyond local capacity went to %s, want saas-stub", over.Extension)
	}
	ready, err := cs.dev.Wait(ctx, over.ID, func(s event.State) bool { return s.Rank() >= event.StateReady.Rank() }, nil)
	if err != nil {
		t.Fatal(err)
	}
	if ready.State != event.StateReady {
		t.Fatalf("overflow sandbox %s: %s (%s)", over.ID, ready.State, ready.Reason)
	}
	b, err := cs.dev.CreditBalance(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	var hold *api.CreditHold
	for i := range b.Holds {
		if b.Holds[i].Sandbox == over.ID {
			hold = &b.Holds[i]
		}
	}
	if hold == nil || hold.Extension != "saas-stub" || hold.Amount <= 0 {
		t.Fatalf("holds %+v: want a priced hold for %s on saas-stub", b.Holds, over.ID)
	}

	// Freeing local room sends the next one back to local.
	if _, err := cs.dev.Destroy(ctx, local[0]); err != nil {
		t.Fatal(err)
	}
	if _, err := cs.dev.Wait(ctx, local[0], event.State.Terminal, nil); err != nil {
		t.Fatal(err)
	}
	// Routing counts from the gateway's fold of the lifecycle stream,
	// which can apply the destroy a moment after a GET reads it: await
	// the listing (the same fold) before the next create.
	awaitCond(t, "the listing to show "+local[0]+" destroyed", func() bool {
		l, err := cs.dev.List(ctx, api.ListFilter{State: string(event.StateDestroyed)})
		return err == nil && slices.ContainsFunc(l, func(s api.Sandbox) bool { return s.ID == local[0] })
	})
	back, err := cs.dev.Create(ctx, api.CreateRequest{Profile: "burst"}, "")
	if err != nil {
		t.Fatal(err)
	}
	if back.Extension != "local" {
		t.Fatalf("burst sandbox after local freed room went to %s", back.Extension)
	}

	if _, err := cs.dev.Destroy(ctx, over.ID); err != nil {
		t.Fatal(err)
	}
	rec := usageOf(t, cs.dev, over.ID)
	if rec.Extension != "saas-stub" || rec.Profile != "burst" || rec.PricingModel != "metered" {
		t.Fatalf("usage record %+v: want burst on saas-stub, metered", rec)
	}
	if rec.Quote.Amount != hold.Amount || rec.Actual.Source != "meter" || rec.Actual.Amount <= 0 || rec.Charged != rec.Actual.Amount {
		t.Fatalf("usage record: quote %+v actual %+v charged %d; want the stub's quote %d and meter", rec.Quote, rec.Actual, rec.Charged, hold.Amount)
	}
	// Local sandboxes of the burst profile are free.
	for _, id := range append(local[1:], back.ID) {
		if _, err := cs.dev.Destroy(ctx, id); err != nil {
			t.Fatal(err)
		}
		if r := usageOf(t, cs.dev, id); r.Charged != 0 || r.Extension != "local" {
			t.Fatalf("local burst usage %+v: want free", r)
		}
	}
}

// TestConcurrentAdmission sends many creates at once against credit for
// a few through the gateway: exactly that many are admitted, the rest get
// 402, and the holds add up to the credit.
func TestConcurrentAdmission(t *testing.T) {
	const (
		quote    = 250 // ext.saas-stub: start fee 50 + 10 started minutes x 20
		afford   = 5
		requests = 40
	)
	cs := startCreditsSystem(t, nil)
	ctx := testContext(t)
	if _, err := cs.admin.Grant(ctx, api.GrantRequest{Consumer: "dev", Amount: quote * afford}); err != nil {
		t.Fatal(err)
	}
	statuses := make(chan int, requests)
	var wg sync.WaitGroup
	for range requests {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := cs.dev.Create(ctx, api.CreateRequest{Profile: "saas", TTL: "10m"}, "")
			statuses <- api.StatusOf(err)
		}()
	}
	wg.Wait()
	close(statuses)
	count := map[int]int{}
	for st := range statuses {
		count[st]++
	}
	if count[0] != afford || count[http.StatusPaymentRequired] != requests-afford {
		t.Fatalf("answers %v: want %d admitted and %d refused with 402", count, afford, requests-afford)
	}
	b, err := cs.dev.CreditBalance(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if b.Held != quote*afford || b.Available != 0 || len(b.Holds) != afford {
		t.Fatalf("account after the rush: %+v", b)
	}
}
