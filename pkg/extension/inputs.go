package extension

import (
	"fmt"
	"maps"
	"path"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/sand-boxer/sandboxer/pkg/event"
)

// InputType is the type of an input value. Every input travels as text and
// is checked against its type.
type InputType string

// Input types.
const (
	TypeString   InputType = "string"
	TypeInt      InputType = "int"
	TypeBool     InputType = "bool"
	TypePort     InputType = "port"
	TypeDuration InputType = "duration"
)

// InputTypes lists the input types.
var InputTypes = []InputType{TypeString, TypeInt, TypeBool, TypePort, TypeDuration}

// Format restricts the characters and shape of a string input. Every
// format excludes whitespace, control characters, shell metacharacters
// ($ ` ; | & < > ( ) { } [ ] * ? ! ' " \ #) and a leading '-', so no input
// can become an option or a shell word of a remote command.
type Format string

// Formats.
const (
	// FormatWord is the default: letters, digits and . _ : / @ + = , ~ -.
	FormatWord Format = "word"
	// FormatName is a sand-boxer name: [a-z0-9][a-z0-9_-]{0,62}.
	FormatName Format = "name"
	// FormatPath is a relative path that stays under its base: no "..",
	// no leading "/".
	FormatPath Format = "path"
	// FormatRepo is a git repository: an https, http, ssh, git or file
	// URL, an scp-like user@host:path, or an absolute local path; never
	// with credentials (a password anywhere, a user name but for ssh).
	// What it may reach is the manifest's [RepoPolicy].
	FormatRepo Format = "repo"
	// FormatSSHTarget is [user@]host[:port].
	FormatSSHTarget Format = "ssh-target"
	// FormatHost is a host name or IP address.
	FormatHost Format = "host"
	// FormatEnv is a comma-separated list of NAME=value pairs, values in
	// FormatWord characters.
	FormatEnv Format = "env"
)

// Formats lists the string formats.
var Formats = []Format{FormatWord, FormatName, FormatPath, FormatRepo, FormatSSHTarget, FormatHost, FormatEnv}

// RepoSchemes are the URL schemes a repo input may use at all; a
// manifest's [RepoPolicy] allows some of them.
var RepoSchemes = []string{"https", "http", "ssh", "git", "file"}

// InputSpec declares one input of an extension.
type InputSpec struct {
	Type        InputType `yaml:"type" json:"type"`
	Required    bool      `yaml:"required,omitempty" json:"required,omitempty"`
	Format      Format    `yaml:"format,omitempty" json:"format,omitempty"`
	Pattern     string    `yaml:"pattern,omitempty" json:"pattern,omitempty"`
	Enum        []string  `yaml:"enum,omitempty" json:"enum,omitempty"`
	MaxLength   int       `yaml:"max_length,omitempty" json:"max_length,omitempty"`
	Min         *int64    `yaml:"min,omitempty" json:"min,omitempty"`
	Max         *int64    `yaml:"max,omitempty" json:"max,omitempty"`
	Default     string    `yaml:"default,omitempty" json:"default,omitempty"`
	Description string    `yaml:"description,omitempty" json:"description,omitempty"`
}

// DefaultMaxLength bounds string inputs without a max_length.
const DefaultMaxLength = 1024

func (s InputSpec) check(name string) []string {
	var out []string
	if name == InputSandboxID {
		out = append(out, "reserved input: sand-boxer passes the sandbox id as sandbox_id to every extension")
	}
	if !inputNameRE.MatchString(name) {
		out = append(out, fmt.Sprintf("invalid input name %q: want [a-z][a-z0-9_]*", name))
	}
	if !slices.Contains(InputTypes, s.Type) {
		out = append(out, fmt.Sprintf("type %q: want one of %v", s.Type, InputTypes))
	}
	if s.Format != "" && !slices.Contains(Formats, s.Format) {
		out = append(out, fmt.Sprintf("format %q: want one of %v", s.Format, Formats))
	}
	if s.Format != "" && s.Type != TypeString {
		out = append(out, "format applies to string inputs only")
	}
	if s.Pattern != "" {
		if _, err := regexp.Compile(s.Pattern); err != nil {
			out = append(out, fmt.Sprintf("pattern: %v", err))
		}
	}
	if s.MaxLength < 0 {
		out = append(out, "max_length must not be negative")
	}
	if s.Default != "" && slices.Contains(InputTypes, s.Type) {
		if err := s.validate(s.Default); err != nil {
			out = append(out, fmt.Sprintf("default: %v", err))
		}
	}
	return out
}

