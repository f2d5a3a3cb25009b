package extension

import (
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
)

// CatalogDir is a directory of catalog files: Path on the operating
// system's file system when FS is nil, else Path in FS (slash-separated,
// as [fs.ValidPath] wants, such as the directories of an embedded file
// system). Files loaded from it are named Path/<file>.
type CatalogDir struct {
	FS   fs.FS
	Path string
}

// String names the directory as problems do.
func (d CatalogDir) String() string { return d.Path }

// list returns the files of d whose names start with prefix and end in
// .yaml or .yml, sorted.
func (d CatalogDir) list(prefix string) ([]string, error) {
	var (
		entries []fs.DirEntry
		err     error
	)
	if d.FS == nil {
		entries, err = os.ReadDir(d.Path)
	} else {
		entries, err = fs.ReadDir(d.FS, d.Path)
	}
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", d.Path, err)
	}
	var out []string
	for _, e := range entries {
		n := e.Name()
		if e.IsDir() || !strings.HasPrefix(n, prefix) || trimExt(n) == n {
			continue
		}
		out = append(out, d.join(n))
	}
	slices.Sort(out)
	return out, nil
}

func (d CatalogDir) join(name string) string {
	if d.FS == nil {
		return filepath.Join(d.Path, name)
	}
	return path.Join(d.Path, name)
}

func (d CatalogDir) read(file string) ([]byte, error) {
	if d.FS == nil {
		return os.ReadFile(file)
	}
	return fs.ReadFile(d.FS, file)
}

// loadFile reads file of d and parses it with parse.
func loadFile[T any](d CatalogDir, file string, parse func(string, []byte) (*T, Problems)) (*T, Problems) {
	data, err := d.read(file)
	if err != nil {
		return nil, Problems{{File: file, Message: err.Error()}}
	}
	return parse(file, data)
}
