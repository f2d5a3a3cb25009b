package metering_test

import (
	"encoding/json"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/credits"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/services/metering"
)

// TestFreeSandboxLeavesOnlyItsUsage: whatever way a free sandbox lives
// (never admitted, as the gateway asks nothing for it, when metering keeps
// nothing for it while it runs; admitted anyway; destroyed before its
// ready is handled; failed, then destroyed), it leaves no ledger entry
// and no credits event, only one usage record;
// redelivered events change nothing, and its meter never opens again. A
// priced sandbox of the same consumer is metered as before, and the
// account is the fold of its ledger throughout.
func TestFreeSandboxLeavesOnlyItsUsage(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.start(t, metering.Options{})
	ctx := testCtx(t)
	const c = "thrifty"
	t0 := time.Now().UTC().Truncate(time.Second)

	never, admitted, early, failed := ref(c, "free-never", profFree), ref(c, "free-admitted", profFree), ref(c, "free-early", profFree), ref(c, "free-failed", profFree)
	free := []event.Ref{never, admitted, early, failed}
	if hr, err := e.client.Hold(ctx, credits.HoldRequest{SandboxID: admitted.SandboxID, Consumer: c, Profile: profFree, Extension: extSelf, TTLSeconds: 60}); err != nil || hr.Amount != 0 || hr.Hold != admitted.SandboxID {
		t.Fatalf("admission of a free sandbox: %+v, %v", hr, err)
	}
	for _, r := range []event.Ref{never, admitted} {
		e.publish(t, r, event.StateReady, t0, false)
	}
	e.drained(t)
	// The one admitted has the hold admission opened, now its meter; the
	// other has nothing.
	if s := e.snap(t, c); len(s.entries) != 0 || len(s.holds) != 1 || s.holds[admitted.SandboxID].ReadyAt.IsZero() || s.acct.Open != 1 {
		t.Fatalf("two free sandboxes running: %d ledger entries, holds %v, %d open; want none, the admitted one's meter", len(s.entries), s.holds, s.acct.Open)
	}
	for _, r := range []event.Ref{never, admitted} {
		e.publish(t, r, event.StateDestroyed, t0.Add(7*time.Second), false)
	}
	// Destroyed before its ready is handled, and the ready after.
	e.publish(t, early, event.StateDestroyed, t0.Add(3*time.Second), false)
	e.drained(t)
	e.publish(t, early, event.StateReady, t0, false)
	e.publish(t, failed, event.StateFailed, t0, false)
	e.publish(t, failed, event.StateDestroyed, t0, false)
	e.drained(t)
	// Redeliveries past the de-duplication window, of every event.
	for _, r := range free {
		for _, st := range []event.State{event.StateReady, event.StateDestroyed} {
			if r == failed && st == event.StateReady {
				st = event.StateFailed
			}
			e.publish(t, r, st, t0, true)
		}
	}
	e.drained(t)

	s := e.snap(t, c)
	checkInvariants(t, s)
	if len(s.entries) != 0 || len(s.holds) != 0 || s.acct.Balance != 0 || s.acct.Held != 0 || s.acct.Open != 0 {
		t.Fatalf("after four free sandboxes: ledger %v, holds %v, account %+v; want nothing", kinds(s.entries), s.holds, s.acct)
	}
	u, err := e.client.Usage(ctx, credits.UsageRequest{Consumer: c})
	if err != nil {
		t.Fatal(err)
	}
	count := map[string]int{}
	for _, rec := range u.Records {
		count[rec.Sandbox]++
		if rec.Charged != 0 || rec.Unpaid != 0 || rec.Actual.Amount != 0 || rec.Reserved != 0 {
			t.Errorf("usage of free sandbox %s: %+v", rec.Sandbox, rec)
		}
		if rec.Sandbox == never.SandboxID && (!rec.ReadyAt.Equal(t0) || rec.Seconds != 7) {
			t.Errorf("usage of %s: ready %s for %ds, want %s for 7s", rec.Sandbox, rec.ReadyAt, rec.Seconds, t0)
		}
	}
	for _, r := range free {
		if count[r.SandboxID] != 1 {
			t.Errorf("free sandbox %s has %d usage records, want 1 (all: %+v)", r.SandboxID, count[r.SandboxID], u.Records)
		}
	}
	var types []string
	for _, ev := range e.meteringEvents(t) {
		if slices.ContainsFunc(free, func(r event.Ref) bool { return r.SandboxID == ev.Subject() }) {
			types = append(types, ev.Type())
		}
	}
	want := []string{string(credits.KindUsage.Type())}
	if len(types) != len(free) || slices.IndexFunc(types, func(s string) bool { return s != want[0] }) >= 0 {
		t.Fatalf("metering events of the free sandboxes: %v, want one %s each", types, want[0])
	}
	validateStream(t, e)
	for _, r := range free {
		if _, err := e.client.Hold(ctx, credits.HoldRequest{SandboxID: r.SandboxID, Consumer: c, Profile: profFree, Extension: extSelf}); !errors.Is(err, credits.ErrHoldClosed) {
			t.Errorf("admission of settled free sandbox %s: %v, want ErrHoldClosed", r.SandboxID, err)
		}
	}

	// A priced sandbox of the same consumer: hold, debit, release.
	if _, err := e.client.Grant(ctx, credits.GrantRequest{Consumer: c, Amount: 100, ID: "g"}); err != nil {
		t.Fatal(err)
	}
	cheap := ref(c, "cheap", profCheap)
	if _, err := e.client.Hold(ctx, credits.HoldRequest{SandboxID: cheap.SandboxID, Consumer: c, Profile: profCheap, Extension: extSelf, TTLSeconds: 60}); err != nil {
		t.Fatal(err)
	}
	e.publish(t, cheap, event.StateReady, t0, false)
	e.publish(t, cheap, event.StateDestroyed, t0.Add(10*time.Second), false)
	e.drained(t)
	s = e.snap(t, c)
	checkInvariants(t, s)
	wantKinds := []credits.EntryKind{credits.EntryGrant, credits.EntryHold, credits.EntryDebit, credits.EntryRelease}
	if !slices.Equal(kinds(s.entries), wantKinds) || s.acct.Balance != 85 {
		t.Fatalf("priced sandbox after free ones: ledger %v, balance %d; want %v and 85", kinds(s.entries), s.acct.Balance, wantKinds)
	}
}

