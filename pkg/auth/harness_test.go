package auth_test

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
)

// The identities of the table.
var (
	admin    = natstest.Admin
	gateway  = auth.Identity{Role: auth.RoleGateway}
	registry = auth.Identity{Role: auth.RoleRegistry}
	metering = auth.Identity{Role: auth.RoleMetering}
	local    = auth.Identity{Role: auth.RoleProvisioner, Extension: "local"}
	saas     = auth.Identity{Role: auth.RoleProvisioner, Extension: "saas-stub"}
	dev      = auth.Identity{Role: auth.RoleTenant, Consumer: "dev"}
	billing  = auth.Identity{Role: auth.RoleBilling}
)

// auditDurable is a second billing reader's durable on the metering
// stream: another durable than the billing identity's own.
const auditDurable = "billing-audit"

const (
	// refusalWait bounds the wait for the server's permissions violation.
	refusalWait = 10 * time.Second
	// effectWait bounds the wait for an allowed action's effect.
	effectWait = 10 * time.Second
)

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

var counter atomic.Int64

// uid is a fresh name token (a valid sandbox id, key or consumer name).
func uid(prefix string) string { return fmt.Sprintf("%s-%d", prefix, counter.Add(1)) }

// await polls cond until it holds or timeout passes, then fails t with
// what it was waiting for and cond's last word.
func await(t testing.TB, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, last := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s (last: %s)", timeout, what, last)
		}
		<-tick.C
	}
}

// pubRefusal and subRefusal are what the server's violation says of a
// refused publish or subscription.
func pubRefusal(subject string) string { return fmt.Sprintf("Publish to %q", subject) }
func subRefusal(subject string) string { return fmt.Sprintf("Subscription to %q", subject) }

// env is one server with the topology, the durables of the design, a
// message for each of them, and the admin's view of it all before any row
// runs.
type env struct {
	srv *natstest.Server
	// admin and js are the admin's connection, for setting up and
	// looking.
	admin *nats.Conn
	js    jetstream.JetStream
	// grants records the requests the stand-in for metering's grant
	// endpoint received (it answers every one); requests records every
	// request event published.
	grants, requests *recorder
	// fixtures: the stream sequences of one saas-stub command, one
	// destroyed event, one metering event, each undelivered, and one
	// expiry schedule that never fires.
	cmdSeq, lifeSeq, meterSeq, timerSeq uint64

	streams   map[string]*jetstream.StreamInfo
	consumers map[string]*jetstream.ConsumerInfo // by stream/name
}

// durables are the consumers setup would declare for the identities of
// the table.
var durables = []bus.ConsumerSpec{
	{Stream: event.StreamCommands, Name: bus.DurableProvisioner("local"), Filters: []string{event.CommandFilter("local")}},
	{Stream: event.StreamCommands, Name: bus.DurableProvisioner("saas-stub"), Filters: []string{event.CommandFilter("saas-stub")}},
	{Stream: event.StreamLifecycle, Name: bus.DurableRegistry, Filters: []string{event.SubjectLifecycle}},
	{Stream: event.StreamLifecycle, Name: bus.DurableMetering, Filters: []string{event.StateFilter(event.StateDestroyed)}},
	{Stream: event.StreamMetering, Name: billing.BillingDurable(), Filters: []string{event.SubjectMetering}},
	{Stream: event.StreamMetering, Name: auditDurable, Filters: []string{event.SubjectMetering}},
}

