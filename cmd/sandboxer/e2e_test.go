//go:build e2e

package main

// The gateway-level end-to-end cases of the SSH backends: the whole
// control plane in process, its compose-ssh and vm-packer pools pointed at a
// real sshd on loopback, and stacks run by this machine's Docker engine.
// Every case runs for real: a missing sshd, busybox-static or Docker fails
// the test, it never skips.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/catalog"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/composessh"
	"github.com/sand-boxer/sandboxer/pkg/extension/composessh/composetest"
	"github.com/sand-boxer/sandboxer/pkg/extension/vmpacker/vmtest"
	"github.com/sand-boxer/sandboxer/pkg/sshx"
	"github.com/sand-boxer/sandboxer/pkg/sshx/sshtest"
	"github.com/sand-boxer/sandboxer/services/provisioner"
)

// e2eEnv is what the cases share: one sshd standing for the compose host
// and the VM, one image, one repository holding a healthy stack, and an
// echo service on the "VM" side for tunnels to reach.
type e2eEnv struct {
	srv      *sshtest.Server
	image    string
	repo     string // composetest's healthy one-service stack
	echoPort int
}

// e2eSystem is a control plane started on a catalog of the test's own.
type e2eSystem struct {
	sys *system
	c   *api.Client
}

// Profiles and extensions of the shared system.
const (
	extCompose      = "compose-ssh"
	extVM           = "vm-packer"
	extRekeyed      = "compose-rekeyed" // compose-ssh whose known_hosts lists another key
	profCompose     = "compose"
	profVM          = "vm"
	profRekeyed     = "compose-rekeyed"
	greetingForTest = "hello-through-the-gateway"
)

// TestGatewayE2E runs the gateway-level cases of the SSH backends: one sshd
// and one image for all, one system for every case but the killed
// provisioner's, which needs its own workers.
func TestGatewayE2E(t *testing.T) {
	e2eRequireDocker(t)
	e := &e2eEnv{srv: sshtest.Start(t, sshtest.Options{}), image: composetest.Image(t)}
	e.repo = composetest.Repo(t, composetest.RepoOptions{Image: e.image})
	e.echoPort = vmtest.Echo(t)

	// One system serves the cases that need no system of their own.
	bases := map[string]string{extCompose: t.TempDir(), extVM: t.TempDir(), extRekeyed: t.TempDir()}
	extDir, profDir := t.TempDir(), t.TempDir()
	e2eWriteFile(t, filepath.Join(extDir, "ext."+extCompose+".yaml"),
		composetest.ManifestYAML(e.srv, bases[extCompose], composetest.ManifestOptions{})+e2eWorkersYAML(10*time.Second))
	e2eWriteFile(t, filepath.Join(extDir, "ext."+extVM+".yaml"),
		vmtest.ManifestYAML(e.srv, bases[extVM], vmtest.ManifestOptions{})+e2eWorkersYAML(10*time.Second))
	// The same host under another extension whose known_hosts lists a
	// different key for it: what a client sees of a host whose key changed.
	changedKH := e.srv.ChangedKnownHosts(t)
	rekeyed := composetest.ManifestYAML(e.srv, bases[extRekeyed], composetest.ManifestOptions{KnownHosts: changedKH})
	if !strings.HasPrefix(rekeyed, "name: "+extCompose+"\n") {
		t.Fatalf("composetest manifest does not start with its name:\n%s", rekeyed)
	}
	rekeyed = "name: " + extRekeyed + strings.TrimPrefix(rekeyed, "name: "+extCompose)
	e2eWriteFile(t, filepath.Join(extDir, "ext."+extRekeyed+".yaml"), rekeyed+e2eWorkersYAML(10*time.Second))
	e2eWriteProfile(t, profDir, profCompose, extCompose, "container")
	e2eWriteProfile(t, profDir, profRekeyed, extRekeyed, "container")
	e2eWriteProfile(t, profDir, profVM, extVM, "vm")
	s := startE2ESystem(t, extDir, profDir, nil)

	// First, alone: it counts the connections sshd accepts.
	t.Run("InjectionRefusedBeforeSSH", func(t *testing.T) { e2eInjectionRefused(t, e, s, bases) })
	t.Run("ComposeStackUpExecDestroy", func(t *testing.T) { t.Parallel(); e2eCompose(t, e, s, bases[extCompose]) })
	t.Run("VMWorkspaceAndTunnel", func(t *testing.T) { t.Parallel(); e2eVM(t, e, s, bases[extVM]) })
	t.Run("ChangedHostKeyFailsAndLeavesNothing", func(t *testing.T) {
		t.Parallel()
		e2eChangedHostKey(t, e, s, bases[extRekeyed], changedKH)
	})
	t.Run("ProvisionerKilledDuringComposeUp", func(t *testing.T) { t.Parallel(); e2eKilledProvisioner(t, e) })
}

