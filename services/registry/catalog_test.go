package registry_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/echo"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
	"github.com/sand-boxer/sandboxer/pkg/workers"
	"github.com/sand-boxer/sandboxer/services/registry"
)

// TestLoadRepoCatalog loads the repository's own extensions/ and profiles/:
// what ships must always load.
func TestLoadRepoCatalog(t *testing.T) {
	t.Parallel()
	c, err := registry.Load(registry.Options{ExtensionsDir: "../../extensions", ProfilesDir: "../../profiles"})
	if err != nil {
		t.Fatalf("loading the shipped catalog: %v", err)
	}
	if _, err := c.Extension("local"); err != nil {
		t.Error(err)
	}
	p, err := c.Profile("local")
	if err != nil {
		t.Fatal(err)
	}
	if p.Extension != "local" {
		t.Errorf("profile local binds %q, want local", p.Extension)
	}
	for _, p := range c.ProfileList() {
		if len(p.ExtensionNames()) == 0 {
			t.Errorf("profile %s binds no extension", p.Slug)
		}
		for _, name := range p.ExtensionNames() {
			if _, err := c.Extension(name); err != nil {
				t.Errorf("profile %s: %v", p.Slug, err)
			}
		}
	}
}

// problem is one expected line of the start-up error.
type problem struct {
	file         string
	line, column int
	path, msg    string
}

func (p problem) render(dir string) string {
	return fmt.Sprintf("%s:%d:%d: %s: %s", filepath.Join(dir, p.file), p.line, p.column, p.path, p.msg)
}

// brokenCase is a set of files with the problems they must produce.
type brokenCase struct {
	name     string
	exts     map[string]string
	profiles map[string]string
	want     []problem
}

var brokenCases = []brokenCase{
	{
		name: "unknown key",
		exts: map[string]string{"ext.a.yaml": "name: a\nhandler: echo\ncolour: red\ncapabilities:\n  isolation_levels: [process]\n  pricing_model: self-hosted\n"},
		want: []problem{{"extensions/ext.a.yaml", 3, 1, "colour", `unknown field "colour"`}},
	},
	{
		name: "unknown nested key",
		exts: map[string]string{"ext.n.yaml": "name: n\nhandler: echo\ncapabilities:\n  isolation_levels: [process]\n  pricing_model: self-hosted\n  gpus: 2\n"},
		want: []problem{{"extensions/ext.n.yaml", 6, 3, "capabilities.gpus", `unknown field "gpus"`}},
	},
	{
		name: "bad pricing model",
		exts: map[string]string{"ext.b.yaml": "name: b\nhandler: echo\ncapabilities:\n  isolation_levels: [process]\n  pricing_model: free\n"},
		want: []problem{{"extensions/ext.b.yaml", 5, 18, "capabilities.pricing_model", `unknown pricing model "free"`}},
	},
	{
		name: "bad isolation level",
		exts: map[string]string{"ext.c.yaml": "name: c\nhandler: echo\ncapabilities:\n  isolation_levels: [process, jail]\n  pricing_model: metered\n"},
		want: []problem{{"extensions/ext.c.yaml", 4, 31, "capabilities.isolation_levels[1]", `unknown isolation level "jail"`}},
	},
	{
		name:     "profile bound to unknown extension",
		profiles: map[string]string{"profile.x.yaml": "slug: x\nextension: nope\n"},
		want:     []problem{{"profiles/profile.x.yaml", 2, 12, "extension", `unknown extension "nope"`}},
	},
	{
		name:     "isolation the extension does not offer",
		profiles: map[string]string{"profile.y.yaml": "slug: y\nextension: echo\nisolation: vm\n"},
		want:     []problem{{"profiles/profile.y.yaml", 3, 12, "isolation", `extension "echo" does not offer isolation "vm"`}},
	},
	{
		name: "file name not matching name",
		exts: map[string]string{"ext.wrong.yaml": "name: d\nhandler: echo\ncapabilities:\n  isolation_levels: [process]\n  pricing_model: metered\n"},
		want: []problem{{"extensions/ext.wrong.yaml", 1, 7, "name", `extension "d" must be declared in ext.d.yaml, not ext.wrong.yaml`}},
	},
	{
		name:     "profile slug not matching file name",
		profiles: map[string]string{"profile.z.yaml": "slug: zed\nextension: echo\n"},
		want:     []problem{{"profiles/profile.z.yaml", 1, 7, "slug", `profile "zed" must be declared in profile.zed.yaml`}},
	},
	{
		name: "duplicate extension",
		exts: map[string]string{"ext.echo.yml": goodManifest},
		want: []problem{
			{"extensions/ext.echo.yml", 1, 7, "name", `extension "echo" already declared in `},
		},
	},
	{
		name: "handler not linked",
		exts: map[string]string{"ext.h.yaml": "name: h\nhandler: nosuch\ncapabilities:\n  isolation_levels: [process]\n  pricing_model: metered\n"},
		want: []problem{{"extensions/ext.h.yaml", 2, 10, "handler", `unknown extension handler "nosuch"`}},
	},
}