func newEnv(t *testing.T) *env {
	t.Helper()
	srv := natstest.Start(t)
	srv.Setup(t, durables...)
	e := &env{srv: srv, admin: srv.Conn(t), grants: &recorder{}, requests: &recorder{},
		streams: map[string]*jetstream.StreamInfo{}, consumers: map[string]*jetstream.ConsumerInfo{}}
	var err error
	if e.js, err = jetstream.New(e.admin); err != nil {
		t.Fatal(err)
	}
	ctx := testCtx(t)
	pub := func(m *nats.Msg) uint64 {
		t.Helper()
		ack, err := e.js.PublishMsg(ctx, m)
		if err != nil {
			t.Fatalf("publishing fixture %s: %v", m.Subject, err)
		}
		return ack.Sequence
	}
	e.cmdSeq = pub(createCommand(t, "saas-stub", "fixture"))
	e.lifeSeq = pub(destroyedEvent(t, "fixture", "saas-stub", 1))
	e.meterSeq = pub(&nats.Msg{Subject: event.MeteringSubject("fixture", "debit"), Data: []byte(`{"amount":1}`)})
	if ack, err := e.js.PublishMsg(ctx, &nats.Msg{Subject: event.ExpiryScheduleSubject("fixture"), Data: []byte("{}")},
		jetstream.WithScheduleAt(time.Now().Add(24*time.Hour)), jetstream.WithScheduleTarget(event.ExpiryFireSubject("fixture"))); err != nil {
		t.Fatalf("publishing fixture schedule: %v", err)
	} else {
		e.timerSeq = ack.Sequence
	}

	if _, err := e.admin.Subscribe(event.SubjectMeteringGrant, func(m *nats.Msg) {
		e.grants.add(m)
		_ = m.Respond([]byte(`{"granted":true}`))
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.admin.Subscribe(event.SubjectRequests, e.requests.add); err != nil {
		t.Fatal(err)
	}
	if err := e.admin.Flush(); err != nil {
		t.Fatal(err)
	}
	for name := range e.js.StreamNames(ctx).Name() {
		s, err := e.js.Stream(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		e.streams[name] = s.CachedInfo()
	}
	for _, d := range durables {
		c, err := e.js.Consumer(ctx, d.Stream, d.Name)
		if err != nil {
			t.Fatal(err)
		}
		e.consumers[d.Stream+"/"+d.Name] = c.CachedInfo()
	}
	return e
}

// createCommand is a create command of extension for consumer's new
// sandbox.
func createCommand(t testing.TB, extension, consumer string) *nats.Msg {
	t.Helper()
	id := uid("sbx")
	ref := event.Ref{SandboxID: id, Consumer: consumer, Profile: extension, Extension: extension}
	return encode(t, event.CommandSubject(extension, event.VerbCreate, consumer, id), event.TypeCreate, id+".create",
		event.Create{Ref: ref, RequestedAt: time.Now().UTC()})
}

// destroyCommand is a destroy command of extension for consumer's
// sandbox.
func destroyCommand(t testing.TB, extension, consumer string) *nats.Msg {
	t.Helper()
	id := uid("sbx")
	ref := event.Ref{SandboxID: id, Consumer: consumer, Profile: extension, Extension: extension}
	return encode(t, event.CommandSubject(extension, event.VerbDestroy, consumer, id), event.TypeDestroy, id+".destroy",
		event.Destroy{Ref: ref, Reason: event.ReasonRequested})
}

// readyEvent is a ready event of consumer's sandbox on extension.
func readyEvent(t testing.TB, consumer, extension string) *nats.Msg {
	t.Helper()
	id := uid("sbx")
	ref := event.Ref{SandboxID: id, Consumer: consumer, Profile: extension, Extension: extension}
	return encode(t, event.LifecycleSubject(consumer, extension, id, event.StateReady), event.TypeReady, id+".ready",
		event.Ready{Ref: ref, Handle: event.Handle{SandboxID: id, Host: "localhost"}, Reachability: event.Reachability{Host: "localhost"}, ReadyAt: time.Now().UTC()})
}

// destroyedEvent is a destroyed event of consumer's sandbox on extension
// whose meter says it cost amount.
func destroyedEvent(t testing.TB, consumer, extension string, amount int64) *nats.Msg {
	t.Helper()
	id := uid("sbx")
	ref := event.Ref{SandboxID: id, Consumer: consumer, Profile: extension, Extension: extension}
	return encode(t, event.LifecycleSubject(consumer, extension, id, event.StateDestroyed), event.TypeDestroyed, id+".destroyed",
		event.Destroyed{Ref: ref, Reason: event.ReasonRequested, Meter: &event.MeterReading{Amount: amount, Quantity: 1, Unit: "minute"}})
}

// meterEvent is a metering event of consumer.
func meterEvent(consumer, kind string) *nats.Msg {
	return &nats.Msg{Subject: event.MeteringSubject(consumer, kind), Data: []byte(fmt.Sprintf(`{"amount":7,"id":%q}`, uid("meter")))}
}

func encode(t testing.TB, subject string, typ event.Type, id string, data any) *nats.Msg {
	t.Helper()
	e, err := event.New(typ, "/sandboxer/test", subject, id, data)
	if err != nil {
		t.Fatal(err)
	}
	m, err := event.Encode(context.Background(), subject, e)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// recorder keeps the messages a subscription received.
type recorder struct {
	mu   sync.Mutex
	msgs []*nats.Msg
}

func (r *recorder) add(m *nats.Msg) {
	r.mu.Lock()
	r.msgs = append(r.msgs, m)
	r.mu.Unlock()
}

// saw reports whether a message on subject carrying mark arrived.
func (r *recorder) saw(subject, mark string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, m := range r.msgs {
		if m.Subject == subject && strings.Contains(string(m.Data), mark) {
			return true
		}
	}
	return false
}

// probe is one row's identity on the bus, and what its action left.
type probe struct {
	*env
	as auth.Identity
	nc *nats.Conn
	js jetstream.JetStream
	v  *natstest.Violations
	// sub and sentinel are a subscribe action's subscriptions.
	sub, sentinel *nats.Subscription
	sentinelSubj  string
	// seq is a stream sequence an action remembers.
	seq uint64
}

// action is one thing an identity tries on the bus.
type action struct {
	// refusal is what the server's violation names when it refuses the
	// action: [pubRefusal] or [subRefusal] of a subject.
	refusal string
	// apiError, instead, is what JetStream answers a refused request
	// with, when permissions let the request through.
	apiError string
	// setup prepares, as the admin, what the action needs.
	setup func(ctx context.Context, p *probe) error
	// do is the action, as the row's identity. A refused one may block
	// until ctx ends.
	do func(ctx context.Context, p *probe) error
	// effect reports whether the action took effect, as the admin sees
	// it; nil when do's own result is all there is to see.
	effect func(ctx context.Context, p *probe) (bool, error)
}

// refusedAt is a with the refusal at subject: where the server stops a
// longer action (a KeyValue Put stops at opening the bucket when the
// identity may not even look it up).
func (a action) refusedAt(subject string) action {
	a.refusal = pubRefusal(subject)
	return a
}

// row is one identity × action, and whether the server must allow it.
type row struct {
	name    string
	as      auth.Identity
	allowed bool
	action
}

func allow(as auth.Identity, name string, a action) row {
	return row{name: as.UserName() + " " + name, as: as, allowed: true, action: a}
}

func refuse(as auth.Identity, name string, a action) row {
	return row{name: as.UserName() + " " + name, as: as, action: a}
}

// runRows runs rows in parallel on e.
func (e *env) runRows(t *testing.T, rows []row) {
	t.Helper()
	seen := map[string]bool{}
	for _, r := range rows {
		if seen[r.name] {
			t.Fatalf("two rows named %q", r.name)
		}
		seen[r.name] = true
		t.Run(r.name, func(t *testing.T) {
			t.Parallel()
			e.run(t, r)
		})
	}
}

// run runs one row: an allowed action must succeed and take effect; a
// refused one must draw the server's refusal and take no effect.
func (e *env) run(t *testing.T, r row) {
	t.Helper()
	nc, v := e.srv.ConnRefusable(t, r.as)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	p := &probe{env: e, as: r.as, nc: nc, js: js, v: v}
	ctx := testCtx(t)
	if r.setup != nil {
		if err := r.setup(ctx, p); err != nil {
			t.Fatalf("setting up: %v", err)
		}
	}
	if r.allowed {
		if err := r.do(ctx, p); err != nil {
			t.Fatalf("allowed action failed: %v (violations: %v)", err, v.Errors())
		}
		if r.effect != nil {
			await(t, effectWait, "the allowed action's effect", func() (bool, string) {
				ok, err := r.effect(ctx, p)
				return ok, fmt.Sprintf("effect %v, err %v", ok, err)
			})
		}
		if err := nc.FlushWithContext(ctx); err != nil {
			t.Fatal(err)
		}
		if errs := v.Errors(); len(errs) > 0 {
			t.Fatalf("allowed action drew violations: %v", errs)
		}
		return
	}
	switch {
	case r.apiError != "":
		err := r.do(ctx, p)
		if err == nil || !strings.Contains(err.Error(), r.apiError) {
			t.Fatalf("got %v, want the server's answer %q", err, r.apiError)
		}
	case r.refusal != "":
		dctx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- r.do(dctx, p) }()
		want := "Permissions Violation for " + r.refusal
		refused := v.Await(want, refusalWait)
		cancel()
		select {
		case <-done:
		case <-time.After(refusalWait):
			t.Fatal("the refused action did not return once cancelled")
		}
		if !refused {
			effect := "not observable"
			if r.effect != nil {
				ok, err := r.effect(ctx, p)
				effect = fmt.Sprintf("%v (err %v)", ok, err)
			}
			t.Fatalf("no %q within %s (violations: %v; took effect: %s)", want, refusalWait, v.Errors(), effect)
		}
	default:
		t.Fatal("a refused row names no refusal")
	}
	if r.effect != nil {
		ok, err := r.effect(ctx, p)
		if err != nil {
			t.Fatalf("looking for the effect: %v", err)
		}
		if ok {
			t.Fatal("the refused action took effect")
		}
	}
}

// Actions.

// jsPublish publishes m with JetStream, which waits for the stream's
// acknowledgement; it took effect when the stream stores m.
func jsPublish(stream string, m *nats.Msg) action {
	return action{
		refusal: pubRefusal(m.Subject),
		do: func(ctx context.Context, p *probe) error {
			_, err := p.js.PublishMsg(ctx, &nats.Msg{Subject: m.Subject, Header: m.Header, Data: m.Data})
			return err
		},
		effect: stored(stream, m.Subject, m.Data),
	}
}

// publish publishes m on the connection (no acknowledgement); effect says
// what it would do.
func publish(m *nats.Msg, effect func(ctx context.Context, p *probe) (bool, error)) action {
	return action{
		refusal: pubRefusal(m.Subject),
		do: func(ctx context.Context, p *probe) error {
			if err := p.nc.PublishMsg(&nats.Msg{Subject: m.Subject, Header: m.Header, Data: m.Data}); err != nil {
				return err
			}
			return p.nc.FlushWithContext(ctx)
		},
		effect: effect,
	}
}

// kvPublish writes key of bucket by publishing on its subject.
func kvPublish(bucket, key string) action {
	return publish(&nats.Msg{Subject: "$KV." + bucket + "." + key, Data: []byte("forged")}, keyWritten(bucket, key))
}

// kvPut writes key of bucket with the jetstream KeyValue API.
func kvPut(bucket, key string) action {
	return action{
		refusal: pubRefusal("$KV." + bucket + "." + key),
		do: func(ctx context.Context, p *probe) error {
			kv, err := p.js.KeyValue(ctx, bucket)
			if err != nil {
				return err
			}
			_, err = kv.Put(ctx, key, []byte("forged"))
			return err
		},
		effect: keyWritten(bucket, key),
	}
}

// request sends a core request; it took effect when effect says so.
func request(subject, body string, effect func(ctx context.Context, p *probe) (bool, error)) action {
	return action{
		refusal: pubRefusal(subject),
		do: func(ctx context.Context, p *probe) error {
			_, err := p.nc.RequestWithContext(ctx, subject, []byte(body))
			return err
		},
		effect: effect,
	}
}

// grant asks metering's grant endpoint for credit.
func grant() action {
	mark := uid("grant")
	return request(event.SubjectMeteringGrant, fmt.Sprintf(`{"consumer":"dev","amount":1000000,"id":%q}`, mark),
		func(_ context.Context, p *probe) (bool, error) {
			return p.grants.saw(event.SubjectMeteringGrant, mark), nil
		})
}

// askFor publishes a request event for consumer; it took effect when the
// gateways' subject carried it.
func askFor(consumer string) action {
	subject := event.RequestSubject(consumer, event.VerbCreate)
	mark := uid("request")
	return publish(&nats.Msg{Subject: subject, Data: []byte(fmt.Sprintf(`{"profile":"local","mark":%q}`, mark))},
		func(_ context.Context, p *probe) (bool, error) { return p.requests.saw(subject, mark), nil })
}

// jsAPI sends a JetStream API request whose body body builds; a JetStream
// error in the answer is an error.
func jsAPI(subject string, body func(p *probe) any, effect func(ctx context.Context, p *probe) (bool, error)) action {
	return action{
		refusal: pubRefusal(subject),
		do: func(ctx context.Context, p *probe) error {
			var b []byte
			if body != nil {
				var err error
				if b, err = json.Marshal(body(p)); err != nil {
					return err
				}
			}
			m, err := p.nc.RequestWithContext(ctx, subject, b)
			if err != nil {
				return err
			}
			var r struct {
				Error *struct {
					Code        int    `json:"code"`
					ErrCode     int    `json:"err_code"`
					Description string `json:"description"`
				} `json:"error"`
			}
			if err := json.Unmarshal(m.Data, &r); err != nil {
				return fmt.Errorf("reading the answer %q: %w", m.Data, err)
			}
			if r.Error != nil {
				return fmt.Errorf("jetstream refused: %s (%d)", r.Error.Description, r.Error.ErrCode)
			}
			return nil
		},
		effect: effect,
	}
}

// updateStream asks to update stream with its configuration as change
// leaves it.
func updateStream(stream string, change func(*jetstream.StreamConfig)) action {
	return jsAPI("$JS.API.STREAM.UPDATE."+stream, func(p *probe) any {
		cfg := p.streams[stream].Config
		change(&cfg)
		return cfg
	}, streamChanged(stream))
}

func moreReplicas(c *jetstream.StreamConfig) { c.Replicas = 3 }
func keepLess(c *jetstream.StreamConfig)     { c.MaxMsgs, c.Description = 1, "forged" }

// createStream asks to create a stream of its own.
func createStream() action {
	name := strings.ToUpper(strings.ReplaceAll(uid("evil"), "-", "_"))
	return jsAPI("$JS.API.STREAM.CREATE."+name, func(*probe) any {
		return jetstream.StreamConfig{Name: name, Subjects: []string{strings.ToLower(name) + ".>"}, Storage: jetstream.MemoryStorage}
	}, streamExists(name))
}

// deleteStream asks to delete stream.
func deleteStream(stream string) action {
	return jsAPI("$JS.API.STREAM.DELETE."+stream, nil, streamChanged(stream))
}

// consumerConfig is the body of a consumer create request.
func consumerConfig(stream string, cfg jetstream.ConsumerConfig) func(*probe) any {
	return func(*probe) any {
		return struct {
			Stream string                   `json:"stream_name"`
			Config jetstream.ConsumerConfig `json:"config"`
		}{stream, cfg}
	}
}

// createConsumer asks for a consumer on stream through subject (one of
// the create endpoints), configured as cfg; name is the consumer it would
// make, whose existence is its effect.
func createConsumer(subject, stream, name string, cfg jetstream.ConsumerConfig) action {
	return jsAPI(subject, consumerConfig(stream, cfg), consumerExists(stream, name))
}

// subscribe subscribes to filter; it took effect when a message on sample
// (published by the admin) arrives. A sentinel published after it says
// when it would have.
func subscribe(filter, sample string) action {
	return action{
		refusal: subRefusal(filter),
		do: func(ctx context.Context, p *probe) error {
			var err error
			p.sentinelSubj = p.as.InboxPrefix() + "." + uid("sentinel")
			if p.sentinel, err = p.nc.SubscribeSync(p.sentinelSubj); err != nil {
				return err
			}
			if p.sub, err = p.nc.SubscribeSync(filter); err != nil {
				return err
			}
			return p.nc.FlushWithContext(ctx)
		},
		effect: func(ctx context.Context, p *probe) (bool, error) {
			if err := p.admin.Publish(sample, []byte("sample")); err != nil {
				return false, err
			}
			if err := p.admin.Publish(p.sentinelSubj, nil); err != nil {
				return false, err
			}
			if _, err := p.sentinel.NextMsgWithContext(ctx); err != nil {
				return false, fmt.Errorf("waiting for the sentinel: %w", err)
			}
			// The server delivers one publisher's messages in order: had
			// the subscription been granted, the sample would be here.
			n, _, err := p.sub.Pending()
			return n > 0, err
		},
	}
}

// directGet reads the last message of stream on filter with a direct
// get; setup, as the admin, first publishes m, which the get must return
// when allowed.
func directGet(stream, filter string, m *nats.Msg) action {
	return action{
		refusal: pubRefusal("$JS.API.DIRECT.GET." + stream + "." + filter),
		setup: func(ctx context.Context, p *probe) error {
			_, err := p.env.js.PublishMsg(ctx, m)
			return err
		},
		do: func(ctx context.Context, p *probe) error {
			got, err := bus.LastMsg(ctx, p.nc, stream, filter)
			if err != nil {
				return err
			}
			if got.Subject != m.Subject || string(got.Data) != string(m.Data) {
				return fmt.Errorf("read %s %q, want %s %q", got.Subject, got.Data, m.Subject, m.Data)
			}
			return nil
		},
	}
}

// fetch pulls one message from durable on stream through the jetstream
// API and double-acks it; it took effect when the message left the
// durable (work queue) or the ack floor moved past it.
func fetch(stream, durable string) action {
	return action{
		refusal: pubRefusal("$JS.API.CONSUMER.INFO." + stream + "." + durable),
		do: func(ctx context.Context, p *probe) error {
			c, err := p.js.Consumer(ctx, stream, durable)
			if err != nil {
				return err
			}
			m, err := c.Next(jetstream.FetchContext(ctx))
			if err != nil {
				return err
			}
			md, err := m.Metadata()
			if err != nil {
				return err
			}
			p.seq = md.Sequence.Stream
			return m.DoubleAck(ctx)
		},
		effect: func(ctx context.Context, p *probe) (bool, error) {
			info, err := consumerInfo(ctx, p.env, stream, durable)
			if err != nil {
				return false, err
			}
			return p.seq != 0 && info.AckFloor.Stream >= p.seq, nil
		},
	}
}

// pull asks durable on stream for its next message with the raw API; it
// took effect when the durable delivered anything.
func pull(stream, durable string) action {
	return request("$JS.API.CONSUMER.MSG.NEXT."+stream+"."+durable, `{"batch":1,"no_wait":true}`, delivered(stream, durable))
}

// Effects, as the admin sees them.

// stored: the stream holds data (any data when nil) as the last message
// on subject.
func stored(stream, subject string, data []byte) func(ctx context.Context, p *probe) (bool, error) {
	return func(ctx context.Context, p *probe) (bool, error) {
		s, err := p.env.js.Stream(ctx, stream)
		if err != nil {
			return false, err
		}
		m, err := s.GetLastMsgForSubject(ctx, subject)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		return data == nil || string(m.Data) == string(data), nil
	}
}

// keyWritten: bucket holds key.
func keyWritten(bucket, key string) func(ctx context.Context, p *probe) (bool, error) {
	return func(ctx context.Context, p *probe) (bool, error) {
		kv, err := p.env.js.KeyValue(ctx, bucket)
		if err != nil {
			return false, err
		}
		_, err = kv.Get(ctx, key)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			return false, nil
		}
		return err == nil, err
	}
}

// streamChanged: stream is gone, recreated or configured otherwise than
// before the rows ran.
func streamChanged(stream string) func(ctx context.Context, p *probe) (bool, error) {
	return func(ctx context.Context, p *probe) (bool, error) {
		s, err := p.env.js.Stream(ctx, stream)
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			return true, nil
		}
		if err != nil {
			return false, err
		}
		now, was := s.CachedInfo(), p.streams[stream]
		return !now.Created.Equal(was.Created) || !reflect.DeepEqual(now.Config, was.Config), nil
	}
}

// streamExists: a stream called name exists.
func streamExists(name string) func(ctx context.Context, p *probe) (bool, error) {
	return func(ctx context.Context, p *probe) (bool, error) {
		_, err := p.env.js.Stream(ctx, name)
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			return false, nil
		}
		return err == nil, err
	}
}