// e2eRequireDocker fails t unless the Docker engine answers.
func e2eRequireDocker(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "docker", "info", "--format", "{{.ServerVersion}}").CombinedOutput()
	if err != nil {
		t.Fatalf("docker info: %v: %s (the e2e cases need a running Docker engine)", err, out)
	}
}

// e2eCtx returns a context that ends after d or with the test.
func e2eCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// e2eWriteFile writes content to file, mode 0644.
func e2eWriteFile(t *testing.T, file, content string) {
	t.Helper()
	if err := os.WriteFile(file, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// e2eWorkersYAML is a manifest's workers block with a short back-off, so
// retries in a test come quickly.
func e2eWorkersYAML(ackWait time.Duration) string {
	return fmt.Sprintf("workers:\n  concurrency: 4\n  ack_wait: %s\n  max_deliver: 10\n  backoff: [1s]\n", ackWait)
}

// e2eWriteProfile writes a free profile bound to ext with short deadlines.
func e2eWriteProfile(t *testing.T, dir, slug, ext, isolation string) {
	t.Helper()
	e2eWriteFile(t, filepath.Join(dir, "profile."+slug+".yaml"), fmt.Sprintf(`slug: %s
description: e2e profile on %s
extension: %s
isolation: %s
ttl:
  default: 10m
  max: 1h
deadlines:
  provision: 2m
  ready: 1m
  teardown: 1m
`, slug, ext, ext, isolation))
}

// startE2ESystem runs the control plane on the given catalog, NATS
// listening on loopback for workers of the test's own, with worker pools
// for pools (default: every extension of the catalog).
func startE2ESystem(t *testing.T, extDir, profDir string, pools []string) *e2eSystem {
	t.Helper()
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	sys, err := startSystem(ctx, systemConfig{
		DataDir: dir, HTTPAddr: "127.0.0.1:0", NATSListen: "127.0.0.1:-1",
		ExtensionsDir: extDir, ProfilesDir: profDir,
		Pools: pools, Extensions: linkedExtensions(),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		sys.Shutdown(ctx)
	})
	tok, err := os.ReadFile(keyPath(dir, "dev"))
	if err != nil {
		t.Fatal(err)
	}
	return &e2eSystem{sys: sys, c: api.NewClient(sys.URL, strings.TrimSpace(string(tok)), nil)}
}

// e2eLifecycle reads the sandbox's lifecycle events from the stream, in
// order, until one announcing state until arrives, and returns them all.
func e2eLifecycle(ctx context.Context, t *testing.T, js jetstream.JetStream, id string, until event.State) []*event.Event {
	t.Helper()
	cons, err := js.OrderedConsumer(ctx, event.StreamLifecycle, jetstream.OrderedConsumerConfig{FilterSubjects: []string{event.SandboxFilter(id)}})
	if err != nil {
		t.Fatal(err)
	}
	var seen []string
	var evs []*event.Event
	for {
		msg, err := cons.Next(jetstream.FetchContext(ctx))
		if err != nil {
			t.Fatalf("waiting for %s of %s after %v: %v", until, id, seen, err)
		}
		_, ev, err := event.Decode(ctx, msg.Headers(), msg.Data())
		if err != nil {
			t.Fatal(err)
		}
		evs = append(evs, ev)
		st, _ := event.StateOf(event.Type(ev.Type()))
		seen = append(seen, string(st))
		if st == until {
			return evs
		}
	}
}

// e2eDataOf decodes the data of the last event of evs, which announces the
// state the caller waited for.
func e2eDataOf[T any](t *testing.T, evs []*event.Event) T {
	t.Helper()
	var v T
	if err := event.DataAs(evs[len(evs)-1], &v); err != nil {
		t.Fatal(err)
	}
	return v
}

// e2eLifecycleCount counts the sandbox's events announcing state s.
func e2eLifecycleCount(ctx context.Context, t *testing.T, js jetstream.JetStream, ext, id string, s event.State) uint64 {
	t.Helper()
	st, err := js.Stream(ctx, event.StreamLifecycle)
	if err != nil {
		t.Fatal(err)
	}
	subj := event.LifecycleSubject("dev", ext, id, s)
	info, err := st.Info(ctx, jetstream.WithSubjectFilter(subj))
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Subjects[subj]
}

// e2eAwait polls cond until it holds, failing t when ctx ends first.
func e2eAwait(ctx context.Context, t *testing.T, what string, cond func() bool) {
	t.Helper()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for %s: %v", what, ctx.Err())
		case <-tick.C:
		}
	}
}

