package local_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/conformance"
	"github.com/sand-boxer/sandboxer/pkg/extension/local"
	"github.com/sand-boxer/sandboxer/pkg/sshx/workspace/workspacetest"
)

func newLocal(t *testing.T) (*local.Local, string) {
	t.Helper()
	dir := t.TempDir()
	reg := extension.NewRegistry(local.Info)
	m, ps := extension.LoadManifestFile("../../../extensions/ext.local.yaml")
	if len(ps) > 0 {
		t.Fatalf("shipped manifest: %v", ps)
	}
	ext, err := reg.Open(context.Background(), m, extension.Env{DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	return ext.(*local.Local), dir
}

// gitRepo makes a local git repository with one committed file.
func gitRepo(t *testing.T) string {
	t.Helper()
	if _, err := exec.LookPath("git"); err != nil {
		t.Fatalf("git is required: %v", err)
	}
	dir := t.TempDir()
	for _, args := range [][]string{
		{"init", "-q", "-b", "main", dir},
		{"-C", dir, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init"},
	} {
		if out, err := exec.Command("git", args...).CombinedOutput(); err != nil {
			t.Fatalf("git %v: %v: %s", args, err, out)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "README"), []byte("hello\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"-C", dir, "add", "README"},
		{"-C", dir, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q", "-m", "readme"},
	} {
		if out, err := exec.Command("git", args...).CombinedOutput(); err != nil {
			t.Fatalf("git %v: %v: %s", args, err, out)
		}
	}
	return dir
}

func TestConformance(t *testing.T) {
	conformance.Run(t, conformance.Harness{
		New: func(t *testing.T) extension.Extension {
			l, _ := newLocal(t)
			return l
		},
		Profile: extension.Profile{Slug: "local", Extension: "local"},
		Host:    "localhost",
		Instances: func(t *testing.T, ext extension.Extension, id string) int {
			return ext.(*local.Local).Instances(id)
		},
	})
}

func TestConformanceWithRepo(t *testing.T) {
	repo := gitRepo(t)
	conformance.Run(t, conformance.Harness{
		New: func(t *testing.T) extension.Extension {
			l, _ := newLocal(t)
			return l
		},
		Profile: extension.Profile{Slug: "local", Extension: "local"},
		Inputs:  extension.Inputs{"repo": "file://" + repo},
		Host:    "localhost",
		Instances: func(t *testing.T, ext extension.Extension, id string) int {
			return ext.(*local.Local).Instances(id)
		},
	})
}

func TestCloneLocalPath(t *testing.T) {
	t.Parallel()
	repo := gitRepo(t)
	l, _ := newLocal(t)
	ctx := context.Background()
	for name, ref := range map[string]string{"path": repo, "file-url": "file://" + repo} {
		t.Run(name, func(t *testing.T) {
			id := conformance.NewSandboxID()
			h, err := l.Provision(ctx, extension.Profile{}, extension.Inputs{"sandbox_id": id, "repo": ref}, "localhost")
			if err != nil {
				t.Fatal(err)
			}
			r, err := l.WaitReady(ctx, h)
			if err != nil {
				t.Fatal(err)
			}
			b, err := os.ReadFile(filepath.Join(r.RemoteDir, "README"))
			if err != nil || string(b) != "hello\n" {
				t.Fatalf("cloned README = %q, %v", b, err)
			}
			if _, err := l.Teardown(ctx, h); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(r.RemoteDir); !os.IsNotExist(err) {
				t.Fatalf("workspace still exists after teardown: %v", err)
			}
		})
	}
}

func TestBadRepoFailsAndLeavesNothing(t *testing.T) {
	t.Parallel()
	l, _ := newLocal(t)
	id := conformance.NewSandboxID()
	_, err := l.Provision(context.Background(), extension.Profile{}, extension.Inputs{"sandbox_id": id, "repo": "/does/not/exist"}, "localhost")
	if err == nil {
		t.Fatal("Provision of a missing repository succeeded")
	}
	if n := l.Instances(id); n != 0 {
		t.Fatalf("failed Provision left %d instances", n)
	}
}

// logBuffer is a log the backend writes and the test reads.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// newLocalWith configures a backend whose manifest has the repo policy
// repoYAML (a repo: block, or "" for the shipped manifest's), logging to
// the returned buffer.
func newLocalWith(t *testing.T, repoYAML string) (*local.Local, *logBuffer) {
	t.Helper()
	var m *extension.Manifest
	var ps extension.Problems
	if repoYAML == "" {
		m, ps = extension.LoadManifestFile("../../../extensions/ext.local.yaml")
	} else {
		m, ps = extension.ParseManifest("ext.local.yaml", []byte(`name: local
handler: local
capabilities: {isolation_levels: [process], pricing_model: self-hosted}
inputs:
  repo: {type: string, format: repo}
`+repoYAML+`config:
  base_dir: workspaces
`))
	}
	if len(ps) > 0 {
		t.Fatal(ps)
	}
	logs := &logBuffer{}
	ext, err := extension.NewRegistry(local.Info).Open(context.Background(), m, extension.Env{DataDir: t.TempDir(), Logger: slog.New(slog.NewTextHandler(logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	return ext.(*local.Local), logs
}

// provision provisions a sandbox cloning repo and returns the error.
func provision(t *testing.T, l *local.Local, repo string) (string, error) {
	t.Helper()
	id := conformance.NewSandboxID()
	_, err := l.Provision(context.Background(), extension.Profile{}, extension.Inputs{extension.InputSandboxID: id, "repo": repo}, "localhost")
	return id, err
}

// wantNotReachable fails t unless err says only that the repository is
// not reachable.
func wantNotReachable(t *testing.T, err error) {
	t.Helper()
	if !errors.Is(err, extension.ErrRepoNotReachable) || err.Error() != "local: repository not reachable" {
		t.Fatalf("Provision = %v, want only %q", err, "local: repository not reachable")
	}
}

// TestRepoRefused: repositories the policy refuses fail Provision with
// "repository not reachable" and nothing more, leave nothing behind, and
// never connect: the listener they point at accepts nothing. The detail
// is in the log.
func TestRepoRefused(t *testing.T) {
	t.Parallel()
	svc := workspacetest.Listen(t, "SSH-2.0-OpenSSH_9.6 loopback-only\r\n")
	port := strconv.Itoa(svc.Port())
	root := t.TempDir()
	outside := gitRepo(t)
	if err := os.Symlink(outside, filepath.Join(root, "escape")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/", filepath.Join(root, "slash")); err != nil {
		t.Fatal(err)
	}
	l, logs := newLocalWith(t, "repo: {schemes: [https, http, ssh, git, file], local_roots: ["+strconv.Quote(root)+"]}\n")
	// Another sandbox's workspace: a clone, in the data directory.
	inRoot := workspacetest.GitRepo(t, root)
	other, err := provision(t, l, inRoot)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, repo, logged string }{
		{"git banner grab on loopback", "git://127.0.0.1:" + port + "/r", "127.0.0.1"},
		{"ssh port scan on loopback", "ssh://git@127.0.0.1:" + port + "/r", "127.0.0.1"},
		{"http to a name resolving to loopback", "http://localhost:" + port + "/r", "(loopback)"},
		{"scp-like to a name resolving to loopback", "git@localhost:r.git", "(loopback)"},
		{"cloud metadata", "http://169.254.169.254/latest/meta-data/", "169.254.169.254"},
		{"private network", "https://10.0.0.1/r.git", "10.0.0.1"},
		{"path outside the roots", outside, "local_roots"},
		{"symlink escaping a root", filepath.Join(root, "escape"), "local_roots"},
		{"through a symlink to /", "file://" + filepath.Join(root, "slash") + outside, "local_roots"},
		{"the service's own tree", "file:///proc/self/cwd", "/proc"},
		{"another sandbox's workspace", l.Dir(other), "excluded"},
		{"password in the URL", "https://alice:secret@example.com/r.git", "password"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			id, err := provision(t, l, tc.repo)
			wantNotReachable(t, err)
			if n := l.Instances(id); n != 0 {
				t.Fatalf("a refused Provision left %d instances", n)
			}
		})
	}
	t.Cleanup(func() {
		if n := svc.Accepts(t); n != 0 {
			t.Errorf("the loopback service accepted %d connections, want 0", n)
		}
		got := logs.String()
		for _, want := range []string{"repository refused", "127.0.0.1", "(loopback)", "169.254.169.254", "local_roots", "/proc", "excluded", "password"} {
			if !strings.Contains(got, want) {
				t.Errorf("the log lacks %q:\n%s", want, got)
			}
		}
		if strings.Contains(got, "secret") {
			t.Errorf("the log holds the password:\n%s", got)
		}
	})
}

// TestShippedPolicy: the shipped ext.local takes local repositories in
// the temporary directory (the walkthrough's, the tests') and public
// https and ssh, and refuses the rest.
func TestShippedPolicy(t *testing.T) {
	t.Parallel()
	svc := workspacetest.Listen(t, "")
	port := strconv.Itoa(svc.Port())
	l, _ := newLocalWith(t, "")
	repo := gitRepo(t)
	if _, err := provision(t, l, "file://"+repo); err != nil {
		t.Fatalf("the shipped manifest refused a file:// repository in the temporary directory: %v", err)
	}
	for _, tc := range []struct{ name, repo string }{
		{"git scheme", "git://127.0.0.1:" + port + "/r"},
		{"http scheme", "http://127.0.0.1:" + port + "/r"},
		{"https to loopback", "https://127.0.0.1:" + port + "/r"},
		{"ssh to loopback by name", "ssh://git@localhost:" + port + "/r"},
		{"outside home and tmp", "/etc"},
		{"the service's own tree", "file:///proc/self/cwd"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := provision(t, l, tc.repo)
			wantNotReachable(t, err)
		})
	}
	t.Cleanup(func() {
		if n := svc.Accepts(t); n != 0 {
			t.Errorf("the loopback service accepted %d connections, want 0", n)
		}
	})
}

// TestRedirectRefused: the one allowed HTTP host answers 301 to another
// loopback port the policy does not list; git refuses the redirect and
// the other port never sees a connection.
func TestRedirectRefused(t *testing.T) {
	t.Parallel()
	elsewhere := workspacetest.Listen(t, "")
	redir := workspacetest.Redirect(t, "http://"+elsewhere.HostPort())
	l, logs := newLocalWith(t, "repo: {schemes: [http], hosts: ["+strconv.Quote(workspacetest.HostPort(redir.Port()))+"]}\n")
	_, err := provision(t, l, redir.URL+"/r.git")
	wantNotReachable(t, err)
	if redir.Requests() == 0 {
		t.Fatal("the allowed host was never asked: refused for another reason")
	}
	if n := elsewhere.Accepts(t); n != 0 {
		t.Fatalf("the redirect's target accepted %d connections, want 0", n)
	}
	if !strings.Contains(logs.String(), "301") {
		t.Errorf("the log lacks git's refusal of the redirect:\n%s", logs)
	}
}

// TestListedLoopbackHostClones: an address the policy lists explicitly is
// reached, loopback or not, through a real git HTTP server.
func TestListedLoopbackHostClones(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	repo := workspacetest.GitRepo(t, root)
	srv := workspacetest.ServeGit(t, root)
	l, logs := newLocalWith(t, "repo: {schemes: [http], hosts: ["+strconv.Quote(workspacetest.HostPort(srv.Port()))+"]}\n")
	id := conformance.NewSandboxID()
	h, err := l.Provision(context.Background(), extension.Profile{}, extension.Inputs{extension.InputSandboxID: id, "repo": srv.URL + "/" + filepath.Base(repo)}, "localhost")
	if err != nil {
		t.Fatalf("Provision: %v\n%s", err, logs)
	}
	r, err := l.WaitReady(context.Background(), h)
	if err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(r.RemoteDir, "README")); err != nil || string(b) != "hello\n" {
		t.Fatalf("cloned README = %q, %v", b, err)
	}
}

// TestGitOutputOnlyInLog: the clone of a loopback service the policy
// lists (git://) fails on its banner; the reason does not carry what the
// service said, the log does.
func TestGitOutputOnlyInLog(t *testing.T) {
	t.Parallel()
	svc := workspacetest.Listen(t, "SECRET-BANNER-of-a-loopback-service\n")
	l, logs := newLocalWith(t, "repo: {schemes: [git], hosts: ["+strconv.Quote(svc.HostPort())+"]}\n")
	_, err := provision(t, l, "git://"+svc.HostPort()+"/r.git")
	wantNotReachable(t, err)
	if !strings.Contains(logs.String(), "SECR") {
		t.Errorf("the log lacks git's stderr:\n%s", logs)
	}
	if n := svc.Accepts(t); n != 1 {
		t.Errorf("the listed service accepted %d connections, want 1", n)
	}
}

// TestHomeRoot: "~" is the provisioner's home directory. (Not parallel:
// it sets HOME.)
func TestHomeRoot(t *testing.T) {
	home := t.TempDir()
	t.Setenv("HOME", home)
	l, _ := newLocalWith(t, "repo: {schemes: [file], local_roots: [\"~\"]}\n")
	if _, err := provision(t, l, workspacetest.GitRepo(t, home)); err != nil {
		t.Fatalf("a repository in the home directory: %v", err)
	}
	_, err := provision(t, l, gitRepo(t))
	wantNotReachable(t, err)
}

func TestGitPinsHTTP(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		version string
		pins    bool
	}{
		{"git version 2.39.5\n", true},
		{"git version 2.37.0", true},
		{"git version 2.40.1.windows.1", true},
		{"git version 3.0.0", true},
		{"git version 2.36.6", false},
		{"git version 2.4.11", false},
		{"git version 1.9.1", false},
		{"not git", false},
		{"", false},
	} {
		if got := local.GitPinsHTTP(tc.version); got != tc.pins {
			t.Errorf("GitPinsHTTP(%q) = %v, want %v", tc.version, got, tc.pins)
		}
	}
}

// TestListPartialAndForeign: List holds finished workspaces and partial
// attempts (a .tmp- directory a crashed Provision left), keyed by their
// sandbox, and nothing else under the base directory; the handle it
// gives tears a partial attempt down.
func TestListPartialAndForeign(t *testing.T) {
	t.Parallel()
	l, _ := newLocal(t)
	ctx := context.Background()
	done, partial := conformance.NewSandboxID(), conformance.NewSandboxID()
	if _, err := l.Provision(ctx, extension.Profile{}, extension.Inputs{"sandbox_id": done}, "localhost"); err != nil {
		t.Fatal(err)
	}
	base := filepath.Dir(l.Dir(done))
	tmp := filepath.Join(base, ".tmp-"+partial+".123456")
	for _, d := range []string{filepath.Join(tmp, "ws"), filepath.Join(base, "unmarked"), filepath.Join(base, "Not-A-Name")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(base, "notes.txt"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	held, err := l.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, h := range held {
		ids = append(ids, h.Handle.SandboxID)
	}
	want := []string{done, partial}
	slices.Sort(want)
	if !slices.Equal(ids, want) {
		t.Fatalf("List holds %v, want %v", ids, want)
	}
	for _, h := range held {
		if h.Handle.SandboxID == partial {
			if !slices.Equal(h.Resources, []string{"dir:" + tmp}) || h.Since.IsZero() {
				t.Errorf("the partial attempt is listed as %+v", h)
			}
			if _, err := l.Teardown(ctx, h.Handle); err != nil {
				t.Fatal(err)
			}
		}
	}
	if n := l.Instances(partial); n != 0 {
		t.Fatalf("teardown of the listed partial attempt left %d instances", n)
	}
	if _, err := os.Stat(filepath.Join(base, "unmarked")); err != nil {
		t.Errorf("a directory that is not a workspace was touched: %v", err)
	}
}