// streamMsgGone: the stream no longer holds the message at seq.
// purgeTimer purges the fixture's expiry schedule off the timers stream
// with the purge API, filtered to its subject.
func purgeTimer() action {
	return jsAPI("$JS.API.STREAM.PURGE."+event.StreamTimers,
		func(p *probe) any { return map[string]string{"filter": event.ExpiryScheduleSubject("fixture")} },
		streamMsgGone(event.StreamTimers, func(p *probe) uint64 { return p.timerSeq }))
}

// cancelMarker is a marker as bus.CancelSchedule publishes on subject,
// but for a TTL long enough for the probe to find it stored.
func cancelMarker(subject string) *nats.Msg {
	m := nats.NewMsg(subject)
	m.Header.Set(jetstream.MsgRollup, jetstream.MsgRollupSubject)
	m.Header.Set(jetstream.MsgTTLHeader, "1m")
	return m
}

func streamMsgGone(stream string, seq func(p *probe) uint64) func(ctx context.Context, p *probe) (bool, error) {
	return func(ctx context.Context, p *probe) (bool, error) {
		s, err := p.env.js.Stream(ctx, stream)
		if err != nil {
			return false, err
		}
		_, err = s.GetMsg(ctx, seq(p))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return true, nil
		}
		return false, err
	}
}

