// Package schematest holds the test helpers that keep the JSON Schemas in
// schemas/ and the Go types they describe in step: compiling a schema,
// validating a value as its JSON, comparing a schema's shape with a Go
// type's JSON encoding, and proving a test value sets every field.
//
// It is imported by tests only and must never be imported by production
// code.
package schematest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/santhosh-tekuri/jsonschema/v6"
)

// Compile compiles the schema file at path, with format assertions on
// (date-time, regex), or fails tb.
func Compile(tb testing.TB, path string) *jsonschema.Schema {
	tb.Helper()
	c := jsonschema.NewCompiler()
	c.AssertFormat()
	s, err := c.Compile(path)
	if err != nil {
		tb.Fatalf("compiling schema %s: %v", path, err)
	}
	return s
}

// ValidateJSON validates the JSON document doc against s and returns the
// validation error, if any.
func ValidateJSON(s *jsonschema.Schema, doc []byte) error {
	v, err := jsonschema.UnmarshalJSON(bytes.NewReader(doc))
	if err != nil {
		return fmt.Errorf("reading instance: %w", err)
	}
	return s.Validate(v)
}

// Validate validates the JSON encoding of v against s.
func Validate(s *jsonschema.Schema, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encoding instance: %w", err)
	}
	return ValidateJSON(s, b)
}

var (
	timeType      = reflect.TypeFor[time.Time]()
	marshalerType = reflect.TypeFor[json.Marshaler]()
)

// CheckShape fails tb wherever the schema file at path and Go type t
// disagree about the JSON shape: for every struct, the schema must be a
// closed object (additionalProperties false) whose properties are exactly
// the struct's JSON fields and whose required list is exactly the fields
// encoded without omitempty/omitzero; maps must constrain their values,
// slices their items, and scalars must have the matching JSON type. Types
// with their own MarshalJSON are leaves, checked only to be described.
func CheckShape(tb testing.TB, path string, t reflect.Type) {
	tb.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		tb.Fatalf("reading %s: %v", path, err)
	}
	var root map[string]any
	if err := json.Unmarshal(raw, &root); err != nil {
		tb.Fatalf("parsing %s: %v", path, err)
	}
	w := walker{tb: tb, root: root, file: path}
	w.check("", t, root)
}

type walker struct {
	tb   testing.TB
	root map[string]any
	file string
}

func (w walker) errorf(at, format string, args ...any) {
	w.tb.Helper()
	if at == "" {
		at = "(root)"
	}
	w.tb.Errorf("%s: %s: %s", w.file, at, fmt.Sprintf(format, args...))
}

// resolve follows local "#/$defs/..." references.
func (w walker) resolve(node map[string]any) map[string]any {
	for range 16 {
		ref, ok := node["$ref"].(string)
		if !ok {
			return node
		}
		name, ok := strings.CutPrefix(ref, "#/$defs/")
		if !ok {
			w.tb.Fatalf("%s: only local #/$defs references are supported, got %q", w.file, ref)
		}
		defs, _ := w.root["$defs"].(map[string]any)
		next, ok := defs[name].(map[string]any)
		if !ok {
			w.tb.Fatalf("%s: dangling reference %q", w.file, ref)
		}
		node = next
	}
	w.tb.Fatalf("%s: reference cycle", w.file)
	return nil
}

func schemaTypes(node map[string]any) []string {
	switch v := node["type"].(type) {
	case string:
		return []string{v}
	case []any:
		var out []string
		for _, x := range v {
			if s, ok := x.(string); ok {
				out = append(out, s)
			}
		}
		return out
	}
	return nil
}

func (w walker) wantType(at string, node map[string]any, want string) {
	w.tb.Helper()
	if got := schemaTypes(node); !slices.Contains(got, want) {
		w.errorf(at, "schema type %v, want %q", got, want)
	}
}

func (w walker) check(at string, t reflect.Type, node map[string]any) {
	w.tb.Helper()
	node = w.resolve(node)
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == timeType {
		w.wantType(at, node, "string")
		if node["format"] != "date-time" {
			w.errorf(at, "time.Time wants format date-time, got %v", node["format"])
		}
		return
	}
	if t.Implements(marshalerType) || reflect.PointerTo(t).Implements(marshalerType) {
		if len(schemaTypes(node)) == 0 {
			w.errorf(at, "%s has no schema type", t)
		}
		return
	}
	switch t.Kind() {
	case reflect.Struct:
		w.checkStruct(at, t, node)
	case reflect.Map:
		w.wantType(at, node, "object")
		ap, ok := node["additionalProperties"].(map[string]any)
		if !ok {
			w.errorf(at, "map %s wants additionalProperties to describe its values", t)
			return
		}
		w.check(at+".*", t.Elem(), ap)
	case reflect.Slice, reflect.Array:
		w.wantType(at, node, "array")
		items, ok := node["items"].(map[string]any)
		if !ok {
			w.errorf(at, "slice %s wants items", t)
			return
		}
		w.check(at+"[]", t.Elem(), items)
	case reflect.String:
		w.wantType(at, node, "string")
	case reflect.Bool:
		w.wantType(at, node, "boolean")
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		w.wantType(at, node, "integer")
	case reflect.Float32, reflect.Float64:
		w.wantType(at, node, "number")
	default:
		w.errorf(at, "unsupported Go kind %s", t.Kind())
	}
}

