package event_test

import (
	"strings"
	"testing"

	"github.com/sand-boxer/sandboxer/pkg/event"
)

// subjectMatches is NATS subject matching: '*' matches one token, '>' one
// or more trailing tokens.
func subjectMatches(filter, subject string) bool {
	f, s := strings.Split(filter, "."), strings.Split(subject, ".")
	for i, tok := range f {
		if tok == ">" {
			return len(s) > i
		}
		if i >= len(s) || (tok != "*" && tok != s[i]) {
			return false
		}
	}
	return len(f) == len(s)
}

func TestSubjectMatchesHelper(t *testing.T) {
	t.Parallel()
	cases := []struct {
		filter, subject string
		want            bool
	}{
		{"a.b", "a.b", true},
		{"a.*", "a.b", true},
		{"a.*", "a.b.c", false},
		{"a.>", "a.b.c", true},
		{"a.>", "a", false},
		{"a.b", "a.c", false},
	}
	for _, c := range cases {
		if got := subjectMatches(c.filter, c.subject); got != c.want {
			t.Errorf("subjectMatches(%q, %q) = %v, want %v", c.filter, c.subject, got, c.want)
		}
	}
}

func TestCommandSubjectRoundTrip(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name                               string
		extension, verb, consumer, sandbox string
	}{
		{"create", "local", event.VerbCreate, "dev", "sbx-01"},
		{"destroy", "compose-ssh", event.VerbDestroy, "team-a", "sbx-0123456789abcdefghijklmnop"},
		{"underscores and digits", "vm_packer2", event.VerbCreate, "t_1", "0_a"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			s := event.CommandSubject(c.extension, c.verb, c.consumer, c.sandbox)
			if want := "sandboxer.cmd." + c.extension + "." + c.verb + "." + c.consumer + "." + c.sandbox; s != want {
				t.Errorf("CommandSubject = %q, want %q", s, want)
			}
			ref := event.Ref{SandboxID: c.sandbox, Consumer: c.consumer, Extension: c.extension}
			if got := ref.CommandSubject(c.verb); got != s {
				t.Errorf("Ref.CommandSubject = %q, want %q", got, s)
			}
			cr, err := event.ParseCommandSubject(s)
			if err != nil {
				t.Fatal(err)
			}
			if cr != (event.CommandRef{Extension: c.extension, Verb: c.verb, Consumer: c.consumer, Sandbox: c.sandbox}) {
				t.Errorf("ParseCommandSubject = %+v", cr)
			}
			if !cr.Matches(ref) {
				t.Errorf("%+v does not match its own ref", cr)
			}
			if other := (event.Ref{SandboxID: c.sandbox, Consumer: c.consumer + "x", Extension: c.extension}); cr.Matches(other) {
				t.Errorf("%+v matches another consumer's ref", cr)
			}
			if !subjectMatches(event.CommandFilter(c.extension), s) {
				t.Errorf("CommandFilter(%q) does not match %q", c.extension, s)
			}
			if subjectMatches(event.CommandFilter(c.extension+"x"), s) {
				t.Errorf("another extension's filter matches %q", s)
			}
			if !subjectMatches(event.SubjectCommands, s) {
				t.Errorf("the commands stream does not capture %q", s)
			}
		})
	}
}

func TestHostCommandSubject(t *testing.T) {
	t.Parallel()
	ref := event.Ref{SandboxID: "sbx-01", Consumer: "dev", Extension: "local", Host: "ignored"}
	cases := []struct {
		name, host, want string
		matches, misses  []string // filters the subject matches, and must not
	}{
		{"bound to a host", "host-a", "sandboxer.cmd.local.destroy.dev.sbx-01.host-a",
			[]string{event.HostCommandFilter("local", "host-a"), event.CommandFilter("local"), event.SubjectCommands},
			[]string{event.UnplacedCommandFilter("local"), event.HostCommandFilter("local", "host-b"), event.HostCommandFilter("other", "host-a")}},
		{"unplaced", "", "sandboxer.cmd.local.destroy.dev.sbx-01",
			[]string{event.UnplacedCommandFilter("local"), event.CommandFilter("local"), event.SubjectCommands},
			[]string{event.HostCommandFilter("local", "host-a"), event.UnplacedCommandFilter("other")}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			s := ref.HostCommandSubject(event.VerbDestroy, c.host)
			if s != c.want {
				t.Fatalf("HostCommandSubject = %q, want %q", s, c.want)
			}
			if s != event.HostCommandSubject("local", event.VerbDestroy, "dev", "sbx-01", c.host) {
				t.Errorf("Ref.HostCommandSubject and HostCommandSubject disagree")
			}
			cr, err := event.ParseCommandSubject(s)
			if err != nil {
				t.Fatal(err)
			}
			if want := (event.CommandRef{Extension: "local", Verb: event.VerbDestroy, Consumer: "dev", Sandbox: "sbx-01", Host: c.host}); cr != want {
				t.Errorf("ParseCommandSubject = %+v, want %+v", cr, want)
			}
			if !cr.Matches(ref) {
				t.Errorf("%+v does not match its own ref", cr)
			}
			for _, f := range c.matches {
				if !subjectMatches(f, s) {
					t.Errorf("%q does not match %q", f, s)
				}
			}
			for _, f := range c.misses {
				if subjectMatches(f, s) {
					t.Errorf("%q matches %q", f, s)
				}
			}
		})
	}
}

