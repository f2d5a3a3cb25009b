package vmpacker_test

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"testing"

	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/vmpacker"
	"github.com/sand-boxer/sandboxer/pkg/sshx/workspace/workspacetest"
)

type injection struct {
	name  string
	in    extension.Inputs
	field string
}

// injections are requests that must be refused before any connection.
func injections(vm string) []injection {
	in := func(kv ...string) extension.Inputs {
		m := extension.Inputs{extension.InputSandboxID: "inj-1", vmpacker.InputVM: vm}
		for i := 0; i+1 < len(kv); i += 2 {
			if kv[i+1] == "<unset>" {
				delete(m, kv[i])
				continue
			}
			m[kv[i]] = kv[i+1]
		}
		return m
	}
	return []injection{
		{"neither vm nor ssh_target", in("vm", "<unset>"), "exactly one of vm and ssh_target"},
		{"both vm and ssh_target", in("ssh_target", "root@127.0.0.1"), "exactly one of vm and ssh_target"},
		{"unknown vm", in("vm", "other"), "unknown VM"},
		{"vm traversal", in("vm", "../x"), "inputs.vm"},
		{"ssh_target option", in("vm", "<unset>", "ssh_target", "-oProxyCommand=touch /tmp/pwned"), "inputs.ssh_target"},
		{"ssh_target shell", in("vm", "<unset>", "ssh_target", "root@h;id"), "inputs.ssh_target"},
		{"ssh_target user option", in("vm", "<unset>", "ssh_target", "-oX@h"), "inputs.ssh_target"},
		{"repo option", in("repo", "--upload-pack=touch /tmp/pwned"), "inputs.repo"},
		{"repo substitution", in("repo", "https://example.com/$(id)"), "inputs.repo"},
		{"repo transport helper", in("repo", "ext::sh"), "inputs.repo"},
		{"workspace_dir escapes", in("workspace_dir", "../../etc"), "inputs.workspace_dir"},
		{"workspace_dir absolute", in("workspace_dir", "/etc"), "inputs.workspace_dir"},
		{"workspace_dir option", in("workspace_dir", "-rf"), "inputs.workspace_dir"},
		{"tunnel_port zero", in("tunnel_port", "0"), "inputs.tunnel_port"},
		{"tunnel_port word", in("tunnel_port", "80;id"), "inputs.tunnel_port"},
		{"ssh_port range", in("ssh_port", "70000"), "inputs.ssh_port"},
		{"ssh_port padded", in("ssh_port", "022"), "inputs.ssh_port"},
		{"sandbox id traversal", in("sandbox_id", "../../x"), "inputs.sandbox_id"},
		{"unknown input", in("command", "id"), "unknown input"},
	}
}

// unreachable is a backend whose VM is a port nothing listens on: an
// input that got as far as SSH would fail with a connection error.
func unreachable(t *testing.T) *vmpacker.VMPacker {
	t.Helper()
	m, ps := extension.ParseManifest("ext.vm-packer.yaml", []byte(`name: vm-packer
handler: vm-packer
capabilities: {isolation_levels: [vm], pricing_model: self-hosted}
inputs:
  vm: {type: string, format: name}
  ssh_target: {type: string, format: ssh-target}
  repo: {type: string, format: repo}
  tunnel_port: {type: port}
  ssh_port: {type: port}
  workspace_dir: {type: string, format: path}
config:
  vms:
    vm1: {ssh: nobody@127.0.0.1:1, known_hosts: /nonexistent/kh, identity: /nonexistent/id, base_dir: /nonexistent/ws}
  ssh_targets: {user: nobody, known_hosts: /nonexistent/kh, identity: /nonexistent/id, base_dir: /nonexistent/ws}
`))
	if len(ps) > 0 {
		t.Fatal(ps)
	}
	ext, err := extension.NewRegistry(vmpacker.Info).Open(context.Background(), m, extension.Env{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = extension.Close(ext) })
	return ext.(*vmpacker.VMPacker)
}

func TestInjectionRefusedBeforeSSH(t *testing.T) {
	t.Parallel()
	v := unreachable(t)
	for _, tc := range injections("vm1") {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := v.Provision(context.Background(), extension.Profile{}, tc.in, "")
			var fe extension.FieldErrors
			if !errors.As(err, &fe) || !strings.Contains(err.Error(), tc.field) {
				t.Fatalf("Provision = %v, want a field error on %s", err, tc.field)
			}
		})
	}
}

