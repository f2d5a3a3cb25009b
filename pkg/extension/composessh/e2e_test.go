//go:build e2e

package composessh_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/composessh"
	"github.com/sand-boxer/sandboxer/pkg/extension/composessh/composetest"
	"github.com/sand-boxer/sandboxer/pkg/extension/conformance"
	"github.com/sand-boxer/sandboxer/pkg/sshx"
	"github.com/sand-boxer/sandboxer/pkg/sshx/sshtest"
)

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// env is what every e2e test of this package shares: one sshd, one image.
type env struct {
	srv   *sshtest.Server
	image string
	repo  string // a healthy stack at docker-compose.yml
}

func exists(p string) bool { _, err := os.Lstat(p); return err == nil }

// instances counts what exists of a sandbox, asking Docker and the file
// system, not the backend: its directory, partial attempts at it, and a
// stack without a directory.
func instances(t *testing.T, c *composessh.ComposeSSH, base, id string) int {
	t.Helper()
	n := 0
	if exists(filepath.Join(base, id)) {
		n++
	}
	tmps, _ := filepath.Glob(filepath.Join(base, ".tmp-"+id+".*"))
	n += len(tmps)
	if n == 0 && !composetest.ProjectResources(t, c.Project(id)).Empty() {
		n = 1
	}
	return n
}

func TestE2E(t *testing.T) {
	e := env{srv: sshtest.Start(t, sshtest.Options{}), image: composetest.Image(t)}
	e.repo = composetest.Repo(t, composetest.RepoOptions{Image: e.image})

	// First, while nothing else talks to sshd: connections are counted.
	t.Run("InjectionRefusedBeforeSSH", func(t *testing.T) { injectionRefused(t, e) })
	t.Run("Conformance", func(t *testing.T) {
		base := t.TempDir()
		m := composetest.Manifest(t, e.srv, base, composetest.ManifestOptions{})
		conformance.Run(t, conformance.Harness{
			New:     func(t *testing.T) extension.Extension { return composetest.Open(t, m) },
			Profile: extension.Profile{Slug: "compose", Extension: "compose-ssh"},
			Inputs:  extension.Inputs{composessh.InputRepo: "file://" + e.repo},
			Host:    composetest.Host,
			Instances: func(t *testing.T, ext extension.Extension, id string) int {
				return instances(t, ext.(*composessh.ComposeSSH), base, id)
			},
			Timeout: 2 * time.Minute,
		})
	})
	t.Run("StackUpExecTeardown", func(t *testing.T) { t.Parallel(); stackUpExecTeardown(t, e) })
	t.Run("ChangedHostKeyFailsAndLeavesNothing", func(t *testing.T) { t.Parallel(); changedHostKey(t, e) })
	t.Run("UnhealthyStackIsNotReady", func(t *testing.T) { t.Parallel(); unhealthy(t, e) })
	t.Run("MissingComposeIsNamed", func(t *testing.T) { t.Parallel(); missingCompose(t, e) })
	t.Run("OrphanProjectListedAndRemoved", func(t *testing.T) { t.Parallel(); orphanProject(t, e) })
}

// composeUp starts the stack in dir as project, with the host's compose
// command, outside the backend.
func composeUp(t *testing.T, dir, project string) {
	t.Helper()
	argv := []string{"docker", "compose"}
	if exec.Command("docker", "compose", "version").Run() != nil {
		argv = []string{"docker-compose"}
	}
	cmd := exec.Command(argv[0], append(argv[1:], "--project-name", project, "up", "--detach")...)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v up: %v: %s", argv, err, out)
	}
	t.Cleanup(func() {
		cmd := exec.Command(argv[0], append(argv[1:], "--project-name", project, "down", "--volumes", "--timeout", "1")...)
		cmd.Dir = dir
		_ = cmd.Run()
	})
}

