package gateway_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	"go.uber.org/goleak"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/apikey"
	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/catalog"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/echo"
	"github.com/sand-boxer/sandboxer/pkg/inventory"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
	"github.com/sand-boxer/sandboxer/services/gateway"
)

func TestMain(m *testing.M) {
	// The W3C propagator, so trace context crosses HTTP and NATS in tests
	// as it does in a configured process.
	otel.SetTextMapPropagator(propagation.TraceContext{})
	goleak.VerifyTestMain(m)
}

// Consumers with keys in every env; root is an admin.
var consumers = []string{"alice", "bob", "carol", "nocredit", "noroute", "badroute", "badadmit"}

// env is a gateway on a real in-process nats-server behind a real HTTP
// server.
type env struct {
	srv    *natstest.Server
	js     jetstream.JetStream
	gw     *gateway.Gateway
	hs     *httptest.Server
	keys   *apikey.Store
	tokens map[string]string
}

type envConfig struct {
	opts    func(*gateway.Options)
	catalog func(*extension.Catalog) // edits the test catalog before it is published
	topo    *bus.Topology            // re-ensured over the default topology
}

func newEnv(t testing.TB, cfg envConfig) *env {
	t.Helper()
	srv := natstest.Start(t)
	js := srv.JetStream(t)
	ctx := testCtx(t)
	if cfg.topo != nil {
		if _, err := cfg.topo.Setup(ctx, js, bus.SetupOptions{Force: true}); err != nil {
			t.Fatalf("setting up topology: %v", err)
		}
	}
	// The gateway runs as itself; the test's own connection (js) is the
	// admin's, standing in for the other services.
	gwJS := srv.JetStreamAs(t, auth.Identity{Role: auth.RoleGateway})
	catKV, err := js.KeyValue(ctx, bus.BucketCatalog)
	if err != nil {
		t.Fatal(err)
	}
	cat := testCatalog()
	if cfg.catalog != nil {
		cfg.catalog(cat)
	}
	if err := catalog.Publish(ctx, catKV, cat); err != nil {
		t.Fatal(err)
	}
	wctx, cancelWatch := context.WithCancel(context.Background())
	t.Cleanup(cancelWatch)
	gwCatKV, err := gwJS.KeyValue(ctx, bus.BucketCatalog)
	if err != nil {
		t.Fatal(err)
	}
	cache, err := catalog.Watch(wctx, gwCatKV)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-cache.Ready():
	case <-ctx.Done():
		t.Fatal("catalog cache not ready")
	}
	keyKV, err := js.KeyValue(ctx, bus.BucketAPIKeys)
	if err != nil {
		t.Fatal(err)
	}
	e := &env{srv: srv, js: js, keys: apikey.NewStore(keyKV), tokens: map[string]string{}}
	for _, c := range consumers {
		e.tokens[c] = e.issue(t, c, apikey.RoleConsumer)
	}
	e.tokens["root"] = e.issue(t, "root", apikey.RoleAdmin)
	gwKeyKV, err := gwJS.KeyValue(ctx, bus.BucketAPIKeys)
	if err != nil {
		t.Fatal(err)
	}

	opts := gateway.Options{JS: gwJS, Catalog: cache, Keys: apikey.NewStore(gwKeyKV)}
	if cfg.opts != nil {
		cfg.opts(&opts)
	}
	e.gw, err = gateway.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.gw.Start(ctx); err != nil {
		t.Fatal(err)
	}
	e.hs = httptest.NewServer(e.gw.Handler())
	// Every request through e.hs.Client() (e.do, e.client, the event
	// streams) and every answer are validated against the OpenAPI document.
	e.hs.Client().Transport = checkedTransport(t, e.hs.Client().Transport)
	t.Cleanup(e.hs.Close)
	t.Cleanup(func() { // before hs.Close: event streams end here
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := e.gw.Shutdown(sctx); err != nil {
			t.Errorf("shutting down gateway: %v", err)
		}
	})
	return e
}

