package metering_test

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/santhosh-tekuri/jsonschema/v6"

	"github.com/sand-boxer/sandboxer/pkg/credits"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/services/metering"
)

const schemaDir = "../../schemas"

// schemas compiles the schema of every metering event type, once.
var schemas = sync.OnceValues(func() (map[string]*jsonschema.Schema, error) {
	c := jsonschema.NewCompiler()
	out := map[string]*jsonschema.Schema{}
	types := []event.Type{metering.TypeAccrual, metering.TypeHoldDeadline}
	for _, k := range credits.Kinds {
		types = append(types, k.Type())
	}
	for _, typ := range types {
		path, err := filepath.Abs(filepath.Join(schemaDir, string(typ)+".json"))
		if err != nil {
			return nil, err
		}
		s, err := c.Compile(path)
		if err != nil {
			return nil, err
		}
		out[string(typ)] = s
	}
	return out, nil
})

// validateStream validates the data of every event on the metering stream
// against the schema of its type.
func validateStream(t *testing.T, e *env) {
	t.Helper()
	ss, err := schemas()
	if err != nil {
		t.Fatalf("compiling schemas: %v", err)
	}
	for _, ev := range e.meteringEvents(t) {
		s, ok := ss[ev.Type()]
		if !ok {
			t.Fatalf("event %s has type %s with no schema", ev.ID(), ev.Type())
		}
		v, err := jsonschema.UnmarshalJSON(bytes.NewReader(ev.Data()))
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Validate(v); err != nil {
			t.Fatalf("event %s (%s) does not match its schema: %v\n%s", ev.ID(), ev.Type(), err, ev.Data())
		}
	}
}

// TestSchemaFilesMatchKinds: every metering kind has its schema file, and
// every credits schema file names a kind.
func TestSchemaFilesMatchKinds(t *testing.T) {
	t.Parallel()
	if _, err := schemas(); err != nil {
		t.Fatal(err)
	}
	files, err := filepath.Glob(filepath.Join(schemaDir, "dev.sandboxer.credits.*.json"))
	if err != nil {
		t.Fatal(err)
	}
	known := map[string]bool{string(metering.TypeAccrual): true, string(metering.TypeHoldDeadline): true}
	for _, k := range credits.Kinds {
		known[string(k.Type())] = true
	}
	for _, f := range files {
		typ := strings.TrimSuffix(filepath.Base(f), ".json")
		if !known[typ] {
			t.Errorf("schema %s names no metering event type", f)
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Contains(b, []byte(`"$id": "https://sandboxer.dev/schemas/`+typ+`.json"`)) {
			t.Errorf("schema %s lacks its $id", f)
		}
	}
}

// TestAccrualSchema validates a tick's data, which never reaches the
// metering stream.
func TestAccrualSchema(t *testing.T) {
	t.Parallel()
	ss, err := schemas()
	if err != nil {
		t.Fatal(err)
	}
	for name, tc := range map[string]struct {
		data string
		ok   bool
	}{
		"valid":         {`{"consumer":"dev","sandbox_id":"sb1"}`, true},
		"bad name":      {`{"consumer":"Dev!","sandbox_id":"sb1"}`, false},
		"unknown field": {`{"consumer":"dev","sandbox_id":"sb1","x":1}`, false},
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			v, err := jsonschema.UnmarshalJSON(strings.NewReader(tc.data))
			if err != nil {
				t.Fatal(err)
			}
			if err := ss[string(metering.TypeAccrual)].Validate(v); (err == nil) != tc.ok {
				t.Fatalf("validate %s: %v, want ok=%v", tc.data, err, tc.ok)
			}
		})
	}
}
