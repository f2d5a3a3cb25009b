package extension_test

import (
	"strings"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/extension"
)

func TestProfilePrice(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		yaml    string
		want    *extension.Price
		problem string
	}{
		{name: "absent", yaml: "", want: nil},
		{name: "start and rate", yaml: "price:\n  start: 50\n  per_second: 2\n", want: &extension.Price{Start: 50, PerSecond: 2}},
		{name: "negative", yaml: "price:\n  start: -1\n", problem: "price.start"},
		{name: "too large", yaml: "price:\n  per_second: 2000000000\n", problem: "price.per_second"},
		{name: "fraction", yaml: "price:\n  per_second: 0.5\n", problem: "per_second"},
		{name: "unknown key", yaml: "price:\n  per_minute: 3\n", problem: "per_minute"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			src := "slug: p\nextension: e\n" + tc.yaml
			p, ps := extension.ParseProfile("profile.p.yaml", []byte(src))
			if tc.problem != "" {
				if len(ps) == 0 || !strings.Contains(ps.Error(), tc.problem) {
					t.Fatalf("problems = %v, want one about %s", ps, tc.problem)
				}
				return
			}
			if len(ps) > 0 {
				t.Fatalf("problems: %v", ps)
			}
			if (p.Price == nil) != (tc.want == nil) || (p.Price != nil && *p.Price != *tc.want) {
				t.Fatalf("price = %+v, want %+v", p.Price, tc.want)
			}
		})
	}
}

func TestPriceCost(t *testing.T) {
	t.Parallel()
	p := &extension.Price{Start: 10, PerSecond: 3}
	for _, tc := range []struct {
		name string
		p    *extension.Price
		d    time.Duration
		want int64
	}{
		{"nil is free", nil, time.Hour, 0},
		{"zero duration", p, 0, 10},
		{"negative duration", p, -time.Second, 10},
		{"whole seconds", p, 2 * time.Second, 16},
		{"started second counts", p, 2*time.Second + time.Millisecond, 19},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := tc.p.Cost(tc.d); got != tc.want {
				t.Fatalf("Cost(%s) = %d, want %d", tc.d, got, tc.want)
			}
		})
	}
}

func TestCharges(t *testing.T) {
	self := &extension.Manifest{Capabilities: extension.Capabilities{PricingModel: extension.PricingSelfHosted}}
	metered := &extension.Manifest{Capabilities: extension.Capabilities{PricingModel: extension.PricingMetered}}
	for _, tc := range []struct {
		name string
		p    *extension.Profile
		m    *extension.Manifest
		want bool
	}{
		{"self-hosted without a price", &extension.Profile{}, self, false},
		{"self-hosted priced at zero", &extension.Profile{Price: &extension.Price{}}, self, false},
		{"self-hosted with a start fee", &extension.Profile{Price: &extension.Price{Start: 1}}, self, true},
		{"self-hosted per second", &extension.Profile{Price: &extension.Price{PerSecond: 1}}, self, true},
		{"metered without a price", &extension.Profile{}, metered, true},
		{"unknown extension", &extension.Profile{}, nil, true},
		{"unknown profile", nil, self, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := extension.Charges(tc.p, tc.m); got != tc.want {
				t.Fatalf("Charges = %v, want %v", got, tc.want)
			}
		})
	}
}
