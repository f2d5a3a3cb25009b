package sandbox_test

import (
	"bytes"
	"errors"
	"fmt"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"pgregory.net/rapid"

	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const id = "sbx-1"

var (
	t0  = time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)
	ref = event.Ref{SandboxID: id, Consumer: "team-a", Profile: "local", Extension: "local"}
)

func requested() *sandbox.Record {
	return sandbox.NewRequested(event.Create{
		Ref: ref, Inputs: map[string]string{"repo": "https://h/r"}, Labels: map[string]string{"team": "a"},
		TTLSeconds: 60, RequestedAt: t0, Hold: "hold-1",
	})
}

// at is the time of the event entering state s: later states, later
// times, so the order of a valid sequence is the order of its times.
func at(s event.State) time.Time { return t0.Add(time.Duration(s.Rank()+1) * time.Minute) }

var handle = event.Handle{SandboxID: id, Host: "h1", Data: map[string]string{"dir": "/w/sbx-1"}}

// payload is the data of the event entering s.
func payload(s event.State) any {
	r := ref
	r.Host = "h1"
	switch s {
	case event.StateProvisioning:
		return event.Provisioning{Ref: r, Worker: "w1", Attempt: 1}
	case event.StateReady:
		return event.Ready{Ref: r, Handle: handle, Reachability: event.Reachability{Host: "h1", SSH: "u@h1"},
			TTLSeconds: 120, ReadyAt: at(s), ExpiresAt: at(s).Add(2 * time.Minute)}
	case event.StateFailed:
		return event.Failed{Ref: r, Phase: "wait_ready", Reason: "ssh: connection refused", Handle: &handle}
	case event.StateExpired:
		return event.Expired{Ref: r, Reason: event.ReasonExpired, ExpiredAt: at(s)}
	case event.StateDestroying:
		return event.Destroying{Ref: r, Reason: event.ReasonRequested}
	case event.StateDestroyed:
		return event.Destroyed{Ref: r, Reason: event.ReasonRequested, Cleanup: event.CleanupReport{Removed: []string{"/w/sbx-1"}}}
	case event.StateRejected:
		return event.Rejected{Ref: ref, Code: "insufficient_credits", Reason: "balance 0"}
	case event.StateOrphaned:
		return event.Orphaned{Ref: r, Reason: string(event.StateDestroyed), Handle: handle, Held: []string{"dir:/w/sbx-1"}, Worker: "w2"}
	}
	panic("no event enters " + string(s))
}

// fataler is what both *testing.T and *rapid.T offer.
type fataler interface {
	Helper()
	Fatal(args ...any)
	Fatalf(format string, args ...any)
}

func lifecycle(t fataler, s event.State, data any) *event.Event {
	t.Helper()
	e, err := event.New(event.LifecycleType(s), "sandboxer/test", id, id+"."+string(s), data)
	if err != nil {
		t.Fatal(err)
	}
	e.SetTime(at(s))
	return e
}

func ev(t fataler, s event.State) *event.Event { return lifecycle(t, s, payload(s)) }

func apply(t fataler, r *sandbox.Record, s event.State) bool {
	t.Helper()
	changed, err := sandbox.Apply(r, ev(t, s))
	if err != nil {
		t.Fatalf("Apply %s: %v", s, err)
	}
	return changed
}

func states(r *sandbox.Record) []event.State {
	var out []event.State
	for _, h := range r.History {
		out = append(out, h.State)
	}
	return out
}

func TestNewRequested(t *testing.T) {
	t.Parallel()
	r := requested()
	want := &sandbox.Record{ID: id, Consumer: "team-a", Profile: "local", Extension: "local", State: event.StateRequested,
		Labels: map[string]string{"team": "a"}, Inputs: map[string]string{"repo": "https://h/r"}, TTLSeconds: 60, Hold: "hold-1",
		CreatedAt: t0, UpdatedAt: t0, History: []sandbox.Transition{{State: event.StateRequested, At: t0}}}
	if !reflect.DeepEqual(r, want) {
		t.Errorf("NewRequested =\n%+v\nwant\n%+v", r, want)
	}
	if r.Ref() != ref {
		t.Errorf("Ref = %+v", r.Ref())
	}
	before := time.Now().UTC()
	if r := sandbox.NewRequested(event.Create{Ref: ref}); r.CreatedAt.Before(before) || r.CreatedAt.Location() != time.UTC {
		t.Errorf("a request without a time is stamped now in UTC, got %s", r.CreatedAt)
	}
}

