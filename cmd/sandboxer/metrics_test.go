package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"go.opentelemetry.io/otel"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/event"
)

// promtool is the path of Prometheus's promtool, or fails t naming the
// script that installs it: the metrics tests never skip.
func promtool(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatalf("promtool not found (%v): run .ci/install-metrics.sh, which installs it from Debian's prometheus package", err)
	}
	return p
}

// scrape is one scrape of a /metrics endpoint: the text as served, and
// the families parsed from it.
type scrape struct {
	text     []byte
	families map[string]*dto.MetricFamily
}

func scrapeMetrics(t *testing.T, url string) scrape {
	t.Helper()
	req, err := http.NewRequestWithContext(testContext(t), http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	// The text format, as promtool reads it.
	req.Header.Set("Accept", "text/plain; version=0.0.4")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("scraping %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("scraping %s: %d\n%s", url, resp.StatusCode, b)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("parsing the scrape of %s: %v\n%s", url, err, b)
	}
	return scrape{text: b, families: fams}
}

// value is the value of the series of family name whose labels include
// labels (name=value pairs): a counter's or gauge's value, a histogram's
// count of observations. ok is false when there is no such series.
func (s scrape) value(name string, labels ...string) (v float64, ok bool) {
	f := s.families[name]
	if f == nil {
		return 0, false
	}
	for _, m := range f.GetMetric() {
		if !hasLabels(m, labels) {
			continue
		}
		switch {
		case m.GetCounter() != nil:
			return m.GetCounter().GetValue(), true
		case m.GetGauge() != nil:
			return m.GetGauge().GetValue(), true
		case m.GetHistogram() != nil:
			return float64(m.GetHistogram().GetSampleCount()), true
		case m.GetUntyped() != nil:
			return m.GetUntyped().GetValue(), true
		}
	}
	return 0, false
}

func hasLabels(m *dto.Metric, labels []string) bool {
	for i := 0; i+1 < len(labels); i += 2 {
		if !slices.ContainsFunc(m.GetLabel(), func(l *dto.LabelPair) bool { return l.GetName() == labels[i] && l.GetValue() == labels[i+1] }) {
			return false
		}
	}
	return true
}

// check is one expectation of a scrape: the series of name with labels
// exists and its value passes ok.
type check struct {
	name   string
	labels []string
	want   string // what ok accepts, for the failure message
	ok     func(float64) bool
}

func atLeast(n float64) (string, func(float64) bool) {
	return fmt.Sprintf(">= %v", n), func(v float64) bool { return v >= n }
}

func equal(n float64) (string, func(float64) bool) {
	return fmt.Sprintf("= %v", n), func(v float64) bool { return v == n }
}

func expect(name string, cond func(float64) (string, func(float64) bool), n float64, labels ...string) check {
	want, ok := cond(n)
	return check{name: name, labels: labels, want: want, ok: ok}
}

// failing lists the checks s does not pass.
func (s scrape) failing(checks []check) []string {
	var out []string
	for _, c := range checks {
		v, found := s.value(c.name, c.labels...)
		switch {
		case !found:
			out = append(out, fmt.Sprintf("%s%v: no such series", c.name, c.labels))
		case !c.ok(v):
			out = append(out, fmt.Sprintf("%s%v = %v, want %s", c.name, c.labels, v, c.want))
		}
	}
	return out
}

// TestMetrics runs the whole system as `sandboxer up` does, makes a free
// local sandbox and a metered one (credit granted first) live and die,
// asks for one on the bus, and scrapes the gateway's /metrics: one scrape
// shows every service's families, promtool finds nothing to say about
// them, and each counts what happened.
func TestMetrics(t *testing.T) {
	tool := promtool(t)
	b := startBusSystem(t, t.TempDir())
	url := b.sys.URL + "/metrics"
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	dev := api.NewClient(b.sys.URL, readKey(t, b.dir, "dev"), hc)
	admin := api.NewClient(b.sys.URL, readKey(t, b.dir, "admin"), hc)
	ctx := testContext(t)
	until := func(want event.State) func(event.State) bool { return func(s event.State) bool { return s == want } }
	live := func(profile string) string {
		t.Helper()
		sb, err := dev.Create(ctx, api.CreateRequest{Profile: profile}, "")
		if err != nil {
			t.Fatalf("creating a %s sandbox: %v", profile, err)
		}
		if _, err := dev.Wait(ctx, sb.ID, until(event.StateReady), nil); err != nil {
			t.Fatalf("waiting for %s sandbox %s: %v", profile, sb.ID, err)
		}
		return sb.ID
	}
	destroy := func(id string) {
		t.Helper()
		if _, err := dev.Destroy(ctx, id); err != nil {
			t.Fatal(err)
		}
		if _, err := dev.Wait(ctx, id, until(event.StateDestroyed), nil); err != nil {
			t.Fatalf("waiting for %s to be destroyed: %v", id, err)
		}
	}

	local := live("local")
	nc := b.connect(t, "dev.creds")
	if r := busRequest(t, nc, DevConsumer, event.VerbGet, "metrics-get-1", event.GetRequest{SandboxID: local}); r.Problem != nil {
		t.Fatalf("get request: %+v", r.Problem)
	}
	destroy(local)
	if _, err := admin.Grant(ctx, api.GrantRequest{Consumer: DevConsumer, Amount: 1000}); err != nil {
		t.Fatal(err)
	}
	saas := live("saas")
	// The first scrape computes the open holds: the metered sandbox's is.
	if s := scrapeMetrics(t, url); len(s.failing([]check{expect("sandboxer_credit_holds_open", atLeast, 1)})) > 0 {
		t.Errorf("a metered sandbox runs, yet %s", s.failing([]check{expect("sandboxer_credit_holds_open", atLeast, 1)}))
	}
	destroy(saas)

	checks := []check{
		// gateway
		expect("sandboxer_gateway_http_requests_total", atLeast, 2, "route", "POST /v1/sandboxes", "code", "202"),
		expect("sandboxer_gateway_http_requests_total", atLeast, 1, "route", "POST /v1/credits/grants", "code", "201"),
		expect("sandboxer_gateway_http_request_duration_seconds", atLeast, 2, "route", "POST /v1/sandboxes"),
		expect("sandboxer_gateway_admissions_total", atLeast, 2, "outcome", "admitted"),
		expect("sandboxer_gateway_admissions_total", equal, 0, "outcome", "insufficient_credits"),
		expect("sandboxer_gateway_intake_requests_total", atLeast, 1, "verb", "get", "outcome", "ok"),
		expect("sandboxer_pool_pending_commands", equal, 0, "extension", "local"),
		expect("sandboxer_pool_in_flight_commands", equal, 0, "extension", "local"),
		expect("sandboxer_pool_live_workers", atLeast, 1, "extension", "local"),
		expect("sandboxer_pool_host_live_workers", atLeast, 1, "extension", "local", "host", "localhost"),
		expect("sandboxer_pool_host_pending_commands", equal, 0, "extension", "local", "host", "localhost"),
		expect("sandboxer_pool_live_workers", atLeast, 1, "extension", "saas-stub"),
		expect("sandboxer_pool_capacity_sandboxes", equal, 100, "extension", "saas-stub"),
		expect("sandboxer_sandboxes", atLeast, 2, "state", "destroyed"),
		expect("sandboxer_sandboxes", equal, 0, "state", "provisioning"),
		expect("sandboxer_sandboxes_past_deadline", equal, 0, "state", "destroying"),
		// provisioner
		expect("sandboxer_provisioner_provision_duration_seconds", atLeast, 1, "extension", "local"),
		expect("sandboxer_provisioner_provision_duration_seconds", atLeast, 1, "extension", "saas-stub"),
		expect("sandboxer_provisioner_wait_ready_duration_seconds", atLeast, 1, "extension", "local"),
		expect("sandboxer_provisioner_teardown_duration_seconds", atLeast, 1, "extension", "local"),
		expect("sandboxer_provisioner_teardown_duration_seconds", atLeast, 1, "extension", "saas-stub"),
		expect("sandboxer_provisioner_outcomes_total", atLeast, 1, "extension", "local", "outcome", "ready"),
		expect("sandboxer_provisioner_outcomes_total", atLeast, 1, "extension", "local", "outcome", "destroyed"),
		expect("sandboxer_provisioner_outcomes_total", atLeast, 1, "extension", "saas-stub", "outcome", "destroyed"),
		expect("sandboxer_provisioner_outcomes_total", equal, 0, "extension", "local", "outcome", "failed_provision"),
		expect("sandboxer_provisioner_outcomes_total", equal, 0, "extension", "local", "outcome", "teardown_error"),
		// the routers of every service
		expect("sandboxer_bus_messages_handled_total", atLeast, 2, "consumer", "provisioner-local"),
		expect("sandboxer_bus_messages_handled_total", atLeast, 2, "consumer", "provisioner-saas-stub"),
		// ready and destroying of each: the events that move the
		// registry's schedules.
		expect("sandboxer_bus_messages_handled_total", atLeast, 4, "consumer", "registry"),
		expect("sandboxer_bus_messages_handled_total", atLeast, 4, "consumer", "metering"),
		expect("sandboxer_bus_messages_handled_total", equal, 0, "consumer", "registry-timers"),
		expect("sandboxer_bus_handler_duration_seconds", atLeast, 2, "consumer", "provisioner-local"),
		expect("sandboxer_bus_redeliveries_total", equal, 0, "consumer", "provisioner-local"),
		expect("sandboxer_bus_dead_letters_total", equal, 0, "consumer", "metering"),
		expect("sandboxer_bus_handler_failures_total", equal, 0, "consumer", "registry"),
		expect("sandboxer_bus_handler_panics_total", equal, 0, "consumer", "metering-accrual"),
		// metering
		expect("sandboxer_metering_events_folded_total", atLeast, 2, "kind", "ready"),
		expect("sandboxer_metering_events_folded_total", atLeast, 2, "kind", "destroyed"),
		expect("sandboxer_metering_consumer_pending_messages", equal, 0, "consumer", "metering"),
		expect("sandboxer_metering_consumer_pending_messages", atLeast, 0, "consumer", "metering-accrual"),
		expect("sandboxer_credit_holds_open", atLeast, 0),
		expect("sandboxer_credit_accounts_low", equal, 0),
		expect("sandboxer_credits_granted_total", equal, 1000),
		expect("sandboxer_credits_debited_total", atLeast, 70), // the stub's start fee and a started minute
		expect("sandboxer_credit_notices_total", equal, 0, "kind", "low"),
		expect("sandboxer_credit_notices_total", equal, 0, "kind", "exhausted"),
		// registry
		expect("sandboxer_registry_expiries_fired_total", equal, 0),
		// the process
		expect("go_goroutines", atLeast, 1),
		expect("process_resident_memory_bytes", atLeast, 1),
	}
	// Metering settles the metered sandbox after its destroyed event:
	// counted once it is done.
	var s scrape
	awaitCond(t, "every family to count what happened", func() bool {
		s = scrapeMetrics(t, url)
		return len(s.failing(checks)) == 0
	})
	if bad := s.failing(checks); len(bad) > 0 {
		t.Fatalf("scrape of %s:\n%s", url, strings.Join(bad, "\n"))
	}

	// promtool reads the scrape as Prometheus would, and lints it.
	cmd := exec.Command(tool, "check", "metrics")
	cmd.Stdin = bytes.NewReader(s.text)
	out, err := cmd.CombinedOutput()
	if err != nil || len(out) > 0 {
		t.Fatalf("promtool check metrics: %v\n%s", err, out)
	}
	// Low cardinality: no label value is a sandbox id or a consumer.
	for name, f := range s.families {
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if v := l.GetValue(); v == local || v == saas || v == DevConsumer {
					t.Errorf("%s has label %s=%q: a sandbox or a consumer", name, l.GetName(), v)
				}
			}
		}
	}
}

