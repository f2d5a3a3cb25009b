package extension_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/santhosh-tekuri/jsonschema/v6"
	"gopkg.in/yaml.v3"

	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/internal/schematest"
)

const (
	manifestSchema = "../../schemas/extension-manifest.json"
	profileSchema  = "../../schemas/profile.json"
)

// yamlAsJSON converts a YAML document to JSON, as a YAML-aware validator
// would see it.
func yamlAsJSON(t *testing.T, data []byte) []byte {
	t.Helper()
	var v any
	if err := yaml.Unmarshal(data, &v); err != nil {
		t.Fatalf("parsing YAML: %v", err)
	}
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatalf("YAML as JSON: %v", err)
	}
	return b
}

// shipped lists the files of dir matching pattern: the test iterates the
// directory, so manifests and profiles added later are covered.
func shipped(t *testing.T, dir, pattern string) []string {
	t.Helper()
	var out []string
	for _, ext := range []string{".yaml", ".yml"} {
		f, err := filepath.Glob(filepath.Join(dir, pattern+ext))
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, f...)
	}
	if len(out) == 0 {
		t.Fatalf("no %s files in %s", pattern, dir)
	}
	return out
}

// validateBothForms validates a file's YAML (as JSON) and the JSON the
// catalog stores for it (json.Marshal of what the loader returned).
func validateBothForms(t *testing.T, s *jsonschema.Schema, file string, loaded any) {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if err := schematest.ValidateJSON(s, yamlAsJSON(t, data)); err != nil {
		t.Errorf("%s (YAML form) fails the schema: %v", file, err)
	}
	stored, err := json.Marshal(loaded)
	if err != nil {
		t.Fatal(err)
	}
	if err := schematest.ValidateJSON(s, stored); err != nil {
		t.Errorf("%s (catalog JSON form) fails the schema:\n%s\n%v", file, stored, err)
	}
}

func TestShippedManifestsMatchSchema(t *testing.T) {
	t.Parallel()
	s := schematest.Compile(t, manifestSchema)
	for _, f := range append(shipped(t, "../../extensions", "ext.*"), "testdata/full/ext.full.yaml") {
		t.Run(filepath.Base(f), func(t *testing.T) {
			t.Parallel()
			m, ps := extension.LoadManifestFile(f)
			if len(ps) != 0 {
				t.Fatalf("problems: %v", ps)
			}
			validateBothForms(t, s, f, m)
		})
	}
}

func TestShippedProfilesMatchSchema(t *testing.T) {
	t.Parallel()
	s := schematest.Compile(t, profileSchema)
	for _, f := range append(shipped(t, "../../profiles", "profile.*"), "testdata/full/profile.full.yaml") {
		t.Run(filepath.Base(f), func(t *testing.T) {
			t.Parallel()
			p, ps := extension.LoadProfileFile(f)
			if len(ps) != 0 {
				t.Fatalf("problems: %v", ps)
			}
			validateBothForms(t, s, f, p)
		})
	}
}

// TestSchemaShape compares the schemas with the Go types field by field,
// and keeps the testdata/full files fully populated, so a field added on
// either side without the other fails here.
func TestSchemaShape(t *testing.T) {
	t.Parallel()
	schematest.CheckShape(t, manifestSchema, reflect.TypeFor[extension.Manifest]())
	schematest.CheckShape(t, profileSchema, reflect.TypeFor[extension.Profile]())
	m, ps := extension.LoadManifestFile("testdata/full/ext.full.yaml")
	if len(ps) != 0 {
		t.Fatal(ps)
	}
	schematest.FullyPopulated(t, *m)
	p, ps := extension.LoadProfileFile("testdata/full/profile.full.yaml")
	if len(ps) != 0 {
		t.Fatal(ps)
	}
	schematest.FullyPopulated(t, *p, "extension.Profile.Extension")
}

// TestSchemasReject proves the schemas can fail, on what the Go loader
// also refuses.
func TestSchemasReject(t *testing.T) {
	t.Parallel()
	ms := schematest.Compile(t, manifestSchema)
	ps := schematest.Compile(t, profileSchema)
	cases := []struct {
		name   string
		schema *jsonschema.Schema
		yaml   string
	}{
		{"manifest unknown key", ms, validManifest + "colour: red\n"},
		{"manifest unknown nested key", ms, validManifest + "workers:\n  retries: 3\n"},
		{"manifest missing handler", ms, strings.Replace(validManifest, "handler: local\n", "", 1)},
		{"manifest bad name", ms, strings.Replace(validManifest, "name: local", "name: Local", 1)},
		{"manifest unknown isolation", ms, strings.Replace(validManifest, "[process]", "[teleport]", 1)},
		{"manifest unknown pricing", ms, strings.Replace(validManifest, "self-hosted", "free", 1)},
		{"manifest bad duration", ms, validManifest + "workers:\n  ack_wait: soon\n"},
		{"manifest negative in-flight capacity", ms, validManifest + "capacity:\n  max_in_flight: -1\n"},
		{"manifest reserved input", ms, validManifest + "inputs:\n  sandbox_id:\n    type: string\n"},
		{"manifest unknown input type", ms, validManifest + "inputs:\n  x:\n    type: float\n"},
		{"manifest config not a mapping", ms, validManifest + "config: [a]\n"},
		{"manifest unknown repo key", ms, validManifest + "repo:\n  ports: [22]\n"},
		{"manifest unknown repo scheme", ms, validManifest + "repo:\n  schemes: [ftp]\n"},
		{"manifest repo scheme twice", ms, validManifest + "repo:\n  schemes: [https, https]\n"},
		{"manifest bad repo host", ms, validManifest + "repo:\n  hosts: [\"bad host\"]\n"},
		{"manifest relative local root", ms, validManifest + "repo:\n  local_roots: [relative]\n"},
		{"manifest local root of another user", ms, validManifest + "repo:\n  local_roots: [\"~user\"]\n"},
		{"profile unknown key", ps, validProfile + "owner: me\n"},
		{"profile missing extension", ps, "slug: local\n"},
		{"profile with extension and candidates", ps, validProfile + "candidates:\n  - extension: echo\n"},
		{"profile unknown placement", ps, validProfile + "placement: random\n"},
		{"profile bad label key", ps, validProfile + "labels:\n  Bad Key: x\n"},
		{"profile negative price", ps, validProfile + "price:\n  start: -1\n"},
		{"profile fractional price", ps, validProfile + "price:\n  start: 0.5\n"},
		{"profile unknown price key", ps, validProfile + "price:\n  per_minute: 1\n"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if err := schematest.ValidateJSON(tc.schema, yamlAsJSON(t, []byte(tc.yaml))); err == nil {
				t.Errorf("schema accepted:\n%s", tc.yaml)
			}
		})
	}
}