// TestFreeUsageRecordedBeforeACrashIsPublishedAsWritten: a free sandbox
// whose usage record was written by a delivery of its destroyed event that
// died before publishing the usage event (the record is there, the event
// is not) gets the event on the next delivery, with the record as it was
// written, and no second record: the server refuses the second write.
func TestFreeUsageRecordedBeforeACrashIsPublishedAsWritten(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.start(t, metering.Options{})
	ctx := testCtx(t)
	const c = "crashy"
	t0 := time.Now().UTC().Truncate(time.Second)
	r := ref(c, "free-crashed", profFree)
	e.publish(t, r, event.StateReady, t0, false)
	e.drained(t)
	if s := e.snap(t, c); len(s.holds) != 0 || s.acct.Open != 0 || len(s.entries) != 0 {
		t.Fatalf("a free sandbox running without a hold: holds %v, %d open, %d entries; want nothing", s.holds, s.acct.Open, len(s.entries))
	}
	// What the dead delivery wrote: 5 seconds, where this one would
	// compute 9.
	was := credits.UsageRecord{Key: "usage." + c + "." + r.SandboxID, Consumer: c, Sandbox: r.SandboxID, Hold: r.SandboxID,
		Profile: r.Profile, Extension: r.Extension, PricingModel: "self_hosted", ReadyAt: t0, DestroyedAt: t0.Add(5 * time.Second),
		Seconds: 5, Reason: event.ReasonRequested, Cause: r.SandboxID + ".destroyed"}
	b, err := json.Marshal(was)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.cred.Create(ctx, was.Key, b); err != nil {
		t.Fatal(err)
	}
	e.publish(t, r, event.StateDestroyed, t0.Add(9*time.Second), false)
	e.drained(t)

	var got []credits.UsageRecord
	for _, ev := range e.meteringEvents(t) {
		if ev.Subject() != r.SandboxID {
			continue
		}
		var u credits.UsageRecord
		if err := ev.DataAs(&u); err != nil {
			t.Fatal(err)
		}
		got = append(got, u)
	}
	if len(got) != 1 || got[0].Seconds != 5 || !got[0].DestroyedAt.Equal(was.DestroyedAt) {
		t.Fatalf("usage events of %s: %+v; want one, the record as written (5 s)", r.SandboxID, got)
	}
	u, err := e.client.Usage(ctx, credits.UsageRequest{Consumer: c})
	if err != nil {
		t.Fatal(err)
	}
	if len(u.Records) != 1 || u.Records[0].Seconds != 5 {
		t.Fatalf("usage records of %s: %+v; want the one written", c, u.Records)
	}
}
