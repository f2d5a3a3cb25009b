// Package composetest helps tests run ext.compose-ssh for real: it builds
// a container image FROM scratch with the static busybox of Debian's
// busybox-static (no image can be pulled), makes git repositories holding
// a compose stack on that image, writes manifests pointing at an
// [sshtest.Server], and lists what the local Docker engine holds of a
// compose project, independently of the backend.
//
// Everything here fails the test when Docker, busybox-static or git is
// missing: it never skips.
package composetest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/composessh"
	"github.com/sand-boxer/sandboxer/pkg/extension/conformance"
	"github.com/sand-boxer/sandboxer/pkg/sshx/sshtest"
)

// Busybox is the static busybox binary images are built from.
const Busybox = "/bin/busybox"

// ImageRepository is the repository of the images Image builds.
const ImageRepository = "sandboxer-e2e/busybox"

// Dockerfile builds the test image from a build context holding the
// busybox binary. deploy/e2e/busybox.Dockerfile is a copy, for building it
// by hand.
const Dockerfile = `FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
LABEL org.sand-boxer.e2e="true"
`

// RequireDocker fails t unless the Docker engine answers.
func RequireDocker(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath("docker"); err != nil {
		t.Fatalf("composetest: docker CLI not found: %v", err)
	}
	if _, err := docker(t, "version", "--format", "{{.Server.Version}}"); err != nil {
		t.Fatalf("composetest: the Docker engine does not answer: %v", err)
	}
}

// Image returns the tag of an image FROM scratch holding a static busybox
// installed under /bin, building it unless an image of the same content
// exists. The tag is a hash of the content, so every test binary shares
// one image.
func Image(t testing.TB) string {
	t.Helper()
	RequireDocker(t)
	bin, err := os.ReadFile(Busybox)
	if err != nil {
		t.Fatalf("composetest: reading %s: %v (install busybox-static: .ci/install-e2e.sh)", Busybox, err)
	}
	if err := requireStatic(Busybox); err != nil {
		t.Fatalf("composetest: %v (install busybox-static: .ci/install-e2e.sh)", err)
	}
	sum := sha256.Sum256(append(bin, Dockerfile...))
	tag := ImageRepository + ":" + hex.EncodeToString(sum[:6])
	if _, err := docker(t, "image", "inspect", "--format", "{{.Id}}", tag); err == nil {
		return tag
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "busybox"), bin, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte(Dockerfile), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := docker(t, "build", "--quiet", "--tag", tag, dir); err != nil {
		t.Fatalf("composetest: building %s: %v", tag, err)
	}
	return tag
}

// requireStatic fails for a dynamically linked binary, which an image
// FROM scratch cannot run.
func requireStatic(file string) error {
	f, err := elf.Open(file)
	if err != nil {
		return fmt.Errorf("%s: %w", file, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked", file)
		}
	}
	return nil
}

// RepoOptions shape the stack of a test repository.
type RepoOptions struct {
	// Image is the image of its one service, "web". Required.
	Image string
	// ComposeFile is the compose file's path in the repository. Default
	// "docker-compose.yml".
	ComposeFile string
	// Unhealthy makes the service's health check fail forever.
	Unhealthy bool
}

// Service is the one service of a test stack. It writes $GREETING (or
// "none") to /data/greeting on its named volume, is healthy once
// /data/ready exists, and stops at once on SIGTERM.
const Service = "web"

// Repo makes a git repository holding a compose stack and returns its
// path. The stack has one service ([Service]) with a health check, a named
// volume ("data") and the project's default network.
func Repo(t testing.TB, o RepoOptions) string {
	t.Helper()
	if o.Image == "" {
		t.Fatal("composetest: RepoOptions.Image is required")
	}
	if o.ComposeFile == "" {
		o.ComposeFile = "docker-compose.yml"
	}
	ready := "/data/ready"
	if o.Unhealthy {
		ready = "/data/never"
	}
	compose := fmt.Sprintf(`services:
  %s:
    image: %s
    environment:
      GREETING: ${GREETING:-none}
    command:
      - /bin/sh
      - -c
      - |
        printf '%%s' "$$GREETING" > /data/greeting
        touch /data/ready
        trap 'exit 0' TERM
        while :; do sleep 1 & wait $$!; done
    healthcheck:
      test: ["CMD", "/bin/test", "-f", "%s"]
      interval: 1s
      timeout: 2s
      retries: 3
    volumes:
      - data:/data
volumes:
  data: {}
`, Service, o.Image, ready)
	dir := t.TempDir()
	file := filepath.Join(dir, o.ComposeFile)
	if err := os.MkdirAll(filepath.Dir(file), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(file, []byte(compose), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"init", "-q", "-b", "main", dir},
		{"-C", dir, "add", "."},
		{"-C", dir, "-c", "user.email=e2e@example.com", "-c", "user.name=e2e", "commit", "-q", "-m", "stack"},
	} {
		if out, err := exec.Command("git", args...).CombinedOutput(); err != nil {
			t.Fatalf("composetest: git %v: %v: %s", args, err, out)
		}
	}
	return dir
}

