package composessh_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/composessh"
	"github.com/sand-boxer/sandboxer/pkg/extension/composessh/composetest"
	"github.com/sand-boxer/sandboxer/pkg/extension/local"
	"github.com/sand-boxer/sandboxer/pkg/extension/vmpacker"
	"github.com/sand-boxer/sandboxer/pkg/sshx/workspace/workspacetest"
)

type injection struct {
	name  string
	in    extension.Inputs
	host  string
	field string
}

// injections are requests that must be refused before anything runs:
// shell and option injection in every input that reaches a command.
func injections(repo string) []injection {
	in := func(kv ...string) extension.Inputs {
		m := extension.Inputs{extension.InputSandboxID: "inj-1", composessh.InputRepo: "file://" + repo}
		for i := 0; i+1 < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return m
	}
	return []injection{
		{"repo option", in("repo", "--upload-pack=touch /tmp/pwned"), "local", "inputs.repo"},
		{"repo option no space", in("repo", "-uhttps://example.com/x"), "local", "inputs.repo"},
		{"repo ext transport", in("repo", "ext::sh%20-c%20touch%20/tmp/pwned"), "local", "inputs.repo"},
		{"repo command substitution", in("repo", "https://example.com/$(touch /tmp/pwned)"), "local", "inputs.repo"},
		{"repo backticks", in("repo", "https://example.com/`id`"), "local", "inputs.repo"},
		{"repo semicolon", in("repo", "https://example.com/x;id"), "local", "inputs.repo"},
		{"repo newline", in("repo", "https://example.com/x\nid"), "local", "inputs.repo"},
		{"repo scheme", in("repo", "gopher://example.com/x"), "local", "inputs.repo"},
		{"compose_file escapes", in("compose_file", "../../etc/passwd"), "local", "inputs.compose_file"},
		{"compose_file absolute", in("compose_file", "/etc/passwd"), "local", "inputs.compose_file"},
		{"compose_file option", in("compose_file", "--help"), "local", "inputs.compose_file"},
		{"compose_file space", in("compose_file", "a b.yml"), "local", "inputs.compose_file"},
		{"env substitution", in("env", "A=$(id)"), "local", "inputs.env"},
		{"env semicolon", in("env", "A=1;touch /tmp/pwned"), "local", "inputs.env"},
		{"env newline", in("env", "A=1\nB=2"), "local", "inputs.env"},
		{"env quote", in("env", "A='x'"), "local", "inputs.env"},
		{"env name", in("env", "A B=1"), "local", "inputs.env"},
		{"sandbox id traversal", in("sandbox_id", "../../etc"), "local", "inputs.sandbox_id"},
		{"sandbox id glob", in("sandbox_id", "*"), "local", "inputs.sandbox_id"},
		{"missing repo", extension.Inputs{extension.InputSandboxID: "inj-2"}, "local", "inputs.repo"},
		{"unknown input", in("command", "id"), "local", "unknown input"},
		{"unknown host", in(), "elsewhere", "host"},
	}
}

// unreachable returns a backend whose one host is a port nothing listens
// on: an input that got as far as SSH would fail with a connection error,
// not a field error.
func unreachable(t *testing.T) *composessh.ComposeSSH {
	t.Helper()
	return open(t, "127.0.0.1:1", "repo: {schemes: [https, ssh, git, file], local_roots: [/srv]}\n", nil)
}

// open returns a backend whose one host, "local", is sshAddr, with the
// manifest's repo policy repoYAML, logging to log (when not nil).
func open(t *testing.T, sshAddr, repoYAML string, log *slog.Logger) *composessh.ComposeSSH {
	t.Helper()
	m, ps := extension.ParseManifest("ext.compose-ssh.yaml", []byte(`name: compose-ssh
handler: compose-ssh
capabilities: {isolation_levels: [container], pricing_model: self-hosted}
hosts: [local]
inputs:
  repo: {type: string, required: true, format: repo}
  compose_file: {type: string, format: path}
  env: {type: string, format: env}
`+repoYAML+`config:
  hosts:
    local:
      ssh: nobody@`+sshAddr+`
      known_hosts: /nonexistent/known_hosts
      identity: /nonexistent/id
      base_dir: /nonexistent/sandboxes
`))
	if len(ps) > 0 {
		t.Fatal(ps)
	}
	ext, err := extension.NewRegistry(composessh.Info).Open(context.Background(), m, extension.Env{Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = extension.Close(ext) })
	return ext.(*composessh.ComposeSSH)
}

