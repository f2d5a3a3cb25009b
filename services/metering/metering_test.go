package metering_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/credits"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/saasstub"
	"github.com/sand-boxer/sandboxer/services/metering"
)

func kinds(es []credits.Entry) []credits.EntryKind {
	out := make([]credits.EntryKind, len(es))
	for i, e := range es {
		out[i] = e.Kind
	}
	return out
}

// TestSelfHostedLifecycle: a hold from the profile's price, a settlement
// from the lifecycle timestamps, the rest released; redelivered events
// change nothing.
func TestSelfHostedLifecycle(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.start(t, metering.Options{})
	ctx := testCtx(t)
	if _, err := e.client.Grant(ctx, credits.GrantRequest{Consumer: "dev", Amount: 1000, ID: "first"}); err != nil {
		t.Fatal(err)
	}
	hr, err := e.client.Hold(ctx, credits.HoldRequest{SandboxID: "sb1", Consumer: "dev", Profile: profCheap, Extension: extSelf, TTLSeconds: 60})
	if err != nil {
		t.Fatal(err)
	}
	if hr.Hold != "sb1" || hr.Amount != 65 || hr.Available != 935 {
		t.Fatalf("hold reply %+v, want 65 held (5 + 60 x 1), 935 available", hr)
	}
	again, err := e.client.Hold(ctx, credits.HoldRequest{SandboxID: "sb1", Consumer: "dev", Profile: profCheap, Extension: extSelf, TTLSeconds: 60})
	if err != nil || again.Hold != hr.Hold || again.Amount != hr.Amount {
		t.Fatalf("second admission of the same sandbox: %+v, %v", again, err)
	}
	r := ref("dev", "sb1", profCheap)
	t0 := time.Now().UTC().Truncate(time.Second)
	e.publish(t, r, event.StateReady, t0, false)
	e.publish(t, r, event.StateDestroyed, t0.Add(10*time.Second), false)
	e.drained(t)
	s := e.snap(t, "dev")
	checkInvariants(t, s)
	want := []credits.EntryKind{credits.EntryGrant, credits.EntryHold, credits.EntryDebit, credits.EntryRelease}
	if fmt.Sprint(kinds(s.entries)) != fmt.Sprint(want) {
		t.Fatalf("ledger %v, want %v", kinds(s.entries), want)
	}
	if s.acct.Balance != 985 || s.acct.Held != 0 {
		t.Fatalf("balance %d held %d, want 985 (1000 - 5 - 10 x 1) and 0", s.acct.Balance, s.acct.Held)
	}
	// Redeliveries past the de-duplication window.
	e.publish(t, r, event.StateReady, t0, true)
	e.publish(t, r, event.StateDestroyed, t0.Add(10*time.Second), true)
	e.drained(t)
	s2 := e.snap(t, "dev")
	checkInvariants(t, s2)
	if len(s2.entries) != len(s.entries) || s2.acct.Balance != 985 {
		t.Fatalf("redelivery changed the ledger: %v, balance %d", kinds(s2.entries), s2.acct.Balance)
	}
	if _, err := e.client.Hold(ctx, credits.HoldRequest{SandboxID: "sb1", Consumer: "dev", Profile: profCheap, Extension: extSelf}); !errors.Is(err, credits.ErrHoldClosed) {
		t.Fatalf("admission of a settled sandbox: %v, want ErrHoldClosed", err)
	}
	u, err := e.client.Usage(ctx, credits.UsageRequest{Consumer: "dev"})
	if err != nil {
		t.Fatal(err)
	}
	if len(u.Records) != 1 || u.Records[0].Quote.Amount != 65 || u.Records[0].Actual.Amount != 15 || u.Records[0].Charged != 15 || u.Records[0].Seconds != 10 {
		t.Fatalf("usage %+v", u.Records)
	}
	validateStream(t, e)
}

