//go:build e2e

package vmpacker_test

import (
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/conformance"
	"github.com/sand-boxer/sandboxer/pkg/extension/vmpacker"
	"github.com/sand-boxer/sandboxer/pkg/extension/vmpacker/vmtest"
	"github.com/sand-boxer/sandboxer/pkg/sshx"
	"github.com/sand-boxer/sandboxer/pkg/sshx/sshtest"
)

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func exists(p string) bool { _, err := os.Lstat(p); return err == nil }

// gitRepo makes a repository with one committed README.
func gitRepo(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "README"), []byte("hello from the repo\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"init", "-q", "-b", "main", dir},
		{"-C", dir, "add", "README"},
		{"-C", dir, "-c", "user.email=e2e@example.com", "-c", "user.name=e2e", "commit", "-q", "-m", "readme"},
	} {
		if out, err := exec.Command("git", args...).CombinedOutput(); err != nil {
			t.Fatalf("git %v: %v: %s", args, err, out)
		}
	}
	return dir
}

// instances counts what exists of a sandbox on the "VM" (the directory and
// partial attempts, seen on disk) and in the backend (a tunnel still
// accepting connections, seen by dialling it).
func instances(t *testing.T, v *vmpacker.VMPacker, base, id string) int {
	n := 0
	if exists(filepath.Join(base, id)) {
		n++
	}
	tmps, _ := filepath.Glob(filepath.Join(base, ".tmp-"+id+".*"))
	n += len(tmps)
	if addr, ok := v.Tunnel(id); ok && n == 0 {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			n = 1
		}
	}
	return n
}

