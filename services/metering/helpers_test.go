package metering_test

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.uber.org/goleak"

	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/catalog"
	"github.com/sand-boxer/sandboxer/pkg/credits"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/saasstub"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
	"github.com/sand-boxer/sandboxer/services/metering"
)

func TestMain(m *testing.M) {
	flag.Parse()
	// Keep the property test bounded on small machines unless asked
	// otherwise on the command line.
	set := map[string]bool{}
	flag.Visit(func(f *flag.Flag) { set[f.Name] = true })
	for name, v := range map[string]string{"rapid.checks": "30", "rapid.steps": "25"} {
		if !set[name] {
			_ = flag.Set(name, v)
		}
	}
	// As every sandboxer process: W3C trace context on every hop, and a
	// tracer provider (without processors: no goroutine) whose spans
	// have ids to propagate.
	otel.SetTextMapPropagator(propagation.TraceContext{})
	otel.SetTracerProvider(sdktrace.NewTracerProvider())
	goleak.VerifyTestMain(m)
}

// tb is what helpers need of a *testing.T or a *rapid.T.
type tb interface {
	Helper()
	Fatal(args ...any)
	Fatalf(format string, args ...any)
	Errorf(format string, args ...any)
	Logf(format string, args ...any)
	Cleanup(func())
}

// logWriter writes a service's log to the test's.
type logWriter struct{ t tb }

func (w logWriter) Write(b []byte) (int, error) {
	w.t.Logf("%s", strings.TrimSpace(string(b)))
	return len(b), nil
}

// Names of the test catalog.
const (
	extSelf    = "selfhost"
	extSaaS    = "saas-stub"
	profCheap  = "cheap"  // start 5, 1 per second
	profPricey = "pricey" // start 0, 10 per second
	profFree   = "free"   // no price
	profSaaS   = "saas"
)

// testCatalog is a self-hosted extension with three profiles and the SaaS
// stub with one.
func testCatalog() *extension.Catalog {
	self := &extension.Manifest{Name: extSelf, Handler: "echo", Capabilities: extension.Capabilities{
		IsolationLevels: []extension.IsolationLevel{extension.IsolationProcess}, PricingModel: extension.PricingSelfHosted}}
	saas := &extension.Manifest{Name: extSaaS, Handler: saasstub.Handler, Capabilities: extension.Capabilities{
		IsolationLevels: []extension.IsolationLevel{extension.IsolationRemote}, PricingModel: extension.PricingMetered}}
	return &extension.Catalog{
		Extensions: map[string]*extension.Manifest{extSelf: self, extSaaS: saas},
		Profiles: map[string]*extension.Profile{
			profCheap:  {Slug: profCheap, Extension: extSelf, Price: &extension.Price{Start: 5, PerSecond: 1}},
			profPricey: {Slug: profPricey, Extension: extSelf, Price: &extension.Price{PerSecond: 10}},
			profFree:   {Slug: profFree, Extension: extSelf},
			profSaaS:   {Slug: profSaaS, Extension: extSaaS},
		},
	}
}

// env is one bus with the test catalog published.
type env struct {
	srv    testBus
	nc     *nats.Conn
	js     jetstream.JetStream
	pub    *bus.Publisher
	client *credits.Client
	// cred is the credits bucket: accounts, holds, usage records and
	// the ledger (under bus.LedgerPrefix).
	cred jetstream.KeyValue
	// killed are the instances armed to die mid-batch: their shutdown
	// may fail.
	killed sync.Map
}

// testBus is a test's NATS: one server ([natstest.Start]) or a cluster
// ([natstest.StartCluster]).
type testBus interface {
	Conn(tb natstest.TB) *nats.Conn
	ConnAs(tb natstest.TB, id auth.Identity) *nats.Conn
	Setup(tb natstest.TB, specs ...bus.ConsumerSpec)
}

func newEnv(t testing.TB) *env {
	t.Helper()
	return newEnvOn(t, natstest.Start(t))
}

