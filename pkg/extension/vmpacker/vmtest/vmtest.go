// Package vmtest helps tests run ext.vm-packer for real against an
// [sshtest.Server] standing in for a VM: manifests pointing at it, a
// configured backend, and a TCP echo service on the "VM" side for tunnels
// to reach.
package vmtest

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/conformance"
	"github.com/sand-boxer/sandboxer/pkg/extension/vmpacker"
	"github.com/sand-boxer/sandboxer/pkg/sshx/sshtest"
)

// VM is the name the manifests of this package give the server.
const VM = "vm1"

// ManifestOptions shape a test manifest.
type ManifestOptions struct {
	// KnownHosts overrides the server's known_hosts file.
	KnownHosts string
	// NoSSHTargets leaves config.ssh_targets (and the ssh_target input)
	// out.
	NoSSHTargets bool
}

// ManifestYAML returns an ext.vm-packer manifest with one VM, [VM],
// reached through srv as its user, keeping sandboxes under baseDir; unless
// o.NoSSHTargets, the ssh_target input may name srv too. Its inputs are
// the shipped manifest's.
func ManifestYAML(srv *sshtest.Server, baseDir string, o ManifestOptions) string {
	kh := o.KnownHosts
	if kh == "" {
		kh = srv.KnownHostsFile
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, `name: vm-packer
handler: vm-packer
description: workspaces on a test sshd
capabilities:
  isolation_levels: [vm]
  pricing_model: self-hosted
inputs:
  vm:
    type: string
    format: name
  repo:
    type: string
    format: repo
  tunnel_port:
    type: port
  ssh_port:
    type: port
  workspace_dir:
    type: string
    format: path
`)
	if !o.NoSSHTargets {
		b.WriteString("  ssh_target:\n    type: string\n    format: ssh-target\n")
	}
	b.WriteString(repoPolicy())
	fmt.Fprintf(&b, `config:
  connect_timeout: 10s
  vms:
    %s:
      ssh: %s
      known_hosts: %s
      identity: %s
      base_dir: %s
`, VM, srv.Target(), kh, srv.IdentityFile, baseDir)
	if !o.NoSSHTargets {
		fmt.Fprintf(&b, `  ssh_targets:
    user: %s
    known_hosts: %s
    identity: %s
    base_dir: %s
`, srv.User, kh, srv.IdentityFile, baseDir)
	}
	return b.String()
}

// repoPolicy is the manifest's repo: block: every scheme, and local
// repositories in this machine's temporary directory, where the tests
// make them (the test sshd runs here, as the test's user).
func repoPolicy() string {
	tmp := os.TempDir()
	if r, err := filepath.EvalSymlinks(tmp); err == nil {
		tmp = r
	}
	return fmt.Sprintf("repo:\n  schemes: [https, ssh, git, file]\n  local_roots: [%q]\n", tmp)
}

// Manifest parses [ManifestYAML] as the catalog would.
func Manifest(t testing.TB, srv *sshtest.Server, baseDir string, o ManifestOptions) *extension.Manifest {
	t.Helper()
	m, ps := extension.ParseManifest("ext.vm-packer.yaml", []byte(ManifestYAML(srv, baseDir, o)))
	if len(ps) > 0 {
		t.Fatalf("vmtest: manifest: %v", ps)
	}
	return m
}

// WriteManifest writes [ManifestYAML] to dir/ext.vm-packer.yaml.
func WriteManifest(t testing.TB, dir string, srv *sshtest.Server, baseDir string, o ManifestOptions) string {
	t.Helper()
	file := filepath.Join(dir, "ext.vm-packer.yaml")
	if err := os.WriteFile(file, []byte(ManifestYAML(srv, baseDir, o)), 0o644); err != nil {
		t.Fatal(err)
	}
	return file
}

// Open configures a backend for m through a registry, as a provisioner
// does, and closes it in t.Cleanup.
func Open(t testing.TB, m *extension.Manifest) *vmpacker.VMPacker {
	t.Helper()
	return conformance.Open(t, vmpacker.Info, m).(*vmpacker.VMPacker)
}

// RoundTrip sends msg to the echo service at addr (directly or through a
// tunnel), closes its side, and returns what came back.
func RoundTrip(addr, msg string) (string, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte(msg)); err != nil {
		return "", err
	}
	_ = c.(*net.TCPConn).CloseWrite()
	b, err := io.ReadAll(c)
	return string(b), err
}

// Echo starts a TCP service on 127.0.0.1 that writes back what it reads,
// stops it in t.Cleanup, and returns its port: the service on the VM a
// tunnel leads to.
func Echo(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns []net.Conn
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().(*net.TCPAddr).Port
}