// TestRepoRefusedBeforeSSH: a repo the manifest's policy refuses never
// gets as far as the host. Statically refused references are field
// errors; references refused after name resolution (by this worker) say
// only "repository not reachable", the detail in the log. Neither the
// compose host nor the repository's address sees a connection.
func TestRepoRefusedBeforeSSH(t *testing.T) {
	t.Parallel()
	sshd := workspacetest.Listen(t, "")
	target := workspacetest.Listen(t, "SSH-2.0-banner\r\n")
	var logs bytes.Buffer
	var mu sync.Mutex
	log := slog.New(slog.NewTextHandler(&lockedWriter{w: &logs, mu: &mu}, nil))
	c := open(t, sshd.HostPort(), "repo: {schemes: [https, ssh, git]}\n", log)
	port := strconv.Itoa(target.Port())
	for _, tc := range []struct {
		name, repo string
		field      string // a field error naming this, or "" for a refusal after resolution
	}{
		{"scheme not allowed", "file:///srv/repo", "scheme file"},
		{"password in the URL", "https://user:secret@example.com/r.git", "password"},
		{"user in an https URL", "https://token@example.com/r.git", "user name"},
		{"loopback address", "git://127.0.0.1:" + port + "/r", "address 127.0.0.1 not allowed"},
		{"private address", "ssh://git@10.1.2.3/r", "address 10.1.2.3 not allowed"},
		{"link-local address", "https://169.254.169.254/r", "address 169.254.169.254 not allowed"},
		{"ssh as a port scan", "ssh://git@127.0.0.1:" + port + "/r", "address 127.0.0.1"},
		{"name resolving to loopback", "ssh://git@localhost:" + port + "/r", ""},
		{"scp-like name resolving to loopback", "git@localhost:r.git", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := c.Provision(context.Background(), extension.Profile{}, extension.Inputs{extension.InputSandboxID: "s1", composessh.InputRepo: tc.repo}, "local")
			if tc.field != "" {
				var fe extension.FieldErrors
				if !errors.As(err, &fe) || !strings.Contains(err.Error(), "inputs.repo") || !strings.Contains(err.Error(), tc.field) {
					t.Fatalf("Provision = %v, want a field error on inputs.repo saying %q", err, tc.field)
				}
				if strings.Contains(err.Error(), "secret") {
					t.Fatalf("the error repeats the password: %v", err)
				}
				return
			}
			if !errors.Is(err, extension.ErrRepoNotReachable) || err.Error() != "compose-ssh: repository not reachable" {
				t.Fatalf("Provision = %v, want only %q", err, "compose-ssh: repository not reachable")
			}
		})
	}
	// Registered last, so run first, once every case above is done (and
	// before the listeners close).
	t.Cleanup(func() {
		if n := sshd.Accepts(t); n != 0 {
			t.Errorf("the compose host accepted %d connections", n)
		}
		if n := target.Accepts(t); n != 0 {
			t.Errorf("the repository's address accepted %d connections", n)
		}
		mu.Lock()
		defer mu.Unlock()
		if !strings.Contains(logs.String(), "loopback") || !strings.Contains(logs.String(), "localhost") {
			t.Errorf("the log lacks the refusal's detail:\n%s", logs.String())
		}
	})
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func TestInjectionRefusedBeforeSSH(t *testing.T) {
	t.Parallel()
	c := unreachable(t)
	for _, tc := range injections("/srv/repo") {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := c.Provision(context.Background(), extension.Profile{}, tc.in, tc.host)
			var fe extension.FieldErrors
			if !errors.As(err, &fe) || !strings.Contains(err.Error(), tc.field) {
				t.Fatalf("Provision = %v, want a field error on %s", err, tc.field)
			}
		})
	}
}