func TestAdmissionRefusals(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.start(t, metering.Options{})
	ctx := testCtx(t)
	if _, err := e.client.Grant(ctx, credits.GrantRequest{Consumer: "poor", Amount: 10}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		req  credits.HoldRequest
		want error
	}{
		{"beyond the balance", credits.HoldRequest{SandboxID: "a", Consumer: "poor", Profile: profCheap, Extension: extSelf, TTLSeconds: 60}, credits.ErrInsufficientCredits},
		{"no account", credits.HoldRequest{SandboxID: "b", Consumer: "nobody", Profile: profCheap, Extension: extSelf, TTLSeconds: 1}, credits.ErrInsufficientCredits},
		{"unknown profile", credits.HoldRequest{SandboxID: "c", Consumer: "poor", Profile: "nope", Extension: extSelf}, credits.ErrNoPrice},
		{"bad consumer", credits.HoldRequest{SandboxID: "d", Consumer: "Bad Name", Profile: profCheap, Extension: extSelf}, credits.ErrInvalidRequest},
		{"negative ttl", credits.HoldRequest{SandboxID: "e", Consumer: "poor", Profile: profCheap, Extension: extSelf, TTLSeconds: -1}, credits.ErrInvalidRequest},
		{"metered without workers", credits.HoldRequest{SandboxID: "f", Consumer: "poor", Profile: profSaaS, Extension: extSaaS}, credits.ErrNoPrice},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.client.Hold(ctx, tc.req)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Hold: %v, want %v", err, tc.want)
			}
		})
	}
	b, err := e.client.Balance(ctx, "poor")
	if err != nil {
		t.Fatal(err)
	}
	if b.Balance != 10 || b.Held != 0 || b.Available != 10 {
		t.Fatalf("refusals changed the balance: %+v", b)
	}
	// A free profile needs no credit.
	if hr, err := e.client.Hold(ctx, credits.HoldRequest{SandboxID: "g", Consumer: "nobody", Profile: profFree, Extension: extSelf}); err != nil || hr.Amount != 0 {
		t.Fatalf("free hold: %+v, %v", hr, err)
	}
}

// TestConcurrentHolds: two hundred concurrent admissions against credit
// for fifty admit fifty at most, across two metering instances.
func TestConcurrentHolds(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.start(t, metering.Options{})
	e.start(t, metering.Options{})
	ctx := testCtx(t)
	const each = 5 + 10 // profile cheap, 10 seconds
	if _, err := e.client.Grant(ctx, credits.GrantRequest{Consumer: "crowd", Amount: 50 * each}); err != nil {
		t.Fatal(err)
	}
	var (
		wg       sync.WaitGroup
		admitted collector[string]
		refused  collector[string]
		other    collector[error]
	)
	for i := range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sb := fmt.Sprintf("c%03d", i)
			_, err := e.client.Hold(ctx, credits.HoldRequest{SandboxID: sb, Consumer: "crowd", Profile: profCheap, Extension: extSelf, TTLSeconds: 10})
			switch {
			case err == nil:
				admitted.add(sb)
			case errors.Is(err, credits.ErrInsufficientCredits):
				refused.add(sb)
			default:
				other.add(err)
			}
		}()
	}
	wg.Wait()
	if len(other.out) > 0 {
		t.Fatalf("%d admissions failed otherwise, first: %v", len(other.out), other.out[0])
	}
	if len(admitted.out) > 50 {
		t.Fatalf("admitted %d sandboxes against credit for 50", len(admitted.out))
	}
	if len(admitted.out) != 50 || len(refused.out) != 150 {
		t.Fatalf("admitted %d, refused %d; want 50 and 150", len(admitted.out), len(refused.out))
	}
	s := e.snap(t, "crowd")
	checkInvariants(t, s)
	if s.acct.Held != 50*each || s.acct.Available() != 0 {
		t.Fatalf("held %d, available %d", s.acct.Held, s.acct.Available())
	}
}

