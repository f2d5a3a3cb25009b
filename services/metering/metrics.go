package metering

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/credits"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/metrics"
)

// kindAccrual is the folded kind of an accrual tick (the others are the
// lifecycle states metering consumes).
const kindAccrual = "accrual"

// Bounds of what a scrape reads.
const (
	// lagTimeout bounds the consumer info reads of one scrape.
	lagTimeout = 2 * time.Second
	// snapshotTimeout bounds one read of every account.
	snapshotTimeout = 5 * time.Second
)

// meteringMetrics are metering's families. The counters count at the
// compare-and-swap that makes a change durable (once, whichever instance
// made it) or where an event was handled; the gauges are read on scrape:
// the durables' lag at every scrape, the open holds and the accounts low
// on credit from a read of every account document (one ordered consumer
// over account.*, never the holds), at most once per MetricsRefresh.
type meteringMetrics struct {
	folded           *prometheus.CounterVec
	granted, debited prometheus.Counter
	notices          *prometheus.CounterVec
	holdsExpired     prometheus.Counter

	log     *slog.Logger
	refresh time.Duration

	mu      sync.Mutex // one scrape reads at a time
	js      jetstream.JetStream
	credits jetstream.KeyValue // nil until Start
	at      time.Time          // of the last snapshot
	snap    *accountsSnapshot  // nil until the first read succeeds
}

// accountsSnapshot is what a read of every account says.
type accountsSnapshot struct {
	openHolds, lowAccounts int
}

var (
	descLag = prometheus.NewDesc(metrics.Namespace+"_metering_consumer_pending_messages",
		"Messages metering's durables have yet to deliver (consumer info NumPending), by durable: metering (lifecycle events), metering-accrual (ticks).",
		[]string{"consumer"}, nil)
	descHoldsOpen = prometheus.NewDesc(metrics.Namespace+"_credit_holds_open",
		"Open credit holds (one per running or starting sandbox, free ones included), from the account documents.", nil, nil)
	descAccountsLow = prometheus.NewDesc(metrics.Namespace+"_credit_accounts_low",
		"Accounts with a running sandbox whose hold could not be extended (its low or exhausted notice went out), from the account documents.", nil, nil)
)

func newMeteringMetrics(reg prometheus.Registerer, log *slog.Logger, refresh time.Duration) *meteringMetrics {
	mm := &meteringMetrics{
		folded: metrics.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metrics.Namespace, Subsystem: "metering", Name: "events_folded_total",
			Help: "Events metering folded into the ledger, by kind: the lifecycle state (ready, failed, rejected, destroyed) or accrual (a tick). A redelivery counts again.",
		}, []string{"kind"})),
		holdsExpired: metrics.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: metrics.Namespace, Subsystem: "metering", Name: "holds_expired_total",
			Help: "Admitted holds whose sandbox had no lifecycle event by the hold's deadline (a create command never came): the sandbox was rejected (hold_expired), which releases the hold.",
		})),
		granted: metrics.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: metrics.Namespace, Name: "credits_granted_total",
			Help: "Credit granted, in minor units (grant ledger entries).",
		})),
		debited: metrics.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: metrics.Namespace, Name: "credits_debited_total",
			Help: "Credit debited for usage, in minor units (debit ledger entries: accruals and settlements).",
		})),
		notices: metrics.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metrics.Namespace, Subsystem: "credit", Name: "notices_total",
			Help: "Low and exhausted notices: a running sandbox's hold could not be extended (low), or it ran out and is destroyed (exhausted).",
		}, []string{"kind"})),
		log: log, refresh: refresh,
	}
	// Every kind is exported from the start, at 0.
	for _, k := range []credits.Kind{credits.KindLow, credits.KindExhausted} {
		mm.notices.WithLabelValues(string(k))
	}
	for _, s := range []event.State{event.StateReady, event.StateFailed, event.StateRejected, event.StateDestroyed} {
		mm.folded.WithLabelValues(string(s))
	}
	mm.folded.WithLabelValues(kindAccrual)
	if reg != nil {
		metrics.Register(reg, prometheus.Collector(mm))
	}
	return mm
}