func consumerInfo(ctx context.Context, e *env, stream, name string) (*jetstream.ConsumerInfo, error) {
	c, err := e.js.Consumer(ctx, stream, name)
	if err != nil {
		return nil, err
	}
	return c.CachedInfo(), nil
}

// consumerExists: stream has a consumer called name.
func consumerExists(stream, name string) func(ctx context.Context, p *probe) (bool, error) {
	return func(ctx context.Context, p *probe) (bool, error) {
		_, err := consumerInfo(ctx, p.env, stream, name)
		if errors.Is(err, jetstream.ErrConsumerNotFound) {
			return false, nil
		}
		return err == nil, err
	}
}

// consumerCount: stream has consumers at all.
func consumerCount(stream string) func(ctx context.Context, p *probe) (bool, error) {
	return func(ctx context.Context, p *probe) (bool, error) {
		s, err := p.env.js.Stream(ctx, stream)
		if err != nil {
			return false, err
		}
		info, err := s.Info(ctx)
		if err != nil {
			return false, err
		}
		return info.State.Consumers > 0, nil
	}
}

// consumerChanged: the durable name on stream is gone, recreated or
// configured otherwise than before the rows ran.
func consumerChanged(stream, name string) func(ctx context.Context, p *probe) (bool, error) {
	return func(ctx context.Context, p *probe) (bool, error) {
		now, err := consumerInfo(ctx, p.env, stream, name)
		if errors.Is(err, jetstream.ErrConsumerNotFound) {
			return true, nil
		}
		if err != nil {
			return false, err
		}
		was := p.consumers[stream+"/"+name]
		return !now.Created.Equal(was.Created) || !reflect.DeepEqual(now.Config, was.Config), nil
	}
}

// delivered: the durable name on stream delivered a message or holds a
// pull request.
func delivered(stream, name string) func(ctx context.Context, p *probe) (bool, error) {
	return func(ctx context.Context, p *probe) (bool, error) {
		info, err := consumerInfo(ctx, p.env, stream, name)
		if err != nil {
			return false, err
		}
		return info.Delivered.Consumer > 0 || info.NumWaiting > 0, nil
	}
}

// ackV2 is the v2 form of a v1 ack subject
// ($JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>):
// $JS.ACK.<domain>.<account hash>.<stream>.<consumer>...<token>, with the
// server's domain ("_": none) and hash of the account, so the server
// would take it.
func ackV2(account, v1 string) string {
	const digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
	sum := sha256.Sum256([]byte(account))
	hash := make([]byte, 8)
	for i := range hash {
		hash[i] = digits[int(sum[i]%62)]
	}
	return "$JS.ACK._." + string(hash) + "." + strings.TrimPrefix(v1, "$JS.ACK.") + ".tok"
}
