package extension_test

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// want is one expected problem: where it is and what it says.
type want struct {
	line, col int
	path      string
	msg       string
}

func (w want) String() string { return fmt.Sprintf("%d:%d %s: ...%s...", w.line, w.col, w.path, w.msg) }

// checkProblems fails t unless ps holds exactly the wanted problems, in
// any order, each in file.
func checkProblems(t *testing.T, file string, ps extension.Problems, wants []want) {
	t.Helper()
	left := slices.Clone([]extension.Problem(ps))
	for _, w := range wants {
		i := slices.IndexFunc(left, func(p extension.Problem) bool {
			return p.Line == w.line && p.Column == w.col && p.Path == w.path && strings.Contains(p.Message, w.msg)
		})
		if i < 0 {
			t.Errorf("missing problem %s", w)
			continue
		}
		if left[i].File != file {
			t.Errorf("problem %s in file %q, want %q", left[i], left[i].File, file)
		}
		left = slices.Delete(left, i, i+1)
	}
	for _, p := range left {
		t.Errorf("unexpected problem %d:%d %s: %s", p.Line, p.Column, p.Path, p.Message)
	}
}

const validManifest = `name: local
handler: local
capabilities:
  isolation_levels: [process]
  pricing_model: self-hosted
`

func TestParseManifestReportsEveryProblem(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name  string
		file  string
		yaml  string
		wants []want
	}{
		{"valid", "ext.local.yaml", validManifest, nil},
		{"valid without a file name", "", validManifest, nil},
		{"valid in a directory", "/etc/sandboxer/extensions/ext.local.yaml", validManifest, nil},
		{"everything wrong at once", "ext.bad.yaml", `name: Bad_Name
handler: ""
colour: blue
capabilities:
  isolation_levels: [process, teleport]
  pricing_model: free
  extra: 1
hosts: ["ok-host", "bad host"]
workers:
  concurrency: many
  ack_wait: 100ms
  backoff: [1s, soon]
inputs:
  repo:
    type: string
    format: url
    colour: red
  sandbox_id:
    type: string
  Bad:
    type: float
capacity:
  max_sandboxes: -1
`, []want{
			{1, 7, "name", `invalid extension name "Bad_Name"`},
			{2, 10, "handler", "required"},
			{3, 1, "colour", `unknown field "colour"`},
			{5, 31, "capabilities.isolation_levels[1]", `unknown isolation level "teleport"`},
			{6, 18, "capabilities.pricing_model", `unknown pricing model "free"`},
			{7, 3, "capabilities.extra", `unknown field "extra"`},
			{8, 20, "hosts[1]", `invalid host "bad host"`},
			{10, 16, "workers.concurrency", "cannot unmarshal !!str `many` into int"},
			{11, 13, "workers.ack_wait", "at least 1s"},
			{12, 17, "workers.backoff[1]", `invalid duration "soon"`},
			{15, 5, "inputs.repo", `format "url"`},
			{17, 5, "inputs.repo.colour", `unknown field "colour"`},
			{19, 5, "inputs.sandbox_id", "reserved input"},
			{21, 5, "inputs.Bad", `invalid input name "Bad"`},
			{21, 5, "inputs.Bad", `type "float"`},
			{23, 3, "capacity", "must not be negative"},
		}},
		{"host locality", "ext.local.yaml", `name: local
handler: local
capabilities:
  isolation_levels: [process]
  pricing_model: self-hosted
  locality: host
hosts: [host-a, box.example.com, host-a]
`, []want{
			{7, 17, "hosts[1]", `placement host "box.example.com" must be 1-63 of [a-z0-9_-]`},
			{7, 34, "hosts[2]", `host "host-a" is listed twice`},
		}},
		{"unknown locality", "ext.local.yaml", `name: local
handler: local
capabilities:
  isolation_levels: [process]
  pricing_model: self-hosted
  locality: everywhere
`, []want{
			{6, 13, "capabilities.locality", `unknown locality "everywhere"`},
		}},
		{"unknown keys at every depth", "ext.local.yaml", `name: local
handler: local
capabilities:
  isolation_levels: [process]
  pricing_model: self-hosted
  gpu: true
workers:
  retries: 3
inputs:
  repo:
    type: string
    validate: always
capacity:
  per_rack: 2
extra: {a: 1}
`, []want{
			{6, 3, "capabilities.gpu", `unknown field "gpu" (known: isolation_levels, locality, pricing_model)`},
			{8, 3, "workers.retries", `unknown field "retries"`},
			{12, 5, "inputs.repo.validate", `unknown field "validate"`},
			{14, 3, "capacity.per_rack", `unknown field "per_rack"`},
			{15, 1, "extra", `unknown field "extra"`},
		}},
		{"wrong types", "ext.local.yaml", `name: [local]
handler: local
capabilities:
  isolation_levels: process
  pricing_model: self-hosted
hosts: localhost
workers:
  max_deliver: 1.5
  ack_wait: {seconds: 30}
inputs:
  count:
    type: int
    min: low
    required: maybe
`, []want{
			{1, 7, "name", "cannot unmarshal !!seq into string"},
			{1, 7, "name", "required"},
			{4, 21, "capabilities.isolation_levels", "cannot unmarshal !!str `process` into []extension.IsolationLevel"},
			{4, 21, "capabilities.isolation_levels", "required: at least one of"},
			{6, 8, "hosts", "cannot unmarshal !!str `localhost` into []string"},
			{8, 16, "workers.max_deliver", "want an integer, got 1.5"},
			{9, 13, "workers.ack_wait", "want a duration"},
			{13, 10, "inputs.count.min", "cannot unmarshal !!str `low` into int64"},
			{14, 15, "inputs.count.required", "cannot unmarshal !!str `maybe` into bool"},
		}},
		{"name and file disagree", "extensions/ext.other.yaml", validManifest, []want{
			{1, 7, "name", "must be declared in ext.local.yaml, not ext.other.yaml"},
		}},
		{"required fields missing", "ext.x.yaml", "description: nothing else\n", []want{
			{1, 1, "name", "required"},
			{1, 1, "handler", "required"},
			{1, 1, "capabilities.isolation_levels", "required: at least one of"},
			{1, 1, "capabilities.pricing_model", "required: one of"},
		}},
		{"bad input specs", "ext.local.yaml", validManifest + `inputs:
  port:
    type: port
    format: word
    default: "99999"
  name:
    type: string
    pattern: "([a-z"
    max_length: -1
  cmd:
    type: string
    default: "rm -rf /"
`, []want{
			{16, 5, "inputs.cmd", "default: contains characters outside"},
			{12, 5, "inputs.name", "pattern: error parsing regexp"},
			{12, 5, "inputs.name", "max_length must not be negative"},
			{8, 5, "inputs.port", "format applies to string inputs only"},
			{8, 5, "inputs.port", "default: want a port 1-65535, got 99999"},
		}},
		{"negative worker settings", "ext.local.yaml", validManifest + `workers:
  concurrency: -1
  max_deliver: -2
capacity:
  per_host: -3
`, []want{
			{7, 16, "workers.concurrency", "must not be negative"},
			{8, 16, "workers.max_deliver", "must not be negative"},
			{10, 3, "capacity", "must not be negative"},
		}},
		{"negative in-flight capacity", "ext.local.yaml", validManifest + "capacity:\n  max_in_flight: -4\n", []want{
			{7, 18, "capacity.max_in_flight", "must not be negative (0 or absent: 256)"},
		}},
		{"fractional in-flight capacity", "ext.local.yaml", validManifest + "capacity:\n  max_in_flight: 2.5\n", []want{
			{7, 18, "capacity.max_in_flight", "want an integer, got 2.5"},
		}},
		{"a worker's concurrency above the pool's capacity", "ext.local.yaml", validManifest + "capacity:\n  max_in_flight: 4\nworkers:\n  concurrency: 16\n", []want{
			{9, 16, "workers.concurrency", "16 exceeds capacity.max_in_flight 4"},
		}},
		{"repo policy problems", "ext.local.yaml", validManifest + `inputs:
  repo: {type: string, format: repo}
repo:
  schemes: [https, ftp, https, file]
  hosts: ["*", 10.0.0.1/8, "bad host", "*.", "h:0", "::ffff:10.0.0.0/104"]
  local_roots: [relative, "~/../x", /proc/x, "~user"]
  colour: red
`, []want{
			{9, 20, "repo.schemes[1]", `unknown scheme "ftp"`},
			{9, 25, "repo.schemes[2]", "listed twice"},
			{10, 16, "repo.hosts[1]", "host bits set (want 10.0.0.0/8)"},
			{10, 28, "repo.hosts[2]", `invalid host "bad host"`},
			{10, 40, "repo.hosts[3]", `invalid wildcard "*."`},
			{10, 46, "repo.hosts[4]", "port out of range"},
			{10, 53, "repo.hosts[5]", "IPv4 form"},
			{11, 17, "repo.local_roots[0]", `invalid local root "relative"`},
			{11, 27, "repo.local_roots[1]", "clean path"},
			{11, 37, "repo.local_roots[2]", "must not be under /proc"},
			{11, 46, "repo.local_roots[3]", `invalid local root "~user"`},
			{12, 3, "repo.colour", `unknown field "colour" (known: hosts, local_roots, schemes)`},
		}},
		{"repo policy without a repo input", "ext.local.yaml", validManifest + "repo:\n  schemes: [https]\n", []want{
			{7, 3, "repo", "no input has format: repo"},
		}},
		{"file scheme without local roots", "ext.local.yaml", validManifest + "inputs:\n  repo: {type: string, format: repo}\nrepo:\n  schemes: [file]\n", []want{
			{9, 12, "repo.schemes", "file needs repo.local_roots"},
		}},
		{"local roots without the file scheme", "ext.local.yaml", validManifest + "inputs:\n  repo: {type: string, format: repo}\nrepo:\n  local_roots: [/srv]\n", []want{
			{9, 16, "repo.local_roots", "file is not among repo.schemes (https, ssh)"},
		}},
		{"repo default the policy refuses", "ext.local.yaml", validManifest + "inputs:\n  repo: {type: string, format: repo, default: \"https://10.0.0.1/r\"}\n", []want{
			{7, 47, "inputs.repo.default", "address 10.0.0.1 not allowed"},
		}},
		{"repo default with a password", "ext.local.yaml", validManifest + "inputs:\n  repo: {type: string, format: repo, default: \"https://u:pw@h/r\"}\n", []want{
			{7, 9, "inputs.repo", "default: repository URL must not carry a password"},
		}},
		{"config must be a mapping", "ext.local.yaml", validManifest + "config: [a, b]\n", []want{
			{6, 9, "config", "config must be a mapping"},
		}},
		{"syntax error", "ext.local.yaml", "name: local\n  handler: [unclosed\n", []want{
			{2, 0, "", "mapping values are not allowed"},
		}},
		{"empty document", "ext.local.yaml", "", []want{{0, 0, "", "empty document"}}},
		{"comment only", "ext.local.yaml", "# nothing\n", []want{{0, 0, "", "empty document"}}},
		{"not a mapping", "ext.local.yaml", "- name: local\n", []want{{1, 1, "", "document must be a mapping"}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			m, ps := extension.ParseManifest(tc.file, []byte(tc.yaml))
			checkProblems(t, tc.file, ps, tc.wants)
			if tc.wants == nil && (m == nil || m.Name != "local" || m.File != tc.file) {
				t.Errorf("manifest %+v", m)
			}
			if (ps.Err() == nil) != (len(tc.wants) == 0) {
				t.Errorf("Err() = %v with %d problems", ps.Err(), len(ps))
			}
		})
	}
}

