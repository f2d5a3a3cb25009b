package main

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel"
	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/proto"

	"github.com/sand-boxer/sandboxer/cmd/sandboxer/internal/telemetry"
	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/event"
)

// otlpSpan is one span an [otlpReceiver] received, flattened.
type otlpSpan struct {
	service              string
	trace, id, parent    string
	name                 string
	kind                 tracepb.Span_SpanKind
	attrs                map[string]string
	linkTraces, linkSpan []string
}

func (s otlpSpan) String() string {
	return fmt.Sprintf("%s %q (%s) parent %s %v", s.id, s.name, s.kind, s.parent, s.attrs)
}

// otlpReceiver is an OTLP/HTTP trace receiver on 127.0.0.1, as a
// collector would run one: it takes every protobuf
// ExportTraceServiceRequest posted to /v1/traces and keeps its spans.
type otlpReceiver struct {
	srv *httptest.Server

	mu    sync.Mutex
	spans []otlpSpan
	posts int
}

func startOTLPReceiver(t *testing.T) *otlpReceiver {
	t.Helper()
	r := &otlpReceiver{}
	r.srv = httptest.NewServer(http.HandlerFunc(r.serve))
	t.Cleanup(r.srv.Close)
	return r
}

func (r *otlpReceiver) serve(w http.ResponseWriter, req *http.Request) {
	if req.Method != http.MethodPost || req.URL.Path != "/v1/traces" {
		http.Error(w, "want POST /v1/traces", http.StatusNotFound)
		return
	}
	if ct := req.Header.Get("Content-Type"); ct != "application/x-protobuf" {
		http.Error(w, "want application/x-protobuf, got "+ct, http.StatusUnsupportedMediaType)
		return
	}
	var body io.Reader = req.Body
	if req.Header.Get("Content-Encoding") == "gzip" {
		gz, err := gzip.NewReader(req.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		body = gz
	}
	b, err := io.ReadAll(body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	var ex coltracepb.ExportTraceServiceRequest
	if err := proto.Unmarshal(b, &ex); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	var got []otlpSpan
	for _, rs := range ex.GetResourceSpans() {
		service := ""
		for _, kv := range rs.GetResource().GetAttributes() {
			if kv.GetKey() == "service.name" {
				service = kv.GetValue().GetStringValue()
			}
		}
		for _, ss := range rs.GetScopeSpans() {
			for _, s := range ss.GetSpans() {
				o := otlpSpan{service: service, trace: hex.EncodeToString(s.GetTraceId()), id: hex.EncodeToString(s.GetSpanId()),
					parent: hex.EncodeToString(s.GetParentSpanId()), name: s.GetName(), kind: s.GetKind(), attrs: map[string]string{}}
				for _, kv := range s.GetAttributes() {
					v := kv.GetValue()
					switch {
					case v.GetStringValue() != "":
						o.attrs[kv.GetKey()] = v.GetStringValue()
					default:
						o.attrs[kv.GetKey()] = fmt.Sprint(v.GetIntValue())
					}
				}
				for _, l := range s.GetLinks() {
					o.linkTraces = append(o.linkTraces, hex.EncodeToString(l.GetTraceId()))
					o.linkSpan = append(o.linkSpan, hex.EncodeToString(l.GetSpanId()))
				}
				got = append(got, o)
			}
		}
	}
	r.mu.Lock()
	r.spans = append(r.spans, got...)
	r.posts++
	r.mu.Unlock()
	out, _ := proto.Marshal(&coltracepb.ExportTraceServiceResponse{})
	w.Header().Set("Content-Type", "application/x-protobuf")
	_, _ = w.Write(out)
}

// received returns the spans received so far.
func (r *otlpReceiver) received() []otlpSpan {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.spans)
}

// wantSpan describes a span a trace must hold: its name, and attributes
// it must carry (a subset).
type wantSpan struct {
	name  string
	attrs map[string]string
}

func (w wantSpan) String() string { return fmt.Sprintf("%q %v", w.name, w.attrs) }

func (w wantSpan) matches(s otlpSpan) bool {
	if s.name != w.name {
		return false
	}
	for k, v := range w.attrs {
		if s.attrs[k] != v {
			return false
		}
	}
	return true
}

// traceOf returns the spans of trace id among spans.
func traceOf(spans []otlpSpan, id string) []otlpSpan {
	var out []otlpSpan
	for _, s := range spans {
		if s.trace == id {
			out = append(out, s)
		}
	}
	return out
}

// sandboxTrace checks that one trace covers sandbox id's life, as far as
// spans: it returns that trace's id and what is still missing or wrong
// (nothing when the trace is whole).
func sandboxTrace(spans []otlpSpan, id, ext string, metered bool) (string, []string) {
	sb := map[string]string{"sandboxer.sandbox": id}
	of := func(typ event.Type) map[string]string {
		return map[string]string{"cloudevents.event_type": string(typ), "cloudevents.event_subject": id}
	}
	var root *otlpSpan
	for i, s := range spans {
		if (wantSpan{"POST /v1/sandboxes", sb}).matches(s) {
			root = &spans[i]
		}
	}
	if root == nil {
		return "", []string{"the HTTP server span of the create"}
	}
	if root.kind != tracepb.Span_SPAN_KIND_SERVER || root.parent != "" {
		return root.trace, []string{"the create's span is no root server span: " + root.String()}
	}
	want := []wantSpan{
		{"publish " + string(event.TypeCreate), map[string]string{"cloudevents.event_subject": id}},
		{"process provisioner-" + ext, of(event.TypeCreate)},
		{"Provision", sb},
		{"WaitReady", sb},
		{"publish " + string(event.TypeReady), map[string]string{"cloudevents.event_subject": id}},
		{"process registry", of(event.TypeReady)},
		{"process metering", of(event.TypeReady)},
		{"destroy sandbox", sb},
		{"publish " + string(event.TypeDestroy), map[string]string{"cloudevents.event_subject": id}},
		{"process provisioner-" + ext, of(event.TypeDestroy)},
		{"Teardown", sb},
		{"publish " + string(event.TypeDestroying), map[string]string{"cloudevents.event_subject": id}},
		{"process registry", of(event.TypeDestroying)},
		{"publish " + string(event.TypeDestroyed), map[string]string{"cloudevents.event_subject": id}},
		{"process metering", of(event.TypeDestroyed)},
		{"publish dev.sandboxer.credits.usage.v1", map[string]string{"cloudevents.event_subject": id}},
	}
	if metered {
		want = append(want,
			wantSpan{"admit", sb},
			wantSpan{"request " + event.SubjectMeteringHold, nil},
			wantSpan{"answer " + event.SubjectMeteringHold, sb},
			wantSpan{"request " + event.QuoteSubject(ext), nil},
			wantSpan{"answer " + event.QuoteSubject(ext), nil},
			wantSpan{"EstimateCost", nil},
			wantSpan{"publish dev.sandboxer.credits.reserved.v1", map[string]string{"cloudevents.event_subject": id}},
			wantSpan{"MeterActual", sb},
			wantSpan{"publish dev.sandboxer.credits.debited.v1", map[string]string{"cloudevents.event_subject": id}},
		)
	}
	tr := traceOf(spans, root.trace)
	var problems []string
	for _, w := range want {
		if !slices.ContainsFunc(tr, w.matches) {
			problems = append(problems, "no span "+w.String())
		}
	}
	// One tree: every span but the root has its parent in the trace.
	ids := map[string]bool{}
	for _, s := range tr {
		ids[s.id] = true
	}
	for _, s := range tr {
		if s.id != root.id && !ids[s.parent] {
			problems = append(problems, "span without its parent in the trace: "+s.String())
		}
	}
	// The DELETE has a trace of its own, linked both ways with the
	// sandbox's.
	i := slices.IndexFunc(tr, wantSpan{"destroy sandbox", sb}.matches)
	if i >= 0 {
		d := tr[i]
		if len(d.linkTraces) != 1 || d.linkTraces[0] == root.trace {
			problems = append(problems, "the destroy span links no other trace: "+d.String())
		} else {
			del := traceOf(spans, d.linkTraces[0])
			j := slices.IndexFunc(del, wantSpan{"DELETE /v1/sandboxes/{id}", sb}.matches)
			switch {
			case j < 0:
				problems = append(problems, "the destroy span's link is not the DELETE's trace")
			case !slices.Contains(del[j].linkTraces, root.trace):
				problems = append(problems, "the DELETE's span links not the sandbox's trace: "+del[j].String())
			}
		}
	}
	return root.trace, problems
}

// traceIDOf is the trace id a traceparent header names, or empty.
func traceIDOf(traceparent string) string {
	parts := strings.Split(traceparent, "-")
	if len(parts) != 4 || len(parts[1]) != 32 {
		return ""
	}
	return parts[1]
}

// storedMsgs reads back every message of stream on filter, with the
// admin's connection.
func storedMsgs(t *testing.T, js jetstream.JetStream, stream, filter string) []jetstream.Msg {
	t.Helper()
	ctx := testContext(t)
	cons, err := js.OrderedConsumer(ctx, stream, jetstream.OrderedConsumerConfig{FilterSubjects: []string{filter}})
	if err != nil {
		t.Fatal(err)
	}
	info, err := cons.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var out []jetstream.Msg
	for uint64(len(out)) < info.NumPending {
		batch, err := cons.Fetch(int(info.NumPending)-len(out), jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		n := len(out)
		for m := range batch.Messages() {
			out = append(out, m)
		}
		if err := batch.Error(); err != nil {
			t.Fatalf("reading %s back: %v", stream, err)
		}
		if len(out) == n {
			t.Fatalf("reading %s back: %d of %d messages", stream, n, info.NumPending)
		}
	}
	return out
}

// otlpEnv points the standard OTEL_* variables at rcv for the rest of the
// test (so it runs alone), and gives the process its tracer provider
// back when the test ends.
func otlpEnv(t *testing.T, rcv *otlpReceiver) {
	t.Setenv("OTEL_TRACES_EXPORTER", "otlp")
	t.Setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rcv.srv.URL)
	t.Setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
	prev := otel.GetTracerProvider()
	t.Cleanup(func() { otel.SetTracerProvider(prev) })
}

// awaitSpan waits for rcv to receive a span of service matching w.
func awaitSpan(t *testing.T, rcv *otlpReceiver, service string, w wantSpan) {
	t.Helper()
	awaitCond(t, fmt.Sprintf("a span %s of %s", w, service), func() bool {
		return slices.ContainsFunc(rcv.received(), func(s otlpSpan) bool { return s.service == service && w.matches(s) })
	})
}

// TestOTLPFromUpAndServe: the standard OTEL_* variables (the OTLP
// exporter over HTTP, an endpoint) are all `sandboxer up` and `sandboxer
// serve` need to export their spans, each under its service's name.
func TestOTLPFromUpAndServe(t *testing.T) {
	rcv := startOTLPReceiver(t)
	otlpEnv(t, rcv)
	dataDir := t.TempDir()
	url, banner := upInEmptyDir(t, dataDir, "--extension", "local", "--nats-listen", "127.0.0.1:-1")
	natsURL := ""
	for _, l := range strings.Split(banner, "\n") {
		if f := strings.Fields(l); len(f) > 1 && f[0] == "nats" {
			natsURL = f[1]
		}
	}
	if !strings.HasPrefix(natsURL, "nats://") {
		t.Fatalf("no NATS URL in the banner:\n%s", banner)
	}
	if out, err := runCLI(t, "create", "--profile", "local", "--url", url, "--data-dir", dataDir); err != nil {
		t.Fatalf("create: %v\n%s", err, out)
	}
	awaitSpan(t, rcv, "sandboxer", wantSpan{"POST /v1/sandboxes", nil})

	creds := filepath.Join(t.TempDir(), "gateway.creds")
	if out, err := runCLI(t, "creds", "issue", "--role", "gateway", "--data-dir", dataDir, "--out", creds); err != nil {
		t.Fatalf("creds issue: %v\n%s", err, out)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close() // a free port, for --http to take
	root := newRoot()
	root.SetOut(io.Discard)
	root.SetErr(io.Discard)
	root.SetArgs([]string{"serve", "gateway", "--nats", natsURL, "--creds", creds, "--http", addr, "--log-level", "error"})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- root.ExecuteContext(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("serve gateway: %v", err)
			}
		case <-time.After(60 * time.Second):
			t.Error("serve gateway did not stop")
		}
	})
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	awaitCond(t, "the served gateway to answer", func() bool {
		select {
		case err := <-done:
			t.Fatalf("serve gateway ended: %v", err)
		default:
		}
		resp, err := hc.Get("http://" + addr + "/healthz")
		if err != nil {
			return false
		}
		_ = resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	awaitSpan(t, rcv, "sandboxer-gateway", wantSpan{"GET /healthz", nil})
}

// TestOneTracePerSandbox runs the whole system with spans exported
// through the standard OTEL_* variables and the real OTLP/HTTP exporter
// to an in-process receiver, creates a free local sandbox and a metered
// one over HTTP, destroys both and waits for their usage records. Then
// one trace covers each sandbox's life: the HTTP create, admission and
// its quote (request-reply, client and server spans), the create
// command, Provision and WaitReady, the registry's and metering's
// handling of ready, the destroy (parented on the create's trace, linked
// with the DELETE's own), Teardown, the destroyed handling and the usage
// record's publish (and, metered, the settlement's debit). And every
// message the sandbox put on the bus (commands, lifecycle, timers,
// metering, the hold request) carries that trace's traceparent, the
// stored ones read back from their streams.
func TestOneTracePerSandbox(t *testing.T) {
	rcv := startOTLPReceiver(t)
	otlpEnv(t, rcv)
	stopTrace, err := telemetry.Setup(context.Background(), "sandboxer-trace-test")
	if err != nil {
		t.Fatal(err)
	}
	flusher, ok := otel.GetTracerProvider().(interface{ ForceFlush(context.Context) error })
	if !ok {
		t.Fatalf("telemetry.Setup installed %T, which cannot flush", otel.GetTracerProvider())
	}
	t.Cleanup(func() {
		// After the system's shutdown (cleanups run last first).
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := stopTrace(ctx); err != nil {
			t.Errorf("stopping the tracer provider: %v", err)
		}
	})

	cs := startCreditsSystem(t, nil)
	ctx := testContext(t)
	var (
		mu   sync.Mutex
		seen []*nats.Msg
	)
	sub, err := cs.sys.NC.Subscribe("sandboxer.>", func(m *nats.Msg) {
		mu.Lock()
		seen = append(seen, m)
		mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := cs.sys.NC.FlushWithContext(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := cs.admin.Grant(ctx, api.GrantRequest{Consumer: DevConsumer, Amount: 1_000_000}); err != nil {
		t.Fatal(err)
	}

	type run struct {
		id, ext string
		metered bool
	}
	var runs []run
	for _, p := range []struct {
		profile, ext string
		metered      bool
	}{{"local", "local", false}, {"saas", "saas-stub", true}} {
		s, err := cs.dev.Create(ctx, api.CreateRequest{Profile: p.profile, TTL: "10m"}, "")
		if err != nil {
			t.Fatalf("creating a %s sandbox: %v", p.profile, err)
		}
		if _, err := cs.dev.Wait(ctx, s.ID, func(st event.State) bool { return st.Rank() >= event.StateReady.Rank() }, nil); err != nil {
			t.Fatal(err)
		}
		// Its expiry scheduled before it goes: a registry that folded the
		// destroy before it handled ready schedules nothing.
		timers, err := cs.sys.JS.Stream(ctx, event.StreamTimers)
		if err != nil {
			t.Fatal(err)
		}
		awaitCond(t, s.ID+": expiry scheduled", func() bool {
			_, err := timers.GetLastMsgForSubject(ctx, event.ExpiryScheduleSubject(s.ID))
			return err == nil
		})
		if _, err := cs.dev.Destroy(ctx, s.ID); err != nil {
			t.Fatal(err)
		}
		if gone, err := cs.dev.Wait(ctx, s.ID, event.State.Terminal, nil); err != nil || gone.State != event.StateDestroyed {
			t.Fatalf("after destroy: %+v, %v", gone, err)
		}
		usageOf(t, cs.dev, s.ID)
		runs = append(runs, run{s.ID, p.ext, p.metered})
	}

	// The spans: flushed and awaited, within a bound.
	traces := map[string]string{}
	deadline := time.Now().Add(45 * time.Second)
	for {
		if err := flusher.ForceFlush(ctx); err != nil {
			t.Fatalf("flushing spans: %v", err)
		}
		spans := rcv.received()
		var problems []string
		for _, r := range runs {
			id, ps := sandboxTrace(spans, r.id, r.ext, r.metered)
			traces[r.id] = id
			for _, p := range ps {
				problems = append(problems, r.id+" ("+r.ext+"): "+p)
			}
		}
		if len(problems) == 0 {
			break
		}
		if time.Now().After(deadline) {
			var b bytes.Buffer
			for _, r := range runs {
				fmt.Fprintf(&b, "\ntrace %s of %s:", traces[r.id], r.id)
				for _, s := range traceOf(spans, traces[r.id]) {
					fmt.Fprintf(&b, "\n  %s", s)
				}
			}
			t.Fatalf("after %d exports of %d spans:\n%s%s", rcv.posts, len(spans), strings.Join(problems, "\n"), b.String())
		}
		timer := time.NewTimer(50 * time.Millisecond)
		<-timer.C
	}
	for _, s := range rcv.received() {
		if s.service != "sandboxer-trace-test" {
			t.Fatalf("span %s from service %q, want the one OTEL_SERVICE_NAME-less Setup named", s, s.service)
		}
	}

	// The messages: every one a sandbox put on the bus carries its trace.
	mu.Lock()
	live := slices.Clone(seen)
	mu.Unlock()
	for _, r := range runs {
		want := traces[r.id]
		check := func(where, subject string, h nats.Header) {
			if got := traceIDOf(h.Get("traceparent")); got != want {
				t.Errorf("%s: %s %s carries traceparent %q, want trace %s", r.id, where, subject, h.Get("traceparent"), want)
			}
		}
		kinds := map[string]bool{}
		for _, m := range live {
			ours := strings.Contains(m.Subject, "."+r.id) || m.Header.Get("ce-subject") == r.id ||
				(m.Subject == event.SubjectMeteringHold && bytes.Contains(m.Data, []byte(`"`+r.id+`"`)))
			if !ours {
				continue
			}
			check("message", m.Subject, m.Header)
			kinds[strings.Join(strings.Split(m.Subject, ".")[:3], ".")] = true
		}
		for _, k := range []string{"sandboxer.cmd." + r.ext, "sandboxer.evt.dev", "sandboxer.timer.schedule", "sandboxer.meter.dev"} {
			if !kinds[k] {
				t.Errorf("%s: no message on %s.> seen (saw %v)", r.id, k, kinds)
			}
		}
		if r.metered && !kinds["sandboxer.rpc.metering"] {
			t.Errorf("%s: no hold request seen", r.id)
		}
		n := 0
		for _, m := range storedMsgs(t, cs.sys.JS, event.StreamLifecycle, event.SandboxFilter(r.id)) {
			check("stored lifecycle event", m.Subject(), m.Headers())
			n++
		}
		if n != 5 {
			t.Errorf("%s: %d lifecycle events stored, want 5 (requested to destroyed)", r.id, n)
		}
		n = 0
		for _, m := range storedMsgs(t, cs.sys.JS, event.StreamMetering, event.MeteringFilter(DevConsumer)) {
			if m.Headers().Get("ce-subject") != r.id {
				continue
			}
			check("stored metering event", m.Subject(), m.Headers())
			n++
		}
		if min := map[bool]int{false: 1, true: 4}[r.metered]; n < min {
			t.Errorf("%s: %d metering events stored, want at least %d", r.id, n, min)
		}
	}
}
