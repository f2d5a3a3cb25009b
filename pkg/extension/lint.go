package extension

import (
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// Problem is one thing wrong with a manifest, profile or catalog, with
// where it is.
type Problem struct {
	File    string `json:"file,omitempty"`
	Line    int    `json:"line,omitempty"`
	Column  int    `json:"column,omitempty"`
	Path    string `json:"path,omitempty"`
	Message string `json:"message"`
}

// String renders p as file:line:column: path: message.
func (p Problem) String() string {
	var b strings.Builder
	if p.File != "" {
		b.WriteString(p.File)
		b.WriteByte(':')
	}
	if p.Line > 0 {
		b.WriteString(strconv.Itoa(p.Line))
		b.WriteByte(':')
		if p.Column > 0 {
			b.WriteString(strconv.Itoa(p.Column))
			b.WriteByte(':')
		}
	}
	if b.Len() > 0 {
		b.WriteByte(' ')
	}
	if p.Path != "" {
		b.WriteString(p.Path)
		b.WriteString(": ")
	}
	b.WriteString(p.Message)
	return b.String()
}

// Problems is every problem found, as an error.
type Problems []Problem

// Error lists every problem, one per line.
func (ps Problems) Error() string {
	lines := make([]string, len(ps))
	for i, p := range ps {
		lines[i] = p.String()
	}
	return fmt.Sprintf("%d problem(s):\n%s", len(ps), strings.Join(lines, "\n"))
}

// Err returns ps as an error, or nil when there are none.
func (ps Problems) Err() error {
	if len(ps) == 0 {
		return nil
	}
	return ps
}

// decodeStrict decodes YAML data into v and reports every problem at once:
// syntax errors, unknown keys (with line and column) and type errors. It
// returns the document's root mapping for positional checks.
func decodeStrict(file string, data []byte, v any) (*yaml.Node, Problems) {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, Problems{yamlErrorProblem(file, err)}
	}
	if doc.Kind == 0 || len(doc.Content) == 0 {
		return nil, Problems{{File: file, Message: "empty document"}}
	}
	root := doc.Content[0]
	if root.Kind != yaml.MappingNode {
		return nil, Problems{{File: file, Line: root.Line, Column: root.Column, Message: "document must be a mapping"}}
	}
	var ps Problems
	checkKnown(file, root, reflect.TypeOf(v), "", &ps)
	if err := root.Decode(v); err != nil {
		var te *yaml.TypeError
		if ok := asTypeError(err, &te); ok {
			for _, msg := range te.Errors {
				ps = append(ps, placeProblem(root, "", lineProblem(file, msg)))
			}
		} else {
			ps = append(ps, yamlErrorProblem(file, err))
		}
	}
	return root, ps
}

var snippetRE = regexp.MustCompile("`([^`]*)`")

// placeProblem completes a problem the YAML decoder reported without a
// path, and possibly with a line only ("cannot unmarshal !!str `many` into
// int"), with the path and column of the value it is about: the node at
// that line and column, or on that line whose value matches the message's
// quoted snippet, or whose kind matches for a sequence or mapping.
func placeProblem(root *yaml.Node, prefix string, p Problem) Problem {
	if p.Line == 0 || p.Path != "" {
		return p
	}
	snippet, hasSnippet := "", false
	if m := snippetRE.FindStringSubmatch(p.Message); m != nil {
		snippet, hasSnippet = strings.TrimSuffix(m[1], "..."), true
	}
	kind := yaml.ScalarNode
	switch {
	case strings.Contains(p.Message, "!!seq"):
		kind = yaml.SequenceNode
	case strings.Contains(p.Message, "!!map"):
		kind = yaml.MappingNode
	}
	var found *yaml.Node
	var foundPath string
	var walk func(n *yaml.Node, path string)
	walk = func(n *yaml.Node, path string) {
		if found != nil || n == nil {
			return
		}
		atColumn := p.Column > 0 && n.Column == p.Column
		byContent := p.Column == 0 && n.Kind == kind && (!hasSnippet || strings.HasPrefix(n.Value, snippet))
		if n.Line == p.Line && (atColumn || byContent) && path != prefix {
			found, foundPath = n, path
			return
		}
		switch n.Kind {
		case yaml.MappingNode:
			for i := 0; i+1 < len(n.Content); i += 2 {
				walk(n.Content[i+1], joinPath(path, n.Content[i].Value))
			}
		case yaml.SequenceNode:
			for i, item := range n.Content {
				walk(item, fmt.Sprintf("%s[%d]", path, i))
			}
		}
	}
	walk(root, prefix)
	if found != nil {
		p.Column, p.Path = found.Column, foundPath
	}
	return p
}