func TestBadHandleRefusedBeforeSSH(t *testing.T) {
	t.Parallel()
	c := unreachable(t)
	for _, tc := range []struct {
		name string
		h    extension.Handle
	}{
		{"traversal id", extension.Handle{SandboxID: "../etc", Host: "local"}},
		{"unknown host", extension.Handle{SandboxID: "ok", Host: "other"}},
		{"compose file escapes", extension.Handle{SandboxID: "ok", Host: "local", Data: map[string]string{"compose_file": "../x"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var fe extension.FieldErrors
			if _, err := c.Teardown(context.Background(), tc.h); !errors.As(err, &fe) {
				t.Errorf("Teardown = %v, want a field error", err)
			}
			if _, err := c.WaitReady(context.Background(), tc.h); !errors.As(err, &fe) {
				t.Errorf("WaitReady = %v, want a field error", err)
			}
		})
	}
}

func TestRepoSchemesConfigMoved(t *testing.T) {
	t.Parallel()
	m, ps := extension.ParseManifest("", []byte(`name: compose-ssh
handler: compose-ssh
capabilities: {isolation_levels: [container], pricing_model: self-hosted}
hosts: [h]
inputs:
  repo: {type: string, required: true, format: repo}
config:
  repo_schemes: [https]
  hosts:
    h: {ssh: u@127.0.0.1:1, known_hosts: /k, identity: /i, base_dir: /b}
`))
	if len(ps) > 0 {
		t.Fatal(ps)
	}
	got := (&extension.Catalog{Extensions: map[string]*extension.Manifest{m.Name: m}}).Check(extension.NewRegistry(composessh.Info))
	if len(got) != 1 || got[0].Path != "config.repo_schemes" || !strings.Contains(got[0].Message, "repo.schemes") {
		t.Fatalf("problems %v, want config.repo_schemes moved to repo.schemes", got)
	}
	if _, err := extension.NewRegistry(composessh.Info).Open(context.Background(), m, extension.Env{}); err == nil {
		t.Fatal("a manifest with config.repo_schemes configured")
	}
}

func TestCheckManifest(t *testing.T) {
	t.Parallel()
	const head = `name: compose-ssh
handler: compose-ssh
capabilities: {isolation_levels: [container], pricing_model: self-hosted}
`
	for _, tc := range []struct {
		name, yaml string
		want       []string // substrings of problems, all must appear
	}{
		{"unknown config key", head + `hosts: [h]
inputs: {repo: {type: string, required: true, format: repo}}
config:
  hosts:
    h: {ssh: u@h:22, known_hosts: /k, identity: /i, base_dir: /b, password: x}
`, []string{`unknown field "password"`}},
		{"every problem at once", head + `hosts: [h, other]
inputs:
  repo: {type: string, format: word}
  command: {type: string}
config:
  compose: podman
  project_prefix: "-x"
  repo_schemes: [ftp]
  hosts:
    h: {ssh: "u@h;id", known_hosts: relative, base_dir: /}
`, []string{"config.compose", "config.project_prefix", "config.repo_schemes", "config.hosts.h.ssh", "config.hosts.h.known_hosts",
			"config.hosts.h: set identity", "config.hosts.h.base_dir", `host "other" has no entry`, "needs a required repo input",
			"format: repo", `does not read input "command"`}},
		{"no hosts", head + `inputs: {repo: {type: string, required: true, format: repo}}
config: {}
`, []string{"config.hosts: required"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			m, ps := extension.ParseManifest("", []byte(tc.yaml))
			if m == nil {
				t.Fatal(ps)
			}
			got := (&extension.Catalog{Extensions: map[string]*extension.Manifest{m.Name: m}}).Check(extension.NewRegistry(composessh.Info))
			all := got.Error()
			for _, w := range tc.want {
				if !strings.Contains(all, w) {
					t.Errorf("problems lack %q:\n%s", w, all)
				}
			}
		})
	}
}

// TestShippedCatalog loads the shipped ext.local, ext.compose-ssh and
// ext.vm-packer manifests and their profiles together, with their
// backends linked, as `sandboxer up` does. (The files are copied to a
// directory of their own, so that other extensions shipped alongside,
// whose backends this test does not link, do not count.)
func TestShippedCatalog(t *testing.T) {
	t.Parallel()
	extDir, profDir := t.TempDir(), t.TempDir()
	for _, f := range []struct{ dir, name string }{
		{extDir, "ext.local.yaml"}, {extDir, "ext.compose-ssh.yaml"}, {extDir, "ext.vm-packer.yaml"},
		{profDir, "profile.local.yaml"}, {profDir, "profile.compose.yaml"}, {profDir, "profile.vm.yaml"},
	} {
		src := "../../../extensions/" + f.name
		if f.dir == profDir {
			src = "../../../profiles/" + f.name
		}
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(f.dir, f.name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	reg := extension.NewRegistry(local.Info, composessh.Info, vmpacker.Info)
	cat, ps := extension.LoadCatalog(extDir, profDir, reg)
	if len(ps) > 0 {
		t.Fatalf("shipped catalog:\n%v", ps)
	}
	for _, want := range []struct{ ext, profile string }{{"local", "local"}, {"compose-ssh", "compose"}, {"vm-packer", "vm"}} {
		if _, err := cat.Extension(want.ext); err != nil {
			t.Error(err)
		}
		p, err := cat.Profile(want.profile)
		if err != nil {
			t.Error(err)
			continue
		}
		if p.Extension != want.ext {
			t.Errorf("profile %s binds %s, want %s", want.profile, p.Extension, want.ext)
		}
	}
	for _, name := range []string{"compose-ssh", "vm-packer"} {
		m, err := cat.Extension(name)
		if err != nil {
			continue
		}
		ext, err := reg.Open(context.Background(), m, extension.Env{})
		if err != nil {
			t.Errorf("the shipped %s manifest does not configure: %v", name, err)
			continue
		}
		_ = extension.Close(ext)
	}
}

// TestDeployDockerfileMatches keeps deploy/e2e/busybox.Dockerfile, the
// copy for building by hand, equal to the one the tests build.
func TestDeployDockerfileMatches(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile("../../../deploy/e2e/busybox.Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != composetest.Dockerfile {
		t.Fatalf("deploy/e2e/busybox.Dockerfile differs from composetest.Dockerfile:\n%s\nvs\n%s", b, composetest.Dockerfile)
	}
}