// e2eSSH connects to a reachability's ssh target as its user would, with
// the test's known_hosts and identity.
func e2eSSH(ctx context.Context, t *testing.T, e *e2eEnv, target string) *sshx.Client {
	t.Helper()
	tg, err := sshx.ParseTarget(target, "")
	if err != nil {
		t.Fatalf("reachability ssh %q: %v", target, err)
	}
	cl, err := sshx.Dial(ctx, sshx.Config{Target: tg, KnownHostsFile: e.srv.KnownHostsFile, IdentityFile: e.srv.IdentityFile})
	if err != nil {
		t.Fatalf("SSH to the reachability %s: %v", target, err)
	}
	t.Cleanup(func() { _ = cl.Close() })
	return cl
}

// e2eRemoteExists asks the host over SSH whether path exists.
func e2eRemoteExists(ctx context.Context, t *testing.T, cl *sshx.Client, path string) bool {
	t.Helper()
	out, err := cl.Run(ctx, "sh", "-c", `if [ -e "$1" ]; then echo yes; else echo no; fi`, "exists", path)
	if err != nil {
		t.Fatalf("looking for %s over SSH: %v", path, err)
	}
	return strings.TrimSpace(string(out)) == "yes"
}

// e2eDirEntries lists the names in dir.
func e2eDirEntries(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range es {
		names = append(names, e.Name())
	}
	return names
}

// e2eInjectionRefused sends inputs carrying shell or option injection: the
// gateway answers 422 naming the field, records and commands nothing, and
// sshd accepts no connection for them.
func e2eInjectionRefused(t *testing.T, e *e2eEnv, s *e2eSystem, bases map[string]string) {
	ctx := e2eCtx(t, time.Minute)
	repo := "file://" + e.repo
	vm := vmtest.VM
	before := e.srv.Connections()
	cases := []struct {
		name, profile string
		inputs        map[string]string
		field         string
	}{
		{"repo as upload-pack option", profCompose, map[string]string{"repo": "--upload-pack=touch /tmp/x"}, "inputs.repo"},
		{"repo with a command after a semicolon", profCompose, map[string]string{"repo": "https://x/y;id"}, "inputs.repo"},
		{"compose_file leaving the checkout", profCompose, map[string]string{"repo": repo, "compose_file": "../../etc"}, "inputs.compose_file"},
		{"env with command substitution", profCompose, map[string]string{"repo": repo, "env": "A=$(id)"}, "inputs.env"},
		{"vm repo as upload-pack option", profVM, map[string]string{"vm": vm, "repo": "--upload-pack=touch /tmp/x"}, "inputs.repo"},
		{"vm workspace_dir leaving the base", profVM, map[string]string{"vm": vm, "workspace_dir": "../../etc"}, "inputs.workspace_dir"},
		{"vm ssh_target as ssh option", profVM, map[string]string{"ssh_target": "-oProxyCommand=id"}, "inputs.ssh_target"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			sb, err := s.c.Create(ctx, api.CreateRequest{Profile: tc.profile, Inputs: tc.inputs}, "")
			var p *api.Problem
			if !errors.As(err, &p) || p.Status != 422 {
				t.Fatalf("Create(%v) = %+v, %v; want 422", tc.inputs, sb, err)
			}
			if !slices.ContainsFunc(p.Errors, func(fe extension.FieldError) bool { return fe.Field == tc.field }) {
				t.Fatalf("422 names %+v, want %s", p.Errors, tc.field)
			}
		})
	}
	// Nothing was recorded or commanded.
	if list, err := s.c.List(ctx, api.ListFilter{}); err != nil || len(list) != 0 {
		t.Fatalf("sandboxes after refused requests: %+v, %v; want none", list, err)
	}
	st, err := s.sys.JS.Stream(ctx, event.StreamCommands)
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State.LastSeq != 0 {
		t.Fatalf("commands stream has %d messages after refused requests, want 0", info.State.LastSeq)
	}
	// No SSH connection: open one of our own and wait until sshd logs it;
	// sshd logs accepted connections in order, so any connection opened
	// for the refused requests would be counted before it.
	cl, err := sshx.Dial(ctx, e.srv.Config())
	if err != nil {
		t.Fatal(err)
	}
	cl.Close()
	e2eAwait(ctx, t, "sshd to log the marker connection", func() bool { return e.srv.Connections() > before })
	if got := e.srv.Connections() - before; got != 1 {
		t.Fatalf("sshd accepted %d connections for the refused requests, want 0:\n%s", got-1, e.srv.Log())
	}
	for ext, base := range bases {
		if names := e2eDirEntries(t, base); len(names) != 0 {
			t.Fatalf("%s base dir holds %v after refused requests", ext, names)
		}
	}
}