func TestApply(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name  string
		path  []event.State
		check func(t *testing.T, r *sandbox.Record)
	}{
		{"provisioning", []event.State{event.StateProvisioning}, func(t *testing.T, r *sandbox.Record) {
			if r.Host != "h1" || r.UpdatedAt != at(event.StateProvisioning) || r.Handle != nil {
				t.Errorf("record %+v", r)
			}
		}},
		{"ready takes handle, reachability, times and TTL", []event.State{event.StateProvisioning, event.StateReady}, func(t *testing.T, r *sandbox.Record) {
			if !reflect.DeepEqual(*r.Handle, handle) || r.Reachability.SSH != "u@h1" || r.ReadyAt != at(event.StateReady) ||
				r.ExpiresAt != at(event.StateReady).Add(2*time.Minute) || r.TTLSeconds != 120 {
				t.Errorf("record %+v", r)
			}
		}},
		{"failed keeps the partial handle and the cause", []event.State{event.StateProvisioning, event.StateFailed}, func(t *testing.T, r *sandbox.Record) {
			if r.Handle == nil || r.Handle.Data["dir"] != "/w/sbx-1" || r.Reason != "ssh: connection refused" {
				t.Errorf("record %+v", r)
			}
		}},
		{"the failure reason survives teardown", []event.State{event.StateProvisioning, event.StateFailed, event.StateDestroying, event.StateDestroyed},
			func(t *testing.T, r *sandbox.Record) {
				if r.Reason != "ssh: connection refused" {
					t.Errorf("reason %q, want the failure's", r.Reason)
				}
			}},
		{"expired", []event.State{event.StateProvisioning, event.StateReady, event.StateExpired}, func(t *testing.T, r *sandbox.Record) {
			if r.Reason != event.ReasonExpired || r.Handle == nil {
				t.Errorf("record %+v", r)
			}
		}},
		{"destroyed drops reachability, keeps the handle", []event.State{event.StateProvisioning, event.StateReady, event.StateDestroying, event.StateDestroyed},
			func(t *testing.T, r *sandbox.Record) {
				if r.Reachability != nil || r.Handle == nil || r.DestroyedAt != at(event.StateDestroyed) || r.Reason != event.ReasonRequested {
					t.Errorf("record %+v", r)
				}
			}},
		{"rejected", []event.State{event.StateRejected}, func(t *testing.T, r *sandbox.Record) {
			if r.Code != "insufficient_credits" || r.Reason != "balance 0" || !r.State.Terminal() {
				t.Errorf("record %+v", r)
			}
		}},
		{"destroy before provisioning", []event.State{event.StateDestroying, event.StateDestroyed}, func(t *testing.T, r *sandbox.Record) {
			if r.DestroyedAt.IsZero() {
				t.Errorf("record %+v", r)
			}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			r := requested()
			for _, s := range tc.path {
				if !apply(t, r, s) {
					t.Fatalf("Apply %s reported no change", s)
				}
				if r.State != s {
					t.Fatalf("state %s after applying %s", r.State, s)
				}
			}
			if want := append([]event.State{event.StateRequested}, tc.path...); !slices.Equal(states(r), want) {
				t.Errorf("history %v, want %v", states(r), want)
			}
			if r.ID != id || r.Consumer != "team-a" || r.Hold != "hold-1" || r.Labels["team"] != "a" || r.CreatedAt != t0 {
				t.Errorf("request fields lost: %+v", r)
			}
			tc.check(t, r)
		})
	}
}

