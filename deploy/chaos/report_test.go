package main

import (
	"strings"
	"testing"
	"time"
)

func TestReportWrite(t *testing.T) {
	t.Parallel()
	r := &Report{
		Faults: []Row{
			{Fault: "kill -9 gateway-1", When: 75 * time.Second, Effect: "12 steps", Outcome: "healthy 2.0s after the fault ended"},
			{Fault: "pause", When: 3*time.Minute + 400*time.Millisecond, Effect: "x", Outcome: "not healthy again", Failed: true},
		},
		Checks:  []Row{{Fault: "0 lost", When: time.Second, Effect: "10 accepted, 0 lost", Outcome: "ok"}},
		Summary: []string{"wall time 3m1s"},
	}
	var b strings.Builder
	if err := r.Write(&b); err != nil {
		t.Fatal(err)
	}
	want := `fault              when    effect    outcome
-----------------  ------  --------  ----------------------------------
kill -9 gateway-1  +01:15  12 steps  healthy 2.0s after the fault ended
pause              +03:00  x         FAIL: not healthy again

check   when    found                outcome
------  ------  -------------------  -------
0 lost  +00:01  10 accepted, 0 lost  ok

wall time 3m1s
result: FAIL
`
	if got := b.String(); got != want {
		t.Errorf("report:\n%s\nwant:\n%s", got, want)
	}
}

func TestReportFailed(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		r    Report
		want bool
	}{
		{"empty", Report{}, false},
		{"all ok", Report{Faults: []Row{{Fault: "a"}}, Checks: []Row{{Fault: "b"}}}, false},
		{"a fault failed", Report{Faults: []Row{{Fault: "a", Failed: true}}}, true},
		{"a check failed", Report{Checks: []Row{{Fault: "b"}, {Fault: "c", Failed: true}}}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := tc.r.Failed(); got != tc.want {
				t.Errorf("Failed() = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestEffect(t *testing.T) {
	t.Parallel()
	t0 := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	ops := []Op{
		{At: t0.Add(-time.Second), Took: time.Hour, Failed: true}, // before the window
		{At: t0.Add(time.Second), Took: 2 * time.Second, Failovers: 1},
		{At: t0.Add(2 * time.Second), Took: 500 * time.Millisecond, Failed: true, Failovers: 2},
		{At: t0.Add(time.Minute), Took: 40 * time.Second},          // after it
		{At: t0.Add(time.Minute), Took: time.Minute, Failed: true}, // began within it
	}
	got := effect("n1 was leader", ops, t0, t0.Add(10*time.Second))
	if want := "n1 was leader; 3 steps, 2 failed, 3 failovers, slowest 60.0s"; got != want {
		t.Errorf("effect = %q, want %q", got, want)
	}
}

func TestSelectFaults(t *testing.T) {
	t.Parallel()
	faults := []Fault{{Name: "kill -9 gateway-1"}, {Name: "kill -9 registry"}, {Name: "rolling restart"}}
	for _, tc := range []struct{ only, want string }{
		{"", "kill -9 gateway-1,kill -9 registry,rolling restart"},
		{"none", ""},
		{"registry,rolling", "kill -9 registry,rolling restart"},
		{"kill", "kill -9 gateway-1,kill -9 registry"},
	} {
		var names []string
		for _, f := range selectFaults(faults, tc.only) {
			names = append(names, f.Name)
		}
		if got := strings.Join(names, ","); got != tc.want {
			t.Errorf("selectFaults(%q) = %q, want %q", tc.only, got, tc.want)
		}
	}
}