// TestServeMetrics runs `sandboxer serve provisioner --metrics ADDR`
// against the system's bus with the pool's credentials: /healthz answers
// while it runs, /readyz once the pool consumes, /metrics its families.
func TestServeMetrics(t *testing.T) {
	b := startBusSystem(t, t.TempDir())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close() // a free port, for --metrics to take
	// serve sets the process's tracer provider up and shuts it down when
	// it ends; the other tests keep theirs.
	tp := otel.GetTracerProvider()
	t.Cleanup(func() { otel.SetTracerProvider(tp) })
	root := newRoot()
	root.SetOut(io.Discard)
	root.SetErr(io.Discard)
	root.SetArgs([]string{"serve", "provisioner", "--extension", "local", "--nats", b.sys.NATS.ClientURL(),
		"--creds", filepath.Join(credsDir(b.dir), "provisioner-local.creds"), "--data-dir", t.TempDir(),
		"--worker-id", "metrics-test", "--metrics", addr, "--log-level", "error"})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- root.ExecuteContext(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("serve provisioner: %v", err)
			}
		case <-time.After(60 * time.Second):
			t.Error("serve provisioner did not stop")
		}
	})
	status := func(path string) int {
		resp, err := http.Get("http://" + addr + path)
		if err != nil {
			return 0
		}
		_ = resp.Body.Close()
		return resp.StatusCode
	}
	awaitCond(t, "/readyz to answer 200", func() bool {
		select {
		case err := <-done:
			t.Fatalf("serve provisioner ended: %v", err)
		default:
		}
		return status("/readyz") == http.StatusOK
	})
	if code := status("/healthz"); code != http.StatusOK {
		t.Errorf("/healthz: %d", code)
	}
	s := scrapeMetrics(t, "http://"+addr+"/metrics")
	if bad := s.failing([]check{
		expect("sandboxer_provisioner_outcomes_total", equal, 0, "extension", "local", "outcome", "ready"),
		expect("sandboxer_bus_messages_handled_total", atLeast, 0, "consumer", "provisioner-local"),
		expect("go_goroutines", atLeast, 1),
	}); len(bad) > 0 {
		t.Errorf("serve provisioner's /metrics:\n%s", strings.Join(bad, "\n"))
	}
	for _, name := range []string{"sandboxer_gateway_admissions_total", "sandboxer_credits_debited_total"} {
		if _, ok := s.families[name]; ok {
			t.Errorf("a provisioner process exports %s, another service's family", name)
		}
	}
}

// TestPrometheusRules checks deploy/prometheus with promtool: the scrape
// configuration, the alert rules, and their unit test.
func TestPrometheusRules(t *testing.T) {
	tool := promtool(t)
	dir := filepath.Join("..", "..", "deploy", "prometheus")
	for _, args := range [][]string{
		{"check", "config", filepath.Join(dir, "prometheus.yml")},
		{"check", "rules", filepath.Join(dir, "rules.yml")},
		{"test", "rules", filepath.Join(dir, "rules_test.yml")},
	} {
		out, err := exec.Command(tool, args...).CombinedOutput()
		if err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}
