package extension_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/extension/echo"
	"github.com/sand-boxer/sandboxer/pkg/extension/local"
)

func TestRegisterPanicsOnProgrammerErrors(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name  string
		infos []extension.Info
		want  string
	}{
		{"empty handler", []extension.Info{{Handler: "", New: echo.Info.New}}, "empty handler name"},
		{"nil constructor", []extension.Info{{Handler: "x"}}, `Register "x" with nil constructor`},
		{"duplicate", []extension.Info{echo.Info, echo.Info}, `Register called twice for handler "echo"`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			defer func() {
				r := recover()
				if r == nil {
					t.Fatal("no panic")
				}
				if msg := fmt.Sprint(r); !strings.Contains(msg, tc.want) {
					t.Errorf("panic %q, want it to contain %q", msg, tc.want)
				}
			}()
			extension.NewRegistry(tc.infos...)
		})
	}
}

func TestRegistryLookup(t *testing.T) {
	t.Parallel()
	reg := extension.NewRegistry(local.Info, echo.Info)
	if got := strings.Join(reg.Handlers(), ","); got != "echo,local" {
		t.Errorf("Handlers = %s, want sorted echo,local", got)
	}
	info, err := reg.Lookup("echo")
	if err != nil || info.Handler != "echo" || info.New == nil {
		t.Fatalf("Lookup(echo) = %+v, %v", info, err)
	}
	if a, b := info.New(), info.New(); a == b {
		t.Error("New returns the same instance twice")
	}
	_, err = reg.Lookup("compose-ssh")
	if err == nil || err.Error() != `unknown extension handler "compose-ssh" (not linked into this binary; known: [echo local])` {
		t.Errorf("Lookup of an unknown handler: %v", err)
	}
	_, err = extension.NewRegistry().Lookup("x")
	if err == nil || !strings.Contains(err.Error(), "known: []") {
		t.Errorf("Lookup on an empty registry: %v", err)
	}
	// Registries are independent values: no package-level state.
	other := extension.NewRegistry()
	other.Register(echo.Info)
	if len(other.Handlers()) != 1 || len(reg.Handlers()) != 2 {
		t.Error("registries share state")
	}
}

func TestRegistryOpen(t *testing.T) {
	t.Parallel()
	reg := extension.NewRegistry(local.Info, echo.Info)
	parse := func(t *testing.T, yamlText string) *extension.Manifest {
		t.Helper()
		m, ps := extension.ParseManifest("ext.local.yaml", []byte(yamlText))
		if len(ps) != 0 {
			t.Fatalf("manifest problems: %v", ps)
		}
		return m
	}

	t.Run("configures", func(t *testing.T) {
		t.Parallel()
		dir := t.TempDir()
		m := parse(t, validManifest+"config:\n  base_dir: ws\n")
		ext, err := reg.Open(context.Background(), m, extension.Env{DataDir: dir})
		if err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := extension.Close(ext); err != nil {
				t.Errorf("Close: %v", err)
			}
		}()
		if _, ok := ext.(*local.Local); !ok {
			t.Fatalf("Open returned %T", ext)
		}
		if fi, err := os.Stat(filepath.Join(dir, "ws")); err != nil || !fi.IsDir() {
			t.Errorf("Configure did not create the base dir: %v", err)
		}
	})
	t.Run("configure error names the extension", func(t *testing.T) {
		t.Parallel()
		m := parse(t, validManifest+"config:\n  base_dir: ws\n  colour: red\n")
		_, err := reg.Open(context.Background(), m, extension.Env{DataDir: t.TempDir()})
		if err == nil || !strings.Contains(err.Error(), "configuring extension local (handler local)") || !strings.Contains(err.Error(), `unknown field "colour"`) {
			t.Errorf("Open = %v", err)
		}
		var ps extension.Problems
		if !errors.As(err, &ps) || ps[0].Line != 8 || ps[0].Path != "config.colour" {
			t.Errorf("Open error does not carry the config problem's position: %#v", ps)
		}
	})
	t.Run("unknown handler", func(t *testing.T) {
		t.Parallel()
		m := parse(t, strings.Replace(validManifest, "handler: local", "handler: vm-packer", 1))
		if _, err := reg.Open(context.Background(), m, extension.Env{}); err == nil || !strings.Contains(err.Error(), "not linked") {
			t.Errorf("Open = %v", err)
		}
	})
	t.Run("without Configurer or Closer", func(t *testing.T) {
		t.Parallel()
		m := parse(t, strings.Replace(validManifest, "handler: local", "handler: echo", 1))
		ext, err := reg.Open(context.Background(), m, extension.Env{})
		if err != nil {
			t.Fatal(err)
		}
		if err := extension.Close(ext); err != nil {
			t.Errorf("Close of a backend without resources: %v", err)
		}
	})
}

// backendConfig is a backend's own config block, for Config.Decode.
type backendConfig struct {
	BaseDir string          `yaml:"base_dir" json:"base_dir"`
	Workers int             `yaml:"workers" json:"workers"`
	Verbose bool            `yaml:"verbose" json:"verbose"`
	Nested  struct{ A int } `yaml:"nested" json:"nested"`
}

