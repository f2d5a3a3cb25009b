package metering_test

import (
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/sand-boxer/sandboxer/pkg/credits"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/services/metering"
)

// value is the value of the series of family name whose labels include
// labels (name, value pairs), and whether there is one.
func value(t *testing.T, reg prometheus.Gatherer, name string, labels ...string) (float64, bool) {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for i := 0; i+1 < len(labels); i += 2 {
				if !slices.ContainsFunc(m.GetLabel(), func(l *dto.LabelPair) bool { return l.GetName() == labels[i] && l.GetValue() == labels[i+1] }) {
					continue next
				}
			}
			if c := m.GetCounter(); c != nil {
				return c.GetValue(), true
			}
			return m.GetGauge().GetValue(), true
		}
	}
	return 0, false
}

// TestMetrics runs a sandbox until its credit runs out: metering counts
// the credit granted and debited and the notices where the change that
// makes them durable succeeds, counts the events it folded, and reads the
// open holds and the accounts low on credit from the account documents:
// one of each while the exhausted sandbox still runs, none once it is
// destroyed.
func TestMetrics(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	reg := prometheus.NewRegistry()
	e.start(t, metering.Options{AccrualInterval: time.Second, Metrics: reg, MetricsRefresh: time.Nanosecond})
	ctx := testCtx(t)
	want := func(v float64, name string, labels ...string) {
		t.Helper()
		got, ok := value(t, reg, name, labels...)
		if !ok || got != v {
			t.Errorf("%s%v = %v (found %v), want %v", name, labels, got, ok, v)
		}
	}
	want(0, "sandboxer_credit_holds_open")
	want(0, "sandboxer_credit_accounts_low")
	want(0, "sandboxer_credit_notices_total", "kind", "low")

	if _, err := e.client.Grant(ctx, credits.GrantRequest{Consumer: "short", Amount: 95, ID: "only"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.client.Hold(ctx, credits.HoldRequest{SandboxID: "hungry", Consumer: "short", Profile: profPricey, Extension: extSelf, TTLSeconds: 2}); err != nil {
		t.Fatal(err)
	}
	want(95, "sandboxer_credits_granted_total")
	want(1, "sandboxer_credit_holds_open")
	r := ref("short", "hungry", profPricey)
	e.publish(t, r, event.StateReady, time.Now().UTC(), false)
	waitFor(t, 30*time.Second, "the destroy command", func() (bool, error) { return len(e.destroyCommands(t)) > 0, nil })
	// Exhausted and not destroyed yet: its hold is open and short.
	want(1, "sandboxer_credit_holds_open")
	want(1, "sandboxer_credit_accounts_low")
	want(1, "sandboxer_credit_notices_total", "kind", "low")
	want(1, "sandboxer_credit_notices_total", "kind", "exhausted")

	e.publish(t, r, event.StateDestroyed, time.Now().UTC(), false)
	e.drained(t)
	s := e.snap(t, "short")
	var debited int64
	for _, x := range s.entries {
		if x.Kind == credits.EntryDebit {
			debited -= x.Amount
		}
	}
	if debited == 0 {
		t.Fatal("nothing debited")
	}
	want(float64(debited), "sandboxer_credits_debited_total")
	want(0, "sandboxer_credit_holds_open")
	want(0, "sandboxer_credit_accounts_low")
	want(1, "sandboxer_metering_events_folded_total", "kind", "ready")
	want(1, "sandboxer_metering_events_folded_total", "kind", "destroyed")
	if n, _ := value(t, reg, "sandboxer_metering_events_folded_total", "kind", "accrual"); n < 2 {
		t.Errorf("%v accrual ticks folded, want several", n)
	}
	want(0, "sandboxer_metering_consumer_pending_messages", "consumer", metering.ConsumerLifecycle)
	if _, ok := value(t, reg, "sandboxer_metering_consumer_pending_messages", "consumer", metering.ConsumerAccrual); !ok {
		t.Error("no lag of the accrual durable")
	}
	if n, _ := value(t, reg, "sandboxer_bus_messages_handled_total", "consumer", metering.ConsumerLifecycle); n != 2 {
		t.Errorf("lifecycle events handled: %v, want 2", n)
	}
}
