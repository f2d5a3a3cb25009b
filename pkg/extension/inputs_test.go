package extension_test

import (
	"reflect"
	"strings"
	"testing"

	"github.com/sand-boxer/sandboxer/pkg/extension"
)

func i64(v int64) *int64 { return &v }

// TestCheckFormat is the gate every string input passes before it can
// reach a command line: each format's valid shapes, and the injection
// attempts it must refuse.
func TestCheckFormat(t *testing.T) {
	t.Parallel()
	// Refused by every format: shell metacharacters, option injection,
	// whitespace and control characters.
	universal := []struct{ name, value string }{
		{"empty", ""},
		{"semicolon", "a;id"},
		{"command substitution", "$(id)"},
		{"variable", "$HOME"},
		{"backticks", "`id`"},
		{"pipe", "a|sh"},
		{"and-and", "a&&id"},
		{"background", "a&"},
		{"newline", "a\nid"},
		{"carriage return", "a\rb"},
		{"tab", "a\tb"},
		{"NUL", "a\x00b"},
		{"DEL", "a\x7fb"},
		{"space", "a b"},
		{"leading dash", "-rf"},
		{"upload-pack option", "--upload-pack=touch /tmp/pwned"},
		{"upload-pack option without space", "--upload-pack=id"},
		{"ssh ProxyCommand option", "-oProxyCommand=id"},
		{"single quote", "a'b"},
		{"double quote", `a"b`},
		{"backslash", `a\b`},
		{"redirect out", "a>/etc/passwd"},
		{"redirect in", "a</etc/passwd"},
		{"glob", "a*"},
		{"question mark", "a?"},
		{"braces", "{a,b}"},
		{"parentheses", "(a)"},
		{"brackets", "a[1]"},
		{"history expansion", "!a"},
		{"comment", "a#b"},
		{"invalid UTF-8", "a\xffb"},
	}
	cases := []struct {
		format extension.Format
		ok     []string
		bad    []string
	}{
		{extension.FormatWord,
			[]string{"main", "v1.2.3", "feature/x", "user@host:path", "a=b,c=d", "a~b", "1+1", "_x", ".hidden"},
			[]string{"é", "a%20b", "~root", "=x", ":x", "/x"}},
		{extension.FormatName,
			[]string{"sbx-1", "0abc", "a_b"},
			[]string{"ABC", "a.b", "a/b", "_a", strings.Repeat("a", 64)}},
		{extension.FormatPath,
			[]string{"src", "src/app", "a.b/c_d-e", "dir/", "."},
			[]string{"/etc/passwd", "/", "..", "../etc", "a/../../etc", "a/..", "a//b", "./a", "a/./b", "~/x", "a:b"}},
		{extension.FormatRepo,
			[]string{"https://github.com/org/repo.git", "http://git.example.com/r", "ssh://git@host:2222/org/repo.git", "git://host/repo",
				"git@github.com:org/repo.git", "file:///srv/repos/r.git", "file://localhost/srv/r", "/srv/repos/r.git", "https://10.0.0.1:8443/r"},
			[]string{"ext::sh -c touch% /tmp/pwned", "ext::sh", "fd::17", "https://host/r::x", "ftp://host/r", "javascript:alert(1)",
				"http://", "https:///path", "ssh://-oProxyCommand=id/r", "file://remote/r", "file:relative", "file:///srv/../etc",
				"/srv/../etc/passwd", "relative/path", "https://host/r;id", "https://host/$(id)", "https://ho_st/r", "git@-oProxy:r",
				"https://[::1]:8443/r", // brackets are glob characters: refused
				// Credentials: a password anywhere, a user but for ssh.
				"https://user:secret@host/r", "https://token@host/r", "http://u@host/r", "git://u@host/r", "ssh://git:secret@host/r",
				"file://u@localhost/srv/r", "ssh://-oX@host/r", "ssh://%2doX@host/r",
				// Hosts a resolver could read otherwise than the check does.
				"https://2130706433/r", "https://127.1/r", "https://0x7f.0.0.1/r", "https://010.0.0.1/r", "https://host./r",
				"https://h:0/r", "https://h:99999/r", "https://h:port/r"}},
		{extension.FormatSSHTarget,
			[]string{"host", "user@host", "user@host:2222", "10.0.0.1", "user@[::1]:22", "u_1@a.b.c"},
			[]string{"host:0", "host:65536", "host:99999", "host:", "User@host", "user@host;id", "user@@host", "user@host:22:33", "user@"}},
		{extension.FormatHost,
			[]string{"example.com", "10.0.0.1", "::1", "[::1]", "build-1"},
			[]string{"ho_st", "a/b", "host:22", "user@host"}},
		{extension.FormatEnv,
			[]string{"A=1", "A=1,B_2=x/y", "A=", "PATH=/usr/bin:/bin"},
			[]string{"A", "1A=x", "A=$(id)", "A=x;B=y", "A=x,,B=y", "A=x y", "A=a,b", "=x", "A=`id`"}},
	}
	for _, tc := range cases {
		t.Run(string(tc.format), func(t *testing.T) {
			t.Parallel()
			for _, v := range tc.ok {
				if err := extension.CheckFormat(tc.format, v); err != nil {
					t.Errorf("CheckFormat(%s, %q) = %v, want ok", tc.format, v, err)
				}
			}
			for _, v := range tc.bad {
				if err := extension.CheckFormat(tc.format, v); err == nil {
					t.Errorf("CheckFormat(%s, %q) accepted", tc.format, v)
				}
			}
			for _, u := range universal {
				if err := extension.CheckFormat(tc.format, u.value); err == nil {
					t.Errorf("CheckFormat(%s) accepted %s: %q", tc.format, u.name, u.value)
				}
			}
		})
	}
	if err := extension.CheckFormat("", "main"); err != nil {
		t.Errorf("empty format is not word: %v", err)
	}
	if err := extension.CheckFormat("url", "x"); err == nil || !strings.Contains(err.Error(), `unknown format "url"`) {
		t.Errorf("unknown format: %v", err)
	}
}