// TestExhaustion: a running sandbox whose consumer runs out of credit is
// destroyed, and the ledger explains every unit.
func TestExhaustion(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.start(t, metering.Options{AccrualInterval: time.Second})
	ctx := testCtx(t)
	const granted = 95
	if _, err := e.client.Grant(ctx, credits.GrantRequest{Consumer: "short", Amount: granted, ID: "only"}); err != nil {
		t.Fatal(err)
	}
	// 10 per second, held for 2 seconds: the hold must be extended twice
	// or so, then the credit runs out after about 9 seconds.
	if _, err := e.client.Hold(ctx, credits.HoldRequest{SandboxID: "hungry", Consumer: "short", Profile: profPricey, Extension: extSelf, TTLSeconds: 2}); err != nil {
		t.Fatal(err)
	}
	r := ref("short", "hungry", profPricey)
	readyAt := time.Now().UTC()
	e.publish(t, r, event.StateReady, readyAt, false)
	var cmd event.Destroy
	waitFor(t, 30*time.Second, "the destroy command", func() (bool, error) {
		cmds := e.destroyCommands(t)
		if len(cmds) == 0 {
			return false, nil
		}
		cmd = cmds[0]
		return true, nil
	})
	if cmd.SandboxID != "hungry" || cmd.Reason != event.ReasonCreditsExhausted || cmd.Extension != extSelf || cmd.Consumer != "short" {
		t.Fatalf("destroy command %+v", cmd)
	}
	destroyedAt := time.Now().UTC()
	e.publish(t, r, event.StateDestroyed, destroyedAt, false)
	e.drained(t)
	s := e.snap(t, "short")
	checkInvariants(t, s)
	if len(s.holds) != 0 {
		t.Fatalf("holds left open: %v", s.holds)
	}
	// Every unit: granted = debited + what is left.
	var debited, extended int64
	seen := map[credits.EntryKind]int{}
	for _, x := range s.entries {
		seen[x.Kind]++
		if x.Kind == credits.EntryDebit {
			debited -= x.Amount
		}
		if x.Kind == credits.EntryExtend {
			extended += x.Held
		}
	}
	if debited+s.acct.Balance != granted {
		t.Fatalf("debited %d + balance %d != granted %d; ledger %v", debited, s.acct.Balance, granted, kinds(s.entries))
	}
	if s.acct.Balance >= 10 {
		t.Fatalf("balance %d left: the sandbox was destroyed with a second's worth of credit", s.acct.Balance)
	}
	if seen[credits.EntryExtend] == 0 || seen[credits.EntryDebit] < 2 || seen[credits.EntryRelease] != 1 {
		t.Fatalf("ledger %v: want extends, several debits, one release", kinds(s.entries))
	}
	evs := e.meteringEvents(t)
	var low, exhausted int
	for _, ev := range evs {
		switch ev.Type() {
		case string(credits.KindLow.Type()):
			low++
		case string(credits.KindExhausted.Type()):
			exhausted++
		}
	}
	if low != 1 || exhausted != 1 {
		t.Fatalf("%d low and %d exhausted events, want one each", low, exhausted)
	}
	u, err := e.client.Usage(ctx, credits.UsageRequest{Consumer: "short"})
	if err != nil || len(u.Records) != 1 {
		t.Fatalf("usage %+v, %v", u, err)
	}
	if rec := u.Records[0]; rec.Charged != debited || rec.Charged+rec.Unpaid != rec.Actual.Amount {
		t.Fatalf("usage record %+v: charged %d + unpaid %d should be the actual amount, and the debits %d", rec, rec.Charged, rec.Unpaid, debited)
	}
	validateStream(t, e)
}