// FieldError is one invalid field of a request.
type FieldError struct {
	Field  string `json:"field"`
	Detail string `json:"detail"`
}

// FieldErrors are every invalid field of a request.
type FieldErrors []FieldError

// Error lists the fields.
func (fe FieldErrors) Error() string {
	parts := make([]string, len(fe))
	for i, f := range fe {
		parts[i] = f.Field + ": " + f.Detail
	}
	return "invalid request: " + strings.Join(parts, "; ")
}

// ValidateInputs checks a request's inputs against spec, after merging
// them over the profile's defaults and the spec's defaults. It returns the
// inputs to provision with, or every problem, field by field. Unknown keys
// are errors.
//
// It checks repo inputs for their format only; [Manifest.ValidateInputs]
// checks them against the manifest's repo policy too.
func ValidateInputs(spec map[string]InputSpec, defaults, in map[string]string) (Inputs, FieldErrors) {
	return validateInputs(spec, defaults, in, nil)
}

// ValidateInputs checks a request's inputs as [ValidateInputs] does
// against m's input spec, and every repo input against m's repo policy
// ([RepoPolicy.Check]: scheme, credentials, and the host where no name
// resolution is needed). It is the check a gateway runs per candidate
// manifest, and a worker before Provision.
func (m *Manifest) ValidateInputs(defaults, in map[string]string) (Inputs, FieldErrors) {
	return validateInputs(m.Inputs, defaults, in, func(s InputSpec, v string) error {
		if s.Format != FormatRepo {
			return nil
		}
		return m.Repo.Check(v)
	})
}

func validateInputs(spec map[string]InputSpec, defaults, in map[string]string, extra func(InputSpec, string) error) (Inputs, FieldErrors) {
	var errs FieldErrors
	out := make(Inputs, len(spec))
	for _, k := range slices.Sorted(maps.Keys(in)) {
		if k == InputSandboxID {
			errs = append(errs, FieldError{Field: "inputs." + k, Detail: "reserved: sand-boxer sets it to the sandbox id"})
			continue
		}
		if _, ok := spec[k]; !ok {
			errs = append(errs, FieldError{Field: "inputs." + SafeField(k), Detail: fmt.Sprintf("unknown input (known: %s)", strings.Join(slices.Sorted(maps.Keys(spec)), ", "))})
		}
	}
	for _, k := range slices.Sorted(maps.Keys(spec)) {
		s := spec[k]
		v, ok := in[k]
		if !ok {
			v, ok = defaults[k]
		}
		if !ok && s.Default != "" {
			v, ok = s.Default, true
		}
		if !ok {
			if s.Required {
				errs = append(errs, FieldError{Field: "inputs." + k, Detail: "required"})
			}
			continue
		}
		if err := s.validate(v); err != nil {
			errs = append(errs, FieldError{Field: "inputs." + k, Detail: err.Error()})
			continue
		}
		if extra != nil {
			if err := extra(s, v); err != nil {
				errs = append(errs, FieldError{Field: "inputs." + k, Detail: err.Error()})
				continue
			}
		}
		out[k] = v
	}
	if len(errs) > 0 {
		return nil, errs
	}
	return out, nil
}

// SafeField keeps an attacker-chosen key short and printable in an error
// or a field path: at most 64 bytes (then "..."), escaped as a Go string
// is, without the quotes.
func SafeField(k string) string {
	if len(k) > 64 {
		k = k[:64] + "..."
	}
	q := strconv.QuoteToASCII(k)
	return q[1 : len(q)-1]
}

func (s InputSpec) validate(v string) error {
	switch s.Type {
	case TypeInt, TypePort:
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return fmt.Errorf("want an integer, got %q", clip(v))
		}
		if s.Type == TypePort && (n < 1 || n > 65535) {
			return fmt.Errorf("want a port 1-65535, got %d", n)
		}
		if s.Min != nil && n < *s.Min {
			return fmt.Errorf("must be at least %d", *s.Min)
		}
		if s.Max != nil && n > *s.Max {
			return fmt.Errorf("must be at most %d", *s.Max)
		}
	case TypeBool:
		if _, err := strconv.ParseBool(v); err != nil {
			return fmt.Errorf("want true or false, got %q", clip(v))
		}
	case TypeDuration:
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 {
			return fmt.Errorf("want a duration such as 30s, got %q", clip(v))
		}
	case TypeString:
		max := s.MaxLength
		if max == 0 {
			max = DefaultMaxLength
		}
		if len(v) > max {
			return fmt.Errorf("longer than %d bytes", max)
		}
		if err := CheckFormat(s.Format, v); err != nil {
			return err
		}
	default:
		return fmt.Errorf("unknown type %q", s.Type)
	}
	if len(s.Enum) > 0 && !slices.Contains(s.Enum, v) {
		return fmt.Errorf("want one of %v", s.Enum)
	}
	if s.Pattern != "" {
		re, err := regexp.Compile(s.Pattern)
		if err != nil || !re.MatchString(v) {
			return fmt.Errorf("does not match %s", s.Pattern)
		}
	}
	return nil
}

