package extension_test

import (
	"encoding/json"
	"os"
	"strings"
	"testing"
	"testing/fstest"

	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/echo"
	"github.com/sand-boxer/sandboxer/pkg/extension/local"
)

// TestLoadCatalogDirsFS loads the shipped catalog through an fs.FS and
// from the operating system's directories: the same catalog, files named
// by their path in the file system.
func TestLoadCatalogDirsFS(t *testing.T) {
	t.Parallel()
	fromOS, ps := extension.LoadCatalog("../../extensions", "../../profiles", nil)
	if len(ps) > 0 {
		t.Fatal(ps)
	}
	repo := os.DirFS("../..")
	fromFS, ps := extension.LoadCatalogDirs(extension.CatalogDir{FS: repo, Path: "extensions"}, extension.CatalogDir{FS: repo, Path: "profiles"}, nil)
	if len(ps) > 0 {
		t.Fatal(ps)
	}
	if len(fromFS.Extensions) == 0 || len(fromFS.Extensions) != len(fromOS.Extensions) || len(fromFS.Profiles) != len(fromOS.Profiles) {
		t.Fatalf("through the FS: %d extensions, %d profiles; from the OS %d and %d",
			len(fromFS.Extensions), len(fromFS.Profiles), len(fromOS.Extensions), len(fromOS.Profiles))
	}
	for name, m := range fromFS.Extensions {
		if m.File != "extensions/ext."+name+".yaml" {
			t.Errorf("extension %s loaded from %q", name, m.File)
		}
		viaFS, viaOS := *m, *fromOS.Extensions[name]
		viaFS.File, viaOS.File = "", ""
		a, _ := json.Marshal(viaFS)
		b, _ := json.Marshal(viaOS)
		if string(a) != string(b) {
			t.Errorf("extension %s differs:\nFS %s\nOS %s", name, a, b)
		}
	}
	for slug, p := range fromFS.Profiles {
		if p.File != "profiles/profile."+slug+".yaml" {
			t.Errorf("profile %s loaded from %q", slug, p.File)
		}
	}
}

// TestLoadCatalogDirsMixed takes manifests from one file system and
// profiles from another, checks handlers against a registry, and reports
// problems with the file system's paths.
func TestLoadCatalogDirsMixed(t *testing.T) {
	t.Parallel()
	exts := fstest.MapFS{
		"shipped/ext.local.yaml": {Data: []byte(localManifest)},
		"shipped/ext.echo.yaml":  {Data: []byte(echoManifest)},
		"shipped/README.md":      {Data: []byte("not a manifest")},
	}
	_, profDir := writeTree(t, map[string]string{
		"profiles/profile.dev.yaml": "slug: dev\nextension: local\nisolation: process\n",
		"profiles/profile.bad.yaml": "slug: bad\nextension: nowhere\n",
	})
	reg := extension.NewRegistry(local.Info, echo.Info)
	c, ps := extension.LoadCatalogDirs(extension.CatalogDir{FS: exts, Path: "shipped"}, extension.CatalogDir{Path: profDir}, reg)
	if len(c.Extensions) != 2 || c.Profiles["dev"] == nil {
		t.Fatalf("catalog %v extensions, %v profiles", len(c.Extensions), len(c.Profiles))
	}
	if len(ps) != 1 || !strings.Contains(ps.Error(), "profile.bad.yaml") || !strings.Contains(ps.Error(), `unknown extension "nowhere"`) {
		t.Fatalf("problems %v, want the bad profile's unknown extension", ps)
	}
	if _, ps := extension.LoadCatalogDirs(extension.CatalogDir{FS: exts, Path: "missing"}, extension.CatalogDir{Path: profDir}, reg); !strings.Contains(ps.Error(), "reading missing") {
		t.Fatalf("a missing directory: %v", ps)
	}
}
