package registry_test

import (
	"errors"
	"slices"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/echo"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
	"github.com/sand-boxer/sandboxer/services/registry"
)

// TestCatalogOption: a registry given an already loaded catalog (here
// from an fs.FS, as the binary's embedded copy is) serves it and reads no
// directory; a broken one is refused at start, as a broken directory is.
func TestCatalogOption(t *testing.T) {
	t.Parallel()
	fsys := fstest.MapFS{
		"ext/ext.echo.yaml":         {Data: []byte(goodManifest)},
		"prof/profile.echo.yaml":    {Data: []byte(goodProfile)},
		"prof/profile.another.yaml": {Data: []byte("slug: another\nextension: echo\n")},
	}
	cat, ps := extension.LoadCatalogDirs(extension.CatalogDir{FS: fsys, Path: "ext"}, extension.CatalogDir{FS: fsys, Path: "prof"}, extension.NewRegistry(echo.Info))
	if len(ps) > 0 {
		t.Fatal(ps)
	}
	srv := natstest.Start(t)
	e := start(t, srv, func(o *registry.Options) {
		o.Catalog = cat
		o.ExtensionsDir, o.ProfilesDir = "/nonexistent/extensions", "/nonexistent/profiles"
	})
	kv, err := e.js.KeyValue(testCtx(t, 10*time.Second), bus.BucketCatalog)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := kv.Keys(testCtx(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(keys)
	if want := []string{"extension.echo", "profile.another", "profile.echo"}; !slices.Equal(keys, want) {
		t.Fatalf("catalog bucket keys %v, want %v", keys, want)
	}
	if got := e.reg.Catalog(); got != cat {
		t.Fatal("the registry serves another catalog than the one it was given")
	}

	// Broken: a profile bound to an extension the catalog lacks.
	broken := &extension.Catalog{
		Extensions: map[string]*extension.Manifest{},
		Profiles:   map[string]*extension.Profile{"orphan": {Slug: "orphan", Extension: "gone"}},
	}
	other := natstest.Start(t)
	nc := other.ConnAs(t, auth.Identity{Role: auth.RoleRegistry})
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	reg, err := registry.New(registry.Options{JS: js, Catalog: broken, Extensions: extension.NewRegistry(echo.Info)})
	if err != nil {
		t.Fatal(err)
	}
	err = reg.Start(testCtx(t, 10*time.Second))
	var bad extension.Problems
	if !errors.As(err, &bad) || !strings.Contains(err.Error(), `unknown extension "gone"`) {
		_ = reg.Shutdown(t.Context())
		t.Fatalf("start on a broken catalog: %v, want its problems", err)
	}
	if err := reg.Shutdown(t.Context()); err != nil {
		t.Fatal(err)
	}
}