// orphanProject: a compose project carrying a sandbox's name, started
// outside sand-boxer (no workspace, no event), is what the backend holds
// of that sandbox; the listed handle tears it down completely.
func orphanProject(t *testing.T, e env) {
	base := t.TempDir()
	c := composetest.Open(t, composetest.Manifest(t, e.srv, base, composetest.ManifestOptions{}))
	id := "sbx-" + strings.TrimPrefix(conformance.NewSandboxID(), "conf-")
	composeUp(t, e.repo, id)
	ctx := ctxFor(t, 2*time.Minute)
	held, err := c.List(ctx)
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	var got *extension.Held
	for i := range held {
		if held[i].Handle.SandboxID == id {
			got = &held[i]
		}
	}
	res := composetest.ProjectResources(t, id)
	if got == nil {
		t.Fatalf("List %+v does not hold the project %s (Docker holds %s)", held, id, res)
	}
	if got.Handle.Host != composetest.Host || got.Since.IsZero() || time.Since(got.Since) > time.Hour {
		t.Errorf("listed as %+v", got)
	}
	for _, name := range res.Containers {
		if !slices.Contains(got.Resources, "container:"+name) {
			t.Errorf("listed resources %v lack container %s", got.Resources, name)
		}
	}
	for _, name := range res.Volumes {
		if !slices.Contains(got.Resources, "volume:"+name) {
			t.Errorf("listed resources %v lack volume %s", got.Resources, name)
		}
	}
	rep, err := c.Teardown(ctx, got.Handle)
	if err != nil {
		t.Fatalf("Teardown of the listed handle: %v", err)
	}
	if left := composetest.ProjectResources(t, id); !left.Empty() {
		t.Fatalf("after teardown Docker still holds %s (report %v)", left, rep.Removed)
	}
	held, err = c.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range held {
		if h.Handle.SandboxID == id {
			t.Fatalf("after teardown List still holds %+v", h)
		}
	}
}

func stackUpExecTeardown(t *testing.T, e env) {
	base := t.TempDir()
	c := composetest.Open(t, composetest.Manifest(t, e.srv, base, composetest.ManifestOptions{}))
	repo := composetest.Repo(t, composetest.RepoOptions{Image: e.image, ComposeFile: "deploy/stack.yml"})
	id := conformance.NewSandboxID()
	ctx := ctxFor(t, 3*time.Minute)
	in := extension.Inputs{
		extension.InputSandboxID:    id,
		composessh.InputRepo:        "file://" + repo,
		composessh.InputComposeFile: "deploy/stack.yml",
		composessh.InputEnv:         "GREETING=hello-from-env,UNUSED=1",
	}
	h, err := c.Provision(ctx, extension.Profile{}, in, composetest.Host)
	if err != nil {
		t.Fatalf("Provision: %v", err)
	}
	t.Cleanup(func() { _, _ = c.Teardown(context.Background(), h) })
	r, err := c.WaitReady(ctx, h)
	if err != nil {
		t.Fatalf("WaitReady: %v", err)
	}
	project := "sbx-" + id
	want := extension.Reachability{SSH: e.srv.Target().String(), RemoteDir: filepath.Join(base, id, "repo"), Host: composetest.Host, ComposeProject: project}
	if r.SSH != want.SSH || r.RemoteDir != want.RemoteDir || r.Host != want.Host || r.ComposeProject != want.ComposeProject {
		t.Fatalf("reachability %+v, want %+v", r, want)
	}

	// Reach the sandbox as its user would: SSH to the reachability and run
	// a command inside the stack.
	target, err := sshx.ParseTarget(r.SSH, "")
	if err != nil {
		t.Fatal(err)
	}
	cl, err := sshx.Dial(ctx, sshx.Config{Target: target, KnownHostsFile: e.srv.KnownHostsFile, IdentityFile: e.srv.IdentityFile})
	if err != nil {
		t.Fatalf("SSH to the reachability: %v", err)
	}
	defer cl.Close()
	out, err := cl.Run(ctx, "sh", "-c", `cd "$1" && exec docker exec "$(docker ps -q --filter "label=com.docker.compose.project=$2")" cat /data/greeting`, "exec", r.RemoteDir, r.ComposeProject)
	if err != nil || string(out) != "hello-from-env" {
		t.Fatalf("command inside the stack = %q, %v; want the env input's GREETING", out, err)
	}
	if _, err := cl.Run(ctx, "test", "-f", filepath.Join(r.RemoteDir, "deploy/stack.yml")); err != nil {
		t.Fatalf("the clone is not at remote_dir: %v", err)
	}

	res := composetest.ProjectResources(t, project)
	if len(res.Containers) != 1 || len(res.Networks) != 1 || len(res.Volumes) != 1 {
		t.Fatalf("stack holds %s, want one container, network and volume", res)
	}
	rep, err := c.Teardown(ctx, h)
	if err != nil {
		t.Fatalf("Teardown: %v", err)
	}
	wantRemoved := []string{
		"container:" + res.Containers[0], "network:" + res.Networks[0], "volume:" + res.Volumes[0],
		"dir:" + filepath.Join(base, id),
	}
	for _, w := range wantRemoved {
		if !slices.Contains(rep.Removed, w) {
			t.Errorf("cleanup report %v lacks %s", rep.Removed, w)
		}
	}
	if left := composetest.ProjectResources(t, project); !left.Empty() {
		t.Fatalf("after teardown Docker still holds %s", left)
	}
	if exists(filepath.Join(base, id)) {
		t.Fatal("after teardown the sandbox directory is still there")
	}
	rep, err = c.Teardown(ctx, h)
	if err != nil || len(rep.Removed) != 0 || !rep.AlreadyGone {
		t.Fatalf("second Teardown = %+v, %v; want already gone", rep, err)
	}
}