// TestApplyTwiceChangesNothing applies every event a second time, right
// after the first and after later events: nothing changes.
func TestApplyTwiceChangesNothing(t *testing.T) {
	t.Parallel()
	path := []event.State{event.StateProvisioning, event.StateReady, event.StateExpired, event.StateDestroying, event.StateDestroyed}
	r := requested()
	for i, s := range path {
		apply(t, r, s)
		for _, again := range path[:i+1] {
			before := r.Marshal()
			if apply(t, r, again) {
				t.Errorf("re-applying %s in state %s reported a change", again, r.State)
			}
			if after := r.Marshal(); !bytes.Equal(before, after) {
				t.Errorf("re-applying %s in state %s changed the record:\n%s\n%s", again, r.State, before, after)
			}
		}
	}
	// Nothing leaves a terminal state, not even a later-ranked event.
	rej := requested()
	apply(t, rej, event.StateRejected)
	before := rej.Marshal()
	for _, s := range path {
		if apply(t, rej, s) || !bytes.Equal(before, rej.Marshal()) {
			t.Errorf("%s changed a rejected sandbox", s)
		}
	}
}

func TestApplyErrors(t *testing.T) {
	t.Parallel()
	create, err := event.New(event.TypeCreate, "test", id, id+".create", event.Create{Ref: ref})
	if err != nil {
		t.Fatal(err)
	}
	other := payload(event.StateReady).(event.Ready)
	other.SandboxID, other.Handle.SandboxID = "sbx-other", "sbx-other"
	unknownField := lifecycle(t, event.StateDestroying, map[string]any{"sandbox_id": id, "reason": "r", "surprise": true})
	textData := ev(t, event.StateDestroying)
	_ = textData.SetData("text/plain", []byte("destroying"))
	cases := []struct {
		name string
		e    *event.Event
		want string
	}{
		{"not a lifecycle event", create, "is not a lifecycle event"},
		{"another sandbox's event", lifecycle(t, event.StateReady, other), `event for sandbox "sbx-other" applied to "sbx-1"`},
		{"unknown data field", unknownField, "surprise"},
		{"not JSON", textData, "datacontenttype"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			r := requested()
			apply(t, r, event.StateProvisioning)
			before := r.Marshal()
			changed, err := sandbox.Apply(r, tc.e)
			if !errors.Is(err, event.ErrMalformed) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Apply = %v, want ErrMalformed mentioning %q", err, tc.want)
			}
			if changed {
				t.Error("Apply reported a change with its error")
			}
			if after := r.Marshal(); !bytes.Equal(before, after) {
				t.Errorf("a refused event changed the record:\n%s\n%s", before, after)
			}
		})
	}
}

// TestApplyIgnoresOrphaned: an orphaned event is about what a backend
// left, not about a record: whatever the record's state, and with no
// record at all, it changes nothing and is not an error (the registry
// must not dead-letter it); only malformed data is refused.
func TestApplyIgnoresOrphaned(t *testing.T) {
	t.Parallel()
	unrouted := payload(event.StateOrphaned).(event.Orphaned)
	unrouted.Consumer, unrouted.Profile, unrouted.Reason = event.Unrouted, event.Unrouted, event.ReasonNoEvents
	for _, tc := range []struct {
		name string
		path []event.State
	}{
		{"no record", nil},
		{"requested", []event.State{}},
		{"ready", []event.State{event.StateProvisioning, event.StateReady}},
		{"destroyed", []event.State{event.StateProvisioning, event.StateReady, event.StateDestroying, event.StateDestroyed}},
		{"rejected", []event.State{event.StateRejected}},
	} {
		for name, data := range map[string]event.Orphaned{"its consumer": payload(event.StateOrphaned).(event.Orphaned), "no consumer": unrouted} {
			t.Run(tc.name+"/"+name, func(t *testing.T) {
				t.Parallel()
				r := &sandbox.Record{}
				if tc.path != nil {
					r = requested()
				}
				for _, s := range tc.path {
					apply(t, r, s)
				}
				before := r.Marshal()
				changed, err := sandbox.Apply(r, lifecycle(t, event.StateOrphaned, data))
				if err != nil || changed {
					t.Fatalf("Apply(orphaned) = %v, %v; want no change, no error", changed, err)
				}
				if after := r.Marshal(); !bytes.Equal(before, after) {
					t.Errorf("an orphaned event changed the record:\n%s\n%s", before, after)
				}
			})
		}
	}
	bad := lifecycle(t, event.StateOrphaned, map[string]any{"sandbox_id": id, "surprise": true})
	if _, err := sandbox.Apply(requested(), bad); !errors.Is(err, event.ErrMalformed) {
		t.Errorf("Apply(malformed orphaned) = %v, want ErrMalformed", err)
	}
}

