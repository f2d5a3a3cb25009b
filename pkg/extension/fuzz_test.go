package extension_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/internal/schematest"
)

// addSeeds adds every file matching pattern under the shipped and test
// directories as a seed.
func addSeeds(f *testing.F, patterns ...string) {
	for _, pat := range patterns {
		files, err := filepath.Glob(pat)
		if err != nil {
			f.Fatal(err)
		}
		for _, file := range files {
			b, err := os.ReadFile(file)
			if err != nil {
				f.Fatal(err)
			}
			f.Add(b)
		}
	}
}

// FuzzParseManifest: ParseManifest never panics, every problem names the
// file, and a manifest it accepts is one the JSON Schema accepts too, in
// its catalog JSON form.
func FuzzParseManifest(f *testing.F) {
	addSeeds(f, "../../extensions/ext.*.yaml", "testdata/full/ext.*.yaml")
	f.Add([]byte(validManifest + "workers:\n  backoff: [1s, soon]\n  concurrency: 1.5\n"))
	f.Add([]byte("name: &a local\nhandler: *a\ncapabilities: {isolation_levels: [process], pricing_model: metered}\n"))
	f.Add([]byte("- a\n- b\n"))
	f.Add([]byte("name: [\n"))
	f.Add([]byte(validManifest + "inputs:\n  x: {type: int, min: 5, max: 1, default: \"3\"}\n"))
	f.Add([]byte(validManifest + "config: !!binary aGVsbG8=\n"))
	s := schematest.Compile(f, manifestSchema)
	f.Fuzz(func(t *testing.T, data []byte) {
		const file = "ext.local.yaml"
		m, ps := extension.ParseManifest(file, data)
		for _, p := range ps {
			if p.File != file {
				t.Fatalf("problem %q does not name the file", p)
			}
		}
		if len(ps) > 0 {
			return
		}
		if m == nil {
			t.Fatal("no manifest and no problem")
		}
		b, err := json.Marshal(m)
		if err != nil {
			t.Fatalf("marshalling an accepted manifest: %v", err)
		}
		if err := schematest.ValidateJSON(s, b); err != nil {
			t.Fatalf("ParseManifest accepted what the schema refuses:\n%s\n%s\n%v", data, b, err)
		}
	})
}

// FuzzParseProfile: as FuzzParseManifest, for profiles.
func FuzzParseProfile(f *testing.F) {
	addSeeds(f, "../../profiles/profile.*.yaml", "testdata/full/profile.*.yaml")
	f.Add([]byte(validProfile + "ttl: {default: 2h, max: 1h}\nlabels: {a: b}\n"))
	f.Add([]byte(validProfile + "price: {start: 0.5, per_minute: 1}\n"))
	f.Add([]byte("slug: local\ncandidates: [{extension: a}, {extension: a}]\n"))
	f.Add([]byte("{}"))
	s := schematest.Compile(f, profileSchema)
	f.Fuzz(func(t *testing.T, data []byte) {
		const file = "profile.local.yaml"
		p, ps := extension.ParseProfile(file, data)
		for _, pr := range ps {
			if pr.File != file {
				t.Fatalf("problem %q does not name the file", pr)
			}
		}
		if len(ps) > 0 {
			return
		}
		if p == nil {
			t.Fatal("no profile and no problem")
		}
		b, err := json.Marshal(p)
		if err != nil {
			t.Fatalf("marshalling an accepted profile: %v", err)
		}
		if err := schematest.ValidateJSON(s, b); err != nil {
			t.Fatalf("ParseProfile accepted what the schema refuses:\n%s\n%s\n%v", data, b, err)
		}
	})
}