// e2eCleanup makes sure a sandbox a case created is gone when the case
// ends, failed or not: destroyed through the gateway, then whatever still
// carries its compose project's label removed from Docker directly.
func e2eCleanup(t *testing.T, s *e2eSystem, id, project string) {
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if sb, err := s.c.Get(ctx, id); err == nil && !sb.State.Terminal() {
			if _, err := s.c.Destroy(ctx, id); err == nil {
				_, _ = s.c.Wait(ctx, id, event.State.Terminal, nil)
			}
		}
		if project == "" {
			return
		}
		f := "label=com.docker.compose.project=" + project
		script := `ids=$(docker ps -aq --filter "$1"); [ -z "$ids" ] || docker rm -f $ids
ids=$(docker network ls -q --filter "$1"); [ -z "$ids" ] || docker network rm $ids
ids=$(docker volume ls -q --filter "$1"); [ -z "$ids" ] || docker volume rm -f $ids
true`
		if out, err := exec.CommandContext(ctx, "sh", "-c", script, "sweep", f).CombinedOutput(); err != nil {
			t.Logf("sweeping %s: %v: %s", project, err, out)
		}
	})
}

// e2eCompose creates a compose-ssh sandbox through the gateway, reaches
// into its stack over SSH, destroys it, and finds nothing left of it in
// Docker or on the host.
func e2eCompose(t *testing.T, e *e2eEnv, s *e2eSystem, base string) {
	ctx := e2eCtx(t, 3*time.Minute)
	sb, err := s.c.Create(ctx, api.CreateRequest{Profile: profCompose, TTL: "10m", Inputs: map[string]string{
		"repo": "file://" + e.repo, "env": "GREETING=" + greetingForTest,
	}}, "")
	if err != nil {
		t.Fatal(err)
	}
	project := sb.ID // ids start with the default project prefix, sbx-, so the id is the project
	e2eCleanup(t, s, sb.ID, project)
	ready, err := s.c.Wait(ctx, sb.ID, func(st event.State) bool { return st.Rank() >= event.StateReady.Rank() }, nil)
	if err != nil {
		t.Fatal(err)
	}
	if ready.State != event.StateReady || ready.Reachability == nil {
		t.Fatalf("sandbox = %+v (reason %q), want ready with reachability", ready.State, ready.Reason)
	}
	r := ready.Reachability
	dir := filepath.Join(base, sb.ID)
	if r.SSH != e.srv.Target().String() || r.ComposeProject != project || r.RemoteDir != filepath.Join(dir, "repo") || r.Host != composetest.Host {
		t.Fatalf("reachability %+v, want ssh %s, project %s, remote_dir under %s, host %s", r, e.srv.Target(), project, dir, composetest.Host)
	}

	// As the sandbox's user: SSH to the reachability and run a command
	// inside the stack, in its remote dir.
	cl := e2eSSH(ctx, t, e, r.SSH)
	out, err := cl.Run(ctx, "sh", "-c", `cd "$1" && exec docker exec "$(docker ps -q --filter "label=com.docker.compose.project=$2" --filter "label=com.docker.compose.service=$3")" cat /data/greeting`,
		"exec", r.RemoteDir, r.ComposeProject, composetest.Service)
	if err != nil || string(out) != greetingForTest {
		t.Fatalf("command inside the stack = %q, %v; want the env input's GREETING %q", out, err, greetingForTest)
	}
	if !e2eRemoteExists(ctx, t, cl, filepath.Join(r.RemoteDir, "docker-compose.yml")) {
		t.Fatal("the repository is not cloned at remote_dir")
	}
	res := composetest.ProjectResources(t, project)
	if len(res.Containers) != 1 || len(res.Networks) != 1 || len(res.Volumes) != 1 {
		t.Fatalf("the stack holds %s, want one container, network and volume", res)
	}

	if _, err := s.c.Destroy(ctx, sb.ID); err != nil {
		t.Fatal(err)
	}
	gone, err := s.c.Wait(ctx, sb.ID, event.State.Terminal, nil)
	if err != nil {
		t.Fatal(err)
	}
	if gone.State != event.StateDestroyed {
		t.Fatalf("state after destroy = %s (reason %q), want destroyed", gone.State, gone.Reason)
	}
	destroyed := e2eDataOf[event.Destroyed](t, e2eLifecycle(ctx, t, s.sys.JS, sb.ID, event.StateDestroyed))
	for _, w := range []string{"container:" + res.Containers[0], "network:" + res.Networks[0], "volume:" + res.Volumes[0], "dir:" + dir} {
		if !slices.Contains(destroyed.Cleanup.Removed, w) {
			t.Errorf("destroyed event's cleanup %v lacks %s", destroyed.Cleanup.Removed, w)
		}
	}
	// Independently of the backend: Docker by the project's label, the
	// host's file system over SSH.
	if left := composetest.ProjectResources(t, project); !left.Empty() {
		t.Fatalf("after destroyed Docker still holds %s", left)
	}
	if e2eRemoteExists(ctx, t, cl, dir) {
		t.Fatalf("after destroyed %s is still on the host", dir)
	}
	if names := e2eDirEntries(t, base); len(names) != 0 {
		t.Fatalf("after destroyed the base dir holds %v", names)
	}
}

