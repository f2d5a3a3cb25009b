package metering_test

import (
	"context"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/credits"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/services/metering"
)

// TestSecondLedgerEntryRefused: the server itself refuses a second ledger
// entry for one cause, however it is written: a write of the key, or an
// atomic batch carrying it with a change of the account, of which nothing
// is then stored.
func TestSecondLedgerEntryRefused(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := testCtx(t)
	e.start(t, metering.Options{})
	if _, err := e.client.Grant(ctx, credits.GrantRequest{Consumer: "once", Amount: 50, ID: "g1"}); err != nil {
		t.Fatal(err)
	}
	s := e.snap(t, "once")
	if len(s.entries) != 1 {
		t.Fatalf("ledger after one grant: %+v", s.entries)
	}
	first := s.entries[0]
	second := first
	second.Amount, second.BalanceAfter, second.Reason = 1000, 1050, "forged second entry"
	body, err := json.Marshal(second)
	if err != nil {
		t.Fatal(err)
	}
	key := bus.LedgerPrefix + first.Key
	_, acctRev := e.account(t, "once")

	if _, err := bus.KVWrite(ctx, e.js, bus.BucketCredits, key, body, 0, 0); !errors.Is(err, jetstream.ErrKeyExists) {
		t.Fatalf("a second write of ledger entry %s: %v, want it refused as existing", key, err)
	}

	acct := s.acct
	acct.Balance, acct.Seq = 1050, acct.Seq+1
	ab, err := json.Marshal(acct)
	if err != nil {
		t.Fatal(err)
	}
	msgs := []*nats.Msg{bus.KVMsg(bus.BucketCredits, key, body, 0), bus.KVMsg(bus.BucketCredits, "account.once", ab, acctRev)}
	_, err = bus.PublishAtomic(ctx, e.nc, msgs)
	var apiErr *jetstream.APIError
	if !errors.As(err, &apiErr) || apiErr.ErrorCode != jetstream.JSErrCodeStreamWrongLastSequence {
		t.Fatalf("a batch with a second entry for cause %s: %v, want wrong last sequence", first.Cause, err)
	}
	after := e.snap(t, "once")
	checkInvariants(t, after)
	if len(after.entries) != 1 || after.entries[0].Amount != 50 || after.acct.Balance != 50 {
		t.Fatalf("after the refused batch: balance %d, ledger %+v", after.acct.Balance, after.entries)
	}
	if _, rev := e.account(t, "once"); rev != acctRev {
		t.Fatalf("account at revision %d after a refused batch, was %d", rev, acctRev)
	}

	// The same batch without the second entry is taken: the refusal was
	// the entry's.
	if _, err := bus.PublishAtomic(ctx, e.nc, msgs[1:]); err != nil {
		t.Fatalf("the account write alone: %v", err)
	}
}

// TestBatchCutShortByKill: a metering instance that dies in the middle of
// an account commit (every message of the batch sent but the commit, then
// its connection gone, as on kill -9) leaves nothing of it: not the ledger
// entry, not the account. Another instance then makes the same change
// once.
func TestBatchCutShortByKill(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := testCtx(t)
	m1 := e.start(t, metering.Options{})
	if _, err := m1.Grant(ctx, credits.GrantRequest{Consumer: "cut", Amount: 10, ID: "before"}); err != nil {
		t.Fatal(err)
	}
	before := e.snap(t, "cut")
	_, rev := e.account(t, "cut")

	disarm := e.kill(m1)
	gctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := m1.Grant(gctx, credits.GrantRequest{Consumer: "cut", Amount: 25, ID: "cut"}); err == nil {
		t.Fatal("a grant whose commit never went out succeeded")
	}
	if !disarm() {
		t.Fatal("the kill did not happen in the commit")
	}
	if ok, err := e.cred.Get(ctx, bus.LedgerPrefix+"cut.grant.cut"); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Fatalf("ledger entry of the cut batch: %v, %v; want none", ok, err)
	}
	if _, now := e.account(t, "cut"); now != rev {
		t.Fatalf("account at revision %d after a cut batch, was %d", now, rev)
	}
	checkInvariants(t, e.snap(t, "cut"))

	e.start(t, metering.Options{})
	r, err := e.client.Grant(ctx, credits.GrantRequest{Consumer: "cut", Amount: 25, ID: "cut"})
	if err != nil || r.Duplicate {
		t.Fatalf("the grant again, on another instance: %+v, %v; want it granted now", r, err)
	}
	after := e.snap(t, "cut")
	checkInvariants(t, after)
	if after.acct.Balance != before.acct.Balance+25 || len(after.entries) != len(before.entries)+1 {
		t.Fatalf("after the grant again: balance %d, %d entries; before the cut %d, %d", after.acct.Balance, len(after.entries), before.acct.Balance, len(before.entries))
	}
}

