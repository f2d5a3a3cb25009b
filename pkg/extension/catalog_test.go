package extension_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/echo"
	"github.com/sand-boxer/sandboxer/pkg/extension/local"
)

// writeTree writes files (name -> content) under a fresh directory and
// returns its extensions and profiles subdirectories.
func writeTree(t *testing.T, files map[string]string) (extDir, profDir string) {
	t.Helper()
	root := t.TempDir()
	extDir, profDir = filepath.Join(root, "extensions"), filepath.Join(root, "profiles")
	for _, d := range []string{extDir, profDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for name, content := range files {
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return extDir, profDir
}

const (
	localManifest = `name: local
handler: local
capabilities:
  isolation_levels: [process]
  pricing_model: self-hosted
inputs:
  repo:
    type: string
    format: repo
  depth:
    type: int
    min: 1
`
	echoManifest = `name: echo
handler: echo
capabilities:
  isolation_levels: [process, container]
  pricing_model: self-hosted
`
)

func TestLoadCatalog(t *testing.T) {
	t.Parallel()
	extDir, profDir := writeTree(t, map[string]string{
		"extensions/ext.local.yaml": localManifest,
		"extensions/ext.echo.yml":   echoManifest,
		"extensions/README.md":      "not a manifest",
		"extensions/other.yaml":     "not: a manifest",
		"extensions/ext.dir/x":      "a directory is skipped",
		"profiles/profile.dev.yaml": "slug: dev\nextension: local\nisolation: process\ninputs:\n  depth: \"3\"\n",
		"profiles/profile.ci.yaml":  "slug: ci\nextension: echo\nisolation: container\n",
	})
	reg := extension.NewRegistry(local.Info, echo.Info)
	c, ps := extension.LoadCatalog(extDir, profDir, reg)
	if len(ps) != 0 {
		t.Fatalf("problems: %v", ps)
	}
	var names []string
	for _, m := range c.ExtensionList() {
		names = append(names, m.Name)
	}
	if strings.Join(names, ",") != "echo,local" {
		t.Errorf("ExtensionList = %v, want sorted [echo local]", names)
	}
	var slugs []string
	for _, p := range c.ProfileList() {
		slugs = append(slugs, p.Slug)
	}
	if strings.Join(slugs, ",") != "ci,dev" {
		t.Errorf("ProfileList = %v, want sorted [ci dev]", slugs)
	}
	if m, err := c.Extension("local"); err != nil || m.File != filepath.Join(extDir, "ext.local.yaml") {
		t.Errorf("Extension(local) = %+v, %v", m, err)
	}
	if p, err := c.Profile("dev"); err != nil || p.Inputs["depth"] != "3" {
		t.Errorf("Profile(dev) = %+v, %v", p, err)
	}
	if _, err := c.Extension("nope"); !errors.Is(err, extension.ErrNotFound) || !strings.Contains(err.Error(), `"nope"`) {
		t.Errorf("Extension(nope) = %v, want ErrNotFound naming it", err)
	}
	if _, err := c.Profile("nope"); !errors.Is(err, extension.ErrNotFound) {
		t.Errorf("Profile(nope) = %v, want ErrNotFound", err)
	}
}

// TestLoadCatalogCrossFileProblems puts every cross-file problem in one
// tree: LoadCatalog reports all of them, each with its file and position,
// and file-level problems of one file do not hide the others'.
func TestLoadCatalogCrossFileProblems(t *testing.T) {
	t.Parallel()
	extDir, profDir := writeTree(t, map[string]string{
		"extensions/ext.local.yaml": localManifest,
		"extensions/ext.local.yml":  localManifest,
		"extensions/ext.echo.yaml":  echoManifest,
		"extensions/ext.ghost.yaml": "name: ghost\nhandler: ghost\ncapabilities:\n  isolation_levels: [vm]\n  pricing_model: metered\n",
		"extensions/ext.bad.yaml":   "name: bad\nhandler: local\ncolour: red\ncapabilities:\n  isolation_levels: [process]\n  pricing_model: self-hosted\ninputs:\n  repo:\n    type: string\n",
		"profiles/profile.orphan.yaml": "slug: orphan\n" +
			"extension: nowhere\n",
		"profiles/profile.vm.yaml": "slug: vm\n" +
			"extension: echo\n" +
			"isolation: vm\n",
		"profiles/profile.inputs.yaml": "slug: inputs\n" +
			"extension: local\n" +
			"inputs:\n" +
			"  branch: main\n" +
			"  depth: \"0\"\n" +
			"  repo: \"ext::sh -c id\"\n",
		"profiles/profile.dup.yaml": "slug: dup\nextension: echo\n",
		"profiles/profile.dup.yml":  "slug: dup\nextension: echo\n",
	})
	reg := extension.NewRegistry(local.Info, echo.Info)
	c, ps := extension.LoadCatalog(extDir, profDir, reg)

	type w struct {
		file      string
		line, col int
		path, msg string
	}
	wants := []w{
		{"ext.bad.yaml", 3, 1, "colour", `unknown field "colour"`},
		{"ext.bad.yaml", 0, 0, "inputs.repo", "ext.local needs format: repo"},
		{"ext.ghost.yaml", 2, 10, "handler", `unknown extension handler "ghost" (not linked into this binary; known: [echo local])`},
		{"ext.local.yml", 1, 7, "name", `extension "local" already declared in ` + filepath.Join(extDir, "ext.local.yaml")},
		{"profile.dup.yml", 1, 7, "slug", `profile "dup" already declared in ` + filepath.Join(profDir, "profile.dup.yaml")},
		{"profile.orphan.yaml", 2, 12, "extension", `unknown extension "nowhere" (known: bad, echo, ghost, local)`},
		{"profile.vm.yaml", 3, 12, "isolation", `extension "echo" does not offer isolation "vm" (offers [process container])`},
		{"profile.inputs.yaml", 4, 11, "inputs.branch", `extension "local" has no input "branch"`},
		{"profile.inputs.yaml", 5, 10, "inputs.depth", "must be at least 1"},
		{"profile.inputs.yaml", 6, 9, "inputs.repo", "characters outside"},
	}
	left := append(extension.Problems(nil), ps...)
	for _, want := range wants {
		found := -1
		for i, p := range left {
			if filepath.Base(p.File) == want.file && p.Line == want.line && p.Column == want.col && p.Path == want.path && strings.Contains(p.Message, want.msg) {
				found = i
				break
			}
		}
		if found < 0 {
			t.Errorf("missing problem %s:%d:%d %s: %s", want.file, want.line, want.col, want.path, want.msg)
			continue
		}
		left = append(left[:found], left[found+1:]...)
	}
	for _, p := range left {
		t.Errorf("unexpected problem %s", p)
	}
	if c == nil || len(c.Extensions) != 4 || len(c.Profiles) != 4 {
		t.Errorf("catalog keeps what loaded: %d extensions, %d profiles", len(c.Extensions), len(c.Profiles))
	}
}

func TestLoadCatalogDirectories(t *testing.T) {
	t.Parallel()
	empty, profDir := writeTree(t, nil)
	_, ps := extension.LoadCatalog(empty, profDir, nil)
	if len(ps) != 1 || !strings.Contains(ps[0].Message, "no ext.<name>.yaml manifests found") {
		t.Errorf("empty extensions dir: %v", ps)
	}
	missing := filepath.Join(t.TempDir(), "missing")
	_, ps = extension.LoadCatalog(missing, missing, nil)
	if len(ps) != 2 || ps[0].File != missing || !strings.Contains(ps[0].Message, "reading") {
		t.Errorf("missing dirs: %v", ps)
	}
}

// TestShippedCatalogLoads loads the repository's own extensions/ and
// profiles/ without a registry: whatever is added there must be valid.
func TestShippedCatalogLoads(t *testing.T) {
	t.Parallel()
	c, ps := extension.LoadCatalog("../../extensions", "../../profiles", nil)
	if len(ps) != 0 {
		t.Fatalf("shipped catalog has problems:\n%v", ps)
	}
	if len(c.Extensions) == 0 || len(c.Profiles) == 0 {
		t.Errorf("shipped catalog is empty")
	}
}