// inputSpec is an extension's spec with one input of every type and
// format.
var inputSpec = map[string]extension.InputSpec{
	"repo":    {Type: extension.TypeString, Format: extension.FormatRepo, Required: true},
	"branch":  {Type: extension.TypeString, Default: "main"},
	"subdir":  {Type: extension.TypeString, Format: extension.FormatPath},
	"target":  {Type: extension.TypeString, Format: extension.FormatSSHTarget},
	"env":     {Type: extension.TypeString, Format: extension.FormatEnv},
	"project": {Type: extension.TypeString, Format: extension.FormatName, MaxLength: 8},
	"mode":    {Type: extension.TypeString, Enum: []string{"fast", "safe"}},
	"tag":     {Type: extension.TypeString, Pattern: `^v[0-9]+$`},
	"cpus":    {Type: extension.TypeInt, Min: i64(1), Max: i64(8)},
	"port":    {Type: extension.TypePort},
	"debug":   {Type: extension.TypeBool},
	"timeout": {Type: extension.TypeDuration},
}

func TestValidateInputs(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name     string
		defaults map[string]string
		in       map[string]string
		want     extension.Inputs
		errs     []string // "field: detail substring"
	}{
		{"minimal: spec default applied", nil, map[string]string{"repo": "https://h/r"},
			extension.Inputs{"repo": "https://h/r", "branch": "main"}, nil},
		{"profile default over spec default", map[string]string{"branch": "dev", "cpus": "2"}, map[string]string{"repo": "https://h/r"},
			extension.Inputs{"repo": "https://h/r", "branch": "dev", "cpus": "2"}, nil},
		{"request over profile default", map[string]string{"branch": "dev"}, map[string]string{"repo": "https://h/r", "branch": "feature/x"},
			extension.Inputs{"repo": "https://h/r", "branch": "feature/x"}, nil},
		{"every type valid", nil, map[string]string{
			"repo": "git@h:o/r.git", "subdir": "app", "target": "u@h:22", "env": "A=1", "project": "p-1", "mode": "safe",
			"tag": "v2", "cpus": "8", "port": "65535", "debug": "false", "timeout": "90s"},
			extension.Inputs{"repo": "git@h:o/r.git", "branch": "main", "subdir": "app", "target": "u@h:22", "env": "A=1", "project": "p-1",
				"mode": "safe", "tag": "v2", "cpus": "8", "port": "65535", "debug": "false", "timeout": "90s"}, nil},
		{"required missing", nil, map[string]string{}, nil, []string{"inputs.repo: required"}},
		{"unknown key", nil, map[string]string{"repo": "https://h/r", "colour": "red"}, nil,
			[]string{"inputs.colour: unknown input (known: branch, cpus, debug, env, mode, port, project, repo, subdir, tag, target, timeout)"}},
		{"unknown key with control characters is quoted", nil, map[string]string{"repo": "https://h/r", "a\nb": "x"}, nil,
			[]string{`inputs.a\nb: unknown input`}},
		{"reserved sandbox_id", nil, map[string]string{"repo": "https://h/r", "sandbox_id": "sbx-other"}, nil,
			[]string{"inputs.sandbox_id: reserved"}},
		{"git option injection in repo", nil, map[string]string{"repo": "--upload-pack=touch /tmp/pwned"}, nil,
			[]string{"inputs.repo: must not start with '-'"}},
		{"transport helper in repo", nil, map[string]string{"repo": "ext::sh -c id"}, nil, []string{"inputs.repo:"}},
		{"path escape", nil, map[string]string{"repo": "https://h/r", "subdir": "../../etc"}, nil, []string{"inputs.subdir: "}},
		{"absolute path", nil, map[string]string{"repo": "https://h/r", "subdir": "/etc"}, nil, []string{"inputs.subdir: "}},
		{"shell in a word", nil, map[string]string{"repo": "https://h/r", "branch": "main;reboot"}, nil, []string{"inputs.branch: contains characters"}},
		{"int not a number", nil, map[string]string{"repo": "https://h/r", "cpus": "many"}, nil, []string{`inputs.cpus: want an integer, got "many"`}},
		{"int fraction", nil, map[string]string{"repo": "https://h/r", "cpus": "1.5"}, nil, []string{"inputs.cpus: want an integer"}},
		{"int below min", nil, map[string]string{"repo": "https://h/r", "cpus": "0"}, nil, []string{"inputs.cpus: must be at least 1"}},
		{"int above max", nil, map[string]string{"repo": "https://h/r", "cpus": "9"}, nil, []string{"inputs.cpus: must be at most 8"}},
		{"int overflow", nil, map[string]string{"repo": "https://h/r", "cpus": "9223372036854775808"}, nil, []string{"inputs.cpus: want an integer"}},
		{"port zero", nil, map[string]string{"repo": "https://h/r", "port": "0"}, nil, []string{"inputs.port: want a port 1-65535, got 0"}},
		{"port too high", nil, map[string]string{"repo": "https://h/r", "port": "65536"}, nil, []string{"inputs.port: want a port"}},
		{"port negative", nil, map[string]string{"repo": "https://h/r", "port": "-22"}, nil, []string{"inputs.port: want a port"}},
		{"bool yes", nil, map[string]string{"repo": "https://h/r", "debug": "yes"}, nil, []string{`inputs.debug: want true or false, got "yes"`}},
		{"duration negative", nil, map[string]string{"repo": "https://h/r", "timeout": "-1s"}, nil, []string{"inputs.timeout: want a duration"}},
		{"duration without unit", nil, map[string]string{"repo": "https://h/r", "timeout": "30"}, nil, []string{"inputs.timeout: want a duration"}},
		{"enum", nil, map[string]string{"repo": "https://h/r", "mode": "reckless"}, nil, []string{"inputs.mode: want one of [fast safe]"}},
		{"pattern", nil, map[string]string{"repo": "https://h/r", "tag": "latest"}, nil, []string{"inputs.tag: does not match ^v[0-9]+$"}},
		{"max length", nil, map[string]string{"repo": "https://h/r", "project": "abcdefghi"}, nil, []string{"inputs.project: longer than 8 bytes"}},
		{"default max length", nil, map[string]string{"repo": "https://h/" + strings.Repeat("r", extension.DefaultMaxLength)}, nil,
			[]string{"inputs.repo: longer than 1024 bytes"}},
		{"long value clipped in the error", nil, map[string]string{"repo": "https://h/r", "cpus": strings.Repeat("9", 100) + "x"}, nil,
			[]string{`inputs.cpus: want an integer, got "` + strings.Repeat("9", 40) + `..."`}},
		{"bad profile default is caught too", map[string]string{"port": "http"}, map[string]string{"repo": "https://h/r"}, nil,
			[]string{"inputs.port: want an integer"}},
		{"every problem at once, sorted", nil, map[string]string{"zzz": "1", "cpus": "0", "port": "0", "sandbox_id": "x"}, nil,
			[]string{"inputs.sandbox_id: reserved", "inputs.zzz: unknown input", "inputs.cpus: must be at least 1", "inputs.port: want a port", "inputs.repo: required"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, errs := extension.ValidateInputs(inputSpec, tc.defaults, tc.in)
			if tc.errs == nil {
				if errs != nil {
					t.Fatalf("errors: %v", errs)
				}
				if !reflect.DeepEqual(got, tc.want) {
					t.Errorf("inputs = %v, want %v", got, tc.want)
				}
				return
			}
			if got != nil {
				t.Errorf("inputs %v returned with errors", got)
			}
			if len(errs) != len(tc.errs) {
				t.Fatalf("errors %v, want %d: %v", errs, len(tc.errs), tc.errs)
			}
			for i, want := range tc.errs {
				if s := errs[i].Field + ": " + errs[i].Detail; !strings.HasPrefix(s, want) && !strings.Contains(s, want) {
					t.Errorf("error %d = %q, want %q", i, s, want)
				}
			}
			if !strings.HasPrefix(errs.Error(), "invalid request: ") {
				t.Errorf("Error() = %q", errs.Error())
			}
		})
	}
}