// e2eChangedHostKey creates a sandbox on a host whose key changed: the
// create ends in a failed event naming the host key problem, nothing is
// made, and the teardown that follows refuses the host too, rather than
// pretending it cleaned up, until the operator puts the host's real key in
// known_hosts; then the sandbox is destroyed.
func e2eChangedHostKey(t *testing.T, e *e2eEnv, s *e2eSystem, base, knownHosts string) {
	ctx := e2eCtx(t, 3*time.Minute)
	sb, err := s.c.Create(ctx, api.CreateRequest{Profile: profRekeyed, Inputs: map[string]string{"repo": "file://" + e.repo}}, "")
	if err != nil {
		t.Fatal(err)
	}
	project := sb.ID
	e2eCleanup(t, s, sb.ID, project)
	restored := false
	restore := func() {
		if !restored {
			sshtest.WriteKnownHosts(t, knownHosts, e.srv.Addr(), e.srv.HostKey)
			restored = true
		}
	}
	t.Cleanup(restore) // before e2eCleanup's destroy, on failure

	evs := e2eLifecycle(ctx, t, s.sys.JS, sb.ID, event.StateFailed)
	failed := e2eDataOf[event.Failed](t, evs)
	if failed.Phase != "provision" {
		t.Errorf("failed in phase %q, want provision", failed.Phase)
	}
	for _, want := range []string{"host key", "changed", e.srv.Addr(), knownHosts} {
		if !strings.Contains(failed.Reason, want) {
			t.Errorf("failed event's reason %q does not name %q", failed.Reason, want)
		}
	}
	if left := composetest.ProjectResources(t, project); !left.Empty() {
		t.Fatalf("a create refused at the host key left %s", left)
	}
	if names := e2eDirEntries(t, base); len(names) != 0 {
		t.Fatalf("a create refused at the host key left %v on the host", names)
	}

	// The destroy that follows a failed create cannot check the host
	// either: it fails and is retried, and the sandbox stays destroying.
	e2eLifecycle(ctx, t, s.sys.JS, sb.ID, event.StateDestroying)
	cons, err := s.sys.JS.Consumer(ctx, event.StreamCommands, "provisioner-"+extRekeyed)
	if err != nil {
		t.Fatal(err)
	}
	e2eAwait(ctx, t, "the destroy command to be redelivered", func() bool {
		info, err := cons.Info(ctx)
		return err == nil && info.NumRedelivered > 0
	})
	if got, err := s.c.Get(ctx, sb.ID); err != nil || got.State != event.StateDestroying {
		t.Fatalf("while the host key is wrong the sandbox is %+v, %v; want destroying", got, err)
	}

	// The operator puts the host's real key back: the next retry tears
	// down what there is (nothing) and the sandbox is destroyed.
	restore()
	destroyed := e2eDataOf[event.Destroyed](t, e2eLifecycle(ctx, t, s.sys.JS, sb.ID, event.StateDestroyed))
	if !destroyed.Cleanup.AlreadyGone || len(destroyed.Cleanup.Removed) != 0 {
		t.Errorf("cleanup %+v, want already gone: the failed create made nothing", destroyed.Cleanup)
	}
	got, err := s.c.Wait(ctx, sb.ID, event.State.Terminal, nil)
	if err != nil || got.State != event.StateDestroyed {
		t.Fatalf("sandbox = %+v, %v; want destroyed", got, err)
	}
	if !strings.Contains(got.Reason, "host key") {
		t.Errorf("the sandbox's reason %q does not name the host key", got.Reason)
	}
	if left := composetest.ProjectResources(t, project); !left.Empty() {
		t.Fatalf("after destroyed Docker holds %s", left)
	}
	if names := e2eDirEntries(t, base); len(names) != 0 {
		t.Fatalf("after destroyed the host holds %v", names)
	}
}