func asTypeError(err error, te **yaml.TypeError) bool {
	t, ok := err.(*yaml.TypeError)
	if ok {
		*te = t
	}
	return ok
}

var lineRE = regexp.MustCompile(`line (\d+)(?:, column (\d+))?: ?`)

func lineProblem(file, msg string) Problem {
	p := Problem{File: file, Message: msg}
	if m := lineRE.FindStringSubmatchIndex(msg); m != nil {
		p.Line, _ = strconv.Atoi(msg[m[2]:m[3]])
		if m[4] >= 0 {
			p.Column, _ = strconv.Atoi(msg[m[4]:m[5]])
		}
		p.Message = strings.TrimSpace(msg[:m[0]] + msg[m[1]:])
	}
	p.Message = strings.TrimPrefix(p.Message, "yaml: ")
	return p
}

func yamlErrorProblem(file string, err error) Problem {
	return lineProblem(file, strings.TrimPrefix(err.Error(), "yaml: "))
}

var (
	yamlUnmarshaler = reflect.TypeOf((*yaml.Unmarshaler)(nil)).Elem()
	yamlNodeType    = reflect.TypeOf(yaml.Node{})
)

// checkKnown walks node against type t and reports every mapping key that
// t does not declare, with its position.
func checkKnown(file string, node *yaml.Node, t reflect.Type, path string, ps *Problems) {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == yamlNodeType || reflect.PointerTo(t).Implements(yamlUnmarshaler) {
		return
	}
	if node.Kind == yaml.AliasNode && node.Alias != nil {
		node = node.Alias
	}
	switch t.Kind() {
	case reflect.Struct:
		if node.Kind != yaml.MappingNode {
			return // the decoder reports the type error
		}
		fields := yamlFields(t)
		for i := 0; i+1 < len(node.Content); i += 2 {
			k, v := node.Content[i], node.Content[i+1]
			ft, ok := fields[k.Value]
			if !ok {
				known := make([]string, 0, len(fields))
				for n := range fields {
					known = append(known, n)
				}
				slices.Sort(known)
				*ps = append(*ps, Problem{File: file, Line: k.Line, Column: k.Column, Path: joinPath(path, k.Value),
					Message: fmt.Sprintf("unknown field %q (known: %s)", k.Value, strings.Join(known, ", "))})
				continue
			}
			checkKnown(file, v, ft, joinPath(path, k.Value), ps)
		}
	case reflect.Map:
		if node.Kind != yaml.MappingNode {
			return
		}
		for i := 0; i+1 < len(node.Content); i += 2 {
			checkKnown(file, node.Content[i+1], t.Elem(), joinPath(path, node.Content[i].Value), ps)
		}
	case reflect.Slice, reflect.Array:
		if node.Kind != yaml.SequenceNode {
			return
		}
		for i, item := range node.Content {
			checkKnown(file, item, t.Elem(), fmt.Sprintf("%s[%d]", path, i), ps)
		}
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		// The decoder truncates a float into an integer without a word.
		if node.Kind == yaml.ScalarNode && node.ShortTag() == "!!float" {
			*ps = append(*ps, Problem{File: file, Line: node.Line, Column: node.Column, Path: path,
				Message: fmt.Sprintf("want an integer, got %s", node.Value)})
		}
	}
}

// yamlFields maps the yaml keys of struct t to their field types,
// following inline fields.
func yamlFields(t reflect.Type) map[string]reflect.Type {
	out := make(map[string]reflect.Type)
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		tag := f.Tag.Get("yaml")
		if tag == "-" {
			continue
		}
		name, opts, _ := strings.Cut(tag, ",")
		if strings.Contains(opts, "inline") {
			ft := f.Type
			for ft.Kind() == reflect.Pointer {
				ft = ft.Elem()
			}
			for k, v := range yamlFields(ft) {
				out[k] = v
			}
			continue
		}
		if name == "" {
			name = strings.ToLower(f.Name)
		}
		out[name] = f.Type
	}
	return out
}