var (
	inputNameRE  = regexp.MustCompile(`^[a-z][a-z0-9_]{0,62}$`)
	wordRE       = regexp.MustCompile(`^[A-Za-z0-9_.][A-Za-z0-9_.:/@+=,~-]*$`)
	pathRE       = regexp.MustCompile(`^[A-Za-z0-9_.][A-Za-z0-9_./-]*$`)
	repoCharsRE  = regexp.MustCompile(`^[A-Za-z0-9_./:@+~%-]+$`)
	scpRepoRE    = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]*@[A-Za-z0-9][A-Za-z0-9.-]*:[A-Za-z0-9_.~/][A-Za-z0-9_./~-]*$`)
	sshTargetRE  = regexp.MustCompile(`^(?:[a-z_][a-z0-9_.-]{0,31}@)?([A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\])(?::([0-9]{1,5}))?$`)
	hostRE       = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9.-]{0,252}$|^\[?[0-9A-Fa-f:.]+\]?$`)
	envNameRE    = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]{0,127}$`)
	envValueRE   = regexp.MustCompile(`^[A-Za-z0-9_.:/@+=~-]*$`)
	labelKeyRE   = regexp.MustCompile(`^[a-z0-9]([a-z0-9._/-]{0,61}[a-z0-9])?$`)
	labelValueRE = regexp.MustCompile(`^[A-Za-z0-9._-]*$`)
)

// CheckFormat checks v against format f (FormatWord when empty). It is the
// one gate every string input passes before it can reach a command line.
func CheckFormat(f Format, v string) error {
	if v == "" {
		return fmt.Errorf("must not be empty")
	}
	if !utf8.ValidString(v) {
		return fmt.Errorf("not valid UTF-8")
	}
	if strings.HasPrefix(v, "-") {
		return fmt.Errorf("must not start with '-' (it would be read as an option)")
	}
	for _, r := range v {
		if r < 0x20 || r == 0x7f {
			return fmt.Errorf("contains a control character")
		}
	}
	switch f {
	case "", FormatWord:
		if !wordRE.MatchString(v) {
			return fmt.Errorf("contains characters outside [A-Za-z0-9._:/@+=,~-]")
		}
	case FormatName:
		if !event.ValidName(v) {
			return fmt.Errorf("want 1-63 of [a-z0-9_-] starting with a letter or digit")
		}
	case FormatPath:
		if !pathRE.MatchString(v) {
			return fmt.Errorf("want a relative path of [A-Za-z0-9._/-]")
		}
		if c := path.Clean(v); path.IsAbs(v) || (c != v && c+"/" != v) {
			return fmt.Errorf("want a clean relative path")
		}
		for _, part := range strings.Split(v, "/") {
			if part == ".." {
				return fmt.Errorf("must not leave its base directory ('..')")
			}
		}
	case FormatRepo:
		return checkRepo(v)
	case FormatSSHTarget:
		m := sshTargetRE.FindStringSubmatch(v)
		if m == nil {
			return fmt.Errorf("want [user@]host[:port]")
		}
		if m[2] != "" {
			if p, _ := strconv.Atoi(m[2]); p < 1 || p > 65535 {
				return fmt.Errorf("port out of range")
			}
		}
	case FormatHost:
		if !hostRE.MatchString(v) {
			return fmt.Errorf("want a host name or IP address")
		}
	case FormatEnv:
		for _, pair := range strings.Split(v, ",") {
			k, val, ok := strings.Cut(pair, "=")
			if !ok || !envNameRE.MatchString(k) {
				return fmt.Errorf("want NAME=value pairs separated by commas")
			}
			if !envValueRE.MatchString(val) {
				return fmt.Errorf("value of %s contains characters outside [A-Za-z0-9_.:/@+=~-]", k)
			}
		}
	default:
		return fmt.Errorf("unknown format %q", f)
	}
	return nil
}

func checkRepo(v string) error {
	_, err := ParseRepo(v)
	return err
}

func clip(s string) string {
	if len(s) > 40 {
		return s[:40] + "..."
	}
	return s
}