// Resources is what the Docker engine holds of a compose project.
type Resources struct {
	Containers, Networks, Volumes []string
}

// Empty reports whether nothing is left.
func (r Resources) Empty() bool { return len(r.Containers)+len(r.Networks)+len(r.Volumes) == 0 }

// String lists the resources.
func (r Resources) String() string {
	return fmt.Sprintf("containers %v, networks %v, volumes %v", r.Containers, r.Networks, r.Volumes)
}

// ProjectResources asks the local Docker engine for every container,
// network and volume labelled with project.
func ProjectResources(t testing.TB, project string) Resources {
	t.Helper()
	f := "label=com.docker.compose.project=" + project
	list := func(args ...string) []string {
		out, err := docker(t, args...)
		if err != nil {
			t.Fatalf("composetest: docker %v: %v", args, err)
		}
		return strings.Fields(string(out))
	}
	return Resources{
		Containers: list("ps", "-a", "--filter", f, "--format", "{{.Names}}"),
		Networks:   list("network", "ls", "--filter", f, "--format", "{{.Name}}"),
		Volumes:    list("volume", "ls", "--filter", f, "--format", "{{.Name}}"),
	}
}

// ContainerOf returns the name of the one container of a project's
// service.
func ContainerOf(t testing.TB, project, service string) string {
	t.Helper()
	out, err := docker(t, "ps", "--filter", "label=com.docker.compose.project="+project,
		"--filter", "label=com.docker.compose.service="+service, "--format", "{{.Names}}")
	names := strings.Fields(string(out))
	if err != nil || len(names) != 1 {
		t.Fatalf("composetest: containers of %s/%s: %v, %v", project, service, names, err)
	}
	return names[0]
}

// Host is the host name the manifests of this package configure.
const Host = "local"

// ManifestOptions shape a test manifest.
type ManifestOptions struct {
	// KnownHosts overrides the server's known_hosts file.
	KnownHosts string
	// ExtraConfig is appended, indented, to the config block.
	ExtraConfig []string
}

// ManifestYAML returns an ext.compose-ssh manifest with one host, [Host],
// reached through srv as its user, keeping sandboxes under baseDir. Its
// inputs are the shipped manifest's.
func ManifestYAML(srv *sshtest.Server, baseDir string, o ManifestOptions) string {
	kh := o.KnownHosts
	if kh == "" {
		kh = srv.KnownHostsFile
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, `name: compose-ssh
handler: compose-ssh
description: compose stacks on a test sshd
capabilities:
  isolation_levels: [container]
  pricing_model: self-hosted
hosts: [%s]
inputs:
  repo:
    type: string
    required: true
    format: repo
  compose_file:
    type: string
    format: path
  env:
    type: string
    format: env
%sconfig:
  poll_interval: 200ms
  stop_timeout: 2s
  connect_timeout: 10s
  hosts:
    %s:
      ssh: %s
      known_hosts: %s
      identity: %s
      base_dir: %s
`, Host, repoPolicy(), Host, srv.Target(), kh, srv.IdentityFile, baseDir)
	for _, l := range o.ExtraConfig {
		b.WriteString("  " + l + "\n")
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
	m, ps := extension.ParseManifest("ext.compose-ssh.yaml", []byte(ManifestYAML(srv, baseDir, o)))
	if len(ps) > 0 {
		t.Fatalf("composetest: manifest: %v", ps)
	}
	return m
}

// WriteManifest writes [ManifestYAML] to dir/ext.compose-ssh.yaml, for a
// catalog directory.
func WriteManifest(t testing.TB, dir string, srv *sshtest.Server, baseDir string, o ManifestOptions) string {
	t.Helper()
	file := filepath.Join(dir, "ext.compose-ssh.yaml")
	if err := os.WriteFile(file, []byte(ManifestYAML(srv, baseDir, o)), 0o644); err != nil {
		t.Fatal(err)
	}
	return file
}

// Open configures a backend for m through a registry, as a provisioner
// does, and closes it in t.Cleanup.
func Open(t testing.TB, m *extension.Manifest) *composessh.ComposeSSH {
	t.Helper()
	return conformance.Open(t, composessh.Info, m).(*composessh.ComposeSSH)
}

// docker runs the local docker CLI and returns its standard output; its
// standard error goes into the error.
func docker(t testing.TB, args ...string) ([]byte, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "docker", args...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}