func (e *env) issue(t testing.TB, consumer, role string) string {
	t.Helper()
	tok, err := e.keys.Issue(testCtx(t), consumer, role, "test")
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// client is the pkg/api client of consumer's key.
func (e *env) client(consumer string) *api.Client {
	return api.NewClient(e.hs.URL, e.tokens[consumer], e.hs.Client())
}

// testCatalog has:
//   - extension echo on hosts h1, h2 and profile echo (TTL default 1h, max
//     2h, label tier=test);
//   - extension gitecho with a required repo input, a ref and a depth, and
//     profile git (ref defaults to main);
//   - profile orphan, bound to an extension the catalog lacks.
func testCatalog() *extension.Catalog {
	em := echo.Manifest("echo")
	em.Hosts = []string{"h1", "h2"}
	gm := echo.Manifest("gitecho")
	one, fifty := int64(1), int64(50)
	gm.Inputs["repo"] = extension.InputSpec{Type: extension.TypeString, Required: true, Format: extension.FormatRepo}
	gm.Inputs["ref"] = extension.InputSpec{Type: extension.TypeString}
	gm.Inputs["depth"] = extension.InputSpec{Type: extension.TypeInt, Min: &one, Max: &fifty}
	return &extension.Catalog{
		Extensions: map[string]*extension.Manifest{em.Name: em, gm.Name: gm},
		Profiles: map[string]*extension.Profile{
			"echo": {Slug: "echo", Extension: "echo",
				TTL:    extension.TTLPolicy{Default: extension.Duration(time.Hour), Max: extension.Duration(2 * time.Hour)},
				Labels: map[string]string{"tier": "test"}},
			"git":    {Slug: "git", Extension: "gitecho", Inputs: map[string]string{"ref": "main"}},
			"orphan": {Slug: "orphan", Extension: "gone"},
		},
	}
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// lastSeqs is the last sequence of every stream (key-value buckets
// included): anything published moves one.
func (e *env) lastSeqs(t *testing.T) map[string]uint64 {
	t.Helper()
	ctx := testCtx(t)
	out := map[string]uint64{}
	l := e.js.ListStreams(ctx)
	for info := range l.Info() {
		out[info.Config.Name] = info.State.LastSeq
	}
	if err := l.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// stored is one message of a stream, decoded.
type stored struct {
	Seq     uint64
	Subject string
	Header  map[string][]string
	Event   *event.Event
}

// messages returns every message stored in stream on subjects matching
// filter, oldest first. It reads by sequence (direct gets), which works on
// the work-queue commands stream, where no test consumer may attach.
func (e *env) messages(t *testing.T, stream, filter string) []stored {
	t.Helper()
	ctx := testCtx(t)
	s, err := e.js.Stream(ctx, stream)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if n := info.State.LastSeq - info.State.FirstSeq; info.State.Msgs > 0 && n > 10_000 {
		t.Fatalf("stream %s spans %d sequences: too many to read", stream, n)
	}
	var out []stored
	for seq := info.State.FirstSeq; info.State.Msgs > 0 && seq <= info.State.LastSeq; seq++ {
		m, err := s.GetMsg(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if !subjectMatch(filter, m.Subject) {
			continue
		}
		_, ev, err := event.Decode(ctx, m.Header, m.Data)
		if err != nil {
			t.Fatalf("message %d on %s is not a CloudEvent: %v", seq, m.Subject, err)
		}
		out = append(out, stored{Seq: seq, Subject: m.Subject, Header: m.Header, Event: ev})
	}
	return out
}

// subjectMatch reports whether subject matches the NATS filter, with *
// for one token and > for the rest.
func subjectMatch(filter, subject string) bool {
	f, s := strings.Split(filter, "."), strings.Split(subject, ".")
	for i, tok := range f {
		if tok == ">" {
			return len(s) > i
		}
		if i >= len(s) || (tok != "*" && tok != s[i]) {
			return false
		}
	}
	return len(f) == len(s)
}

// record reads a sandbox's record straight from the lifecycle stream:
// the fold of its events, and the sequence of the last.
func (e *env) record(t *testing.T, id string) (*sandbox.Record, uint64) {
	t.Helper()
	rec, err := inventory.Read(testCtx(t), e.js.Conn(), event.SandboxFilter(id))
	if err != nil {
		t.Fatalf("reading sandbox %s: %v", id, err)
	}
	if rec == nil {
		t.Fatalf("reading sandbox %s: no event", id)
	}
	return rec, rec.Seq
}

// seed stores sandboxes straight on the lifecycle stream, as the gateway
// and a worker record them: each one's requested event and, when its
// state is ready, its ready event (with its reachability).
func (e *env) seed(t testing.TB, recs ...*sandbox.Record) {
	t.Helper()
	ctx := testCtx(t)
	var outs []bus.Out
	flush := func() {
		if err := bus.NewPublisher(e.js).PublishAll(ctx, outs); err != nil {
			t.Fatal(err)
		}
		outs = outs[:0]
	}
	for _, rec := range recs {
		ref := rec.Ref()
		req, err := event.New(event.TypeRequested, gateway.Source, rec.ID, rec.ID+".requested", event.Requested{
			Ref: ref, Labels: rec.Labels, Inputs: rec.Inputs, TTLSeconds: rec.TTLSeconds, RequestedAt: rec.CreatedAt})
		if err != nil {
			t.Fatal(err)
		}
		outs = append(outs, bus.Out{Subject: ref.LifecycleSubject(event.StateRequested), Event: req})
		if rec.State == event.StateReady {
			var reach event.Reachability
			if rec.Reachability != nil {
				reach = *rec.Reachability
			}
			ready, err := event.New(event.TypeReady, "/sandboxer/provisioner", rec.ID, rec.ID+".ready", event.Ready{
				Ref: ref, Handle: event.Handle{SandboxID: rec.ID, Host: rec.Host}, Reachability: reach, ReadyAt: rec.CreatedAt})
			if err != nil {
				t.Fatal(err)
			}
			outs = append(outs, bus.Out{Subject: ref.LifecycleSubject(event.StateReady), Event: ready})
		}
		if len(outs) >= 512 {
			flush()
		}
	}
	flush()
}

// lifecycleEvent builds the event announcing state for the sandbox of rec,
// as the provisioner does.
func lifecycleEvent(t *testing.T, rec *sandbox.Record, s event.State) *event.Event {
	t.Helper()
	ref := rec.Ref()
	now := time.Now().UTC()
	var data any
	switch s {
	case event.StateProvisioning:
		data = event.Provisioning{Ref: ref, Worker: "w1", Attempt: 1}
	case event.StateReady:
		data = event.Ready{Ref: ref, Handle: event.Handle{SandboxID: rec.ID, Host: rec.Host},
			Reachability: event.Reachability{Host: rec.Host, RemoteDir: "/tmp/" + rec.ID}, ReadyAt: now}
	case event.StateFailed:
		data = event.Failed{Ref: ref, Phase: "provision", Reason: "test failure"}
	case event.StateDestroying:
		data = event.Destroying{Ref: ref, Reason: event.ReasonRequested}
	case event.StateDestroyed:
		data = event.Destroyed{Ref: ref, Reason: event.ReasonRequested, Cleanup: event.CleanupReport{AlreadyGone: true}}
	default:
		t.Fatalf("no test event for state %s", s)
	}
	ev, err := event.New(event.LifecycleType(s), "/sandboxer/provisioner", rec.ID, rec.ID+"."+string(s), data)
	if err != nil {
		t.Fatal(err)
	}
	return ev
}

// advance publishes the lifecycle events of states for sandbox id, as the
// provisioner does: each guarded by the sandbox's last event, since the
// events are the record.
func (e *env) advance(t *testing.T, id string, states ...event.State) {
	t.Helper()
	ctx := testCtx(t)
	pub := bus.NewPublisher(e.js)
	for _, s := range states {
		rec, seq := e.record(t, id)
		ev := lifecycleEvent(t, rec, s)
		if _, err := pub.PublishTransition(ctx, rec.Ref().LifecycleSubject(s), ev, rec.Ref().RefFilter(), seq); err != nil {
			t.Fatalf("announcing %s of %s: %v", s, id, err)
		}
	}
	if len(states) == 0 {
		return
	}
	// A DELETE decides on the gateway's fold of the stream: wait until it
	// has folded the last state, as its listing shows.
	last := states[len(states)-1]
	await(t, id+" listed "+string(last), func() bool {
		l, err := e.client("root").List(ctx, api.ListFilter{State: string(last)})
		return err == nil && slices.ContainsFunc(l, func(s api.Sandbox) bool { return s.ID == id })
	})
}

// await polls cond until it holds or 10s pass.
func await(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		<-tick.C
	}
}

// response is a raw HTTP answer.
type response struct {
	Status  int
	Header  http.Header
	Body    []byte
	Problem *api.Problem
}

// do sends a raw request with consumer's token ("" for none).
func (e *env) do(t *testing.T, method, path, consumer, body string, hdr map[string]string) response {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(testCtx(t), method, e.hs.URL+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if consumer != "" {
		req.Header.Set("Authorization", "Bearer "+e.tokens[consumer])
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := e.hs.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	r := response{Status: resp.StatusCode, Header: resp.Header, Body: b}
	if resp.StatusCode >= 400 {
		if ct := resp.Header.Get("Content-Type"); ct != api.ContentTypeProblem {
			t.Fatalf("%s %s: status %d with content type %q, want %s; body %s", method, path, resp.StatusCode, ct, api.ContentTypeProblem, b)
		}
		var p api.Problem
		if err := json.Unmarshal(b, &p); err != nil {
			t.Fatalf("%s %s: undecodable problem %s: %v", method, path, b, err)
		}
		if p.Status != resp.StatusCode || p.Title == "" {
			t.Fatalf("%s %s: problem %+v does not match status %d", method, path, p, resp.StatusCode)
		}
		r.Problem = &p
	}
	return r
}

// problemOf returns the problem of a client error, failing the test for
// anything else.
func problemOf(t *testing.T, err error) *api.Problem {
	t.Helper()
	var p *api.Problem
	if !errors.As(err, &p) {
		t.Fatalf("want a problem, got %v", err)
	}
	return p
}

// fields lists the field names of a problem.
func fields(p *api.Problem) []string {
	var out []string
	for _, fe := range p.Errors {
		out = append(out, fe.Field)
	}
	return out
}

// sseLines opens an event stream and returns its lines as they come; the
// channel closes when the stream ends. Cancel ctx to hang up.
func (e *env) sseLines(t *testing.T, ctx context.Context, path, consumer string, hdr map[string]string) (<-chan string, *http.Response) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, e.hs.URL+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+e.tokens[consumer])
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := e.hs.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	lines := make(chan string)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(lines)
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			select {
			case lines <- sc.Text():
			case <-ctx.Done():
				return
			}
		}
	}()
	t.Cleanup(func() {
		resp.Body.Close()
		wg.Wait()
	})
	return lines, resp
}

func mustUnmarshal(t *testing.T, b []byte, v any) {
	t.Helper()
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("decoding %s: %v", b, err)
	}
}