// TestManifestValidateInputs: the gateway's check of a request against a
// candidate manifest applies the manifest's repo policy too, with the
// other inputs' problems, and never repeats a password.
func TestManifestValidateInputs(t *testing.T) {
	t.Parallel()
	m, ps := extension.ParseManifest("", []byte(validManifest+`inputs:
  repo: {type: string, format: repo}
  branch: {type: string}
repo:
  schemes: [https, ssh]
  hosts: ["*", git.corp.example]
`))
	if len(ps) > 0 {
		t.Fatal(ps)
	}
	cases := []struct {
		name     string
		defaults map[string]string
		in       map[string]string
		errs     []string // "field: detail substring"
	}{
		{"public https", nil, map[string]string{"repo": "https://example.com/r.git"}, nil},
		{"scp-like keeps its user", nil, map[string]string{"repo": "git@example.com:o/r.git"}, nil},
		{"ssh URL keeps its user", nil, map[string]string{"repo": "ssh://git@git.corp.example:2222/r"}, nil},
		{"scheme not allowed", nil, map[string]string{"repo": "git://example.com/r"}, []string{"inputs.repo: repository scheme git not allowed by this extension (allowed: https, ssh)"}},
		{"local path not allowed", nil, map[string]string{"repo": "/srv/r"}, []string{"inputs.repo: repository scheme file (a local path) not allowed"}},
		{"proc self cwd", nil, map[string]string{"repo": "file:///proc/self/cwd"}, []string{"inputs.repo: repository scheme file"}},
		{"loopback address", nil, map[string]string{"repo": "https://127.0.0.1:8080/r"}, []string{"inputs.repo: repository address 127.0.0.1 not allowed"}},
		{"link-local address", nil, map[string]string{"repo": "ssh://git@169.254.169.254/r"}, []string{"inputs.repo: repository address 169.254.169.254 not allowed"}},
		{"password", nil, map[string]string{"repo": "https://alice:secret@example.com/r"}, []string{"inputs.repo: repository URL must not carry a password"}},
		{"token as user", nil, map[string]string{"repo": "https://secret@example.com/r"}, []string{"inputs.repo: repository URL must not carry a user name"}},
		{"ssh password", nil, map[string]string{"repo": "ssh://git:secret@example.com/r"}, []string{"inputs.repo: repository URL must not carry a password"}},
		{"bad password escape is not echoed", nil, map[string]string{"repo": "https://alice:secret%zz@example.com/r"}, []string{"inputs.repo: want a repository URL"}},
		{"profile default checked too", map[string]string{"repo": "https://10.0.0.1/r"}, nil, []string{"inputs.repo: repository address 10.0.0.1 not allowed"}},
		{"with the other problems", nil, map[string]string{"repo": "git://h/r", "branch": "a;b"}, []string{"inputs.branch: contains characters", "inputs.repo: repository scheme git"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, errs := m.ValidateInputs(tc.defaults, tc.in)
			if tc.errs == nil {
				if errs != nil {
					t.Fatalf("errors: %v", errs)
				}
				if got["repo"] != tc.in["repo"] {
					t.Fatalf("inputs = %v", got)
				}
				return
			}
			if len(errs) != len(tc.errs) {
				t.Fatalf("errors %v, want %v", errs, tc.errs)
			}
			for i, want := range tc.errs {
				if s := errs[i].Field + ": " + errs[i].Detail; !strings.HasPrefix(s, want) {
					t.Errorf("error %d = %q, want %q", i, s, want)
				}
			}
			if strings.Contains(errs.Error(), "secret") {
				t.Errorf("the errors repeat the password: %v", errs)
			}
		})
	}
	// The spec-only check keeps working for callers without a manifest:
	// format and credentials, no policy.
	if _, errs := extension.ValidateInputs(m.Inputs, nil, map[string]string{"repo": "git://example.com/r"}); errs != nil {
		t.Errorf("ValidateInputs applied a policy: %v", errs)
	}
	if _, errs := extension.ValidateInputs(m.Inputs, nil, map[string]string{"repo": "https://u:secret@example.com/r"}); errs == nil {
		t.Error("ValidateInputs accepted a password")
	}
}

func BenchmarkValidateInputs(b *testing.B) {
	in := map[string]string{
		"repo": "https://github.com/org/repo.git", "subdir": "services/api", "target": "dev@build-1.example.com:2222",
		"env": "GOFLAGS=-mod=mod,CGO_ENABLED=0", "project": "sbx-1", "mode": "safe", "tag": "v12", "cpus": "4",
		"port": "8080", "debug": "true", "timeout": "5m",
	}
	defaults := map[string]string{"branch": "main"}
	b.ReportAllocs()
	for b.Loop() {
		if _, errs := extension.ValidateInputs(inputSpec, defaults, in); errs != nil {
			b.Fatal(errs)
		}
	}
}
