package saasstub_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/conformance"
	"github.com/sand-boxer/sandboxer/pkg/extension/saasstub"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// open configures the shipped manifest on a fresh data directory.
func open(t *testing.T, dir string) *saasstub.SaaSStub {
	t.Helper()
	m, ps := extension.LoadManifestFile("../../../extensions/ext.saas-stub.yaml")
	if len(ps) > 0 {
		t.Fatalf("shipped manifest: %v", ps)
	}
	if ps := saasstub.New().CheckManifest(m); len(ps) > 0 {
		t.Fatalf("shipped manifest: %v", ps)
	}
	ext, err := extension.NewRegistry(saasstub.Info).Open(context.Background(), m, extension.Env{DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	return ext.(*saasstub.SaaSStub)
}

func TestConformance(t *testing.T) {
	conformance.Run(t, conformance.Harness{
		New:     func(t *testing.T) extension.Extension { return open(t, t.TempDir()) },
		Profile: extension.Profile{Slug: "saas", Extension: "saas-stub"},
		Host:    "saas-stub",
		Instances: func(t *testing.T, ext extension.Extension, id string) int {
			return ext.(*saasstub.SaaSStub).Instances(id)
		},
	})
}

func TestShippedProfileBindsTheStub(t *testing.T) {
	t.Parallel()
	c, ps := extension.LoadCatalog("../../../extensions", "../../../profiles", nil)
	for _, p := range ps {
		if strings.Contains(p.File, "saas") {
			t.Errorf("problem: %v", p)
		}
	}
	p, err := c.Profile("saas")
	if err != nil {
		t.Fatal(err)
	}
	m, err := c.Extension(p.Extension)
	if err != nil {
		t.Fatal(err)
	}
	if m.Handler != saasstub.Handler || m.Capabilities.PricingModel != extension.PricingMetered {
		t.Fatalf("profile saas binds %s (handler %s, %s)", m.Name, m.Handler, m.Capabilities.PricingModel)
	}
}

// clock is a settable test clock.
type clock struct{ t time.Time }

func (c *clock) now() time.Time      { return c.t }
func (c *clock) add(d time.Duration) { c.t = c.t.Add(d) }

func TestEstimateCost(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		cfg  saasstub.Config
		d    time.Duration
		want int64
	}{
		{"start fee only at zero", saasstub.Config{StartFee: 50, PerStartedMinute: 20}, 0, 50},
		{"one started minute", saasstub.Config{StartFee: 50, PerStartedMinute: 20}, time.Second, 70},
		{"exact minutes", saasstub.Config{StartFee: 50, PerStartedMinute: 20}, 2 * time.Minute, 90},
		{"per second", saasstub.Config{PerSecond: 3}, 10*time.Second + time.Millisecond, 33},
		{"free", saasstub.Config{}, time.Hour, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s, err := saasstub.Open(tc.cfg, t.TempDir(), nil)
			if err != nil {
				t.Fatal(err)
			}
			q, err := s.EstimateCost(context.Background(), extension.Profile{}, tc.d)
			if err != nil {
				t.Fatal(err)
			}
			if q.Amount != tc.want || q.Duration != tc.d || len(q.Breakdown) == 0 {
				t.Fatalf("quote %+v, want amount %d for %s with a breakdown", q, tc.want, tc.d)
			}
		})
	}
}

func TestBadConfig(t *testing.T) {
	t.Parallel()
	for name, cfg := range map[string]saasstub.Config{
		"both rates":   {PerSecond: 1, PerStartedMinute: 1},
		"negative fee": {StartFee: -1},
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			if _, err := saasstub.Open(cfg, t.TempDir(), nil); err == nil {
				t.Fatalf("Open(%+v) succeeded", cfg)
			}
		})
	}
	m, ps := extension.ParseManifest("ext.x.yaml", []byte("name: x\nhandler: saas-stub\ncapabilities:\n  isolation_levels: [remote]\n  pricing_model: self-hosted\nconfig:\n  per_hour: 3\n"))
	if len(ps) > 0 {
		t.Fatal(ps)
	}
	got := saasstub.New().CheckManifest(m)
	if len(got) == 0 || !strings.Contains(extension.Problems(got).Error(), "per_hour") {
		t.Fatalf("CheckManifest = %v, want the unknown key reported", got)
	}
}

// TestMeterDiffersFromLifecycle: the provider bills its own sessions, by
// started minute and with a start fee, and a second worker sharing the
// state directory reads the same record.
func TestMeterDiffersFromLifecycle(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	clk := &clock{t: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)}
	cfg := saasstub.Config{StartFee: 50, PerStartedMinute: 20}
	a, err := saasstub.Open(cfg, dir, clk.now)
	if err != nil {
		t.Fatal(err)
	}
	b, err := saasstub.Open(cfg, dir, clk.now)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	id := conformance.NewSandboxID()
	h, err := a.Provision(ctx, extension.Profile{}, extension.Inputs{extension.InputSandboxID: id}, "")
	if err != nil {
		t.Fatal(err)
	}
	clk.add(2 * time.Second)
	readyAt := clk.t
	clk.add(61 * time.Second)
	destroyedAt := clk.t
	clk.add(2 * time.Second)
	if _, err := b.Teardown(ctx, h); err != nil { // another worker tears down
		t.Fatal(err)
	}
	usage := extension.Usage{ReadyAt: readyAt, DestroyedAt: destroyedAt}
	for name, s := range map[string]*saasstub.SaaSStub{"provisioner": a, "other worker": b} {
		r, err := s.MeterActual(ctx, h, usage)
		if err != nil {
			t.Fatal(err)
		}
		// 65s by its own clock: two started minutes and the fee; the
		// lifecycle saw 61s.
		if r.Amount != 90 || r.Quantity != 2 || r.Unit != "minute" {
			t.Fatalf("%s: reading %+v, want 90 for 2 minute", name, r)
		}
	}
	// A sandbox that never ran costs nothing.
	r, err := a.MeterActual(ctx, extension.Handle{SandboxID: conformance.NewSandboxID(), Host: "x"}, usage)
	if err != nil || r.Amount != 0 {
		t.Fatalf("never-ran reading %+v, %v", r, err)
	}
}