// TestStartRefusesBrokenCatalog: start-up fails on any problem, and the
// error lists every problem with file, line and column; nothing reaches
// the catalog bucket.
func TestStartRefusesBrokenCatalog(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	js := srv.JetStream(t)

	all := brokenCase{name: "every problem at once", exts: map[string]string{}, profiles: map[string]string{}}
	for _, c := range brokenCases {
		maps.Copy(all.exts, c.exts)
		maps.Copy(all.profiles, c.profiles)
		all.want = append(all.want, c.want...)
	}
	t.Run("cases", func(t *testing.T) {
		for _, c := range append(slices.Clone(brokenCases), all) {
			t.Run(c.name, func(t *testing.T) {
				t.Parallel()
				root := t.TempDir()
				extDir, profDir := filepath.Join(root, "extensions"), filepath.Join(root, "profiles")
				writeFiles(t, extDir, map[string]string{"ext.echo.yaml": goodManifest})
				writeFiles(t, profDir, map[string]string{"profile.echo.yaml": goodProfile})
				writeFiles(t, extDir, c.exts)
				writeFiles(t, profDir, c.profiles)

				reg, err := registry.New(registry.Options{
					JS: js, ExtensionsDir: extDir, ProfilesDir: profDir,
					Extensions: extension.NewRegistry(echo.Info),
				})
				if err != nil {
					t.Fatal(err)
				}
				err = reg.Start(testCtx(t, 10*time.Second))
				if err == nil {
					_ = reg.Shutdown(t.Context())
					t.Fatal("Start succeeded on a broken catalog")
				}
				var ps extension.Problems
				if !errors.As(err, &ps) {
					t.Fatalf("error %v does not wrap extension.Problems", err)
				}
				msg := err.Error()
				if len(ps) != len(c.want) {
					t.Errorf("got %d problems, want %d:\n%s", len(ps), len(c.want), msg)
				}
				for _, p := range c.want {
					if !strings.Contains(msg, p.render(root)) {
						t.Errorf("error does not list\n  %s\ngot:\n%s", p.render(root), msg)
					}
				}
				for _, p := range ps {
					if p.Line == 0 || p.Column == 0 {
						t.Errorf("problem without line and column: %s", p)
					}
				}
				if err := reg.Shutdown(t.Context()); err != nil {
					t.Errorf("Shutdown after a failed Start: %v", err)
				}
			})
		}
	})
	ctx := testCtx(t, 5*time.Second)
	kv, err := js.KeyValue(ctx, bus.BucketCatalog)
	if err != nil {
		t.Fatal(err)
	}
	if keys, err := kv.Keys(ctx); !errors.Is(err, jetstream.ErrNoKeysFound) {
		t.Errorf("a refused start published to the catalog bucket: %v %v", keys, err)
	}
}