const validProfile = `slug: local
extension: local
`

// TestCapacityInFlight: capacity.max_in_flight and workers.concurrency
// are two settings, the pool's and one worker's; an absent capacity is
// the finite default.
func TestCapacityInFlight(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name              string
		yaml              string
		inFlight, workers int
	}{
		{"both absent", validManifest, extension.DefaultMaxInFlight, 8},
		{"both given", validManifest + "capacity:\n  max_in_flight: 64\nworkers:\n  concurrency: 16\n", 64, 16},
		{"a worker as large as the pool", validManifest + "capacity:\n  max_in_flight: 16\nworkers:\n  concurrency: 16\n", 16, 16},
		{"zero is the default", validManifest + "capacity:\n  max_in_flight: 0\nworkers:\n  concurrency: 300\n", extension.DefaultMaxInFlight, 300},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			m, ps := extension.ParseManifest("ext.local.yaml", []byte(tc.yaml))
			if len(ps) > 0 {
				t.Fatal(ps)
			}
			if got := m.Capacity.InFlight(); got != tc.inFlight {
				t.Errorf("Capacity.InFlight() = %d, want %d", got, tc.inFlight)
			}
			if got := m.Workers.WithDefaults().Concurrency; got != tc.workers {
				t.Errorf("workers.concurrency = %d, want %d", got, tc.workers)
			}
		})
	}
}