// TestMeteredSettlement: a metered sandbox is held at its backend's quote,
// accrues by its backend's price and settles to its backend's meter, which
// differs from the lifecycle timestamps; the usage record shows quote and
// actual side by side.
func TestMeteredSettlement(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	dir := t.TempDir()
	clk := time.Now().UTC()
	var mu sync.Mutex
	now := func() time.Time { mu.Lock(); defer mu.Unlock(); return clk }
	stub, err := saasstub.Open(saasstub.Config{StartFee: 50, PerStartedMinute: 20}, dir, now)
	if err != nil {
		t.Fatal(err)
	}
	e.answerQuotes(t, stub)
	e.start(t, metering.Options{})
	ctx := testCtx(t)
	if _, err := e.client.Grant(ctx, credits.GrantRequest{Consumer: "dev", Amount: 1000}); err != nil {
		t.Fatal(err)
	}
	hr, err := e.client.Hold(ctx, credits.HoldRequest{SandboxID: "s1", Consumer: "dev", Profile: profSaaS, Extension: extSaaS,
		TTLSeconds: 600, PricingModel: extension.PricingMetered})
	if err != nil {
		t.Fatal(err)
	}
	if hr.Amount != 50+10*20 || len(hr.Quote.Breakdown) == 0 {
		t.Fatalf("hold %+v, want the stub's quote for 10 minutes (250) with its breakdown", hr)
	}
	h, err := stub.Provision(ctx, extension.Profile{Slug: profSaaS}, extension.Inputs{extension.InputSandboxID: "s1"}, "")
	if err != nil {
		t.Fatal(err)
	}
	r := ref("dev", "s1", profSaaS)
	readyAt := clk.Add(3 * time.Second)
	destroyedAt := readyAt.Add(50 * time.Second)
	mu.Lock()
	clk = destroyedAt.Add(20 * time.Second) // the provider stops its meter later
	mu.Unlock()
	if _, err := stub.Teardown(ctx, h); err != nil {
		t.Fatal(err)
	}
	reading, err := stub.MeterActual(ctx, h, extension.Usage{ReadyAt: readyAt, DestroyedAt: destroyedAt})
	if err != nil {
		t.Fatal(err)
	}
	if reading.Amount != 50+2*20 {
		t.Fatalf("stub reading %+v, want 90 (73s by its clock: 2 started minutes)", reading)
	}
	e.publish(t, r, event.StateReady, readyAt, false)
	e.publishData(t, r, event.StateDestroyed, destroyedAt, event.Destroyed{Ref: r, Reason: event.ReasonRequested,
		Meter: &event.MeterReading{Amount: reading.Amount, Quantity: reading.Quantity, Unit: reading.Unit, Breakdown: reading.Breakdown}}, false)
	e.drained(t)
	s := e.snap(t, "dev")
	checkInvariants(t, s)
	if s.acct.Balance != 1000-90 || s.acct.Held != 0 {
		t.Fatalf("balance %d held %d, want 910 and 0", s.acct.Balance, s.acct.Held)
	}
	u, err := e.client.Usage(ctx, credits.UsageRequest{Consumer: "dev"})
	if err != nil || len(u.Records) != 1 {
		t.Fatalf("usage %+v, %v", u, err)
	}
	rec := u.Records[0]
	if rec.Quote.Amount != 250 || rec.Actual.Amount != 90 || rec.Actual.Source != credits.SourceMeter || rec.Actual.Unit != "minute" || rec.Seconds != 50 {
		t.Fatalf("usage record %+v", rec)
	}
	validateStream(t, e)
}

