package workspace_test

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/sshx"
	"github.com/sand-boxer/sandboxer/pkg/sshx/workspace"
)

// localRunner runs the argv here, through sh -c and the same quoting a
// remote host's login shell reads: the scripts run for real, only without
// the SSH hop (the backends' e2e tests add it). env is added to the
// commands' environment.
func localRunner(calls *int, env ...string) workspace.Runner {
	var mu sync.Mutex
	return func(ctx context.Context, argv ...string) ([]byte, error) {
		mu.Lock()
		*calls++
		mu.Unlock()
		line, err := sshx.Join(argv)
		if err != nil {
			return nil, err
		}
		cmd := exec.CommandContext(ctx, "/bin/sh", "-c", line)
		cmd.Env = append(os.Environ(), env...)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			// What an sshx.Client reports of a remote command's failure.
			return out, &sshx.ExitError{Command: argv[0], Status: ee.ExitCode(), Stderr: stderr.String()}
		}
		return out, err
	}
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return c
}

// localRepo is a local repository as a RepoChecker with Remote set
// returns it: to be checked on the host under {tmp}, where the tests'
// repositories are.
func localRepo(path string) *extension.RepoTarget {
	return &extension.RepoTarget{Scheme: "file", URL: path, LocalRoots: []string{"{tmp}"}}
}

func gitRepo(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for _, args := range [][]string{
		{"init", "-q", "-b", "main", dir},
		{"-C", dir, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init"},
	} {
		if out, err := exec.Command("git", args...).CombinedOutput(); err != nil {
			t.Fatalf("git %v: %v: %s", args, err, out)
		}
	}
	return dir
}

func TestEnsureAndRemove(t *testing.T) {
	t.Parallel()
	repo := gitRepo(t)
	for _, tc := range []struct {
		name string
		spec workspace.Spec
		want []string // files expected in the workspace
	}{
		{"empty", workspace.Spec{ID: "s1", Checkout: "work"}, []string{"work"}},
		{"repo and files", workspace.Spec{ID: "s2", Checkout: "repo", Repo: localRepo("file://" + repo),
			Files: map[string]string{"compose.env": "A=1\n", "odd": "$(id) `id` 'q'"}}, []string{"repo/.git", "compose.env", "odd"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var calls int
			run := localRunner(&calls)
			base := filepath.Join(t.TempDir(), "ws")
			s := tc.spec
			s.Base = base
			created, err := workspace.Ensure(ctx(t), run, s)
			if err != nil || !created {
				t.Fatalf("Ensure = %v, %v; want created", created, err)
			}
			dir := workspace.Dir(base, s.ID)
			for _, f := range append(tc.want, workspace.Marker) {
				if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
					t.Errorf("workspace lacks %s: %v", f, err)
				}
			}
			for name, content := range s.Files {
				if b, _ := os.ReadFile(filepath.Join(dir, name)); string(b) != content {
					t.Errorf("file %s = %q, want %q", name, b, content)
				}
			}
			if created, err := workspace.Ensure(ctx(t), run, s); err != nil || created {
				t.Fatalf("second Ensure = %v, %v; want found", created, err)
			}
			if ok, err := workspace.Exists(ctx(t), run, base, s.ID); err != nil || !ok {
				t.Fatalf("Exists = %v, %v", ok, err)
			}
			removed, err := workspace.Remove(ctx(t), run, base, s.ID)
			if err != nil || !slices.Equal(removed, []string{dir}) {
				t.Fatalf("Remove = %v, %v; want [%s]", removed, err, dir)
			}
			if removed, err := workspace.Remove(ctx(t), run, base, s.ID); err != nil || len(removed) != 0 {
				t.Fatalf("second Remove = %v, %v; want nothing removed", removed, err)
			}
			if ok, err := workspace.Exists(ctx(t), run, base, s.ID); err != nil || ok {
				t.Fatalf("Exists after Remove = %v, %v", ok, err)
			}
		})
	}
}

func TestConcurrentEnsureMakesOne(t *testing.T) {
	t.Parallel()
	var calls int
	run := localRunner(&calls)
	base := filepath.Join(t.TempDir(), "ws")
	s := workspace.Spec{Base: base, ID: "same", Checkout: "repo", Repo: localRepo(gitRepo(t))}
	var wg sync.WaitGroup
	results := make(chan bool, 4)
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			created, err := workspace.Ensure(ctx(t), run, s)
			if err != nil {
				t.Errorf("Ensure: %v", err)
			}
			results <- created
		}()
	}
	wg.Wait()
	close(results)
	n := 0
	for c := range results {
		if c {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("%d concurrent Ensures reported creating the workspace, want 1", n)
	}
	entries, _ := os.ReadDir(base)
	if len(entries) != 1 || entries[0].Name() != "same" {
		t.Fatalf("base holds %v, want only the workspace", entries)
	}
}

func TestFailedCloneLeavesNothing(t *testing.T) {
	t.Parallel()
	var calls int
	base := filepath.Join(t.TempDir(), "ws")
	empty := t.TempDir() // not a repository
	_, err := workspace.Ensure(ctx(t), localRunner(&calls), workspace.Spec{Base: base, ID: "bad", Checkout: "repo", Repo: localRepo(empty)})
	if !errors.Is(err, extension.ErrRepoNotReachable) || err.Error() != "repository not reachable" {
		t.Fatalf("Ensure with a directory that is no repository = %v, want only %q", err, extension.ErrRepoNotReachable)
	}
	entries, _ := os.ReadDir(base)
	if len(entries) != 0 {
		t.Fatalf("a failed Ensure left %v", entries)
	}
}