// e2eVM creates a vm-packer sandbox with a tunnel through the gateway:
// traffic through reachability.ports["tunnel"] reaches the listener on the
// VM side; after destroyed the tunnel refuses connections and the
// workspace is gone.
func e2eVM(t *testing.T, e *e2eEnv, s *e2eSystem, base string) {
	ctx := e2eCtx(t, 3*time.Minute)
	sb, err := s.c.Create(ctx, api.CreateRequest{Profile: profVM, TTL: "10m", Inputs: map[string]string{
		"vm": vmtest.VM, "repo": "file://" + e.repo, "tunnel_port": strconv.Itoa(e.echoPort),
	}}, "")
	if err != nil {
		t.Fatal(err)
	}
	e2eCleanup(t, s, sb.ID, "")
	ready, err := s.c.Wait(ctx, sb.ID, func(st event.State) bool { return st.Rank() >= event.StateReady.Rank() }, nil)
	if err != nil {
		t.Fatal(err)
	}
	if ready.State != event.StateReady || ready.Reachability == nil {
		t.Fatalf("sandbox = %s (reason %q), want ready with reachability", ready.State, ready.Reason)
	}
	r := ready.Reachability
	dir := filepath.Join(base, sb.ID)
	if r.SSH != e.srv.Target().String() || r.RemoteDir != filepath.Join(dir, "workspace") || r.Host != vmtest.VM {
		t.Fatalf("reachability %+v, want ssh %s, remote_dir under %s, host %s", r, e.srv.Target(), dir, vmtest.VM)
	}
	tunnel := r.Ports["tunnel"]
	if tunnel == "" {
		t.Fatalf("reachability has no tunnel port: %+v", r)
	}
	for i := range 3 {
		msg := "through the tunnel " + strconv.Itoa(i)
		if got, err := vmtest.RoundTrip(tunnel, msg); err != nil || got != msg {
			t.Fatalf("echo through the tunnel = %q, %v; want %q", got, err, msg)
		}
	}
	cl := e2eSSH(ctx, t, e, r.SSH)
	if !e2eRemoteExists(ctx, t, cl, filepath.Join(r.RemoteDir, "docker-compose.yml")) {
		t.Fatal("the repository is not cloned in the workspace")
	}

	if _, err := s.c.Destroy(ctx, sb.ID); err != nil {
		t.Fatal(err)
	}
	gone, err := s.c.Wait(ctx, sb.ID, event.State.Terminal, nil)
	if err != nil {
		t.Fatal(err)
	}
	if gone.State != event.StateDestroyed {
		t.Fatalf("state after destroy = %s (reason %q), want destroyed", gone.State, gone.Reason)
	}
	destroyed := e2eDataOf[event.Destroyed](t, e2eLifecycle(ctx, t, s.sys.JS, sb.ID, event.StateDestroyed))
	for _, w := range []string{"tunnel:" + tunnel, "dir:" + dir} {
		if !slices.Contains(destroyed.Cleanup.Removed, w) {
			t.Errorf("destroyed event's cleanup %v lacks %s", destroyed.Cleanup.Removed, w)
		}
	}
	if c, err := net.DialTimeout("tcp", tunnel, 5*time.Second); err == nil {
		c.Close()
		t.Fatalf("the tunnel %s still accepts connections after destroyed", tunnel)
	}
	if e2eRemoteExists(ctx, t, cl, dir) {
		t.Fatalf("after destroyed the workspace %s is still on the VM", dir)
	}
	if names := e2eDirEntries(t, base); len(names) != 0 {
		t.Fatalf("after destroyed the VM's base dir holds %v", names)
	}
}

