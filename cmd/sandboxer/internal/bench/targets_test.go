package bench

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

// TestTargets: each target is its ratio of the run's figures against its
// limit, met or not on either side of the limit; free and priced runs
// have their own message and memory targets; a target of a phase that did
// not run is left out.
func TestTargets(t *testing.T) {
	t.Parallel()
	r := &Result{
		RawLoopP50us: 500, RawLoopP99us: 1000, RawLoopsPerS: 4000,
		CreateReadyP50us: 1400, CreateReadyP99us: 3100,
		LifecyclesPerS: 1000, MeteringEventsPerS: 3999,
		BusMsgsPerLifecycle: 16, RSSMB10k: 151,
	}
	want := map[string]struct {
		value float64
		met   bool
	}{
		"bus_msgs_per_lifecycle_free":  {16, true},
		"lifecycles_per_raw_loop":      {0.25, true},
		"create_ready_p50_x_raw":       {2.8, true},
		"create_ready_p99_x_raw":       {3.1, false},
		"metering_events_per_raw_loop": {3999.0 / 4000, false},
		"rss_mb_10k_free":              {151, false},
	}
	got := Targets(r)
	if len(got) != len(want) {
		t.Fatalf("%d targets %+v, want %d", len(got), got, len(want))
	}
	for _, tg := range got {
		w, ok := want[tg.Name]
		if !ok {
			t.Errorf("unexpected target %s", tg.Name)
			continue
		}
		if d := tg.Value - w.value; d > 1e-9 || d < -1e-9 || tg.Met != w.met {
			t.Errorf("%s = %g met %v, want %g met %v", tg.Name, tg.Value, tg.Met, w.value, w.met)
		}
	}

	r.Priced, r.BusMsgsPerLifecycle = true, 21
	for _, tg := range Targets(r) {
		if strings.HasSuffix(tg.Name, "_free") {
			t.Errorf("priced run has the free target %s", tg.Name)
		}
		if tg.Name == "bus_msgs_per_lifecycle_priced" && (tg.Limit != 22 || !tg.Met) {
			t.Errorf("priced messages: %+v, want 21 <= 22 met", tg)
		}
	}

	// --only raw,memory: no ratio of a figure not measured.
	only := Targets(&Result{RawLoopP50us: 500, RawLoopsPerS: 4000, RSSMB10k: 100})
	if len(only) != 1 || only[0].Name != "rss_mb_10k_free" || !only[0].Met {
		t.Errorf("targets of raw and memory only: %+v, want rss_mb_10k_free met", only)
	}
}

// TestResultJSON: the targets are in the JSON beside the figures, and in
// the table beside theirs.
func TestResultJSON(t *testing.T) {
	t.Parallel()
	r := &Result{RawLoopP50us: 500, CreateReadyP50us: 2000, Mode: "quick"}
	r.Targets = Targets(r)
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	var out struct {
		CreateReadyP50us float64 `json:"create_ready_p50_us"`
		Targets          []struct {
			Name  string  `json:"name"`
			Value float64 `json:"value"`
			Limit float64 `json:"limit"`
			Op    string  `json:"op"`
			Met   *bool   `json:"met"`
		} `json:"targets"`
	}
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	if out.CreateReadyP50us != 2000 || len(out.Targets) != 1 {
		t.Fatalf("json %s", b)
	}
	if tg := out.Targets[0]; tg.Name != "create_ready_p50_x_raw" || tg.Value != 4 || tg.Limit != 3 || tg.Op != "<=" || tg.Met == nil || *tg.Met {
		t.Errorf("target in json %+v, want create_ready_p50_x_raw 4 <= 3 missed", tg)
	}
	var table bytes.Buffer
	Print(&table, r)
	if !strings.Contains(table.String(), "create_ready_p50_us / raw_loop_p50_us = 4 <= 3: MISSED") || !strings.Contains(table.String(), "targets: 0 of 1 met") {
		t.Errorf("table:\n%s", table.String())
	}
}