// newClusterEnv is newEnv on a three-node cluster, every stream and bucket
// at three replicas.
func newClusterEnv(t testing.TB) *env {
	t.Helper()
	c := natstest.StartCluster(t, 3)
	if _, err := (bus.Topology{Replicas: 3}).Setup(testCtx(t), c.JetStream(t), bus.SetupOptions{}); err != nil {
		t.Fatal(err)
	}
	return newEnvOn(t, c)
}

func newEnvOn(t testing.TB, srv testBus) *env {
	t.Helper()
	nc := srv.Conn(t)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := testCtx(t)
	kv, err := js.KeyValue(ctx, bus.BucketCatalog)
	if err != nil {
		t.Fatal(err)
	}
	if err := catalog.Publish(ctx, kv, testCatalog()); err != nil {
		t.Fatal(err)
	}
	// The client asks as the gateway does.
	gw := srv.ConnAs(t, auth.Identity{Role: auth.RoleGateway})
	e := &env{srv: srv, nc: nc, js: js, pub: bus.NewPublisher(js), client: credits.NewClient(gw)}
	if e.cred, err = js.KeyValue(ctx, bus.BucketCredits); err != nil {
		t.Fatal(err)
	}
	return e
}

func testCtx(t tb) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// start starts a metering instance on its own connection, shut down by
// t.Cleanup. Zero options get test defaults: accrual every hour (no ticks
// unless a test asks for them).
func (e *env) start(t tb, opts metering.Options) *metering.Metering {
	t.Helper()
	nc := e.srv.ConnAs(t, auth.Identity{Role: auth.RoleMetering})
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	opts.JS = js
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(logWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	if opts.AccrualInterval == 0 {
		opts.AccrualInterval = time.Hour
	}
	if len(opts.Policy.Backoff) == 0 {
		opts.Policy.Backoff = []time.Duration{50 * time.Millisecond, 200 * time.Millisecond}
	}
	if opts.Policy.AckWait == 0 {
		// A stopped instance's undelivered pull buffer comes back quickly.
		opts.Policy.AckWait = 2 * time.Second
	}
	e.srv.Setup(t, metering.Consumers(opts.Policy)...)
	m, err := metering.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Start(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := m.Shutdown(ctx); err != nil {
			if _, killed := e.killed.Load(m); !killed {
				t.Errorf("shutdown: %v", err)
			}
		}
	})
	return m
}

// kill arms m to close its connection before its next commit, with every
// other message of the batch sent ([metering.KillBeforeCommit]).
func (e *env) kill(m *metering.Metering) (disarm func() bool) {
	e.killed.Store(m, true)
	return metering.KillBeforeCommit(m)
}