// TestApplyToEmptyRecord is the inventory hearing of a sandbox first from
// a lifecycle event (its create was never seen).
func TestApplyToEmptyRecord(t *testing.T) {
	t.Parallel()
	var r sandbox.Record
	if !apply(t, &r, event.StateReady) {
		t.Fatal("no change")
	}
	if r.ID != id || r.Consumer != "team-a" || r.Profile != "local" || r.Extension != "local" || r.Host != "h1" ||
		r.CreatedAt != at(event.StateReady) || r.State != event.StateReady || !slices.Equal(states(&r), []event.State{event.StateReady}) {
		t.Errorf("record %+v", r)
	}
}

func TestMarshalRoundTrip(t *testing.T) {
	t.Parallel()
	r := requested()
	for _, s := range []event.State{event.StateProvisioning, event.StateReady} {
		apply(t, r, s)
	}
	back, err := sandbox.Unmarshal(r.Marshal())
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(back, r) {
		t.Errorf("round trip:\n%+v\n%+v", back, r)
	}
	if _, err := sandbox.Unmarshal([]byte("{")); err == nil || !strings.HasPrefix(err.Error(), "decoding sandbox record: ") {
		t.Errorf("Unmarshal of bad JSON = %v", err)
	}
}

// validSequence draws a lifecycle a sandbox can go through after its
// request: a walk along the allowed transitions, possibly stopped early
// (a sandbox still alive).
func validSequence(t *rapid.T) []event.State {
	var seq []event.State
	cur := event.StateRequested
	for !cur.Terminal() {
		var next []event.State
		for _, s := range event.States {
			if event.CanTransition(cur, s) {
				next = append(next, s)
			}
		}
		if len(seq) > 0 && rapid.Bool().Draw(t, fmt.Sprintf("stop after %s", cur)) {
			break
		}
		cur = rapid.SampledFrom(next).Draw(t, fmt.Sprintf("after %s", cur))
		seq = append(seq, cur)
	}
	return seq
}

// TestApplyProperties: for any valid lifecycle, delivering its events
// with redeliveries (every event any number of times, a redelivery at any
// later point) ends in exactly the record in-order delivery gives; and
// delivering them in any order, duplicated, ends in the same final state
// with a history that has no duplicate and only moves forward. Apply's
// contract is that an event arriving after a later one changes nothing,
// so a reordered history may skip the states whose events came late.
func TestApplyProperties(t *testing.T) {
	t.Parallel()
	rapid.Check(t, func(rt *rapid.T) {
		seq := validSequence(rt)
		events := make([]*event.Event, len(seq))
		for i, s := range seq {
			events[i] = ev(rt, s)
		}
		inOrder := requested()
		for _, e := range events {
			if changed, err := sandbox.Apply(inOrder, e); err != nil || !changed {
				rt.Fatalf("in-order Apply %s: %v %v", e.Type(), changed, err)
			}
		}
		final := seq[len(seq)-1]

		// Redeliveries: order of first deliveries kept.
		var delivered []int
		for i := range events {
			n := rapid.IntRange(1, 3).Draw(rt, fmt.Sprintf("copies of %d", i))
			for range n {
				delivered = append(delivered, i)
			}
			for range rapid.IntRange(0, 2).Draw(rt, fmt.Sprintf("redeliveries after %d", i)) {
				delivered = append(delivered, rapid.IntRange(0, i).Draw(rt, "redelivered"))
			}
		}
		dup := requested()
		changes := 0
		for _, i := range delivered {
			changed, err := sandbox.Apply(dup, events[i])
			if err != nil {
				rt.Fatal(err)
			}
			if changed {
				changes++
			}
		}
		if changes != len(events) {
			rt.Errorf("%d changes for %d distinct events", changes, len(events))
		}
		if !bytes.Equal(dup.Marshal(), inOrder.Marshal()) {
			rt.Fatalf("redelivered:\n%s\nin order:\n%s", dup.Marshal(), inOrder.Marshal())
		}

		// Any order, duplicated.
		shuffled := rapid.Permutation(delivered).Draw(rt, "order")
		mixed := requested()
		for _, i := range shuffled {
			if _, err := sandbox.Apply(mixed, events[i]); err != nil {
				rt.Fatal(err)
			}
		}
		if mixed.State != final || mixed.UpdatedAt != at(final) {
			rt.Fatalf("final state %s at %s, want %s at %s", mixed.State, mixed.UpdatedAt, final, at(final))
		}
		hist := states(mixed)
		if hist[0] != event.StateRequested || hist[len(hist)-1] != final {
			rt.Fatalf("history %v", hist)
		}
		for i := 1; i < len(hist); i++ {
			if hist[i].Rank() <= hist[i-1].Rank() {
				rt.Fatalf("history %v goes back or repeats", hist)
			}
			if !slices.Contains(seq, hist[i]) {
				rt.Fatalf("history %v holds %s, not in %v", hist, hist[i], seq)
			}
		}
	})
}