func (w walker) checkStruct(at string, t reflect.Type, node map[string]any) {
	w.tb.Helper()
	w.wantType(at, node, "object")
	if ap, ok := node["additionalProperties"].(bool); !ok || ap {
		w.errorf(at, "struct %s is closed: want additionalProperties false", t)
	}
	props, _ := node["properties"].(map[string]any)
	var required []string
	if rs, ok := node["required"].([]any); ok {
		for _, r := range rs {
			required = append(required, fmt.Sprint(r))
		}
	}
	fields := JSONFields(t)
	var wantRequired []string
	for _, f := range fields {
		p, ok := props[f.Name].(map[string]any)
		if !ok {
			w.errorf(at, "Go field %s.%s (json %q) missing from schema properties", t, f.GoName, f.Name)
			continue
		}
		if !f.Optional {
			wantRequired = append(wantRequired, f.Name)
		}
		w.check(joinAt(at, f.Name), f.Type, p)
	}
	for name := range props {
		if !slices.ContainsFunc(fields, func(f Field) bool { return f.Name == name }) {
			w.errorf(at, "schema property %q has no Go field in %s", name, t)
		}
	}
	slices.Sort(required)
	slices.Sort(wantRequired)
	if !slices.Equal(required, wantRequired) {
		w.errorf(at, "required %v, want %v (the fields of %s encoded without omitempty/omitzero)", required, wantRequired, t)
	}
}

func joinAt(at, name string) string {
	if at == "" {
		return name
	}
	return at + "." + name
}

// Field is one JSON field of a struct.
type Field struct {
	Name, GoName string
	Type         reflect.Type
	// Optional is true for omitempty and omitzero fields.
	Optional bool
}

// JSONFields lists the fields encoding/json writes for struct t, embedded
// structs inlined, in declaration order.
func JSONFields(t reflect.Type) []Field {
	var out []Field
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		tag := f.Tag.Get("json")
		if tag == "-" {
			continue
		}
		name, opts, _ := strings.Cut(tag, ",")
		if f.Anonymous && name == "" {
			ft := f.Type
			for ft.Kind() == reflect.Pointer {
				ft = ft.Elem()
			}
			if ft.Kind() == reflect.Struct {
				out = append(out, JSONFields(ft)...)
				continue
			}
		}
		if !f.IsExported() {
			continue
		}
		if name == "" {
			name = f.Name
		}
		optional := false
		for _, o := range strings.Split(opts, ",") {
			if o == "omitempty" || o == "omitzero" {
				optional = true
			}
		}
		out = append(out, Field{Name: name, GoName: f.Name, Type: f.Type, Optional: optional})
	}
	return out
}

// FullyPopulated fails tb for every exported field of v, at any depth,
// that holds its zero value, an empty map or an empty slice, so that a
// "fully populated" test value stays so when a field is added. Types with
// their own MarshalJSON are checked only to be non-zero. except names
// fields that cannot be set together with others, as reported
// ("extension.Profile.Extension"); the caller covers them elsewhere.
func FullyPopulated(tb testing.TB, v any, except ...string) {
	tb.Helper()
	populated(tb, reflect.TypeOf(v).String(), reflect.ValueOf(v), except)
}

func populated(tb testing.TB, at string, v reflect.Value, except []string) {
	tb.Helper()
	if slices.Contains(except, at) {
		return
	}
	if v.IsZero() {
		tb.Errorf("%s is zero: populate it in the test value", at)
		return
	}
	switch v.Kind() {
	case reflect.Pointer, reflect.Interface:
		populated(tb, at, v.Elem(), except)
	case reflect.Struct:
		if v.Type() == timeType || v.Type().Implements(marshalerType) || reflect.PointerTo(v.Type()).Implements(marshalerType) {
			return
		}
		for i := 0; i < v.NumField(); i++ {
			if f := v.Type().Field(i); f.IsExported() {
				populated(tb, at+"."+f.Name, v.Field(i), except)
			}
		}
	case reflect.Map:
		if v.Len() == 0 {
			tb.Errorf("%s is an empty map", at)
		}
		iter := v.MapRange()
		for iter.Next() {
			populated(tb, fmt.Sprintf("%s[%v]", at, iter.Key()), iter.Value(), except)
		}
	case reflect.Slice:
		if v.Len() == 0 {
			tb.Errorf("%s is an empty slice", at)
		}
		for i := 0; i < v.Len(); i++ {
			populated(tb, fmt.Sprintf("%s[%d]", at, i), v.Index(i), except)
		}
	}
}