func TestParseCommandSubjectErrors(t *testing.T) {
	t.Parallel()
	cases := []struct{ name, subject string }{
		{"empty", ""},
		{"lifecycle subject", "sandboxer.evt.dev.local.sbx-01.ready"},
		{"too few tokens", "sandboxer.cmd.local.create.sbx-01"},
		{"too many tokens", "sandboxer.cmd.local.create.dev.sbx-01.host-a.x"},
		{"invalid host", "sandboxer.cmd.local.destroy.dev.sbx-01.-a"},
		{"unknown verb", "sandboxer.cmd.local.restart.dev.sbx-01"},
		{"wrong root", "other.cmd.local.create.dev.sbx-01"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			if ref, err := event.ParseCommandSubject(c.subject); err == nil {
				t.Errorf("ParseCommandSubject(%q) = %+v, want an error", c.subject, ref)
			}
		})
	}
}

func TestLifecycleSubjectRoundTrip(t *testing.T) {
	t.Parallel()
	for _, s := range event.States {
		t.Run(string(s), func(t *testing.T) {
			t.Parallel()
			subj := event.LifecycleSubject("team-a", "compose-ssh", "sbx-01", s)
			if want := "sandboxer.evt.team-a.compose-ssh.sbx-01." + string(s); subj != want {
				t.Errorf("LifecycleSubject = %q, want %q", subj, want)
			}
			ref := event.Ref{SandboxID: "sbx-01", Consumer: "team-a", Extension: "compose-ssh"}
			if got := ref.LifecycleSubject(s); got != subj {
				t.Errorf("Ref.LifecycleSubject = %q, want %q", got, subj)
			}
			lr, err := event.ParseLifecycleSubject(subj)
			if err != nil {
				t.Fatal(err)
			}
			if lr != (event.LifecycleRef{Consumer: "team-a", Extension: "compose-ssh", Sandbox: "sbx-01", State: s}) {
				t.Errorf("ParseLifecycleSubject = %+v", lr)
			}
			if !lr.Matches(ref) {
				t.Errorf("%+v does not match its own ref", lr)
			}
			if !subjectMatches(event.SandboxFilter("sbx-01"), subj) || subjectMatches(event.SandboxFilter("sbx-02"), subj) {
				t.Errorf("SandboxFilter does not select exactly sbx-01's %q", subj)
			}
			if !subjectMatches(ref.RefFilter(), subj) {
				t.Errorf("RefFilter does not match %q", subj)
			}
			if !subjectMatches(event.ConsumerLifecycleFilter("team-a"), subj) || subjectMatches(event.ConsumerLifecycleFilter("team-b"), subj) {
				t.Errorf("ConsumerLifecycleFilter does not select exactly team-a's %q", subj)
			}
			if !subjectMatches(event.ExtensionLifecycleFilter("compose-ssh"), subj) || subjectMatches(event.ExtensionLifecycleFilter("local"), subj) {
				t.Errorf("ExtensionLifecycleFilter does not select exactly compose-ssh's %q", subj)
			}
			if f := event.ExtensionSandboxFilter("compose-ssh", "sbx-01"); !subjectMatches(f, subj) {
				t.Errorf("ExtensionSandboxFilter does not match %q", subj)
			}
			for _, other := range []string{
				event.LifecycleSubject("team-a", "local", "sbx-01", s), event.LifecycleSubject("team-a", "compose-ssh", "sbx-010", s),
			} {
				if subjectMatches(event.ExtensionSandboxFilter("compose-ssh", "sbx-01"), other) {
					t.Errorf("ExtensionSandboxFilter of compose-ssh's sbx-01 matches %q", other)
				}
			}
			if !subjectMatches(event.ExtensionLifecycleFilter("compose-ssh"), event.ExtensionSandboxFilter("compose-ssh", "sbx-01")) {
				t.Error("ExtensionSandboxFilter is not within what a pool may read")
			}
			if !subjectMatches(event.StateFilter(s), subj) {
				t.Errorf("StateFilter(%s) does not match %q", s, subj)
			}
			if !subjectMatches(event.SubjectLifecycle, subj) {
				t.Errorf("the lifecycle stream does not capture %q", subj)
			}
		})
	}
}