func TestConfigDecodeIsStrict(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name   string
		config string
		wants  []want
	}{
		{"valid", "config:\n  base_dir: ws\n  workers: 2\n  verbose: true\n", nil},
		{"unknown keys", "config:\n  base_dir: ws\n  colour: red\n  nested:\n    b: 1\n", []want{
			{8, 3, "config.colour", `unknown field "colour"`},
			{10, 5, "config.nested.b", `unknown field "b" (known: a)`},
		}},
		{"wrong types", "config:\n  workers: many\n  verbose: sometimes\n", []want{
			{7, 12, "config.workers", "cannot unmarshal !!str `many` into int"},
			{8, 12, "config.verbose", "cannot unmarshal !!str `sometimes` into bool"},
		}},
		{"float for an integer", "config:\n  workers: 2.5\n", []want{
			{7, 12, "config.workers", "want an integer, got 2.5"},
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			m, ps := extension.ParseManifest("ext.local.yaml", []byte(validManifest+tc.config))
			if len(ps) != 0 {
				t.Fatalf("manifest problems: %v", ps)
			}
			var cfg backendConfig
			err := m.Config.Decode(&cfg)
			if tc.wants == nil {
				if err != nil || cfg.BaseDir != "ws" || cfg.Workers != 2 || !cfg.Verbose {
					t.Errorf("Decode = %+v, %v", cfg, err)
				}
				return
			}
			var got extension.Problems
			if !errors.As(err, &got) {
				t.Fatalf("Decode error %v is not Problems", err)
			}
			checkProblems(t, "ext.local.yaml", got, tc.wants)
		})
	}
}

// TestConfigDecodeFromCatalogJSON decodes a config that travelled through
// the catalog's JSON form: no positions any more, but just as strict.
func TestConfigDecodeFromCatalogJSON(t *testing.T) {
	t.Parallel()
	roundTrip := func(t *testing.T, yamlText string) *extension.Manifest {
		t.Helper()
		m, ps := extension.ParseManifest("ext.local.yaml", []byte(yamlText))
		if len(ps) != 0 {
			t.Fatal(ps)
		}
		b, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		var back extension.Manifest
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatal(err)
		}
		return &back
	}
	m := roundTrip(t, validManifest+"config:\n  base_dir: ws\n  workers: 3\n")
	var cfg backendConfig
	if err := m.Config.Decode(&cfg); err != nil || cfg.BaseDir != "ws" || cfg.Workers != 3 {
		t.Errorf("Decode = %+v, %v", cfg, err)
	}
	m = roundTrip(t, validManifest+"config:\n  base_dir: ws\n  colour: red\n")
	if err := m.Config.Decode(&cfg); err == nil || !strings.Contains(err.Error(), `unknown field "colour"`) {
		t.Errorf("Decode of an unknown key from JSON = %v", err)
	}
	m = roundTrip(t, validManifest)
	if !m.Config.IsZero() {
		t.Error("absent config is not zero after the round trip")
	}
	if err := m.Config.Decode(&cfg); err != nil {
		t.Errorf("Decode of an absent config = %v", err)
	}
	var zero extension.Config
	if b, err := json.Marshal(zero); err != nil || string(b) != "null" {
		t.Errorf("zero Config marshals to %s, %v", b, err)
	}
}

func TestDuration(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, yaml string
		want       time.Duration
		wantErr    bool
	}{
		{"seconds", "30s", 30 * time.Second, false},
		{"compound", "1h30m", 90 * time.Minute, false},
		{"fraction", "1.5s", 1500 * time.Millisecond, false},
		{"zero", "0", 0, false},
		{"no unit", "30", 0, true},
		{"word", "soon", 0, true},
		{"sequence", "[1s]", 0, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var v struct {
				D extension.Duration `yaml:"d"`
			}
			err := yaml.Unmarshal([]byte("d: "+tc.yaml), &v)
			if (err != nil) != tc.wantErr || (!tc.wantErr && v.D.D() != tc.want) {
				t.Fatalf("yaml %q: %v, %v", tc.yaml, v.D, err)
			}
			if tc.wantErr {
				var te *yaml.TypeError
				if !errors.As(err, &te) || !strings.Contains(err.Error(), "line 1, column 4") {
					t.Errorf("error %v is not a positioned *yaml.TypeError", err)
				}
				return
			}
			b, err := json.Marshal(v.D)
			if err != nil {
				t.Fatal(err)
			}
			var back extension.Duration
			if err := json.Unmarshal(b, &back); err != nil || back != v.D {
				t.Errorf("JSON round trip of %s: %s -> %v, %v", v.D, b, back, err)
			}
			out, err := yaml.Marshal(v)
			if err != nil || strings.TrimSpace(string(out)) != "d: "+v.D.String() {
				t.Errorf("yaml.Marshal = %q, %v", out, err)
			}
		})
	}
	var d extension.Duration
	for _, bad := range []string{`30`, `"soon"`, `null x`} {
		if err := json.Unmarshal([]byte(bad), &d); err == nil {
			t.Errorf("json %s accepted as a duration", bad)
		}
	}
}
