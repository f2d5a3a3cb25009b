package gateway_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/services/gateway"
)

// series reads the value of the series of family name whose labels
// include labels (name, value pairs) from reg: a counter's or gauge's
// value, a histogram's count.
func series(t *testing.T, reg prometheus.Gatherer, name string, labels ...string) (float64, bool) {
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
			switch {
			case m.GetCounter() != nil:
				return m.GetCounter().GetValue(), true
			case m.GetGauge() != nil:
				return m.GetGauge().GetValue(), true
			case m.GetHistogram() != nil:
				return float64(m.GetHistogram().GetSampleCount()), true
			}
		}
	}
	return 0, false
}

// TestMetrics: the gateway counts its answers by route and code and its
// create requests by outcome where it decides them, reads its pools'
// queues from their durables on scrape, and counts the inventory by state
// and the sandboxes past their state's deadline by its clock; /metrics
// serves the registry.
func TestMetrics(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	var clock atomic.Int64
	clock.Store(time.Now().UnixNano())
	e := newEnv(t, envConfig{opts: func(o *gateway.Options) {
		o.Metrics = reg
		o.Now = func() time.Time { return time.Unix(0, clock.Load()) }
		static := &gateway.StaticResolver{}
		o.Resolver = gateway.ResolverFunc(func(ctx context.Context, req gateway.RouteRequest) (gateway.Route, error) {
			if req.Consumer == "noroute" {
				return gateway.Route{}, fmt.Errorf("all hosts drained: %w", gateway.ErrNoRoute)
			}
			return static.Resolve(ctx, req)
		})
		o.Admitter = gateway.AdmitterFunc(func(_ context.Context, req gateway.AdmitRequest) (string, error) {
			if req.Consumer == "nocredit" {
				return "", fmt.Errorf("balance 0: %w", gateway.ErrInsufficientCredits)
			}
			return "", nil
		})
	}})
	e.srv.Setup(t, bus.ConsumerSpec{
		Stream: event.StreamCommands, Name: bus.DurableProvisioner("echo"),
		Filters: []string{event.CommandFilter("echo")}, Policy: bus.ConsumerPolicy{AckWait: time.Minute},
	})
	ctx := testCtx(t)
	want := func(v float64, name string, labels ...string) {
		t.Helper()
		got, ok := series(t, reg, name, labels...)
		if !ok || got != v {
			t.Errorf("%s%v = %v (found %v), want %v", name, labels, got, ok, v)
		}
	}

	var ids []string
	for range 2 {
		sb, err := e.client("alice").Create(ctx, api.CreateRequest{Profile: "echo"}, "")
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, sb.ID)
	}
	for _, c := range []string{"nocredit", "noroute"} {
		if _, err := e.client(c).Create(ctx, api.CreateRequest{Profile: "echo"}, ""); err == nil {
			t.Fatalf("%s: created", c)
		}
	}
	if _, err := e.client("alice").Create(ctx, api.CreateRequest{Profile: "nope"}, ""); err == nil {
		t.Fatal("unknown profile: created")
	}
	want(2, "sandboxer_gateway_admissions_total", "outcome", "admitted")
	want(1, "sandboxer_gateway_admissions_total", "outcome", "insufficient_credits")
	want(1, "sandboxer_gateway_admissions_total", "outcome", "no_route")
	want(1, "sandboxer_gateway_admissions_total", "outcome", "invalid")
	want(0, "sandboxer_gateway_admissions_total", "outcome", "unavailable")
	want(2, "sandboxer_gateway_http_requests_total", "route", "POST /v1/sandboxes", "code", "202")
	want(1, "sandboxer_gateway_http_requests_total", "route", "POST /v1/sandboxes", "code", "402")
	want(1, "sandboxer_gateway_http_requests_total", "route", "POST /v1/sandboxes", "code", "422")
	want(5, "sandboxer_gateway_http_request_duration_seconds", "route", "POST /v1/sandboxes")

	// The two commands wait in the echo pool's durable; gitecho has none,
	// so its queue is left out rather than reported empty.
	want(2, "sandboxer_pool_pending_commands", "extension", "echo")
	want(0, "sandboxer_pool_in_flight_commands", "extension", "echo")
	if _, ok := series(t, reg, "sandboxer_pool_pending_commands", "extension", "gitecho"); ok {
		t.Error("a pool without its durable has a queue depth")
	}

	// One sandbox provisions, and stays so past the deadlines.
	e.advance(t, ids[0], event.StateProvisioning)
	await(t, "the inventory to see the provisioning sandbox", func() bool {
		v, _ := series(t, reg, "sandboxer_sandboxes", "state", "provisioning")
		return v == 1
	})
	want(1, "sandboxer_sandboxes", "state", "requested")
	want(2, "sandboxer_sandboxes", "state", "rejected")
	want(0, "sandboxer_sandboxes_past_deadline", "state", "provisioning")
	clock.Add(int64(11 * time.Minute)) // the default provision and ready deadlines: 5m each
	want(1, "sandboxer_sandboxes_past_deadline", "state", "provisioning")
	want(1, "sandboxer_sandboxes_past_deadline", "state", "requested")
	want(0, "sandboxer_sandboxes_past_deadline", "state", "destroying")

	resp, err := http.Get(e.hs.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `sandboxer_gateway_admissions_total{outcome="admitted"} 2`) {
		t.Errorf("GET /metrics: %d\n%s", resp.StatusCode, body)
	}
}

// TestMetricsNotServed: without a registry, /metrics is not served.
func TestMetricsNotServed(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	resp, err := http.Get(e.hs.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("GET /metrics without a registry: %d, want 404", resp.StatusCode)
	}
}