func TestParseLifecycleSubjectErrors(t *testing.T) {
	t.Parallel()
	cases := []struct{ name, subject string }{
		{"empty", ""},
		{"command subject", "sandboxer.cmd.local.create.dev.sbx-01"},
		{"unknown state", "sandboxer.evt.dev.local.sbx-01.exploded"},
		{"too few tokens", "sandboxer.evt.local.sbx-01.ready"},
		{"too many tokens", "sandboxer.evt.dev.local.sbx-01.ready.x"},
		{"wrong root", "x.evt.dev.local.sbx-01.ready"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			if ref, err := event.ParseLifecycleSubject(c.subject); err == nil {
				t.Errorf("ParseLifecycleSubject(%q) = %+v, want an error", c.subject, ref)
			}
		})
	}
}

func TestRequestSubject(t *testing.T) {
	t.Parallel()
	for _, verb := range []string{event.VerbCreate, event.VerbDestroy, event.VerbGet} {
		s := event.RequestSubject("team-a", verb)
		if want := "sandboxer.req.team-a." + verb; s != want {
			t.Errorf("RequestSubject = %q, want %q", s, want)
		}
		r, err := event.ParseRequestSubject(s)
		if err != nil || r != (event.RequestRef{Consumer: "team-a", Verb: verb}) {
			t.Errorf("ParseRequestSubject(%q) = %+v, %v", s, r, err)
		}
		if !subjectMatches(event.RequestFilter, s) || !subjectMatches(event.SubjectRequests, s) {
			t.Errorf("request filters do not match %q", s)
		}
	}
	for _, bad := range []string{"sandboxer.req.team-a", "sandboxer.req.team-a.restart", "sandboxer.req.Team.create", "sandboxer.req._.create", "sandboxer.req.a.create.x", "x.req.a.create"} {
		if r, err := event.ParseRequestSubject(bad); err == nil {
			t.Errorf("ParseRequestSubject(%q) = %+v, want an error", bad, r)
		}
	}
	if event.ValidName(event.Unrouted) {
		t.Errorf("Unrouted %q is a valid name: an extension could be called that", event.Unrouted)
	}
}