func TestNewID(t *testing.T) {
	t.Parallel()
	shape := regexp.MustCompile(`^sbx-[0-9a-v]{26}$`)
	seen := make(map[string]bool, 10000)
	for range 10000 {
		s := sandbox.NewID()
		if !shape.MatchString(s) || !event.ValidName(s) {
			t.Fatalf("NewID = %q: want sbx- and 26 lower-case base32hex characters, a valid name", s)
		}
		if seen[s] {
			t.Fatalf("NewID repeated %q", s)
		}
		seen[s] = true
	}

	// Time-ordered: an id from a later millisecond sorts after.
	a := sandbox.NewID()
	start := time.Now().UnixMilli()
	deadline := time.Now().Add(time.Second)
	for time.Now().UnixMilli() <= start+1 && time.Now().Before(deadline) {
	}
	if b := sandbox.NewID(); b <= a {
		t.Errorf("NewID %q from a later millisecond does not sort after %q", b, a)
	}
}

func TestRecordListed(t *testing.T) {
	t.Parallel()
	const week = 7 * 24 * time.Hour
	now := t0.Add(30 * 24 * time.Hour)
	for _, tc := range []struct {
		state     event.State
		updated   time.Time
		retention time.Duration
		want      bool
	}{
		{event.StateReady, t0, week, true},
		{event.StateDestroying, t0, week, true},
		{event.StateDestroyed, t0, week, false},
		{event.StateDestroyed, now.Add(-time.Hour), week, true},
		{event.StateRejected, t0, week, false},
		{event.StateDestroyed, t0, -1, true},
	} {
		if got := (&sandbox.Record{State: tc.state, UpdatedAt: tc.updated}).Listed(now, tc.retention); got != tc.want {
			t.Errorf("Listed of a %s record updated %s ago with retention %s = %v, want %v", tc.state, now.Sub(tc.updated), tc.retention, got, tc.want)
		}
	}
}

