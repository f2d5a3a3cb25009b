package metering_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"pgregory.net/rapid"

	"github.com/sand-boxer/sandboxer/pkg/credits"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/services/metering"
)

// propSandbox is the model of one sandbox in the property test.
type propSandbox struct {
	id, profile string
	admitted    bool
	ready       bool
	readyAt     time.Time
	destroyedAt time.Time
	terminal    bool // failed, rejected or destroyed
	settled     bool // destroyed after ready: charged
	published   []propEvent
}

type propEvent struct {
	state event.State
	at    time.Time
}

// TestPropertyLedger drives random sequences of grants, admissions,
// readies, failures, rejections, destroys, duplicate requests,
// redelivered events, concurrent writers of the account in both
// instances, instances killed in the middle of a commit and service
// restarts against a real NATS server with two metering instances, and
// checks after every step that the balance
// and the credit on hold are the folds of the ledger, that no cause is
// recorded twice, that every hold is released exactly once when its
// sandbox ends and never before, that nothing goes below zero, and that
// every settled sandbox was charged its price.
func TestPropertyLedger(t *testing.T) {
	e := newEnv(t)
	cat := testCatalog()
	var checks atomic.Int64
	base := time.Now().UTC().Truncate(time.Second)
	rapid.Check(t, func(rt *rapid.T) {
		consumer := fmt.Sprintf("p%d", checks.Add(1))
		instances := []*metering.Metering{e.start(rt, metering.Options{}), e.start(rt, metering.Options{})}
		var (
			sandboxes []*propSandbox
			grants    []string
			granted   int64
		)
		pick := func(rt *rapid.T, label string, ok func(*propSandbox) bool) *propSandbox {
			var cands []*propSandbox
			for _, s := range sandboxes {
				if ok(s) {
					cands = append(cands, s)
				}
			}
			if len(cands) == 0 {
				rt.Skip("no sandbox to " + label)
			}
			return rapid.SampledFrom(cands).Draw(rt, label)
		}
		publish := func(rt *rapid.T, s *propSandbox, st event.State, at time.Time) {
			e.publish(rt, ref(consumer, s.id, s.profile), st, at, false)
			s.published = append(s.published, propEvent{st, at})
		}
		ctx := context.Background()
		rt.Repeat(map[string]func(*rapid.T){
			"grant": func(rt *rapid.T) {
				id := fmt.Sprintf("g%d", len(grants))
				if len(grants) > 0 && rapid.Bool().Draw(rt, "duplicate grant") {
					id = rapid.SampledFrom(grants).Draw(rt, "grant id")
				}
				amount := rapid.Int64Range(1, 200).Draw(rt, "amount")
				r, err := e.client.Grant(ctx, credits.GrantRequest{Consumer: consumer, Amount: amount, ID: id})
				if err != nil {
					rt.Fatal(err)
				}
				if !r.Duplicate {
					grants = append(grants, id)
					granted += amount
				}
			},
			"create": func(rt *rapid.T) {
				s := &propSandbox{
					id:      fmt.Sprintf("%s-s%d", consumer, len(sandboxes)),
					profile: rapid.SampledFrom([]string{profCheap, profPricey, profFree}).Draw(rt, "profile"),
				}
				sandboxes = append(sandboxes, s)
				req := credits.HoldRequest{SandboxID: s.id, Consumer: consumer, Profile: s.profile, Extension: extSelf,
					TTLSeconds: rapid.Int64Range(0, 30).Draw(rt, "ttl")}
				r, err := e.client.Hold(ctx, req)
				switch {
				case err == nil:
					s.admitted = true
				case errors.Is(err, credits.ErrInsufficientCredits):
					return
				default:
					rt.Fatal(err)
				}
				if rapid.Bool().Draw(rt, "ask again") {
					again, err := e.client.Hold(ctx, req)
					if err != nil || again.Hold != r.Hold || again.Amount != r.Amount {
						rt.Fatalf("second admission of %s: %+v, %v; first %+v", s.id, again, err, r)
					}
				}
			},
			"ready": func(rt *rapid.T) {
				s := pick(rt, "ready", func(s *propSandbox) bool { return !s.ready && !s.terminal })
				s.ready, s.readyAt = true, base.Add(time.Duration(rapid.IntRange(0, 60).Draw(rt, "ready after"))*time.Second)
				publish(rt, s, event.StateReady, s.readyAt)
			},
			"fail": func(rt *rapid.T) {
				s := pick(rt, "fail", func(s *propSandbox) bool { return !s.ready && !s.terminal })
				s.terminal = true
				publish(rt, s, event.StateFailed, base)
				if rapid.Bool().Draw(rt, "then destroyed") {
					publish(rt, s, event.StateDestroyed, base)
				}
			},
			"reject": func(rt *rapid.T) {
				s := pick(rt, "reject", func(s *propSandbox) bool { return !s.ready && !s.terminal })
				s.terminal = true
				publish(rt, s, event.StateRejected, base)
			},
			"destroy": func(rt *rapid.T) {
				s := pick(rt, "destroy", func(s *propSandbox) bool { return s.ready && !s.terminal })
				s.terminal, s.settled = true, true
				s.destroyedAt = s.readyAt.Add(time.Duration(rapid.IntRange(0, 120).Draw(rt, "ran for"))*time.Second + time.Duration(rapid.IntRange(0, 999).Draw(rt, "ms"))*time.Millisecond)
				publish(rt, s, event.StateDestroyed, s.destroyedAt)
			},
			"redeliver": func(rt *rapid.T) {
				s := pick(rt, "redeliver", func(s *propSandbox) bool { return len(s.published) > 0 })
				ev := rapid.SampledFrom(s.published).Draw(rt, "event")
				e.publish(rt, ref(consumer, s.id, s.profile), ev.state, ev.at, true)
			},
			"concurrent": func(rt *rapid.T) {
				// Several writers of the account at once, in both
				// instances: grants and admissions racing each other.
				n := rapid.IntRange(2, 6).Draw(rt, "writers")
				type write struct {
					grant  string
					amount int64
					sb     *propSandbox
					req    credits.HoldRequest
					err    error
					dup    bool
				}
				ws := make([]*write, n)
				for k := range ws {
					w := &write{}
					if rapid.Bool().Draw(rt, "grant") {
						w.grant = fmt.Sprintf("c%d-%d", len(grants), k)
						w.amount = rapid.Int64Range(1, 100).Draw(rt, "amount")
					} else {
						w.sb = &propSandbox{id: fmt.Sprintf("%s-s%d", consumer, len(sandboxes)),
							profile: rapid.SampledFrom([]string{profCheap, profPricey, profFree}).Draw(rt, "profile")}
						sandboxes = append(sandboxes, w.sb)
						w.req = credits.HoldRequest{SandboxID: w.sb.id, Consumer: consumer, Profile: w.sb.profile, Extension: extSelf, TTLSeconds: 30}
					}
					ws[k] = w
				}
				var wg sync.WaitGroup
				for k, w := range ws {
					m := instances[k%len(instances)]
					wg.Go(func() {
						if w.sb != nil {
							_, w.err = m.Hold(ctx, w.req)
							return
						}
						var r credits.GrantReply
						r, w.err = m.Grant(ctx, credits.GrantRequest{Consumer: consumer, Amount: w.amount, ID: w.grant})
						w.dup = r.Duplicate
					})
				}
				wg.Wait()
				for _, w := range ws {
					switch {
					case w.sb != nil && w.err == nil:
						w.sb.admitted = true
					case w.sb != nil && errors.Is(w.err, credits.ErrInsufficientCredits):
					case w.err != nil:
						rt.Fatal(w.err)
					case w.dup:
						rt.Fatalf("fresh grant %s answered as a duplicate", w.grant)
					default:
						grants = append(grants, w.grant)
						granted += w.amount
					}
				}
			},
			"kill": func(rt *rapid.T) {
				// An instance dies in the middle of a commit: nothing of
				// the batch is stored, and the change made again on
				// another instance is made once.
				i := rapid.IntRange(0, len(instances)-1).Draw(rt, "instance")
				id := fmt.Sprintf("k%d", len(grants))
				amount := rapid.Int64Range(1, 100).Draw(rt, "amount")
				disarm := e.kill(instances[i])
				kctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				_, err := instances[i].Grant(kctx, credits.GrantRequest{Consumer: consumer, Amount: amount, ID: id})
				cancel()
				fired := disarm()
				if err == nil {
					// Committed before the kill hit another batch.
					grants = append(grants, id)
					granted += amount
				}
				sctx, scancel := context.WithTimeout(ctx, 10*time.Second)
				_ = instances[i].Shutdown(sctx) // its connection may be gone
				scancel()
				instances[i] = e.start(rt, metering.Options{})
				if err == nil {
					return
				}
				if !fired {
					rt.Fatalf("grant %s failed with no kill: %v", id, err)
				}
				r, err := instances[1-i].Grant(ctx, credits.GrantRequest{Consumer: consumer, Amount: amount, ID: id})
				if err != nil {
					rt.Fatal(err)
				}
				if r.Duplicate {
					rt.Fatalf("grant %s of a batch cut short was stored", id)
				}
				grants = append(grants, id)
				granted += amount
			},
			"restart": func(rt *rapid.T) {
				i := rapid.IntRange(0, len(instances)-1).Draw(rt, "instance")
				sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				defer cancel()
				if err := instances[i].Shutdown(sctx); err != nil {
					rt.Fatal(err)
				}
				instances[i] = e.start(rt, metering.Options{})
			},
			"": func(rt *rapid.T) {
				e.drained(rt)
				s := e.snap(rt, consumer)
				checkInvariants(rt, s)
				var debited, refunded, expired int64
				for _, x := range s.entries {
					switch x.Kind {
					case credits.EntryDebit:
						debited -= x.Amount
					case credits.EntryRefund:
						refunded += x.Amount
					case credits.EntryExpire:
						expired -= x.Amount
					}
				}
				if s.acct.Balance != granted-debited+refunded-expired {
					rt.Fatalf("balance %d, but granted %d - debited %d + refunded %d - expired %d", s.acct.Balance, granted, debited, refunded, expired)
				}
				for _, sb := range sandboxes {
					_, open := s.holds[sb.id]
					switch {
					case sb.terminal && open:
						rt.Fatalf("sandbox %s ended but its hold is open", sb.id)
					case !sb.terminal && (sb.admitted || sb.ready) && !open:
						rt.Fatalf("sandbox %s runs but has no open hold", sb.id)
					}
				}
				u, err := e.client.Usage(ctx, credits.UsageRequest{Consumer: consumer})
				if err != nil {
					rt.Fatal(err)
				}
				for _, sb := range sandboxes {
					i := slices.IndexFunc(u.Records, func(r credits.UsageRecord) bool { return r.Sandbox == sb.id })
					if !sb.settled || !(sb.admitted || sb.ready) {
						continue
					}
					if i < 0 {
						rt.Fatalf("settled sandbox %s has no usage record", sb.id)
					}
					rec := u.Records[i]
					want := cat.Profiles[sb.profile].Price.Cost(sb.destroyedAt.Sub(sb.readyAt))
					if rec.Actual.Amount != want || rec.Charged+rec.Unpaid != want {
						rt.Fatalf("sandbox %s ran %s on %s: usage %+v, want actual %d = charged + unpaid", sb.id, sb.destroyedAt.Sub(sb.readyAt), sb.profile, rec, want)
					}
				}
			},
		})
	})
}