// e2eWorker is a provisioner serving compose-ssh on a NATS connection of
// its own, as a separate process would.
type e2eWorker struct {
	id  string
	nc  *nats.Conn
	p   *provisioner.Provisioner
	ext atomic.Pointer[composessh.ComposeSSH]
}

// e2eStartWorker starts a worker and shuts it down with the test.
func e2eStartWorker(t *testing.T, s *e2eSystem, id string) *e2eWorker {
	t.Helper()
	w := &e2eWorker{id: id}
	// A worker of its own pool's identity, as an operator would start it
	// with provisioner-<extension>.creds.
	creds, _, err := s.sys.Auth.Issue(auth.Identity{Role: auth.RoleProvisioner, Extension: extCompose}, auth.IssueOptions{Unlisted: true})
	if err != nil {
		t.Fatal(err)
	}
	opts, err := auth.ConnectOptions(creds)
	if err != nil {
		t.Fatal(err)
	}
	nc, err := nats.Connect(s.sys.NATS.ClientURL(), append(opts, nats.Name(id))...)
	if err != nil {
		t.Fatal(err)
	}
	w.nc = nc
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	wctx, stopWatch := context.WithCancel(context.Background())
	t.Cleanup(stopWatch)
	cat, err := catalog.Follow(wctx, nc)
	if err != nil {
		t.Fatal(err)
	}
	<-cat.Ready()
	reg := extension.NewRegistry(extension.Info{Handler: composessh.Handler, New: func() extension.Extension {
		c := new(composessh.ComposeSSH)
		w.ext.Store(c)
		return c
	}})
	w.p, err = provisioner.New(provisioner.Options{
		JS: js, Catalog: cat, Extensions: reg, Pools: []string{extCompose},
		DataDir: t.TempDir(), WorkerID: id,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := w.p.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = w.p.Shutdown(ctx)
	})
	return w
}

// kill ends the worker as a dying process would: its NATS connection
// drops without an ack or a nak, and so do its SSH connections, which
// stops the remote commands they run.
func (w *e2eWorker) kill(t *testing.T) {
	t.Helper()
	w.nc.Close()
	if c := w.ext.Load(); c != nil {
		_ = c.Close()
	}
}

// e2eSlowRepo makes a repository whose stack takes a while to come up:
// web gets healthy after a few seconds and app waits for it, so `compose
// up` runs for those seconds with web's container made and app's not.
func e2eSlowRepo(t *testing.T, image string) string {
	t.Helper()
	loop := `trap 'exit 0' TERM; while :; do sleep 1 & wait $$!; done`
	compose := fmt.Sprintf(`services:
  web:
    image: %[1]s
    command: ["/bin/sh", "-c", "sleep 4; touch /data/ready; %[2]s"]
    healthcheck:
      test: ["CMD", "/bin/test", "-f", "/data/ready"]
      interval: 1s
      timeout: 2s
      retries: 60
    volumes:
      - data:/data
  app:
    image: %[1]s
    command: ["/bin/sh", "-c", "%[2]s"]
    depends_on:
      web:
        condition: service_healthy
volumes:
  data: {}
`, image, loop)
	dir := t.TempDir()
	e2eWriteFile(t, filepath.Join(dir, "docker-compose.yml"), compose)
	for _, args := range [][]string{
		{"init", "-q", "-b", "main", dir},
		{"-C", dir, "add", "."},
		{"-C", dir, "-c", "user.email=e2e@example.com", "-c", "user.name=e2e", "commit", "-q", "-m", "slow stack"},
	} {
		if out, err := exec.Command("git", args...).CombinedOutput(); err != nil {
			t.Fatalf("git %v: %v: %s", args, err, out)
		}
	}
	return dir
}