// answerQuotes answers quote requests for the SaaS stub the way its
// provisioner workers do, with the stub's own EstimateCost.
func (e *env) answerQuotes(t *testing.T, stub *saasstub.SaaSStub) {
	t.Helper()
	sub, err := e.nc.Subscribe(event.QuoteSubject(extSaaS), func(msg *nats.Msg) {
		var r event.QuoteRequest
		var reply event.QuoteReply
		if err := json.Unmarshal(msg.Data, &r); err != nil {
			reply.Error = err.Error()
		} else if q, err := stub.EstimateCost(context.Background(), extension.Profile{Slug: r.Profile}, time.Duration(r.DurationSeconds)*time.Second); err != nil {
			reply.Error = err.Error()
		} else {
			reply.Amount, reply.Breakdown = q.Amount, q.Breakdown
		}
		b, _ := json.Marshal(reply)
		_ = msg.Respond(b)
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
}

// ref is the reference of sandbox sb of consumer on profile.
func ref(consumer, sb, profile string) event.Ref {
	ext := extSelf
	if profile == profSaaS {
		ext = extSaaS
	}
	return event.Ref{SandboxID: sb, Consumer: consumer, Profile: profile, Extension: ext}
}

// publish publishes a lifecycle event of r's sandbox at time at. With
// redeliver, the event gets a fresh Nats-Msg-Id so the stream keeps it a
// second time, as a redelivery past the de-duplication window would.
func (e *env) publish(t tb, r event.Ref, s event.State, at time.Time, redeliver bool) {
	t.Helper()
	var data any
	switch s {
	case event.StateReady:
		d := event.Ready{Ref: r, Handle: event.Handle{SandboxID: r.SandboxID, Host: "localhost"}, Reachability: event.Reachability{Host: "localhost"}, ReadyAt: at}
		// As a worker's: the hold admission reserved, which its create
		// command carries.
		if _, err := e.cred.Get(testCtx(t), "hold."+r.Consumer+"."+r.SandboxID); err == nil {
			d.Hold = r.SandboxID
		}
		data = d
	case event.StateFailed:
		data = event.Failed{Ref: r, Phase: "provision", Reason: "test"}
	case event.StateRejected:
		data = event.Rejected{Ref: r, Code: "test", Reason: "test"}
	case event.StateDestroyed:
		data = event.Destroyed{Ref: r, Reason: event.ReasonRequested}
	default:
		t.Fatalf("publish: state %s", s)
	}
	e.publishData(t, r, s, at, data, redeliver)
}

func (e *env) publishData(t tb, r event.Ref, s event.State, at time.Time, data any, redeliver bool) {
	t.Helper()
	ev, err := event.New(event.LifecycleType(s), "/test", r.SandboxID, r.SandboxID+"."+string(s), data)
	if err != nil {
		t.Fatal(err)
	}
	ev.SetTime(at)
	msg, err := event.Encode(context.Background(), r.LifecycleSubject(s), ev)
	if err != nil {
		t.Fatal(err)
	}
	if redeliver {
		msg.Header.Set(event.HeaderMsgID, event.MsgID(ev)+fmt.Sprintf("#again-%d", time.Now().UnixNano()))
	}
	if _, err := e.pub.PublishMsg(testCtx(t), msg); err != nil {
		t.Fatal(err)
	}
}

// waitFor polls cond every 20ms until it holds or the deadline passes.
func waitFor(t tb, d time.Duration, what string, cond func() (bool, error)) {
	t.Helper()
	deadline := time.Now().Add(d)
	var last error
	for time.Now().Before(deadline) {
		ok, err := cond()
		if ok {
			return
		}
		last = err
		tk := time.NewTimer(20 * time.Millisecond)
		<-tk.C
	}
	t.Fatalf("waiting for %s: not after %s (last: %v)", what, d, last)
}

// drained waits until the lifecycle consumer has acknowledged every event
// on the lifecycle stream.
func (e *env) drained(t tb) {
	t.Helper()
	ctx := testCtx(t)
	st, err := e.js.Stream(ctx, event.StreamLifecycle)
	if err != nil {
		t.Fatal(err)
	}
	si, err := st.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	last := si.State.LastSeq
	waitFor(t, 20*time.Second, "lifecycle events handled", func() (bool, error) {
		c, err := e.js.Consumer(ctx, event.StreamLifecycle, metering.ConsumerLifecycle)
		if err != nil {
			return false, err
		}
		info, err := c.Info(ctx)
		if err != nil {
			return false, err
		}
		return info.AckFloor.Stream >= last, fmt.Errorf("acked through %d of %d, %d pending, %d in flight", info.AckFloor.Stream, last, info.NumPending, info.NumAckPending)
	})
}

// snapshot is an account, its open holds and its ledger, read
// consistently.
type snapshot struct {
	acct    metering.Account
	holds   map[string]metering.Hold
	entries []credits.Entry
}

// snap reads consumer's account, holds and ledger until the account did
// not change while they were read and its events were published.
func (e *env) snap(t tb, consumer string) snapshot {
	t.Helper()
	ctx := testCtx(t)
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		a1, r1 := e.account(t, consumer)
		holds := e.holds(t, ctx, consumer)
		entries := e.entries(t, ctx, consumer)
		_, r2 := e.account(t, consumer)
		if r1 == r2 && len(a1.Events) == 0 && len(a1.Outbox) == 0 {
			return snapshot{acct: a1, holds: holds, entries: entries}
		}
		tk := time.NewTimer(10 * time.Millisecond)
		<-tk.C
	}
	t.Fatalf("account %s never stood still", consumer)
	return snapshot{}
}

// holds reads the open holds of consumer.
func (e *env) holds(t tb, ctx context.Context, consumer string) map[string]metering.Hold {
	t.Helper()
	out := map[string]metering.Hold{}
	lister, err := e.cred.ListKeysFiltered(ctx, "hold."+consumer+".>")
	if errors.Is(err, jetstream.ErrNoKeysFound) {
		return out
	}
	if err != nil {
		t.Fatal(err)
	}
	for k := range lister.Keys() {
		en, err := e.cred.Get(ctx, k)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		var h metering.Hold
		if err := json.Unmarshal(en.Value(), &h); err != nil {
			t.Fatal(err)
		}
		if "hold."+consumer+"."+h.Sandbox != k {
			t.Fatalf("hold key %s holds the hold of %s", k, h.Sandbox)
		}
		out[h.Sandbox] = h
	}
	return out
}

func (e *env) account(t tb, consumer string) (metering.Account, uint64) {
	t.Helper()
	en, err := e.cred.Get(testCtx(t), "account."+consumer)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return metering.Account{Consumer: consumer}, 0
	}
	if err != nil {
		t.Fatal(err)
	}
	var a metering.Account
	if err := json.Unmarshal(en.Value(), &a); err != nil {
		t.Fatal(err)
	}
	return a, en.Revision()
}