func TestParseProfileReportsEveryProblem(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name  string
		file  string
		yaml  string
		wants []want
	}{
		{"valid", "profile.local.yaml", validProfile, nil},
		{"everything wrong at once", "profile.bad.yaml", `slug: BadSlug
extension: ""
isolation: teleport
ttl:
  default: 2h
  max: 1h
  forever: true
deadlines:
  provision: -1s
  ready: soon
labels:
  "Bad Key": x
  ok: "bad value!"
inputs:
  repo: [1, 2]
price:
  start: -5
`, []want{
			{1, 7, "slug", `invalid profile slug "BadSlug"`},
			{2, 12, "extension", "required"},
			{3, 12, "isolation", `unknown isolation level "teleport"`},
			{5, 12, "ttl.default", "default 2h0m0s exceeds max 1h0m0s"},
			{7, 3, "ttl.forever", `unknown field "forever"`},
			{9, 14, "deadlines.provision", "must not be negative"},
			{10, 10, "deadlines.ready", `invalid duration "soon"`},
			{12, 14, "labels.Bad Key", `invalid label key "Bad Key"`},
			{13, 7, "labels.ok", `invalid label value "bad value!"`},
			{15, 9, "inputs.repo", "cannot unmarshal !!seq into string"},
			{17, 10, "price.start", "must be an integer from 0"},
		}},
		{"unknown keys at every depth", "profile.local.yaml", validProfile + `ttl:
  min: 1m
deadlines:
  boot: 1m
price:
  per_minute: 3
  start: 0.5
owner: me
`, []want{
			{4, 3, "ttl.min", `unknown field "min" (known: default, max)`},
			{6, 3, "deadlines.boot", `unknown field "boot" (known: provision, ready, teardown)`},
			{8, 3, "price", `unknown field "per_minute"`},
			{9, 10, "price.start", "must be an integer number of credit minor units"},
			{10, 1, "owner", `unknown field "owner"`},
		}},
		{"slug and file disagree", "profiles/profile.other.yaml", validProfile, []want{
			{1, 7, "slug", "must be declared in profile.local.yaml, not profile.other.yaml"},
		}},
		{"negative TTL", "profile.local.yaml", validProfile + "ttl:\n  max: -1h\n", []want{
			{4, 3, "ttl", "durations must not be negative"},
		}},
		{"wrong types", "profile.local.yaml", "slug: local\nextension: {name: local}\nlabels: [a]\nttl: 1h\n", []want{
			{2, 12, "extension", "cannot unmarshal !!map into string"},
			{2, 12, "extension", "required"},
			{3, 9, "labels", "cannot unmarshal !!seq into map[string]string"},
			{4, 6, "ttl", "cannot unmarshal !!str `1h` into extension.TTLPolicy"},
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			p, ps := extension.ParseProfile(tc.file, []byte(tc.yaml))
			checkProblems(t, tc.file, ps, tc.wants)
			if tc.wants == nil && (p == nil || p.Slug != "local" || p.File != tc.file) {
				t.Errorf("profile %+v", p)
			}
		})
	}
}