// TestCatalog: a started registry publishes its catalog to the bucket and
// answers catalog requests with it.
func TestCatalog(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	e := start(t, srv)
	ctx := testCtx(t, 10*time.Second)

	kv, err := e.js.KeyValue(ctx, bus.BucketCatalog)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := kv.Keys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(keys)
	if want := []string{"extension.echo", "profile.echo"}; !slices.Equal(keys, want) {
		t.Errorf("catalog bucket keys %v, want %v", keys, want)
	}

	client := srv.Conn(t)
	tests := []struct {
		name    string
		body    string
		wantErr string
	}{
		{name: "empty body"},
		{name: "empty object", body: "{}"},
		{name: "unknown field", body: `{"extension":"echo"}`, wantErr: "400"},
		{name: "not json", body: "catalog please", wantErr: "400"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			msg, err := client.RequestWithContext(testCtx(t, 5*time.Second), event.SubjectCatalog, []byte(tc.body))
			if err != nil {
				t.Fatal(err)
			}
			if tc.wantErr != "" {
				if code := msg.Header.Get("Nats-Service-Error-Code"); code != tc.wantErr {
					t.Fatalf("error code %q, want %q (body %q)", code, tc.wantErr, msg.Data)
				}
				return
			}
			var c extension.Catalog
			if err := json.Unmarshal(msg.Data, &c); err != nil {
				t.Fatalf("decoding catalog %q: %v", msg.Data, err)
			}
			m, err := c.Extension("echo")
			if err != nil {
				t.Fatal(err)
			}
			if m.Handler != "echo" || m.Capabilities.PricingModel != extension.PricingSelfHosted {
				t.Errorf("extension echo: %+v", m)
			}
			p, err := c.Profile("echo")
			if err != nil {
				t.Fatal(err)
			}
			if p.Extension != "echo" || p.Isolation != extension.IsolationProcess {
				t.Errorf("profile echo: %+v", p)
			}
		})
	}

	t.Run("FetchCatalog", func(t *testing.T) {
		t.Parallel()
		c, err := registry.FetchCatalog(testCtx(t, 5*time.Second), client)
		if err != nil {
			t.Fatal(err)
		}
		if got := slices.Sorted(maps.Keys(c.Extensions)); !slices.Equal(got, []string{"echo"}) {
			t.Errorf("extensions %v", got)
		}
	})
}

// TestWorkers: heartbeats put in the workers bucket are served by the
// registry, filtered by extension on request.
func TestWorkers(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	e := start(t, srv)
	ctx := testCtx(t, 10*time.Second)
	kv, err := e.js.KeyValue(ctx, bus.BucketWorkers)
	if err != nil {
		t.Fatal(err)
	}
	started := time.Now().UTC().Truncate(time.Second)
	beats := []workers.Heartbeat{
		{Extension: "echo", Worker: workers.ID("Host.Example", 41), Host: "host.example", PID: 41, StartedAt: started, Concurrency: 8, InFlight: 1},
		{Extension: "echo", Worker: "w2", Host: "h2", PID: 7, StartedAt: started, Concurrency: 4},
		{Extension: "local", Worker: "w1", Host: "h1", PID: 9, StartedAt: started, Concurrency: 2},
	}
	for _, h := range beats {
		if err := workers.Put(ctx, kv, h); err != nil {
			t.Fatal(err)
		}
	}
	client := srv.Conn(t)
	eventually(t, 5*time.Second, func() (bool, string) {
		got, err := registry.FetchWorkers(ctx, client, "")
		if err != nil {
			return false, err.Error()
		}
		return len(got) == 3, fmt.Sprintf("%d workers", len(got))
	})

	tests := []struct {
		name      string
		extension string
		want      []string
	}{
		{name: "all", want: []string{"echo.host-example-41", "echo.w2", "local.w1"}},
		{name: "one extension", extension: "local", want: []string{"local.w1"}},
		{name: "no workers", extension: "vm-packer", want: []string{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := registry.FetchWorkers(testCtx(t, 5*time.Second), client, tc.extension)
			if err != nil {
				t.Fatal(err)
			}
			keys := []string{}
			for _, h := range got {
				keys = append(keys, h.Key())
				if h.SeenAt.IsZero() || !h.StartedAt.Equal(started) {
					t.Errorf("heartbeat %s: %+v", h.Key(), h)
				}
			}
			if !slices.Equal(keys, tc.want) {
				t.Errorf("workers %v, want %v", keys, tc.want)
			}
		})
	}
	t.Run("bad request", func(t *testing.T) {
		t.Parallel()
		_, err := registry.FetchWorkers(testCtx(t, 5*time.Second), client, "Not A Name")
		var se *registry.ServiceError
		if !errors.As(err, &se) || se.Code != "400" {
			t.Fatalf("err %v, want a 400 ServiceError", err)
		}
	})
}