func (e *env) entries(t tb, ctx context.Context, consumer string) []credits.Entry {
	t.Helper()
	lister, err := e.cred.ListKeysFiltered(ctx, bus.LedgerPrefix+consumer+".>")
	if err != nil {
		t.Fatal(err)
	}
	var out []credits.Entry
	for k := range lister.Keys() {
		en, err := e.cred.Get(ctx, k)
		if err != nil {
			t.Fatal(err)
		}
		var x credits.Entry
		if err := json.Unmarshal(en.Value(), &x); err != nil {
			t.Fatal(err)
		}
		if bus.LedgerPrefix+x.Key != k {
			t.Fatalf("ledger key %s holds entry %s", k, x.Key)
		}
		out = append(out, x)
	}
	return out
}

// checkInvariants checks what must hold of an account at every moment:
// the balance and the held credit are the folds of the ledger, no cause
// has two entries of one kind, entries are numbered without gaps, nothing
// is below zero, and every hold is released at most once (exactly once
// when closed).
func checkInvariants(t tb, s snapshot) {
	t.Helper()
	var bal, held int64
	seqs := map[uint64]bool{}
	releases := map[string]int{}
	holds := map[string]int{}
	byCause := map[string]string{}
	for _, x := range s.entries {
		bal += x.Amount
		held += x.Held
		if seqs[x.Seq] {
			t.Fatalf("two entries with seq %d", x.Seq)
		}
		seqs[x.Seq] = true
		ck := x.Cause + "/" + string(x.Kind) + "/" + x.Sandbox + x.Grant
		if x.Kind != credits.EntryExtend && x.Kind != credits.EntryDebit && x.Kind != credits.EntryExpire {
			if prev, dup := byCause[ck]; dup {
				t.Fatalf("cause %s has two %s entries: %s and %s", x.Cause, x.Kind, prev, x.Key)
			}
			byCause[ck] = x.Key
		}
		switch x.Kind {
		case credits.EntryRelease:
			releases[x.Sandbox]++
		case credits.EntryHold:
			holds[x.Sandbox]++
		}
		if x.BalanceAfter < 0 || x.HeldAfter < 0 || x.HeldAfter > x.BalanceAfter {
			t.Fatalf("entry %s leaves balance %d, held %d", x.Key, x.BalanceAfter, x.HeldAfter)
		}
	}
	for i := uint64(1); i <= uint64(len(s.entries)); i++ {
		if !seqs[i] {
			t.Fatalf("ledger of %d entries lacks seq %d", len(s.entries), i)
		}
	}
	a := s.acct
	if uint64(len(s.entries)) != a.Seq {
		t.Fatalf("account seq %d, ledger has %d entries", a.Seq, len(s.entries))
	}
	if bal != a.Balance || held != a.Held {
		t.Fatalf("account balance %d held %d, ledger folds to %d and %d", a.Balance, a.Held, bal, held)
	}
	if a.Balance < 0 || a.Held < 0 || a.Held > a.Balance {
		t.Fatalf("account balance %d, held %d", a.Balance, a.Held)
	}
	if fb, fh, err := credits.Fold(slices.SortedFunc(slices.Values(s.entries), func(x, y credits.Entry) int { return cmp.Compare(x.Seq, y.Seq) })); err != nil || fb != a.Balance || fh != a.Held {
		t.Fatalf("Fold: %d, %d, %v; account %d, %d", fb, fh, err, a.Balance, a.Held)
	}
	var sumHeld int64
	for sb, h := range s.holds {
		if h.Amount < 0 {
			t.Fatalf("hold %s amount %d", sb, h.Amount)
		}
		sumHeld += h.Amount
	}
	if sumHeld != a.Held || len(s.holds) != a.Open {
		t.Fatalf("%d open holds sum to %d; account held %d in %d holds", len(s.holds), sumHeld, a.Held, a.Open)
	}
	if len(a.LegacyHolds) != 0 {
		t.Fatalf("account still has %d holds in its document", len(a.LegacyHolds))
	}
	for sb, n := range releases {
		if n != 1 {
			t.Fatalf("sandbox %s released %d times", sb, n)
		}
		if _, open := s.holds[sb]; open {
			t.Fatalf("sandbox %s released but its hold is open", sb)
		}
	}
	for sb, n := range holds {
		if n != 1 {
			t.Fatalf("sandbox %s held %d times", sb, n)
		}
		if _, open := s.holds[sb]; !open && releases[sb] != 1 {
			t.Fatalf("hold of %s closed without a release", sb)
		}
	}
}