// started gives the gauges what they read.
func (mm *meteringMetrics) started(js jetstream.JetStream, credits jetstream.KeyValue) {
	mm.mu.Lock()
	defer mm.mu.Unlock()
	mm.js, mm.credits = js, credits
}

// committed counts what one compare-and-swap of an account made durable:
// the grants and debits of its ledger entries, its notices.
func (mm *meteringMetrics) committed(items []*Item) {
	if mm == nil {
		return
	}
	for _, it := range items {
		switch {
		case it.Entry != nil && it.Entry.Kind == credits.EntryGrant:
			mm.granted.Add(float64(it.Entry.Amount))
		case it.Entry != nil && it.Entry.Kind == credits.EntryDebit:
			mm.debited.Add(float64(-it.Entry.Amount))
		case it.Notice != nil:
			mm.notices.WithLabelValues(string(it.Notice.Kind)).Inc()
		}
	}
}

// foldedLifecycle counts a lifecycle event handled, by its subject's
// state.
func (mm *meteringMetrics) foldedLifecycle(subject string) {
	if ref, err := event.ParseLifecycleSubject(subject); err == nil {
		mm.folded.WithLabelValues(string(ref.State)).Inc()
	}
}

// countAccrual is onAccrual, counting the ticks it handled.
func (m *Metering) countAccrual(ctx context.Context, msg *bus.Message) ([]bus.Out, error) {
	outs, err := m.onAccrual(ctx, msg)
	if err == nil {
		m.metrics.folded.WithLabelValues(kindAccrual).Inc()
	}
	return outs, err
}

func (mm *meteringMetrics) Describe(ch chan<- *prometheus.Desc) {
	ch <- descLag
	ch <- descHoldsOpen
	ch <- descAccountsLow
}

func (mm *meteringMetrics) Collect(ch chan<- prometheus.Metric) {
	mm.mu.Lock()
	defer mm.mu.Unlock()
	if mm.credits == nil {
		return
	}
	lctx, cancel := context.WithTimeout(context.Background(), lagTimeout)
	defer cancel()
	for _, d := range []struct{ stream, name string }{
		{event.StreamLifecycle, ConsumerLifecycle}, {event.StreamTimers, ConsumerAccrual},
	} {
		cons, err := mm.js.Consumer(lctx, d.stream, d.name)
		if err != nil {
			mm.log.Warn("reading consumer for metrics", "consumer", d.name, "err", err)
			continue
		}
		ch <- prometheus.MustNewConstMetric(descLag, prometheus.GaugeValue, float64(cons.CachedInfo().NumPending), d.name)
	}
	if mm.snap == nil || time.Since(mm.at) >= mm.refresh {
		sctx, cancel := context.WithTimeout(context.Background(), snapshotTimeout)
		snap, err := readAccounts(sctx, mm.credits)
		cancel()
		if err != nil {
			mm.log.Warn("reading accounts for metrics", "err", err)
		} else {
			mm.snap, mm.at = snap, time.Now()
		}
	}
	if mm.snap != nil {
		ch <- prometheus.MustNewConstMetric(descHoldsOpen, prometheus.GaugeValue, float64(mm.snap.openHolds))
		ch <- prometheus.MustNewConstMetric(descAccountsLow, prometheus.GaugeValue, float64(mm.snap.lowAccounts))
	}
}

// readAccounts reads every account document of the credits bucket as of
// now: O(accounts), whatever the number of sandboxes.
func readAccounts(ctx context.Context, kv jetstream.KeyValue) (*accountsSnapshot, error) {
	var snap accountsSnapshot
	err := watchAll(ctx, kv, accountKey("*"), func(b []byte) error {
		var a struct {
			Open        int                        `json:"open_holds"`
			LowHolds    int                        `json:"low_holds"`
			LegacyHolds map[string]json.RawMessage `json:"holds"`
		}
		if err := json.Unmarshal(b, &a); err != nil {
			return fmt.Errorf("decoding account: %w", err)
		}
		snap.openHolds += a.Open
		if a.Open == 0 {
			snap.openHolds += len(a.LegacyHolds) // written before holds had keys of their own
		}
		if a.LowHolds > 0 {
			snap.lowAccounts++
		}
		return nil
	})
	if errors.Is(err, jetstream.ErrNoKeysFound) {
		err = nil
	}
	return &snap, err
}