func TestProblemString(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name string
		p    extension.Problem
		want string
	}{
		{"everything", extension.Problem{File: "ext.a.yaml", Line: 3, Column: 5, Path: "workers.concurrency", Message: "bad"}, "ext.a.yaml:3:5: workers.concurrency: bad"},
		{"line only", extension.Problem{File: "f", Line: 3, Message: "bad"}, "f:3: bad"},
		{"no position", extension.Problem{File: "f", Message: "bad"}, "f: bad"},
		{"message only", extension.Problem{Message: "bad"}, "bad"},
	}
	for _, tc := range cases {
		if got := tc.p.String(); got != tc.want {
			t.Errorf("%s: String() = %q, want %q", tc.name, got, tc.want)
		}
	}
	ps := extension.Problems{cases[0].p, cases[1].p}
	if got := ps.Error(); got != "2 problem(s):\next.a.yaml:3:5: workers.concurrency: bad\nf:3: bad" {
		t.Errorf("Error() = %q", got)
	}
	if (extension.Problems{}).Err() != nil {
		t.Error("no problems is an error")
	}
}

func TestLoadFileErrors(t *testing.T) {
	t.Parallel()
	if _, ps := extension.LoadManifestFile("testdata/none/ext.none.yaml"); len(ps) != 1 || !strings.Contains(ps[0].Message, "no such file") {
		t.Errorf("LoadManifestFile of a missing file: %v", ps)
	}
	if _, ps := extension.LoadProfileFile("testdata/none/profile.none.yaml"); len(ps) != 1 || !strings.Contains(ps[0].Message, "no such file") {
		t.Errorf("LoadProfileFile of a missing file: %v", ps)
	}
}