// e2eKilledProvisioner kills the compose-ssh worker running a sandbox's
// `compose up`; the other worker gets the command after ack_wait and
// completes it: one ready event, one stack, and destroy cleans everything.
func e2eKilledProvisioner(t *testing.T, e *e2eEnv) {
	base := t.TempDir()
	extDir, profDir := t.TempDir(), t.TempDir()
	e2eWriteFile(t, filepath.Join(extDir, "ext."+extCompose+".yaml"),
		composetest.ManifestYAML(e.srv, base, composetest.ManifestOptions{})+e2eWorkersYAML(5*time.Second))
	// The system runs a pool for vm-packer only: compose-ssh is served by
	// the two workers below.
	e2eWriteFile(t, filepath.Join(extDir, "ext."+extVM+".yaml"),
		vmtest.ManifestYAML(e.srv, t.TempDir(), vmtest.ManifestOptions{}))
	e2eWriteProfile(t, profDir, profCompose, extCompose, "container")
	s := startE2ESystem(t, extDir, profDir, []string{extVM})
	if slices.Contains(s.sys.Pools, extCompose) {
		t.Fatalf("the system runs a compose-ssh pool: %v", s.sys.Pools)
	}
	workers := map[string]*e2eWorker{}
	for _, id := range []string{"worker-a", "worker-b"} {
		workers[id] = e2eStartWorker(t, s, id)
	}

	ctx := e2eCtx(t, 4*time.Minute)
	repo := e2eSlowRepo(t, e.image)
	sb, err := s.c.Create(ctx, api.CreateRequest{Profile: profCompose, Inputs: map[string]string{"repo": "file://" + repo}}, "")
	if err != nil {
		t.Fatal(err)
	}
	project := sb.ID
	e2eCleanup(t, s, sb.ID, project)

	// Find the worker provisioning it, and wait until its compose up is
	// under way: web's container exists and app's does not yet.
	prov := e2eDataOf[event.Provisioning](t, e2eLifecycle(ctx, t, s.sys.JS, sb.ID, event.StateProvisioning))
	victim := workers[prov.Worker]
	if victim == nil {
		t.Fatalf("provisioning by %q, not one of the test's workers", prov.Worker)
	}
	var survivor *e2eWorker
	for id, w := range workers {
		if id != victim.id {
			survivor = w
		}
	}
	e2eAwait(ctx, t, "a container of "+project, func() bool {
		return len(composetest.ProjectResources(t, project).Containers) > 0
	})
	if res := composetest.ProjectResources(t, project); len(res.Containers) != 1 {
		t.Fatalf("compose up had got past web before the kill (%s): the stack is too quick for this case", res)
	}
	victim.kill(t)
	t.Logf("killed %s during compose up of %s", victim.id, project)

	ready, err := s.c.Wait(ctx, sb.ID, func(st event.State) bool { return st.Rank() >= event.StateReady.Rank() }, nil)
	if err != nil {
		t.Fatal(err)
	}
	if ready.State != event.StateReady {
		t.Fatalf("sandbox = %s (reason %q), want ready", ready.State, ready.Reason)
	}
	if n := e2eLifecycleCount(ctx, t, s.sys.JS, extCompose, sb.ID, event.StateReady); n != 1 {
		t.Fatalf("%d ready events, want exactly 1", n)
	}
	if n := victim.p.Stats().Handled.Load(); n != 0 {
		t.Fatalf("the killed worker completed %d commands", n)
	}
	if n := survivor.p.Stats().Handled.Load(); n != 1 {
		t.Fatalf("the surviving worker completed %d commands, want the create", n)
	}
	// One stack: one container per service, one network, one volume.
	res := composetest.ProjectResources(t, project)
	if len(res.Containers) != 2 || len(res.Networks) != 1 || len(res.Volumes) != 1 {
		t.Fatalf("the stack holds %s, want two containers (web, app), one network and one volume", res)
	}
	for _, svc := range []string{"web", "app"} {
		composetest.ContainerOf(t, project, svc) // exactly one, running
	}
	if names := e2eDirEntries(t, base); len(names) != 1 || names[0] != sb.ID {
		t.Fatalf("the host's base dir holds %v, want [%s]", names, sb.ID)
	}

	if _, err := s.c.Destroy(ctx, sb.ID); err != nil {
		t.Fatal(err)
	}
	gone, err := s.c.Wait(ctx, sb.ID, event.State.Terminal, nil)
	if err != nil {
		t.Fatal(err)
	}
	if gone.State != event.StateDestroyed {
		t.Fatalf("state after destroy = %s (reason %q), want destroyed", gone.State, gone.Reason)
	}
	if left := composetest.ProjectResources(t, project); !left.Empty() {
		t.Fatalf("after destroyed Docker still holds %s", left)
	}
	if names := e2eDirEntries(t, base); len(names) != 0 {
		t.Fatalf("after destroyed the host's base dir holds %v", names)
	}
}