// TestStreamsCaptureTheirSubjects checks every subject builder against
// the stream meant to hold it, and that no stream captures another's
// subjects or a request-reply subject (a stream capturing an RPC subject
// would answer the request itself with a publish ack).
func TestStreamsCaptureTheirSubjects(t *testing.T) {
	t.Parallel()
	streams := map[string]string{
		event.StreamCommands:  event.SubjectCommands,
		event.StreamLifecycle: event.SubjectLifecycle,
		event.StreamMetering:  event.SubjectMetering,
		event.StreamDLQ:       event.SubjectDLQ,
		event.StreamTimers:    event.SubjectTimers,
	}
	cases := []struct {
		subject, stream string
	}{
		{event.CommandSubject("local", event.VerbCreate, "dev", "sbx-1"), event.StreamCommands},
		{event.LifecycleSubject("dev", "local", "sbx-1", event.StateReady), event.StreamLifecycle},
		{event.RequestSubject("dev", event.VerbCreate), ""},
		{event.MeteringSubject("team-a", "debit"), event.StreamMetering},
		{event.DLQSubject(event.StreamCommands, "local"), event.StreamDLQ},
		{event.ExpiryScheduleSubject("sbx-1"), event.StreamTimers},
		{event.ExpiryFireSubject("sbx-1"), event.StreamTimers},
		{event.AccrualScheduleSubject("sbx-1"), event.StreamTimers},
		{event.AccrualFireSubject("sbx-1"), event.StreamTimers},
		{event.RetryScheduleSubject("sbx-1"), event.StreamTimers},
		{event.RetryFireSubject("sbx-1"), event.StreamTimers},
		{event.HoldDeadlineScheduleSubject("sbx-1"), event.StreamTimers},
		{event.HoldDeadlineFireSubject("sbx-1"), event.StreamTimers},
		{event.SubjectCatalog, ""},
		{event.SubjectWorkers, ""},
		{event.SubjectMeteringHold, ""},
		{event.SubjectMeteringGrant, ""},
		{event.SubjectMeteringBalance, ""},
		{event.SubjectMeteringLedger, ""},
		{event.SubjectMeteringUsage, ""},
		{event.QuoteSubject("saas-stub"), ""},
	}
	for _, c := range cases {
		for name, filter := range streams {
			if got := subjectMatches(filter, c.subject); got != (name == c.stream) {
				t.Errorf("stream %s (%s) captures %q: %v, want %v", name, filter, c.subject, got, name == c.stream)
			}
		}
	}
	if !subjectMatches(event.ExpiryFireFilter, event.ExpiryFireSubject("sbx-1")) || subjectMatches(event.ExpiryFireFilter, event.ExpiryScheduleSubject("sbx-1")) {
		t.Error("ExpiryFireFilter must match fired expiries only")
	}
	if !subjectMatches(event.AccrualFireFilter, event.AccrualFireSubject("sbx-1")) || subjectMatches(event.AccrualFireFilter, event.AccrualScheduleSubject("sbx-1")) {
		t.Error("AccrualFireFilter must match fired accruals only")
	}
	if subjectMatches(event.ExpiryFireFilter, event.AccrualFireSubject("sbx-1")) || subjectMatches(event.AccrualFireFilter, event.ExpiryFireSubject("sbx-1")) {
		t.Error("expiry and accrual fire filters overlap")
	}
	// The timers stream is a work queue: its durables' filters must not
	// overlap, and no filter may take a schedule before it fires.
	fires := map[string]string{
		event.ExpiryFireFilter: event.ExpiryFireSubject("sbx-1"), event.AccrualFireFilter: event.AccrualFireSubject("sbx-1"),
		event.RetryFireFilter: event.RetryFireSubject("sbx-1"), event.HoldDeadlineFireFilter: event.HoldDeadlineFireSubject("sbx-1"),
	}
	schedules := []string{event.ExpiryScheduleSubject("sbx-1"), event.AccrualScheduleSubject("sbx-1"),
		event.RetryScheduleSubject("sbx-1"), event.HoldDeadlineScheduleSubject("sbx-1")}
	for filter := range fires {
		for other, subj := range fires {
			if got := subjectMatches(filter, subj); got != (filter == other) {
				t.Errorf("fire filter %s matches %s: %v", filter, subj, got)
			}
		}
		for _, subj := range schedules {
			if subjectMatches(filter, subj) {
				t.Errorf("fire filter %s matches the schedule %s", filter, subj)
			}
		}
	}
}

// TestDestroyIDs: each attempt of a destroy has ids of its own, and the
// first keeps the ids of before attempts existed.
func TestDestroyIDs(t *testing.T) {
	t.Parallel()
	for _, c := range []struct{ got, want string }{
		{event.DestroyID("sbx-1", 0), "sbx-1.destroy"},
		{event.DestroyID("sbx-1", 3), "sbx-1.destroy.3"},
		{event.DestroyingID("sbx-1", 0), "sbx-1.destroying"},
		{event.DestroyingID("sbx-1", 2), "sbx-1.destroying.2"},
		{event.TeardownFailedID("sbx-1", 0), "sbx-1.teardown_failed.0"},
		{event.TeardownFailedID("sbx-1", 4), "sbx-1.teardown_failed.4"},
	} {
		if c.got != c.want {
			t.Errorf("id %q, want %q", c.got, c.want)
		}
	}
}

func TestValidName(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name  string
		value string
		want  bool
	}{
		{"simple", "local", true},
		{"digits first", "0abc", true},
		{"dash and underscore", "a-b_c", true},
		{"sandbox id", "sbx-0123456789abcdefghijklmnop", true},
		{"63 characters", strings.Repeat("a", 63), true},
		{"64 characters", strings.Repeat("a", 64), false},
		{"empty", "", false},
		{"upper case", "Local", false},
		{"leading dash", "-x", false},
		{"leading underscore", "_x", false},
		{"dot (subject separator)", "a.b", false},
		{"star wildcard", "a*", false},
		{"gt wildcard", "a>", false},
		{"space", "a b", false},
		{"slash", "a/b", false},
		{"shell metacharacter", "a;b", false},
		{"non-ASCII", "café", false},
		{"newline", "a\n", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			if got := event.ValidName(c.value); got != c.want {
				t.Errorf("ValidName(%q) = %v, want %v", c.value, got, c.want)
			}
			err := event.CheckName("extension name", c.value)
			if (err == nil) != c.want {
				t.Errorf("CheckName(%q) = %v", c.value, err)
			}
			if err != nil && !strings.Contains(err.Error(), "extension name") {
				t.Errorf("CheckName error %q does not name the kind", err)
			}
		})
	}
}

