package bench

import "fmt"

// Target is one performance target of docs/performance.md checked on the
// figures of one run: Value, a figure or the ratio of two, against Limit.
// Targets are ratios to the raw loop where they can be, so that they hold
// on any machine the run measures both on.
type Target struct {
	// Name names the target; a target the issue sets apart for free and
	// priced runs ends in _free or _priced.
	Name string `json:"name"`
	// Of says what Value is: a figure, or "a / b" of two.
	Of string `json:"of"`
	// Value is the run's.
	Value float64 `json:"value"`
	// Op is "<=" or ">=": the target is met when Value Op Limit.
	Op    string  `json:"op"`
	Limit float64 `json:"limit"`
	Met   bool    `json:"met"`
	// figure is the figure of the table the target is shown beside.
	figure string
}

// The limits of the targets (issue 12, "Targets").
const (
	// A lifecycle's floor is about 12 messages: two commands, four
	// events, their acks.
	limitBusMsgsFree   = 16
	limitBusMsgsPriced = 22
	// Lifecycles per second at least a quarter of raw loops per second.
	limitLifecyclesPerRawLoop = 0.25
	// Create to ready within 3 raw loops, at p50 and at p99.
	limitCreateReadyXRaw = 3
	// Metering folds at least one event per raw loop.
	limitMeteringPerRawLoop = 1
	// The resident set of a process holding 10k live sandboxes.
	limitRSSMB10k = 150
)

// Targets checks r's figures against the targets. A target whose figures
// a run did not measure (a phase left out with --only) is left out.
func Targets(r *Result) []Target {
	mode := "_free"
	busLimit := float64(limitBusMsgsFree)
	if r.Priced {
		mode, busLimit = "_priced", limitBusMsgsPriced
	}
	var ts []Target
	add := func(figure, name, of string, value float64, op string, limit float64, measured bool) {
		if !measured {
			return
		}
		met := value <= limit
		if op == ">=" {
			met = value >= limit
		}
		ts = append(ts, Target{Name: name, Of: of, Value: value, Op: op, Limit: limit, Met: met, figure: figure})
	}
	ratio := func(a, b float64) float64 {
		if b == 0 {
			return 0
		}
		return a / b
	}
	add("bus_msgs_per_lifecycle", "bus_msgs_per_lifecycle"+mode, "bus_msgs_per_lifecycle",
		r.BusMsgsPerLifecycle, "<=", busLimit, r.BusMsgsPerLifecycle > 0)
	add("lifecycles_per_s", "lifecycles_per_raw_loop", "lifecycles_per_s / raw_loops_per_s",
		ratio(r.LifecyclesPerS, r.RawLoopsPerS), ">=", limitLifecyclesPerRawLoop, r.LifecyclesPerS > 0 && r.RawLoopsPerS > 0)
	add("create_ready_p50_us", "create_ready_p50_x_raw", "create_ready_p50_us / raw_loop_p50_us",
		ratio(r.CreateReadyP50us, r.RawLoopP50us), "<=", limitCreateReadyXRaw, r.CreateReadyP50us > 0 && r.RawLoopP50us > 0)
	add("create_ready_p99_us", "create_ready_p99_x_raw", "create_ready_p99_us / raw_loop_p99_us",
		ratio(r.CreateReadyP99us, r.RawLoopP99us), "<=", limitCreateReadyXRaw, r.CreateReadyP99us > 0 && r.RawLoopP99us > 0)
	add("metering_events_per_s", "metering_events_per_raw_loop", "metering_events_per_s / raw_loops_per_s",
		ratio(r.MeteringEventsPerS, r.RawLoopsPerS), ">=", limitMeteringPerRawLoop, r.MeteringEventsPerS > 0 && r.RawLoopsPerS > 0)
	add("rss_mb_10k", "rss_mb_10k"+mode, "rss_mb_10k",
		r.RSSMB10k, "<=", limitRSSMB10k, r.RSSMB10k > 0)
	return ts
}

// Missed returns the targets of r not met.
func (r *Result) Missed() []Target {
	var out []Target
	for _, t := range r.Targets {
		if !t.Met {
			out = append(out, t)
		}
	}
	return out
}

// String is the target as the table shows it beside its figure.
func (t Target) String() string {
	verdict := "met"
	if !t.Met {
		verdict = "MISSED"
	}
	if t.Of == t.figure {
		return fmt.Sprintf("%s %g: %s", t.Op, t.Limit, verdict)
	}
	return fmt.Sprintf("%s = %.3g %s %g: %s", t.Of, t.Value, t.Op, t.Limit, verdict)
}