func TestE2E(t *testing.T) {
	srv := sshtest.Start(t, sshtest.Options{})
	repo := gitRepo(t)
	echoPort := strconv.Itoa(vmtest.Echo(t))

	t.Run("InjectionRefusedBeforeSSH", func(t *testing.T) {
		base := t.TempDir()
		v := vmtest.Open(t, vmtest.Manifest(t, srv, base, vmtest.ManifestOptions{}))
		before := srv.Connections()
		for _, tc := range injections(vmtest.VM) {
			t.Run(tc.name, func(t *testing.T) {
				_, err := v.Provision(ctxFor(t, time.Minute), extension.Profile{}, tc.in, "")
				var fe extension.FieldErrors
				if !errors.As(err, &fe) || !strings.Contains(err.Error(), tc.field) {
					t.Fatalf("Provision = %v, want a field error on %s", err, tc.field)
				}
			})
		}
		if got := srv.Connections(); got != before {
			t.Fatalf("refused inputs opened %d SSH connections, want 0", got-before)
		}
		if entries, _ := os.ReadDir(base); len(entries) != 0 {
			t.Fatalf("refused inputs left %v", entries)
		}
	})

	t.Run("Conformance", func(t *testing.T) {
		base := t.TempDir()
		m := vmtest.Manifest(t, srv, base, vmtest.ManifestOptions{})
		conformance.Run(t, conformance.Harness{
			New:     func(t *testing.T) extension.Extension { return vmtest.Open(t, m) },
			Profile: extension.Profile{Slug: "vm", Extension: "vm-packer"},
			Inputs: extension.Inputs{
				vmpacker.InputVM:         vmtest.VM,
				vmpacker.InputRepo:       "file://" + repo,
				vmpacker.InputTunnelPort: echoPort,
			},
			Host: vmtest.VM,
			Instances: func(t *testing.T, ext extension.Extension, id string) int {
				return instances(t, ext.(*vmpacker.VMPacker), base, id)
			},
			Timeout: time.Minute,
		})
	})

	t.Run("WorkspaceAndTunnel", func(t *testing.T) {
		t.Parallel()
		base := t.TempDir()
		v := vmtest.Open(t, vmtest.Manifest(t, srv, base, vmtest.ManifestOptions{}))
		id := conformance.NewSandboxID()
		ctx := ctxFor(t, time.Minute)
		h, err := v.Provision(ctx, extension.Profile{}, extension.Inputs{
			extension.InputSandboxID:   id,
			vmpacker.InputVM:           vmtest.VM,
			vmpacker.InputRepo:         repo,
			vmpacker.InputTunnelPort:   echoPort,
			vmpacker.InputWorkspaceDir: "src",
		}, "")
		if err != nil {
			t.Fatalf("Provision: %v", err)
		}
		t.Cleanup(func() { _, _ = v.Teardown(context.Background(), h) })
		r, err := v.WaitReady(ctx, h)
		if err != nil {
			t.Fatalf("WaitReady: %v", err)
		}
		if r.SSH != srv.Target().String() || r.Host != vmtest.VM || r.RemoteDir != filepath.Join(base, id, "src") {
			t.Fatalf("reachability %+v", r)
		}
		if b, err := os.ReadFile(filepath.Join(r.RemoteDir, "README")); err != nil || string(b) != "hello from the repo\n" {
			t.Fatalf("workspace README = %q, %v", b, err)
		}
		tunnel := r.Ports["tunnel"]
		if tunnel == "" {
			t.Fatalf("reachability has no tunnel port: %+v", r)
		}
		// Several connections through the tunnel reach the listener on the
		// VM side, and so does one after Provision runs again.
		for i := range 3 {
			msg := "through the tunnel " + strconv.Itoa(i)
			if got, err := vmtest.RoundTrip(tunnel, msg); err != nil || got != msg {
				t.Fatalf("echo through the tunnel = %q, %v; want %q", got, err, msg)
			}
		}
		h2, err := v.Provision(ctx, extension.Profile{}, extension.Inputs{
			extension.InputSandboxID: id, vmpacker.InputVM: vmtest.VM, vmpacker.InputRepo: repo,
			vmpacker.InputTunnelPort: echoPort, vmpacker.InputWorkspaceDir: "src",
		}, "")
		if err != nil || h2.Data["tunnel"] != tunnel {
			t.Fatalf("second Provision = %+v, %v; want the same tunnel %s", h2, err, tunnel)
		}
		rep, err := v.Teardown(ctx, h)
		if err != nil {
			t.Fatalf("Teardown: %v", err)
		}
		for _, w := range []string{"tunnel:" + tunnel, "dir:" + filepath.Join(base, id)} {
			if !slices.Contains(rep.Removed, w) {
				t.Errorf("cleanup report %v lacks %s", rep.Removed, w)
			}
		}
		if exists(filepath.Join(base, id)) {
			t.Fatal("the workspace is still on the VM")
		}
		if c, err := net.DialTimeout("tcp", tunnel, time.Second); err == nil {
			c.Close()
			t.Fatal("the tunnel still accepts after teardown")
		}
	})

	t.Run("SSHTargetInput", func(t *testing.T) {
		t.Parallel()
		base := t.TempDir()
		v := vmtest.Open(t, vmtest.Manifest(t, srv, base, vmtest.ManifestOptions{}))
		id := conformance.NewSandboxID()
		ctx := ctxFor(t, time.Minute)
		h, err := v.Provision(ctx, extension.Profile{}, extension.Inputs{
			extension.InputSandboxID: id,
			vmpacker.InputSSHTarget:  srv.Host, // user from config.ssh_targets
			vmpacker.InputSSHPort:    strconv.Itoa(srv.Port),
		}, "")
		if err != nil {
			t.Fatalf("Provision: %v", err)
		}
		if h.Host != srv.Target().String() {
			t.Fatalf("handle host %q, want the effective target %s", h.Host, srv.Target())
		}
		r, err := v.WaitReady(ctx, h)
		if err != nil || r.RemoteDir != filepath.Join(base, id, vmpacker.DefaultWorkspaceDir) {
			t.Fatalf("WaitReady = %+v, %v", r, err)
		}
		// A partial handle finds it too.
		if _, err := v.Teardown(ctx, extension.Handle{SandboxID: id, Host: h.Host}); err != nil {
			t.Fatal(err)
		}
		if exists(filepath.Join(base, id)) {
			t.Fatal("teardown left the workspace")
		}
	})

	t.Run("UnknownTargetKeyIsRefused", func(t *testing.T) {
		t.Parallel()
		base := t.TempDir()
		v := vmtest.Open(t, vmtest.Manifest(t, srv, base, vmtest.ManifestOptions{KnownHosts: sshtest.EmptyKnownHosts(t)}))
		_, err := v.Provision(ctxFor(t, time.Minute), extension.Profile{}, extension.Inputs{
			extension.InputSandboxID: conformance.NewSandboxID(),
			vmpacker.InputSSHTarget:  srv.Target().String(),
		}, "")
		if !errors.Is(err, sshx.ErrHostKeyUnknown) {
			t.Fatalf("Provision to a target missing from known_hosts = %v, want ErrHostKeyUnknown", err)
		}
	})

	t.Run("ChangedHostKeyFailsAndLeavesNothing", func(t *testing.T) {
		t.Parallel()
		base := t.TempDir()
		kh := srv.ChangedKnownHosts(t)
		v := vmtest.Open(t, vmtest.Manifest(t, srv, base, vmtest.ManifestOptions{KnownHosts: kh}))
		id := conformance.NewSandboxID()
		_, err := v.Provision(ctxFor(t, time.Minute), extension.Profile{}, extension.Inputs{
			extension.InputSandboxID: id, vmpacker.InputVM: vmtest.VM, vmpacker.InputRepo: repo, vmpacker.InputTunnelPort: echoPort,
		}, "")
		if !errors.Is(err, sshx.ErrHostKeyChanged) || !strings.Contains(err.Error(), kh) {
			t.Fatalf("Provision = %v, want ErrHostKeyChanged naming %s", err, kh)
		}
		if _, ok := v.Tunnel(id); ok || exists(filepath.Join(base, id)) {
			t.Fatal("a Provision refused at the host key left a tunnel or a workspace")
		}
		if entries, _ := os.ReadDir(base); len(entries) != 0 {
			t.Fatalf("left %v", entries)
		}
	})
}