// TestPreviousVersionOutboxFinished: an account the previous version
// committed with an outbox it had not written yet (a crash between its
// compare-and-swap and its writes) is finished when metering next loads
// it: the ledger entry and the hold are written in the credits bucket, the
// event published, and the outbox cleared; nothing twice.
func TestPreviousVersionOutboxFinished(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := testCtx(t)
	now := time.Now().UTC().Truncate(time.Second)
	grant := credits.Entry{Key: "prev.grant.g", Seq: 1, Consumer: "prev", Kind: credits.EntryGrant, Amount: 100, BalanceAfter: 100, Grant: "g", Cause: "grant.g", At: now}
	hold := credits.Entry{Key: "prev.sb.sb1.hold", Seq: 2, Consumer: "prev", Kind: credits.EntryHold, Held: 30, BalanceAfter: 100, HeldAfter: 30, Sandbox: "sb1", Hold: "sb1", Cause: "admission.sb1", At: now}
	h := metering.Hold{ID: "sb1", Sandbox: "sb1", Profile: profCheap, Extension: extSelf, PricingModel: "self-hosted",
		Price: &extension.Price{Start: 5, PerSecond: 1}, Amount: 30, Reserved: 30, Quote: credits.Quote{Amount: 30, DurationSeconds: 25}, CreatedAt: now}
	// The grant entry was written before the crash; the hold's entry and
	// key were not.
	gb, _ := json.Marshal(grant)
	if _, err := e.cred.Create(ctx, bus.LedgerPrefix+grant.Key, gb); err != nil {
		t.Fatal(err)
	}
	acct := metering.Account{Consumer: "prev", Balance: 100, Held: 30, Seq: 2, Open: 1,
		Grants: []*metering.Grant{{Grant: credits.Grant{ID: "g", Amount: 100, Remaining: 100, GrantedAt: now}}}, UpdatedAt: now,
		Outbox: []*metering.Item{{Entry: &grant}, {Entry: &hold}, {Hold: &metering.HoldWrite{Key: "hold.prev.sb1", Hold: &h}}}}
	ab, _ := json.Marshal(acct)
	if _, err := e.cred.Create(ctx, "account.prev", ab); err != nil {
		t.Fatal(err)
	}
	e.start(t, metering.Options{})
	bal, err := e.client.Balance(ctx, "prev")
	if err != nil || bal.Balance != 100 || bal.Held != 30 || len(bal.Holds) != 1 {
		t.Fatalf("balance of an account with an unfinished outbox: %+v, %v", bal, err)
	}
	s := e.snap(t, "prev")
	checkInvariants(t, s)
	if len(s.entries) != 2 || len(s.holds) != 1 || len(s.acct.Outbox) != 0 {
		t.Fatalf("after finishing the outbox: %d entries, holds %v, outbox %d", len(s.entries), s.holds, len(s.acct.Outbox))
	}
	kinds := map[string]int{}
	for _, ev := range e.meteringEvents(t) {
		kinds[ev.Type()]++
	}
	if kinds[string(credits.KindGranted.Type())] != 1 || kinds[string(credits.KindReserved.Type())] != 1 {
		t.Fatalf("metering stream after finishing the outbox: %v; want one granted and one reserved", kinds)
	}
}