func TestStates(t *testing.T) {
	t.Parallel()
	for _, s := range event.States {
		if !s.Valid() {
			t.Errorf("%s not Valid", s)
		}
		typ := event.LifecycleType(s)
		if !strings.HasPrefix(string(typ), "dev.sandboxer.sandbox.") || !strings.HasSuffix(string(typ), ".v1") {
			t.Errorf("LifecycleType(%s) = %q", s, typ)
		}
		back, ok := event.StateOf(typ)
		if !ok || back != s {
			t.Errorf("StateOf(%s) = %s, %v; want %s", typ, back, ok, s)
		}
		if s.Rank() < 0 {
			t.Errorf("%s has no rank", s)
		}
	}
	for _, typ := range []event.Type{event.TypeCreate, event.TypeDestroy, event.TypeExpiry, "", "dev.sandboxer.sandbox.unknown.v1"} {
		if s, ok := event.StateOf(typ); ok {
			t.Errorf("StateOf(%q) = %s, want none", typ, s)
		}
	}
	if event.State("exploded").Valid() || event.State("exploded").Rank() != -1 {
		t.Error("an unknown state is valid or ranked")
	}
}

// TestOrphanedIsOutsideTheMachine: orphaned is a lifecycle state with its
// own event, terminal, ranked above every other state (a projection never
// moves back from it), and no transition enters it.
func TestOrphanedIsOutsideTheMachine(t *testing.T) {
	t.Parallel()
	s := event.StateOrphaned
	if !s.Valid() || !s.Terminal() || event.LifecycleType(s) != event.TypeOrphaned {
		t.Fatalf("orphaned: valid %v, terminal %v, type %q", s.Valid(), s.Terminal(), event.LifecycleType(s))
	}
	for _, other := range event.States {
		if other != s && other.Rank() >= s.Rank() {
			t.Errorf("%s ranks %d, not below orphaned's %d", other, other.Rank(), s.Rank())
		}
		if event.CanTransition(other, s) || event.CanTransition(s, other) {
			t.Errorf("a transition between %s and orphaned is allowed", other)
		}
	}
}

// TestTransitionsRaiseRank proves the property Apply relies on: every
// allowed transition moves to a strictly higher rank, terminal states have
// no way out, and every non-terminal state reaches destroyed or rejected.
func TestTransitionsRaiseRank(t *testing.T) {
	t.Parallel()
	for _, from := range event.States {
		exits := 0
		for _, to := range event.States {
			if !event.CanTransition(from, to) {
				continue
			}
			exits++
			if to.Rank() <= from.Rank() {
				t.Errorf("%s -> %s allowed but rank %d -> %d does not rise", from, to, from.Rank(), to.Rank())
			}
		}
		if from.Terminal() != (exits == 0) {
			t.Errorf("%s: Terminal() = %v with %d exits", from, from.Terminal(), exits)
		}
	}
	want := map[[2]event.State]bool{
		{event.StateRequested, event.StateRejected}:     true,
		{event.StateRequested, event.StateProvisioning}: true,
		{event.StateProvisioning, event.StateReady}:     true,
		{event.StateProvisioning, event.StateFailed}:    true,
		{event.StateReady, event.StateDestroying}:       true,
		{event.StateReady, event.StateExpired}:          true,
		{event.StateFailed, event.StateDestroying}:      true,
		{event.StateExpired, event.StateDestroying}:     true,
		{event.StateDestroying, event.StateDestroyed}:   true,
	}
	for tr := range want {
		if !event.CanTransition(tr[0], tr[1]) {
			t.Errorf("design transition %s -> %s not allowed", tr[0], tr[1])
		}
	}
	for _, bad := range [][2]event.State{
		{event.StateReady, event.StateProvisioning},
		{event.StateDestroyed, event.StateReady},
		{event.StateRejected, event.StateProvisioning},
		{event.StateFailed, event.StateReady},
		{event.StateReady, event.StateFailed},
		{event.StateExpired, event.StateReady},
	} {
		if event.CanTransition(bad[0], bad[1]) {
			t.Errorf("%s -> %s allowed", bad[0], bad[1])
		}
	}
}