// TestApplyRequested: the requested event is a record's first: it gives
// what the create asked for, and a second one changes nothing.
func TestApplyRequested(t *testing.T) {
	t.Parallel()
	e := lifecycle(t, event.StateRequested, event.RequestedOf(event.Create{
		Ref: ref, Labels: map[string]string{"team": "a"}, Inputs: map[string]string{"repo": "r"}, TTLSeconds: 60, RequestedAt: t0, Hold: "h-1",
	}, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"))
	e.SetTime(t0.Add(time.Second))
	var r sandbox.Record
	changed, err := sandbox.Apply(&r, e)
	if err != nil || !changed {
		t.Fatalf("Apply(requested) = %v, %v; want true, nil", changed, err)
	}
	if r.ID != ref.SandboxID || r.State != event.StateRequested || r.Labels["team"] != "a" || r.Inputs["repo"] != "r" ||
		r.TTLSeconds != 60 || r.Hold != "h-1" || r.Trace == "" || !r.CreatedAt.Equal(t0) || len(r.History) != 1 {
		t.Fatalf("record after requested = %+v", r)
	}
	if changed, err := sandbox.Apply(&r, e); err != nil || changed {
		t.Fatalf("Apply(requested) again = %v, %v; want false, nil", changed, err)
	}
}

// TestApplyTeardownProgress: destroying events of later attempts and of
// failed teardowns keep the state and say how teardown goes; older news
// changes nothing, in any order.
func TestApplyTeardownProgress(t *testing.T) {
	t.Parallel()
	r := ref
	r.Host = "h1"
	step := func(attempt int, err string, min int) *event.Event {
		e := lifecycle(t, event.StateDestroying, event.Destroying{Ref: r, Reason: event.ReasonRequested, Attempt: attempt, Error: err})
		e.SetTime(t0.Add(time.Duration(min) * time.Minute))
		return e
	}
	cases := []struct {
		name        string
		events      []*event.Event
		attempt     int
		err         string
		failedAt    int // minutes after t0; 0: never failed
		stuck       bool
		wantChanges []bool
	}{
		{"first attempt failed", []*event.Event{step(0, "", 10), step(0, "boom 0", 11)}, 0, "boom 0", 11, true, []bool{true, true}},
		{"failure redelivered", []*event.Event{step(0, "", 10), step(0, "boom 0", 11), step(0, "boom 0", 11)}, 0, "boom 0", 11, true, []bool{true, true, false}},
		{"retry started", []*event.Event{step(0, "", 10), step(0, "boom 0", 11), step(1, "", 12)}, 1, "boom 0", 11, false, []bool{true, true, true}},
		{"retry failed", []*event.Event{step(0, "", 10), step(0, "boom 0", 11), step(1, "", 12), step(1, "boom 1", 13)}, 1, "boom 1", 13, true, []bool{true, true, true, true}},
		{"old failure after a newer attempt", []*event.Event{step(0, "", 10), step(1, "", 12), step(0, "boom 0", 11)}, 1, "", 0, false, []bool{true, true, false}},
		{"failure before its start", []*event.Event{step(0, "boom 0", 11), step(0, "", 10)}, 0, "boom 0", 11, true, []bool{true, false}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			rec := requested()
			apply(t, rec, event.StateProvisioning)
			apply(t, rec, event.StateReady)
			for i, e := range tc.events {
				changed, err := sandbox.Apply(rec, e)
				if err != nil {
					t.Fatal(err)
				}
				if changed != tc.wantChanges[i] {
					t.Errorf("event %d: changed = %v, want %v", i, changed, tc.wantChanges[i])
				}
			}
			if rec.State != event.StateDestroying {
				t.Fatalf("state = %s, want destroying", rec.State)
			}
			if got := states(rec); len(got) != 4 {
				t.Errorf("history = %v, want destroying entered once", got)
			}
			var failedAt time.Time
			if tc.failedAt > 0 {
				failedAt = t0.Add(time.Duration(tc.failedAt) * time.Minute)
			}
			if rec.DestroyAttempt != tc.attempt || rec.TeardownError != tc.err || !rec.TeardownFailedAt.Equal(failedAt) || rec.TeardownStuck() != tc.stuck {
				t.Errorf("attempt %d, error %q at %v, stuck %v; want %d, %q at %v, %v",
					rec.DestroyAttempt, rec.TeardownError, rec.TeardownFailedAt, rec.TeardownStuck(), tc.attempt, tc.err, failedAt, tc.stuck)
			}
			apply(t, rec, event.StateDestroyed)
			if rec.State != event.StateDestroyed || rec.TeardownStuck() {
				t.Errorf("after destroyed: state %s, stuck %v", rec.State, rec.TeardownStuck())
			}
		})
	}
}
