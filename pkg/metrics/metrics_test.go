package metrics_test

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"

	"github.com/sand-boxer/sandboxer/pkg/metrics"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func counter() *prometheus.CounterVec {
	return prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: metrics.Namespace, Name: "things_total", Help: "Things.",
	}, []string{"kind"})
}

// TestRegisterShares: two components registering the same family count
// into one; a nil registry registers nothing; a family registered again
// with other labels is a programmer's error.
func TestRegisterShares(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	a := metrics.Register(reg, counter())
	b := metrics.Register(reg, counter())
	if a != b {
		t.Fatal("the second registration got a collector of its own")
	}
	a.WithLabelValues("x").Inc()
	b.WithLabelValues("x").Inc()
	if got := testutil.ToFloat64(a.WithLabelValues("x")); got != 2 {
		t.Fatalf("shared counter = %v, want 2", got)
	}

	c := metrics.Register(nil, counter())
	c.WithLabelValues("y").Inc() // counts for nobody, and must not panic

	defer func() {
		if recover() == nil {
			t.Fatal("registering a family again with other labels did not panic")
		}
	}()
	metrics.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: metrics.Namespace, Name: "things_total", Help: "Things.",
	}, []string{"other"}))
}

// TestMux: /metrics serves the registry, /healthz always answers, /readyz
// says what is missing.
func TestMux(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	metrics.Register(reg, counter()).WithLabelValues("x").Inc()
	var not atomic.Pointer[[]string]
	not.Store(&[]string{})
	srv := httptest.NewServer(metrics.Mux(reg, func(context.Context) []string { return *not.Load() }))
	t.Cleanup(srv.Close)
	get := func(path string) (int, string) {
		t.Helper()
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode, string(b)
	}
	if code, body := get("/metrics"); code != 200 || !strings.Contains(body, `sandboxer_things_total{kind="x"} 1`) {
		t.Errorf("/metrics: %d\n%s", code, body)
	}
	if code, _ := get("/healthz"); code != 200 {
		t.Errorf("/healthz: %d", code)
	}
	if code, _ := get("/readyz"); code != 200 {
		t.Errorf("/readyz when ready: %d", code)
	}
	not.Store(&[]string{"nats not connected"})
	if code, body := get("/readyz"); code != 503 || !strings.Contains(body, "nats not connected") {
		t.Errorf("/readyz when not ready: %d %s", code, body)
	}
	if code, _ := get("/other"); code != 404 {
		t.Errorf("/other: %d, want 404", code)
	}
}