// TestMeteredAccrualAndRefund: while it runs, a metered sandbox is debited
// by its backend's quotes; when the meter reads less, the difference is
// refunded.
func TestMeteredAccrualAndRefund(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	stub, err := saasstub.Open(saasstub.Config{StartFee: 50, PerStartedMinute: 20}, t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	e.answerQuotes(t, stub)
	e.start(t, metering.Options{AccrualInterval: time.Second})
	ctx := testCtx(t)
	if _, err := e.client.Grant(ctx, credits.GrantRequest{Consumer: "dev", Amount: 1000}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.client.Hold(ctx, credits.HoldRequest{SandboxID: "s2", Consumer: "dev", Profile: profSaaS, Extension: extSaaS, TTLSeconds: 60}); err != nil {
		t.Fatal(err)
	}
	r := ref("dev", "s2", profSaaS)
	e.publish(t, r, event.StateReady, time.Now().UTC(), false)
	waitFor(t, 20*time.Second, "a debit", func() (bool, error) {
		b, err := e.client.Balance(ctx, "dev")
		return err == nil && b.Balance < 1000, err
	})
	// The provider says it cost only its start fee.
	e.publishData(t, r, event.StateDestroyed, time.Now().UTC(), event.Destroyed{Ref: r, Reason: event.ReasonRequested,
		Meter: &event.MeterReading{Amount: 30, Quantity: 0, Unit: "minute"}}, false)
	e.drained(t)
	s := e.snap(t, "dev")
	checkInvariants(t, s)
	var refunds int
	for _, x := range s.entries {
		if x.Kind == credits.EntryRefund {
			refunds++
		}
	}
	if refunds != 1 || s.acct.Balance != 970 {
		t.Fatalf("ledger %v, balance %d: want one refund down to 970", kinds(s.entries), s.acct.Balance)
	}
}

// TestFailedAndRejectedCostNothing: holds of sandboxes that never became
// ready are released in full.
func TestFailedAndRejectedCostNothing(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.start(t, metering.Options{})
	ctx := testCtx(t)
	if _, err := e.client.Grant(ctx, credits.GrantRequest{Consumer: "dev", Amount: 500}); err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC()
	for _, tc := range []struct {
		sb     string
		states []event.State
	}{
		{"fails", []event.State{event.StateFailed, event.StateDestroyed}},
		{"rejected", []event.State{event.StateRejected}},
		{"gone", []event.State{event.StateDestroyed}},
	} {
		if _, err := e.client.Hold(ctx, credits.HoldRequest{SandboxID: tc.sb, Consumer: "dev", Profile: profCheap, Extension: extSelf, TTLSeconds: 30}); err != nil {
			t.Fatal(err)
		}
		for _, s := range tc.states {
			e.publish(t, ref("dev", tc.sb, profCheap), s, now, false)
		}
	}
	e.drained(t)
	s := e.snap(t, "dev")
	checkInvariants(t, s)
	if s.acct.Balance != 500 || s.acct.Held != 0 || len(s.holds) != 0 {
		t.Fatalf("balance %d held %d holds %v", s.acct.Balance, s.acct.Held, s.holds)
	}
}

// TestReadyWithoutAdmission: a sandbox that was never admitted is metered
// from ready all the same, and a late ready after its destroyed opens
// nothing.
func TestReadyWithoutAdmission(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.start(t, metering.Options{})
	ctx := testCtx(t)
	if _, err := e.client.Grant(ctx, credits.GrantRequest{Consumer: "dev", Amount: 100}); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now().UTC().Truncate(time.Second)
	r := ref("dev", "walkin", profCheap)
	e.publish(t, r, event.StateReady, t0, false)
	e.drained(t)
	e.publish(t, r, event.StateDestroyed, t0.Add(5*time.Second), false)
	late := ref("dev", "late", profCheap)
	e.publish(t, late, event.StateDestroyed, t0, false)
	e.drained(t)
	e.publish(t, late, event.StateReady, t0, false)
	e.drained(t)
	s := e.snap(t, "dev")
	checkInvariants(t, s)
	if s.acct.Balance != 100-10 || len(s.holds) != 0 {
		t.Fatalf("balance %d, holds %v; want 90 and none", s.acct.Balance, s.holds)
	}
}

// TestGrantsSpendingOrderAndExpiry: priority first, then earliest expiry;
// an expired grant's unspent, unheld rest is removed; grants are
// idempotent by id.
func TestGrantsSpendingOrderAndExpiry(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	clock := struct {
		sync.Mutex
		t time.Time
	}{t: time.Now().UTC()}
	now := func() time.Time { clock.Lock(); defer clock.Unlock(); return clock.t }
	e.start(t, metering.Options{Now: now})
	ctx := testCtx(t)
	soon := now().Add(time.Hour)
	later := now().Add(2 * time.Hour)
	for _, g := range []credits.GrantRequest{
		{Consumer: "dev", Amount: 100, ID: "paid", Priority: 1},
		{Consumer: "dev", Amount: 30, ID: "promo-late", Promo: true, ExpiresAt: later},
		{Consumer: "dev", Amount: 20, ID: "promo-soon", Promo: true, ExpiresAt: soon},
		{Consumer: "dev", Amount: 20, ID: "promo-soon", Promo: true, ExpiresAt: soon}, // again
	} {
		if _, err := e.client.Grant(ctx, g); err != nil {
			t.Fatal(err)
		}
	}
	b, err := e.client.Balance(ctx, "dev")
	if err != nil {
		t.Fatal(err)
	}
	var order []string
	for _, g := range b.Grants {
		order = append(order, g.ID)
	}
	if b.Balance != 150 || fmt.Sprint(order) != "[promo-soon promo-late paid]" {
		t.Fatalf("balance %d, spending order %v", b.Balance, order)
	}
	// Spend 25 through a sandbox: all of promo-soon, 5 of promo-late.
	if _, err := e.client.Hold(ctx, credits.HoldRequest{SandboxID: "x", Consumer: "dev", Profile: profCheap, Extension: extSelf, TTLSeconds: 20}); err != nil {
		t.Fatal(err)
	}
	t0 := now().Truncate(time.Second)
	r := ref("dev", "x", profCheap)
	e.publish(t, r, event.StateReady, t0, false)
	e.publish(t, r, event.StateDestroyed, t0.Add(20*time.Second), false)
	e.drained(t)
	// Past promo-late's expiry: its 25 left expire.
	clock.Lock()
	clock.t = later.Add(time.Second)
	clock.Unlock()
	b, err = e.client.Balance(ctx, "dev")
	if err != nil {
		t.Fatal(err)
	}
	if b.Balance != 100 {
		t.Fatalf("after expiry balance %d, want 100: %+v", b.Balance, b.Grants)
	}
	s := e.snap(t, "dev")
	checkInvariants(t, s)
	var expired int64
	for _, x := range s.entries {
		if x.Kind == credits.EntryExpire {
			expired -= x.Amount
		}
	}
	if expired != 25 {
		t.Fatalf("expired %d, want 25; ledger %v", expired, kinds(s.entries))
	}
	l, err := e.client.Ledger(ctx, credits.LedgerRequest{Consumer: "dev", AfterSeq: 2, Limit: 2})
	if err != nil || len(l.Entries) != 2 || l.Entries[0].Seq != 3 || !l.More {
		t.Fatalf("ledger page %+v, %v", l, err)
	}
	all, err := e.client.LedgerAll(ctx, credits.LedgerRequest{Consumer: "dev", Limit: 2})
	if err != nil || len(all) != len(s.entries) {
		t.Fatalf("LedgerAll: %d entries, %v; want %d", len(all), err, len(s.entries))
	}
}

// TestLegacyAccountMigrates: an account written when holds lived in its
// document has them moved to keys of their own by its next change, and
// they settle as before.
func TestLegacyAccountMigrates(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := testCtx(t)
	now := time.Now().UTC().Truncate(time.Second)
	legacy := map[string]any{
		"consumer": "old", "balance": 100, "held": 30, "seq": 2,
		"grants": []map[string]any{{"id": "g", "amount": 100, "remaining": 100, "priority": 0, "granted_at": now}},
		"holds": map[string]any{"sb1": map[string]any{"id": "sb1", "sandbox_id": "sb1", "profile": profCheap, "extension": extSelf,
			"pricing_model": "self-hosted", "price": map[string]any{"start": 5, "per_second": 1}, "amount": 30, "reserved": 30,
			"debited": 0, "quote": map[string]any{"amount": 30, "duration_seconds": 25}, "created_at": now}},
		"updated_at": now,
	}
	for _, x := range []credits.Entry{
		{Key: "old.grant.g", Seq: 1, Consumer: "old", Kind: credits.EntryGrant, Amount: 100, BalanceAfter: 100, Grant: "g", Cause: "grant.g", At: now},
		{Key: "old.sb.sb1.hold", Seq: 2, Consumer: "old", Kind: credits.EntryHold, Held: 30, BalanceAfter: 100, HeldAfter: 30, Sandbox: "sb1", Hold: "sb1", Cause: "admission.sb1", At: now},
	} {
		b, _ := json.Marshal(x)
		if _, err := e.cred.Create(ctx, bus.LedgerPrefix+x.Key, b); err != nil {
			t.Fatal(err)
		}
	}
	b, _ := json.Marshal(legacy)
	if _, err := e.cred.Create(ctx, "account.old", b); err != nil {
		t.Fatal(err)
	}
	e.start(t, metering.Options{})
	bal, err := e.client.Balance(ctx, "old")
	if err != nil || bal.Held != 30 || len(bal.Holds) != 1 {
		t.Fatalf("balance of a legacy account: %+v, %v", bal, err)
	}
	s := e.snap(t, "old")
	checkInvariants(t, s)
	if _, ok := s.holds["sb1"]; !ok {
		t.Fatalf("hold sb1 not moved to its key: %v", s.holds)
	}
	r := ref("old", "sb1", profCheap)
	e.publish(t, r, event.StateReady, now, false)
	e.publish(t, r, event.StateDestroyed, now.Add(10*time.Second), false)
	e.drained(t)
	s = e.snap(t, "old")
	checkInvariants(t, s)
	if s.acct.Balance != 85 || s.acct.Held != 0 || len(s.holds) != 0 || len(s.acct.Grants) != 1 {
		t.Fatalf("after settlement: %+v, holds %v", s.acct, s.holds)
	}
}

// TestCacheFollowsOtherInstances: an instance that cached an account
// never answers from it once another instance changed the account: a read
// sees the other's grant, an admission spends it, and a hold the other
// closed is closed here too.
func TestCacheFollowsOtherInstances(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	m1 := e.start(t, metering.Options{})
	m2 := e.start(t, metering.Options{})
	ctx := testCtx(t)
	if _, err := m1.Grant(ctx, credits.GrantRequest{Consumer: "two", Amount: 100, ID: "a"}); err != nil {
		t.Fatal(err)
	}
	hold := func(m *metering.Metering, sb string, ttl int64) error {
		_, err := m.Hold(ctx, credits.HoldRequest{SandboxID: sb, Consumer: "two", Profile: profCheap, Extension: extSelf, TTLSeconds: ttl})
		return err
	}
	if err := hold(m1, "sb1", 10); err != nil { // m1 caches the account: 15 held
		t.Fatal(err)
	}
	if _, err := m2.Grant(ctx, credits.GrantRequest{Consumer: "two", Amount: 50, ID: "b"}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		check func() error
	}{
		{"read sees the other's grant", func() error {
			b, err := m1.Balance(ctx, "two")
			if err == nil && (b.Balance != 150 || b.Held != 15 || len(b.Holds) != 1) {
				err = fmt.Errorf("balance %+v, want 150 with 15 held in one hold", b)
			}
			return err
		}},
		{"admission spends the other's grant", func() error {
			return hold(m1, "sb2", 120) // 125 of the 135 available: needs grant b
		}},
		{"a hold closed elsewhere is closed", func() error {
			// Whichever instance handles the rejected event, m1
			// answers from the account as it is now.
			e.publish(t, ref("two", "sb1", profCheap), event.StateRejected, time.Now().UTC(), false)
			e.drained(t)
			if err := hold(m1, "sb1", 10); !errors.Is(err, credits.ErrHoldClosed) {
				return fmt.Errorf("admission of a released sandbox: %v, want ErrHoldClosed", err)
			}
			return nil
		}},
	} {
		if err := tc.check(); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
	}
	s := e.snap(t, "two")
	checkInvariants(t, s)
	if s.acct.Balance != 150 || s.acct.Held != 125 || len(s.holds) != 1 {
		t.Fatalf("account %+v, holds %v", s.acct, s.holds)
	}
}

// TestFreeSandboxHasNoAccrual: a sandbox with nothing to accrue gets no
// accrual schedule; a priced one gets one while it runs, and loses it when
// it is settled.
func TestFreeSandboxHasNoAccrual(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.start(t, metering.Options{})
	ctx := testCtx(t)
	if _, err := e.client.Grant(ctx, credits.GrantRequest{Consumer: "dev", Amount: 1000}); err != nil {
		t.Fatal(err)
	}
	timers, err := e.js.Stream(ctx, event.StreamTimers)
	if err != nil {
		t.Fatal(err)
	}
	scheduled := func(sb string) bool {
		t.Helper()
		m, err := timers.GetLastMsgForSubject(ctx, event.AccrualScheduleSubject(sb))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return false
		}
		if err != nil {
			t.Fatal(err)
		}
		// A cancel leaves a marker without a schedule for a second.
		return m.Header.Get(jetstream.ScheduleHeader) != ""
	}
	t0 := time.Now().UTC().Truncate(time.Second)
	free, cheap := ref("dev", "free1", profFree), ref("dev", "cheap1", profCheap)
	for _, r := range []event.Ref{free, cheap} {
		if _, err := e.client.Hold(ctx, credits.HoldRequest{SandboxID: r.SandboxID, Consumer: "dev", Profile: r.Profile, Extension: extSelf, TTLSeconds: 60}); err != nil {
			t.Fatal(err)
		}
		e.publish(t, r, event.StateReady, t0, false)
	}
	e.drained(t)
	if scheduled(free.SandboxID) || !scheduled(cheap.SandboxID) {
		t.Fatalf("accrual schedules: free %v, cheap %v; want false, true", scheduled(free.SandboxID), scheduled(cheap.SandboxID))
	}
	for _, r := range []event.Ref{free, cheap} {
		e.publish(t, r, event.StateDestroyed, t0.Add(3*time.Second), false)
	}
	e.drained(t)
	if scheduled(cheap.SandboxID) {
		t.Fatal("the settled sandbox's accrual schedule is still there")
	}
	s := e.snap(t, "dev")
	checkInvariants(t, s)
	if s.acct.Balance != 1000-5-3 || s.acct.Held != 0 {
		t.Fatalf("balance %d held %d, want 992 (the cheap one's 5 + 3 x 1) and 0", s.acct.Balance, s.acct.Held)
	}
}

// TestReadsWhereTheLeaderIs admits a sandbox whose hold this instance has
// not read, which asks the credits stream whether it holds one: on one
// server, whose only replica is the leader, by direct get; on a cluster
// of three replicas from the stream's leader (a JetStream API request),
// never by a direct get that a follower behind the leader may answer.
func TestReadsWhereTheLeaderIs(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		env     func(testing.TB) *env
		leaders bool
	}{
		{"one server", newEnv, false},
		{"cluster", newClusterEnv, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := tc.env(t)
			ctx := testCtx(t)
			reads := make(chan *nats.Msg, 64)
			for _, subj := range []string{"$JS.API.STREAM.MSG.GET." + bus.KVStream(bus.BucketCredits), "$JS.API.DIRECT.GET." + bus.KVStream(bus.BucketCredits) + ".>"} {
				sub, err := e.nc.ChanSubscribe(subj, reads)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { _ = sub.Unsubscribe() })
			}
			if err := e.nc.Flush(); err != nil {
				t.Fatal(err)
			}
			e.start(t, metering.Options{})
			if _, err := e.client.Grant(ctx, credits.GrantRequest{Consumer: "dev", Amount: 1000, ID: "first"}); err != nil {
				t.Fatal(err)
			}
			if _, err := e.client.Hold(ctx, credits.HoldRequest{SandboxID: "sb1", Consumer: "dev", Profile: profCheap, Extension: extSelf, TTLSeconds: 60}); err != nil {
				t.Fatal(err)
			}
			// Copies of the reads reach this connection over the cluster's
			// routes in their own time: wait for the kind expected, then
			// count what came.
			leader, direct := 0, 0
			count := func(m *nats.Msg) {
				switch {
				case !strings.Contains(m.Subject, ".hold.") && !strings.Contains(string(m.Data), ".hold."):
				case strings.HasPrefix(m.Subject, "$JS.API.DIRECT."):
					direct++
				default:
					leader++
				}
			}
			deadline := time.After(10 * time.Second)
			for (tc.leaders && leader == 0) || (!tc.leaders && direct == 0) {
				select {
				case m := <-reads:
					count(m)
				case <-deadline:
					t.Fatalf("no read of the hold the way wanted in 10s: %d from the leader, %d by direct get", leader, direct)
				}
			}
			for len(reads) > 0 {
				count(<-reads)
			}
			if tc.leaders && direct != 0 {
				t.Fatalf("hold read %d times from the leader and %d by direct get; want the leader only", leader, direct)
			}
			if !tc.leaders && leader != 0 {
				t.Fatalf("hold read %d times by direct get and %d from the leader; want direct gets only", direct, leader)
			}
		})
	}
}