// commands reads the destroy commands on the commands stream.
func (e *env) destroyCommands(t *testing.T) []event.Destroy {
	t.Helper()
	ctx := testCtx(t)
	s, err := e.js.Stream(ctx, event.StreamCommands)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var out []event.Destroy
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
		raw, err := s.GetMsg(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(raw.Subject, ".destroy.") {
			continue
		}
		_, ev, err := event.Decode(ctx, raw.Header, raw.Data)
		if err != nil {
			t.Fatal(err)
		}
		var d event.Destroy
		if err := event.DataAs(ev, &d); err != nil {
			t.Fatal(err)
		}
		out = append(out, d)
	}
	return out
}

// meteringEvents reads every event of the metering stream.
func (e *env) meteringEvents(t *testing.T) []*event.Event {
	t.Helper()
	ctx := testCtx(t)
	c, err := e.js.OrderedConsumer(ctx, event.StreamMetering, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	s, err := e.js.Stream(ctx, event.StreamMetering)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var out []*event.Event
	for uint64(len(out)) < info.State.Msgs {
		msg, err := c.Next(jetstream.FetchMaxWait(5 * time.Second))
		if err != nil {
			t.Fatalf("reading metering stream: %v", err)
		}
		_, ev, err := event.Decode(ctx, msg.Headers(), msg.Data())
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, ev)
	}
	return out
}

// collector gathers values from goroutines.
type collector[T any] struct {
	mu  sync.Mutex
	out []T
}

func (c *collector[T]) add(v T) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.out = append(c.out, v)
}
