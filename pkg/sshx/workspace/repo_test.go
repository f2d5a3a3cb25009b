package workspace_test

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/sshx/workspace"
	"github.com/sand-boxer/sandboxer/pkg/sshx/workspace/workspacetest"
)

var loopback = netip.MustParseAddr("127.0.0.1")

// wantNotReachable fails t unless err is a RepoError that says nothing
// but "repository not reachable", and returns it.
func wantNotReachable(t *testing.T, err error) *extension.RepoError {
	t.Helper()
	var re *extension.RepoError
	if !errors.As(err, &re) || !errors.Is(err, extension.ErrRepoNotReachable) {
		t.Fatalf("Ensure = %v, want a RepoError", err)
	}
	if err.Error() != "repository not reachable" {
		t.Fatalf("Ensure's error says %q, want only %q", err.Error(), "repository not reachable")
	}
	return re
}

// TestEnsureChecksLocalPathOnHost runs the host's side of the local
// roots check for real: symlinks resolved on the host, roots expanded
// there.
func TestEnsureChecksLocalPathOnHost(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	inRoot := workspacetest.GitRepo(t, root)
	outside := workspacetest.GitRepo(t, "")
	home := t.TempDir()
	if err := os.Mkdir(filepath.Join(home, "src"), 0o755); err != nil {
		t.Fatal(err)
	}
	inHome := workspacetest.GitRepo(t, filepath.Join(home, "src"))
	tmpdir := t.TempDir()
	inTmp := workspacetest.GitRepo(t, tmpdir)
	for name, target := range map[string]string{"escape": outside, "slash": "/", "alias": inRoot} {
		if err := os.Symlink(target, filepath.Join(root, name)); err != nil {
			t.Fatal(err)
		}
	}
	gitfile := filepath.Join(root, "gitfile")
	if err := os.Mkdir(gitfile, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(gitfile, ".git"), []byte("gitdir: "+outside+"/.git\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	notDir := filepath.Join(root, "file")
	if err := os.WriteFile(notDir, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}

	cases := []struct {
		name   string
		url    string
		roots  []string
		ok     bool
		reason string // in the refusal's reason
	}{
		{"path in a root", inRoot, []string{root}, true, ""},
		{"file URL in a root", "file://" + inRoot, []string{root}, true, ""},
		{"symlink within the root", filepath.Join(root, "alias"), []string{root}, true, ""},
		{"home root", inHome, []string{"~/src"}, true, ""},
		{"tmp root", inTmp, []string{"{tmp}"}, true, ""},
		{"outside every root", outside, []string{root, "~/src"}, false, "in none of the local roots"},
		{"symlink escaping the root", filepath.Join(root, "escape"), []string{root}, false, "in none of the local roots"},
		{"through a symlink to /", filepath.Join(root, "slash") + outside, []string{root}, false, "in none of the local roots"},
		{"proc self cwd", "file:///proc/self/cwd", []string{"/"}, false, "/proc"},
		{"gitfile leading out", gitfile, []string{root}, false, "not a directory"},
		{"not a directory", notDir, []string{root}, false, "not a directory"},
		{"missing", filepath.Join(root, "missing"), []string{root}, false, "not a directory"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var calls int
			run := localRunner(&calls, "HOME="+home, "TMPDIR="+tmpdir)
			base := filepath.Join(t.TempDir(), "ws")
			s := workspace.Spec{Base: base, ID: "s1", Checkout: "repo", Repo: &extension.RepoTarget{Scheme: "file", URL: tc.url, LocalRoots: tc.roots}}
			created, err := workspace.Ensure(ctx(t), run, s)
			if tc.ok {
				if err != nil || !created {
					t.Fatalf("Ensure = %v, %v; want created", created, err)
				}
				if b, err := os.ReadFile(filepath.Join(base, "s1", "repo", "README")); err != nil || string(b) != "hello\n" {
					t.Fatalf("cloned README = %q, %v", b, err)
				}
				return
			}
			re := wantNotReachable(t, err)
			if !strings.Contains(re.Reason, "refused on the host") || !strings.Contains(re.Reason, tc.reason) {
				t.Errorf("reason %q, want a refusal on the host saying %q", re.Reason, tc.reason)
			}
			if entries, _ := os.ReadDir(base); len(entries) != 0 {
				t.Errorf("a refused Ensure left %v", entries)
			}
		})
	}
}

// TestEnsureRefusesWorkspacesAsSource: another sandbox's checkout is a
// git repository in a root, but never a source.
func TestEnsureRefusesWorkspacesAsSource(t *testing.T) {
	t.Parallel()
	var calls int
	run := localRunner(&calls)
	base := filepath.Join(t.TempDir(), "ws")
	first := workspace.Spec{Base: base, ID: "first", Checkout: "repo", Repo: localRepo(gitRepo(t))}
	if _, err := workspace.Ensure(ctx(t), run, first); err != nil {
		t.Fatal(err)
	}
	second := workspace.Spec{Base: base, ID: "second", Checkout: "repo", Repo: localRepo(filepath.Join(base, "first", "repo"))}
	re := wantNotReachable(t, func() error { _, err := workspace.Ensure(ctx(t), run, second); return err }())
	if !strings.Contains(re.Reason, "workspaces directory") {
		t.Errorf("reason %q", re.Reason)
	}
}

// TestEnsurePinsHTTPHost clones by a host name nothing resolves
// (repo.test): it works only because git connects to the pinned address.
func TestEnsurePinsHTTPHost(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	repo := workspacetest.GitRepo(t, root)
	srv := workspacetest.ServeGit(t, root)
	var calls int
	base := filepath.Join(t.TempDir(), "ws")
	target := &extension.RepoTarget{Scheme: "http", URL: "http://repo.test:" + strconv.Itoa(srv.Port()) + "/" + filepath.Base(repo),
		Host: "repo.test", Port: srv.Port(), Addr: loopback}
	if _, err := workspace.Ensure(ctx(t), localRunner(&calls), workspace.Spec{Base: base, ID: "s1", Checkout: "repo", Repo: target}); err != nil {
		var re *extension.RepoError
		if errors.As(err, &re) {
			t.Fatalf("Ensure: %s", re.Detail())
		}
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(base, "s1", "repo", "README")); err != nil || string(b) != "hello\n" {
		t.Fatalf("cloned README = %q, %v", b, err)
	}
	if srv.Requests() == 0 {
		t.Fatal("the git server answered nothing")
	}
}

// TestEnsureRefusesRedirect: an allowed host that redirects elsewhere
// fails the clone, and the redirect's target never sees a connection.
func TestEnsureRefusesRedirect(t *testing.T) {
	t.Parallel()
	elsewhere := workspacetest.Listen(t, "")
	redir := workspacetest.Redirect(t, "http://"+elsewhere.HostPort())
	var calls int
	base := filepath.Join(t.TempDir(), "ws")
	target := &extension.RepoTarget{Scheme: "http", URL: redir.URL + "/r.git", Host: "127.0.0.1", Port: redir.Port(), Addr: loopback}
	_, err := workspace.Ensure(ctx(t), localRunner(&calls), workspace.Spec{Base: base, ID: "s1", Checkout: "repo", Repo: target})
	re := wantNotReachable(t, err)
	t.Logf("detail: %s", re.Detail())
	if !strings.Contains(re.Reason, "git clone on the host failed") || !strings.Contains(re.Output, "301") {
		t.Errorf("detail %q, want git refusing the 301", re.Detail())
	}
	if redir.Requests() == 0 {
		t.Error("the allowed host was never asked: the clone failed for another reason")
	}
	if n := elsewhere.Accepts(t); n != 0 {
		t.Fatalf("the redirect's target accepted %d connections, want 0", n)
	}
}

// TestEnsurePinsSSHHost: ssh connects to the pinned address of a name
// nothing resolves, and git's stderr (the fake server's failure) stays out
// of the error.
func TestEnsurePinsSSHHost(t *testing.T) {
	t.Parallel()
	fake := workspacetest.Listen(t, "SSH-2.0-sandboxer-fake\r\ngarbage\r\n")
	var calls int
	base := filepath.Join(t.TempDir(), "ws")
	target := &extension.RepoTarget{Scheme: "ssh", URL: "ssh://git@repo.test:" + strconv.Itoa(fake.Port()) + "/r.git",
		Host: "repo.test", Port: fake.Port(), Addr: loopback}
	_, err := workspace.Ensure(ctx(t), localRunner(&calls, "HOME="+t.TempDir()), workspace.Spec{Base: base, ID: "s1", Checkout: "repo", Repo: target})
	re := wantNotReachable(t, err)
	t.Logf("detail: %s", re.Detail())
	if re.Output == "" {
		t.Error("git's stderr is not in the detail")
	}
	if n := fake.Accepts(t); n != 1 {
		t.Fatalf("the pinned address accepted %d connections, want 1", n)
	}
}

// TestEnsureKeepsBannerOutOfError: a git:// clone of a service that is
// not git fails; what the service said reaches the detail only.
func TestEnsureKeepsBannerOutOfError(t *testing.T) {
	t.Parallel()
	svc := workspacetest.Listen(t, "SECRET-BANNER-0123456789\n")
	var calls int
	base := filepath.Join(t.TempDir(), "ws")
	target := &extension.RepoTarget{Scheme: "git", URL: "git://" + svc.HostPort() + "/r.git", Host: "127.0.0.1", Port: svc.Port(), Addr: loopback}
	_, err := workspace.Ensure(ctx(t), localRunner(&calls), workspace.Spec{Base: base, ID: "s1", Checkout: "repo", Repo: target})
	re := wantNotReachable(t, err)
	t.Logf("detail: %s", re.Detail())
	if !strings.Contains(re.Output, "SECR") {
		t.Errorf("git's stderr %q is not in the detail", re.Output)
	}
	if svc.Accepts(t) != 1 {
		t.Error("the service was not connected to")
	}
}
