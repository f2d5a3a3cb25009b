package local_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/conformance"
	"github.com/sand-boxer/sandboxer/pkg/extension/local"
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
