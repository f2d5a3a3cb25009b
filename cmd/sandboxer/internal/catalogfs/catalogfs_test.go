package catalogfs_test

import (
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"testing"

	"github.com/sand-boxer/sandboxer/cmd/sandboxer/internal/catalogfs"
)

// TestCopyIsCurrent: the embedded catalog is the repository's
// extensions/*.yaml and profiles/*.yaml, byte for byte, no file more or
// less.
func TestCopyIsCurrent(t *testing.T) {
	for _, dir := range []string{catalogfs.Extensions, catalogfs.Profiles} {
		repo, err := filepath.Glob(filepath.Join("..", "..", "..", "..", dir, "*.yaml"))
		if err != nil {
			t.Fatal(err)
		}
		embedded, err := fs.Glob(catalogfs.FS, path.Join(dir, "*.yaml"))
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, f := range repo {
			names = append(names, path.Join(dir, filepath.Base(f)))
		}
		if len(names) == 0 || !slices.Equal(names, embedded) {
			t.Fatalf("the repository's %s/ holds %v, the embedded copy %v: run go generate ./internal/catalogfs in cmd/sandboxer", dir, names, embedded)
		}
		for i, f := range repo {
			want, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			got, err := fs.ReadFile(catalogfs.FS, names[i])
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != string(want) {
				t.Errorf("embedded %s differs from %s: run go generate ./internal/catalogfs in cmd/sandboxer", names[i], f)
			}
		}
	}
}