func changedHostKey(t *testing.T, e env) {
	base := t.TempDir()
	kh := e.srv.ChangedKnownHosts(t)
	c := composetest.Open(t, composetest.Manifest(t, e.srv, base, composetest.ManifestOptions{KnownHosts: kh}))
	id := conformance.NewSandboxID()
	ctx := ctxFor(t, time.Minute)
	h, err := c.Provision(ctx, extension.Profile{}, extension.Inputs{extension.InputSandboxID: id, composessh.InputRepo: "file://" + e.repo}, composetest.Host)
	if !errors.Is(err, sshx.ErrHostKeyChanged) {
		t.Fatalf("Provision against a host whose key changed = %v, want ErrHostKeyChanged", err)
	}
	var hke *sshx.HostKeyError
	errors.As(err, &hke)
	for _, want := range []string{"host key", "changed", e.srv.Addr(), hke.Fingerprint, kh} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %q", err, want)
		}
	}
	if exists(filepath.Join(base, id)) || !composetest.ProjectResources(t, c.Project(id)).Empty() {
		t.Fatal("a Provision refused at the host key left something behind")
	}
	// The failed sandbox's destroy fails the same way, naming the reason,
	// rather than pretending it cleaned up.
	if _, err := c.Teardown(ctx, h); !errors.Is(err, sshx.ErrHostKeyChanged) {
		t.Fatalf("Teardown = %v, want ErrHostKeyChanged", err)
	}
}

func unhealthy(t *testing.T, e env) {
	base := t.TempDir()
	c := composetest.Open(t, composetest.Manifest(t, e.srv, base, composetest.ManifestOptions{}))
	repo := composetest.Repo(t, composetest.RepoOptions{Image: e.image, Unhealthy: true})
	id := conformance.NewSandboxID()
	h, err := c.Provision(ctxFor(t, 2*time.Minute), extension.Profile{}, extension.Inputs{extension.InputSandboxID: id, composessh.InputRepo: repo}, composetest.Host)
	if err != nil {
		t.Fatalf("Provision: %v", err)
	}
	t.Cleanup(func() { _, _ = c.Teardown(context.Background(), h) })
	_, err = c.WaitReady(ctxFor(t, 5*time.Second), h)
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), composetest.Service+" is ") {
		t.Fatalf("WaitReady on a stack that never gets healthy = %v, want a deadline naming the service", err)
	}
	if _, err := c.Teardown(ctxFor(t, 2*time.Minute), h); err != nil {
		t.Fatal(err)
	}
	if left := composetest.ProjectResources(t, c.Project(id)); !left.Empty() || exists(filepath.Join(base, id)) {
		t.Fatalf("teardown left %s", left)
	}
}

func missingCompose(t *testing.T, e env) {
	base := t.TempDir()
	c := composetest.Open(t, composetest.Manifest(t, e.srv, base, composetest.ManifestOptions{
		ExtraConfig: []string{"compose: standalone", "docker_compose: /nonexistent/docker-compose"},
	}))
	id := conformance.NewSandboxID()
	ctx := ctxFor(t, time.Minute)
	h, err := c.Provision(ctx, extension.Profile{}, extension.Inputs{extension.InputSandboxID: id, composessh.InputRepo: "file://" + e.repo}, composetest.Host)
	if err == nil || !strings.Contains(err.Error(), "no compose command (tried /nonexistent/docker-compose)") {
		t.Fatalf("Provision without the compose plugin = %v", err)
	}
	if _, err := c.Teardown(ctx, h); err != nil {
		t.Fatalf("Teardown: %v", err)
	}
	if exists(filepath.Join(base, id)) {
		t.Fatal("teardown left the directory")
	}
}

func injectionRefused(t *testing.T, e env) {
	base := t.TempDir()
	c := composetest.Open(t, composetest.Manifest(t, e.srv, base, composetest.ManifestOptions{}))
	before := e.srv.Connections()
	for _, tc := range injections(e.repo) {
		t.Run(tc.name, func(t *testing.T) {
			_, err := c.Provision(ctxFor(t, time.Minute), extension.Profile{}, tc.in, tc.host)
			var fe extension.FieldErrors
			if !errors.As(err, &fe) || !strings.Contains(err.Error(), tc.field) {
				t.Fatalf("Provision(%v) = %v, want a field error on %s", tc.in, err, tc.field)
			}
		})
	}
	if got := e.srv.Connections(); got != before {
		t.Fatalf("refused inputs opened %d SSH connections, want 0:\n%s", got-before, e.srv.Log())
	}
	entries, _ := os.ReadDir(base)
	if len(entries) != 0 {
		t.Fatalf("refused inputs left %v", entries)
	}
}