func TestRemoveKeepsOtherSandboxes(t *testing.T) {
	t.Parallel()
	var calls int
	run := localRunner(&calls)
	base := t.TempDir()
	// A partial attempt of "abc-def" and the workspace of "abc".
	for _, d := range []string{".tmp-abc-def.x1y2z3", ".tmp-abc.a1b2c3", "abc", "abc-def"} {
		if err := os.Mkdir(filepath.Join(base, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	removed, err := workspace.Remove(ctx(t), run, base, "abc")
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(removed)
	want := []string{filepath.Join(base, ".tmp-abc.a1b2c3"), filepath.Join(base, "abc")}
	if !slices.Equal(removed, want) {
		t.Fatalf("Remove(abc) removed %v, want %v", removed, want)
	}
	for _, d := range []string{".tmp-abc-def.x1y2z3", "abc-def"} {
		if _, err := os.Stat(filepath.Join(base, d)); err != nil {
			t.Errorf("Remove(abc) removed another sandbox's %s", d)
		}
	}
}

func TestRefusedBeforeRunning(t *testing.T) {
	t.Parallel()
	ok := workspace.Spec{Base: "/srv/ws", ID: "s1", Checkout: "repo"}
	for _, tc := range []struct {
		name string
		mod  func(*workspace.Spec)
	}{
		{"relative base", func(s *workspace.Spec) { s.Base = "srv/ws" }},
		{"root base", func(s *workspace.Spec) { s.Base = "/" }},
		{"unclean base", func(s *workspace.Spec) { s.Base = "/srv/../etc" }},
		{"shell in base", func(s *workspace.Spec) { s.Base = "/srv/$(id)" }},
		{"id with slash", func(s *workspace.Spec) { s.ID = "a/b" }},
		{"id with dot", func(s *workspace.Spec) { s.ID = "a.b" }},
		{"id glob", func(s *workspace.Spec) { s.ID = "*" }},
		{"checkout escapes", func(s *workspace.Spec) { s.Checkout = "../x" }},
		{"checkout absolute", func(s *workspace.Spec) { s.Checkout = "/etc" }},
		{"checkout option", func(s *workspace.Spec) { s.Checkout = "-rf" }},
		{"repo option", func(s *workspace.Spec) {
			s.Repo = &extension.RepoTarget{Scheme: "file", URL: "--upload-pack=touch /tmp/x", LocalRoots: []string{"/"}}
		}},
		{"repo unknown scheme", func(s *workspace.Spec) {
			s.Repo = &extension.RepoTarget{Scheme: "ext", URL: "https://example.com/r", Addr: netip.MustParseAddr("192.0.2.1")}
		}},
		{"repo without a checked address", func(s *workspace.Spec) { s.Repo = &extension.RepoTarget{Scheme: "https", URL: "https://example.com/r"} }},
		{"local repo without roots", func(s *workspace.Spec) { s.Repo = &extension.RepoTarget{Scheme: "file", URL: "/srv/r"} }},
		{"local root with shell", func(s *workspace.Spec) {
			s.Repo = &extension.RepoTarget{Scheme: "file", URL: "/srv/r", LocalRoots: []string{"/srv/$(id)"}}
		}},
		{"local root escaping", func(s *workspace.Spec) {
			s.Repo = &extension.RepoTarget{Scheme: "file", URL: "/srv/r", LocalRoots: []string{"/srv/../etc"}}
		}},
		{"local root with newline", func(s *workspace.Spec) {
			s.Repo = &extension.RepoTarget{Scheme: "file", URL: "/srv/r", LocalRoots: []string{"/srv\n/"}}
		}},
		{"file escapes", func(s *workspace.Spec) { s.Files = map[string]string{"../x": ""} }},
		{"marker file", func(s *workspace.Spec) { s.Files = map[string]string{workspace.Marker: ""} }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var calls int
			s := ok
			tc.mod(&s)
			if _, err := workspace.Ensure(ctx(t), localRunner(&calls), s); err == nil {
				t.Fatal("Ensure accepted the spec")
			}
			if calls != 0 {
				t.Fatalf("Ensure ran %d commands before refusing", calls)
			}
		})
	}
}

func TestCheckIDMatchesEventNames(t *testing.T) {
	t.Parallel()
	for _, id := range []string{"a", "abc-def_1", "0x", "-a", "A", "a.b", "a/b", "", strings.Repeat("a", 63), strings.Repeat("a", 64)} {
		if got, want := workspace.CheckID(id) == nil, event.ValidName(id); got != want {
			t.Errorf("CheckID(%q) ok = %v, event.ValidName = %v", id, got, want)
		}
	}
}

func TestRepoScheme(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ repo, want string }{
		{"https://example.com/r.git", "https"},
		{"ssh://git@example.com/r.git", "ssh"},
		{"git@example.com:r.git", "ssh"},
		{"/srv/r.git", "file"},
		{"file:///srv/r.git", "file"},
	} {
		t.Run(tc.repo, func(t *testing.T) {
			t.Parallel()
			if got := workspace.RepoScheme(tc.repo); got != tc.want {
				t.Errorf("RepoScheme(%q) = %q, want %q", tc.repo, got, tc.want)
			}
		})
	}
}