func joinPath(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

// locator finds positions of keys in a decoded document, for problems found
// after decoding.
type locator struct {
	file string
	root *yaml.Node
}

// at returns a problem positioned at the value of the dotted path, or at
// the deepest ancestor that exists.
func (l locator) at(path, format string, args ...any) Problem {
	p := Problem{File: l.file, Path: path, Message: fmt.Sprintf(format, args...)}
	n := l.root
	if n != nil {
		p.Line, p.Column = n.Line, n.Column
	}
	if path == "" || n == nil {
		return p
	}
	for _, key := range splitPath(path) {
		next := child(n, key)
		if next == nil {
			break
		}
		n = next
		p.Line, p.Column = n.Line, n.Column
	}
	return p
}

func splitPath(path string) []string {
	var out []string
	for _, part := range strings.Split(path, ".") {
		// a[1] -> a, [1]
		for {
			i := strings.IndexByte(part, '[')
			if i < 0 {
				out = append(out, part)
				break
			}
			if i > 0 {
				out = append(out, part[:i])
			}
			j := strings.IndexByte(part, ']')
			if j < i {
				out = append(out, part[i:])
				break
			}
			out = append(out, part[i:j+1])
			part = part[j+1:]
			if part == "" {
				break
			}
		}
	}
	return out
}

func child(n *yaml.Node, key string) *yaml.Node {
	switch n.Kind {
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			if n.Content[i].Value == key {
				return n.Content[i+1]
			}
		}
	case yaml.SequenceNode:
		if strings.HasPrefix(key, "[") && strings.HasSuffix(key, "]") {
			i, err := strconv.Atoi(key[1 : len(key)-1])
			if err == nil && i >= 0 && i < len(n.Content) {
				return n.Content[i]
			}
		}
	}
	return nil
}

// Config is a backend-specific configuration block. It keeps its YAML node
// when loaded from a file, so that a backend decoding it reports problems
// with line and column, and travels as plain JSON in the catalog.
type Config struct {
	file string
	node *yaml.Node
	raw  map[string]any
}

// UnmarshalYAML keeps the node.
func (c *Config) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.MappingNode {
		return nodeError(n, "config must be a mapping")
	}
	var raw map[string]any
	if err := n.Decode(&raw); err != nil {
		return err
	}
	c.node, c.raw = n, raw
	return nil
}

// MarshalJSON encodes the block as a JSON object.
func (c Config) MarshalJSON() ([]byte, error) {
	if c.raw == nil {
		return []byte("null"), nil
	}
	return json.Marshal(c.raw)
}

// UnmarshalJSON reads a JSON object.
func (c *Config) UnmarshalJSON(b []byte) error {
	c.node = nil
	return json.Unmarshal(b, &c.raw)
}

// IsZero reports whether no config was given.
func (c Config) IsZero() bool { return len(c.raw) == 0 }

// CheckDecode decodes the block into v as Decode does and returns what is
// wrong as problems, each where Decode placed it, else at "config" of
// file: the start of a ManifestChecker's answer.
func (c Config) CheckDecode(v any, file string) []Problem {
	err := c.Decode(v)
	if err == nil {
		return nil
	}
	var ps Problems
	if errors.As(err, &ps) {
		return ps
	}
	return []Problem{{File: file, Path: "config", Message: err.Error()}}
}

// Decode decodes the block into v strictly: every unknown key is reported,
// with its line and column when the block came from a file.
func (c Config) Decode(v any) error {
	if c.node != nil {
		var ps Problems
		checkKnown(c.file, c.node, reflect.TypeOf(v), "config", &ps)
		if err := c.node.Decode(v); err != nil {
			var te *yaml.TypeError
			if asTypeError(err, &te) {
				for _, m := range te.Errors {
					ps = append(ps, placeProblem(c.node, "config", lineProblem(c.file, m)))
				}
			} else {
				ps = append(ps, Problem{File: c.file, Message: err.Error()})
			}
		}
		return ps.Err()
	}
	if c.raw == nil {
		return nil
	}
	b, err := json.Marshal(c.raw)
	if err != nil {
		return fmt.Errorf("decoding config: %w", err)
	}
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("decoding config: %w", err)
	}
	return nil
}