func TestBadHandleRefusedBeforeSSH(t *testing.T) {
	t.Parallel()
	v := unreachable(t)
	for _, tc := range []struct {
		name string
		h    extension.Handle
	}{
		{"traversal id", extension.Handle{SandboxID: "../etc", Host: "vm1"}},
		{"host option", extension.Handle{SandboxID: "ok", Host: "-oProxyCommand=x"}},
		{"workspace escapes", extension.Handle{SandboxID: "ok", Host: "vm1", Data: map[string]string{"workspace_dir": "../x"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var fe extension.FieldErrors
			if _, err := v.Teardown(context.Background(), tc.h); !errors.As(err, &fe) {
				t.Errorf("Teardown = %v, want a field error", err)
			}
			if _, err := v.WaitReady(context.Background(), tc.h); !errors.As(err, &fe) {
				t.Errorf("WaitReady = %v, want a field error", err)
			}
		})
	}
}

// TestRepoRefusedBeforeSSH: a repo the manifest's policy refuses never
// gets as far as the VM: statically (a field error) or once this worker
// resolved its host ("repository not reachable"). Neither the VM nor the
// repository's address sees a connection.
func TestRepoRefusedBeforeSSH(t *testing.T) {
	t.Parallel()
	sshd := workspacetest.Listen(t, "")
	target := workspacetest.Listen(t, "")
	m, ps := extension.ParseManifest("", []byte(`name: vm-packer
handler: vm-packer
capabilities: {isolation_levels: [vm], pricing_model: self-hosted}
inputs:
  vm: {type: string, format: name}
  repo: {type: string, format: repo}
repo: {schemes: [https, ssh]}
config:
  vms:
    vm1: {ssh: u@`+sshd.HostPort()+`, known_hosts: /nonexistent/kh, identity: /nonexistent/id, base_dir: /nonexistent/ws}
`))
	if len(ps) > 0 {
		t.Fatal(ps)
	}
	ext, err := extension.NewRegistry(vmpacker.Info).Open(context.Background(), m, extension.Env{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = extension.Close(ext) })
	port := strconv.Itoa(target.Port())
	for _, tc := range []struct {
		name, repo, field string // field: a field error saying this, "" for a refusal after resolution
	}{
		{"local path", "/proc/self/cwd", "scheme file"},
		{"password", "ssh://git:secret@example.com/r", "password"},
		{"git scheme", "git://example.com/r", "scheme git"},
		{"loopback address", "https://127.0.0.1:" + port + "/r", "address 127.0.0.1"},
		{"name resolving to loopback", "https://localhost:" + port + "/r", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := ext.Provision(context.Background(), extension.Profile{}, extension.Inputs{"sandbox_id": "s", "vm": "vm1", "repo": tc.repo}, "")
			if tc.field != "" {
				var fe extension.FieldErrors
				if !errors.As(err, &fe) || !strings.Contains(err.Error(), tc.field) || strings.Contains(err.Error(), "secret") {
					t.Fatalf("Provision = %v, want a field error on inputs.repo saying %q", err, tc.field)
				}
				return
			}
			if !errors.Is(err, extension.ErrRepoNotReachable) || err.Error() != "vm-packer: repository not reachable" {
				t.Fatalf("Provision = %v, want only %q", err, "vm-packer: repository not reachable")
			}
		})
	}
	t.Cleanup(func() {
		if n := sshd.Accepts(t); n != 0 {
			t.Errorf("the VM accepted %d connections", n)
		}
		if n := target.Accepts(t); n != 0 {
			t.Errorf("the repository's address accepted %d connections", n)
		}
	})
}

func TestSSHTargetNeedsConfig(t *testing.T) {
	t.Parallel()
	m, ps := extension.ParseManifest("", []byte(`name: vm-packer
handler: vm-packer
capabilities: {isolation_levels: [vm], pricing_model: self-hosted}
inputs:
  vm: {type: string, format: name}
config:
  vms:
    vm1: {ssh: u@127.0.0.1:1, known_hosts: /k, identity: /i, base_dir: /b}
`))
	if len(ps) > 0 {
		t.Fatal(ps)
	}
	ext, err := extension.NewRegistry(vmpacker.Info).Open(context.Background(), m, extension.Env{})
	if err != nil {
		t.Fatal(err)
	}
	defer extension.Close(ext)
	_, err = ext.Provision(context.Background(), extension.Profile{}, extension.Inputs{"sandbox_id": "s", "ssh_target": "u@127.0.0.1"}, "")
	if err == nil || !strings.Contains(err.Error(), "ssh_target is not enabled") {
		t.Fatalf("Provision with ssh_target and no ssh_targets config = %v", err)
	}
}

func TestCheckManifest(t *testing.T) {
	t.Parallel()
	const head = `name: vm-packer
handler: vm-packer
capabilities: {isolation_levels: [vm], pricing_model: self-hosted}
`
	for _, tc := range []struct {
		name, yaml string
		want       []string
	}{
		{"unknown config key", head + `inputs: {vm: {type: string, format: name}}
config:
  vms:
    vm1: {ssh: u@h:22, known_hosts: /k, identity: /i, base_dir: /b, sudo: true}
`, []string{`unknown field "sudo"`}},
		{"every problem at once", head + `inputs:
  vm: {type: string, format: name, required: true}
  ssh_target: {type: string, format: word}
  tunnel_port: {type: int}
  command: {type: string}
config:
  tunnel_bind: "0.0.0.0;id"
  repo_schemes: [ftp]
  vms:
    Bad_Name: {ssh: "u@h:99999", known_hosts: kh, base_dir: relative}
`, []string{"config.tunnel_bind", "config.repo_schemes", "config.vms.Bad_Name", "config.vms.Bad_Name.ssh", "config.vms.Bad_Name.known_hosts",
			"config.vms.Bad_Name: set identity", "config.vms.Bad_Name.base_dir", "config.ssh_targets is unset", "must not be required",
			"inputs.ssh_target: vm-packer needs type: string and format: ssh-target", "inputs.tunnel_port: vm-packer needs type: port", `does not read input "command"`}},
		{"neither vm nor target", head + `inputs: {repo: {type: string, format: repo}}
config:
  vms:
    vm1: {ssh: u@h:22, known_hosts: /k, identity: /i, base_dir: /b}
`, []string{"needs a vm or an ssh_target input"}},
		{"nothing configured", head + `inputs: {vm: {type: string, format: name}}
config: {}
`, []string{"config.vms: required"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			m, ps := extension.ParseManifest("", []byte(tc.yaml))
			if m == nil {
				t.Fatal(ps)
			}
			all := (&extension.Catalog{Extensions: map[string]*extension.Manifest{m.Name: m}}).Check(extension.NewRegistry(vmpacker.Info)).Error()
			for _, w := range tc.want {
				if !strings.Contains(all, w) {
					t.Errorf("problems lack %q:\n%s", w, all)
				}
			}
		})
	}
}
