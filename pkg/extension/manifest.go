package extension

import (
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/sand-boxer/sandboxer/pkg/event"
)

// IsolationLevel says how strongly a backend separates sandboxes.
type IsolationLevel string

// Known isolation levels.
const (
	IsolationProcess   IsolationLevel = "process"   // a directory on a shared machine
	IsolationContainer IsolationLevel = "container" // containers on a shared kernel
	IsolationVM        IsolationLevel = "vm"        // a virtual machine
	IsolationRemote    IsolationLevel = "remote"    // a third party's service
)

// IsolationLevels lists the known isolation levels.
var IsolationLevels = []IsolationLevel{IsolationProcess, IsolationContainer, IsolationVM, IsolationRemote}

// PricingModel says who meters a backend.
type PricingModel string

// Known pricing models.
const (
	// PricingSelfHosted backends are priced by the profile's rate and the
	// lifecycle timestamps.
	PricingSelfHosted PricingModel = "self-hosted"
	// PricingMetered backends quote a price and report actual usage
	// themselves ([Metered]).
	PricingMetered PricingModel = "metered"
)

// PricingModels lists the known pricing models.
var PricingModels = []PricingModel{PricingSelfHosted, PricingMetered}

// Locality says which workers of a pool can reach a sandbox.
type Locality string

// Known localities.
const (
	// LocalityShared backends are reached alike from every worker of the
	// pool (a remote host over SSH, a third party's API): any worker
	// tears down any sandbox. The default.
	LocalityShared Locality = "shared"
	// LocalityHost backends keep each sandbox on the machine of the
	// worker that made it (a directory, a local VM): the sandbox is
	// placed on that worker's host, and only a worker on that host tears
	// it down. The manifest's hosts are then the pool's placement hosts:
	// the names its workers serve (`serve provisioner --host`), one
	// durable consumer each.
	LocalityHost Locality = "host"
)

// Localities lists the known localities.
var Localities = []Locality{LocalityShared, LocalityHost}

// Capabilities are what a backend can do, as plain data checked at start-up.
type Capabilities struct {
	IsolationLevels []IsolationLevel `yaml:"isolation_levels" json:"isolation_levels"`
	PricingModel    PricingModel     `yaml:"pricing_model" json:"pricing_model"`
	// Locality says which workers reach a sandbox. Default shared.
	Locality Locality `yaml:"locality,omitempty" json:"locality,omitempty"`
}

// HostBound reports whether m's sandboxes live on the host of the worker
// that made them (capabilities.locality: host).
func (m *Manifest) HostBound() bool { return m != nil && m.Capabilities.Locality == LocalityHost }

// Capacity is what a backend can take: how many sandboxes it may have
// (MaxSandboxes, PerHost; zero means unbounded), and how many it may be
// building or tearing down at once (MaxInFlight).
type Capacity struct {
	MaxSandboxes int `yaml:"max_sandboxes,omitempty" json:"max_sandboxes,omitempty"`
	PerHost      int `yaml:"per_host,omitempty" json:"per_host,omitempty"`
	// MaxInFlight caps the commands (creates and destroys) the whole
	// worker pool runs at once, whatever the number of workers: the
	// MaxAckPending of the pool's durable consumer. Zero means
	// [DefaultMaxInFlight]; see [Capacity.InFlight].
	MaxInFlight int `yaml:"max_in_flight,omitempty" json:"max_in_flight,omitempty"`
}

// DefaultMaxInFlight is the pool-wide cap on commands in flight of a
// manifest that gives no capacity.max_in_flight. It is finite, so that
// adding workers to a backend that never said what it can take cannot
// flood it, and high enough that it caps no pool before 32 workers of
// the default concurrency (8) run it.
const DefaultMaxInFlight = 256

// InFlight returns MaxInFlight, or [DefaultMaxInFlight] when it is zero.
func (c Capacity) InFlight() int {
	if c.MaxInFlight <= 0 {
		return DefaultMaxInFlight
	}
	return c.MaxInFlight
}

// WorkerPolicy is how the extension's worker pool consumes commands.
type WorkerPolicy struct {
	// Concurrency is how many commands one worker process runs at once
	// (`serve provisioner --concurrency` overrides it per process); the
	// pool as a whole runs at most capacity.max_in_flight. Default 8.
	Concurrency int `yaml:"concurrency,omitempty" json:"concurrency,omitempty"`
	// AckWait is how long a command may go without a heartbeat before
	// another worker gets it. Default 30s.
	AckWait Duration `yaml:"ack_wait,omitempty" json:"ack_wait,omitempty"`
	// MaxDeliver bounds attempts per command. Default 5.
	MaxDeliver int `yaml:"max_deliver,omitempty" json:"max_deliver,omitempty"`
	// Backoff is the delay before each retry. Default 1s, 5s, 15s, 30s.
	Backoff []Duration `yaml:"backoff,omitempty" json:"backoff,omitempty"`
}

// Manifest describes one extension: extensions/ext.<name>.yaml.
type Manifest struct {
	// Name is the extension's id: the subject token of its commands and
	// events, and what profiles bind to.
	Name string `yaml:"name" json:"name"`
	// Handler picks the backend code from the [Registry].
	Handler      string       `yaml:"handler" json:"handler"`
	Description  string       `yaml:"description,omitempty" json:"description,omitempty"`
	Capabilities Capabilities `yaml:"capabilities" json:"capabilities"`
	// Hosts the backend places sandboxes on. Default ["localhost"].
	Hosts    []string     `yaml:"hosts,omitempty" json:"hosts,omitempty"`
	Capacity Capacity     `yaml:"capacity,omitempty" json:"capacity,omitzero"`
	Workers  WorkerPolicy `yaml:"workers,omitempty" json:"workers,omitzero"`
	// Inputs is the spec every request's inputs are validated against
	// before anything is published or provisioned.
	Inputs map[string]InputSpec `yaml:"inputs,omitempty" json:"inputs,omitempty"`
	// Repo is what the extension's repo inputs (format repo) may reach:
	// schemes, hosts after name resolution, local roots. The zero policy
	// is the default: https and ssh to public hosts, no local path.
	Repo RepoPolicy `yaml:"repo,omitempty" json:"repo,omitzero"`
	// Config is the backend's own configuration, decoded strictly by it.
	Config Config `yaml:"config,omitempty" json:"config,omitzero"`

	// File is where the manifest was loaded from.
	File string `yaml:"-" json:"file,omitempty"`
	// root is the parsed document, to position problems found later.
	root *yaml.Node
}

// TTLPolicy bounds a sandbox's time to live.
type TTLPolicy struct {
	// Default applies when a request gives no TTL. Zero means no expiry.
	Default Duration `yaml:"default,omitempty" json:"default,omitempty"`
	// Max is the longest TTL a request may ask for. Zero means unbounded.
	Max Duration `yaml:"max,omitempty" json:"max,omitempty"`
}

// Deadlines bound each phase of a sandbox's life.
type Deadlines struct {
	// Provision bounds Provision. Default 5m.
	Provision Duration `yaml:"provision,omitempty" json:"provision,omitempty"`
	// Ready bounds WaitReady. Default 5m.
	Ready Duration `yaml:"ready,omitempty" json:"ready,omitempty"`
	// Teardown bounds Teardown. Default 5m.
	Teardown Duration `yaml:"teardown,omitempty" json:"teardown,omitempty"`
}

// Default deadlines.
const (
	DefaultProvisionDeadline = 5 * time.Minute
	DefaultReadyDeadline     = 5 * time.Minute
	DefaultTeardownDeadline  = 5 * time.Minute
)

// ProvisionDeadline returns the provision deadline or its default.
func (d Deadlines) ProvisionDeadline() time.Duration {
	return orDefault(d.Provision.D(), DefaultProvisionDeadline)
}

// ReadyDeadline returns the ready deadline or its default.
func (d Deadlines) ReadyDeadline() time.Duration { return orDefault(d.Ready.D(), DefaultReadyDeadline) }

// TeardownDeadline returns the teardown deadline or its default.
func (d Deadlines) TeardownDeadline() time.Duration {
	return orDefault(d.Teardown.D(), DefaultTeardownDeadline)
}

func orDefault(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

// Profile is what a request asks for: profiles/profile.<slug>.yaml.
type Profile struct {
	Slug        string `yaml:"slug" json:"slug"`
	Description string `yaml:"description,omitempty" json:"description,omitempty"`
	// Extension binds the profile to one extension. A profile names either
	// Extension or Candidates.
	Extension string `yaml:"extension,omitempty" json:"extension,omitempty"`
	// Candidates route the profile over several extensions, in order of
	// preference: a sandbox goes to the first candidate that has room
	// (its manifest's capacity) and is not failing, and falls over to the
	// next otherwise. See [Profile.ExtensionNames].
	Candidates []Candidate `yaml:"candidates,omitempty" json:"candidates,omitempty"`
	// Placement is how a host is picked among the chosen extension's
	// hosts. Default [PlacementLeastLoaded].
	Placement Placement `yaml:"placement,omitempty" json:"placement,omitempty"`
	// Isolation is the level the profile needs; the extension must offer it.
	Isolation IsolationLevel `yaml:"isolation,omitempty" json:"isolation,omitempty"`
	TTL       TTLPolicy      `yaml:"ttl,omitempty" json:"ttl,omitzero"`
	Deadlines Deadlines      `yaml:"deadlines,omitempty" json:"deadlines,omitzero"`
	// Inputs are defaults a request's inputs are merged over.
	Inputs map[string]string `yaml:"inputs,omitempty" json:"inputs,omitempty"`
	// Labels are added to every sandbox of the profile.
	Labels map[string]string `yaml:"labels,omitempty" json:"labels,omitempty"`
	// Config is passed to the backend with each sandbox.
	Config Config `yaml:"config,omitempty" json:"config,omitzero"`
	// Price is what a sandbox of a self-hosted extension costs. Metered
	// extensions price themselves and ignore it. Nil means free.
	Price *Price `yaml:"price,omitempty" json:"price,omitempty"`

	// File is where the profile was loaded from.
	File string `yaml:"-" json:"file,omitempty"`
	// root is the parsed document, to position problems found later.
	root *yaml.Node
}

// Candidate is one extension a routed profile may place sandboxes on.
type Candidate struct {
	// Extension names the candidate's manifest.
	Extension string `yaml:"extension" json:"extension"`
}

// Placement is how a sandbox's host is picked among an extension's hosts.
type Placement string

// Known placements.
const (
	// PlacementLeastLoaded picks the host with the fewest live sandboxes
	// that has room under the manifest's capacity.per_host.
	PlacementLeastLoaded Placement = "least-loaded"
)

// Placements lists the known placements.
var Placements = []Placement{PlacementLeastLoaded}

// ExtensionNames returns the extensions a profile may place sandboxes on,
// in order of preference: its one Extension, or its Candidates.
func (p *Profile) ExtensionNames() []string {
	if len(p.Candidates) == 0 {
		if p.Extension == "" {
			return nil
		}
		return []string{p.Extension}
	}
	out := make([]string, len(p.Candidates))
	for i, c := range p.Candidates {
		out[i] = c.Extension
	}
	return out
}

// Binds reports whether a sandbox of the profile may run on extension
// name.
func (p *Profile) Binds(name string) bool {
	return name != "" && slices.Contains(p.ExtensionNames(), name)
}

// Price is the price list of a self-hosted profile, in credit minor units
// (integers, never fractions: the minor unit is the smallest amount the
// ledger records). A sandbox costs Start once it is ready, plus PerSecond
// for every second, started or not, from ready to destroyed.
type Price struct {
	// Start is charged once, when the sandbox becomes ready.
	Start int64 `yaml:"start,omitempty" json:"start,omitempty"`
	// PerSecond is charged for each second the sandbox runs.
	PerSecond int64 `yaml:"per_second,omitempty" json:"per_second,omitempty"`
}

// UnmarshalYAML decodes a price strictly, refusing unknown keys and
// anything but integers: YAML would otherwise truncate 0.5 to 0 without a
// word.
func (p *Price) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind == yaml.MappingNode {
		// Every problem, as a *yaml.TypeError the decoder collects before
		// going on with the rest of the document.
		var errs []string
		for i := 0; i+1 < len(n.Content); i += 2 {
			if k := n.Content[i]; k.Value != "start" && k.Value != "per_second" {
				errs = append(errs, fmt.Sprintf("line %d, column %d: price: unknown field %q (known: per_second, start)", k.Line, k.Column, k.Value))
				continue
			}
			if v := n.Content[i+1]; v.Kind != yaml.ScalarNode || v.ShortTag() != "!!int" {
				errs = append(errs, fmt.Sprintf("line %d, column %d: price.%s must be an integer number of credit minor units, not %q",
					v.Line, v.Column, n.Content[i].Value, v.Value))
			}
		}
		if len(errs) > 0 {
			return &yaml.TypeError{Errors: errs}
		}
	}
	type plain Price
	return n.Decode((*plain)(p))
}

// MaxPriceAmount bounds every price field, so that a price for any
// duration up to a century fits an int64.
const MaxPriceAmount = 1 << 30

// Charges reports whether running a sandbox of profile p on the extension
// of manifest m may cost anything: a self-hosted backend only when the
// profile has a price that is not zero; any other (metered) always.
func Charges(p *Profile, m *Manifest) bool {
	if m == nil || m.Capabilities.PricingModel != PricingSelfHosted {
		return true
	}
	return p == nil || !p.Price.Free()
}

// Free reports whether running at price p costs nothing: no price, or
// one of zero.
func (p *Price) Free() bool { return p == nil || (p.Start == 0 && p.PerSecond == 0) }

// Cost is the price of running for d: Start plus PerSecond for every
// second, a started second counting whole. A nil price costs nothing; a
// negative d costs Start.
func (p *Price) Cost(d time.Duration) int64 {
	if p == nil {
		return 0
	}
	if d < 0 {
		d = 0
	}
	secs := int64((d + time.Second - 1) / time.Second)
	return p.Start + p.PerSecond*secs
}

func (p *Price) check(l locator) Problems {
	if p == nil {
		return nil
	}
	var ps Problems
	for _, f := range []struct {
		path string
		v    int64
	}{{"price.start", p.Start}, {"price.per_second", p.PerSecond}} {
		if f.v < 0 || f.v > MaxPriceAmount {
			ps = append(ps, l.at(f.path, "must be an integer from 0 to %d (credit minor units)", int64(MaxPriceAmount)))
		}
	}
	return ps
}

// ParseManifest decodes and checks one manifest, reporting every problem.
// The file name, when given, must be ext.<name>.yaml (or .yml).
func ParseManifest(file string, data []byte) (*Manifest, Problems) {
	var m Manifest
	root, ps := decodeStrict(file, data, &m)
	if root == nil {
		return nil, ps
	}
	m.File, m.root = file, root
	m.Config.file = file
	ps = append(ps, m.check(locator{file: file, root: root})...)
	return &m, ps
}

// ParseProfile decodes and checks one profile, reporting every problem.
// Checks that need the extension (isolation, inputs) are done by the
// catalog.
func ParseProfile(file string, data []byte) (*Profile, Problems) {
	var p Profile
	root, ps := decodeStrict(file, data, &p)
	if root == nil {
		return nil, ps
	}
	p.File, p.root = file, root
	p.Config.file = file
	ps = append(ps, p.check(locator{file: file, root: root})...)
	return &p, ps
}

// problemAt returns a problem at path in the file m was loaded from, with
// its line and column when m was parsed from YAML.
func (m *Manifest) problemAt(path, format string, args ...any) Problem {
	return locator{file: m.File, root: m.root}.at(path, format, args...)
}

// problemAt returns a problem at path in the file p was loaded from, with
// its line and column when p was parsed from YAML.
func (p *Profile) problemAt(path, format string, args ...any) Problem {
	return locator{file: p.File, root: p.root}.at(path, format, args...)
}

func (m *Manifest) check(l locator) Problems {
	var ps Problems
	if m.Name == "" {
		ps = append(ps, l.at("name", "required"))
	} else if err := event.CheckName("extension name", m.Name); err != nil {
		ps = append(ps, l.at("name", "%v", err))
	} else if l.file != "" {
		if want := "ext." + m.Name + ".yaml"; trimExt(filepath.Base(l.file)) != trimExt(want) {
			ps = append(ps, l.at("name", "extension %q must be declared in %s, not %s", m.Name, want, filepath.Base(l.file)))
		}
	}
	if m.Handler == "" {
		ps = append(ps, l.at("handler", "required"))
	}
	if len(m.Capabilities.IsolationLevels) == 0 {
		ps = append(ps, l.at("capabilities.isolation_levels", "required: at least one of %v", IsolationLevels))
	}
	for i, lvl := range m.Capabilities.IsolationLevels {
		if !slices.Contains(IsolationLevels, lvl) {
			ps = append(ps, l.at(fmt.Sprintf("capabilities.isolation_levels[%d]", i), "unknown isolation level %q (known: %v)", lvl, IsolationLevels))
		}
	}
	if m.Capabilities.PricingModel == "" {
		ps = append(ps, l.at("capabilities.pricing_model", "required: one of %v", PricingModels))
	} else if !slices.Contains(PricingModels, m.Capabilities.PricingModel) {
		ps = append(ps, l.at("capabilities.pricing_model", "unknown pricing model %q (known: %v)", m.Capabilities.PricingModel, PricingModels))
	}
	if lc := m.Capabilities.Locality; lc != "" && !slices.Contains(Localities, lc) {
		ps = append(ps, l.at("capabilities.locality", "unknown locality %q (known: %v)", lc, Localities))
	}
	for i, h := range m.Hosts {
		switch {
		case !hostRE.MatchString(h):
			ps = append(ps, l.at(fmt.Sprintf("hosts[%d]", i), "invalid host %q", h))
		case m.HostBound() && !event.ValidName(h):
			// A placement host is a subject token and a durable's name.
			ps = append(ps, l.at(fmt.Sprintf("hosts[%d]", i), "placement host %q must be 1-63 of [a-z0-9_-], starting with a letter or digit", h))
		case slices.Contains(m.Hosts[:i], h):
			ps = append(ps, l.at(fmt.Sprintf("hosts[%d]", i), "host %q is listed twice", h))
		}
	}
	if m.Capacity.MaxSandboxes < 0 || m.Capacity.PerHost < 0 {
		ps = append(ps, l.at("capacity", "capacities must not be negative"))
	}
	if m.Capacity.MaxInFlight < 0 {
		ps = append(ps, l.at("capacity.max_in_flight", "must not be negative (0 or absent: %d)", DefaultMaxInFlight))
	}
	if m.Workers.Concurrency < 0 {
		ps = append(ps, l.at("workers.concurrency", "must not be negative"))
	} else if c := m.Capacity.MaxInFlight; c > 0 && m.Workers.Concurrency > c {
		ps = append(ps, l.at("workers.concurrency", "%d exceeds capacity.max_in_flight %d: no worker can run more than the whole pool may",
			m.Workers.Concurrency, c))
	}
	if m.Workers.MaxDeliver < 0 {
		ps = append(ps, l.at("workers.max_deliver", "must not be negative"))
	}
	if m.Workers.AckWait != 0 && m.Workers.AckWait.D() < time.Second {
		ps = append(ps, l.at("workers.ack_wait", "must be at least 1s"))
	}
	hasRepo := false
	for _, name := range slices.Sorted(maps.Keys(m.Inputs)) {
		spec := m.Inputs[name]
		for _, msg := range spec.check(name) {
			ps = append(ps, l.at("inputs."+name, "%s", msg))
		}
		hasRepo = hasRepo || spec.Format == FormatRepo
	}
	repoPs := m.Repo.check(l)
	ps = append(ps, repoPs...)
	if !m.Repo.IsZero() && !hasRepo {
		ps = append(ps, l.at("repo", "no input has format: repo, so the repo policy would never apply"))
	}
	for _, name := range slices.Sorted(maps.Keys(m.Inputs)) {
		if spec := m.Inputs[name]; len(repoPs) == 0 && spec.Format == FormatRepo && spec.Default != "" && spec.check(name) == nil {
			if err := m.Repo.Check(spec.Default); err != nil {
				ps = append(ps, l.at("inputs."+name+".default", "%v", err))
			}
		}
	}
	return ps
}

func (p *Profile) check(l locator) Problems {
	var ps Problems
	if p.Slug == "" {
		ps = append(ps, l.at("slug", "required"))
	} else if err := event.CheckName("profile slug", p.Slug); err != nil {
		ps = append(ps, l.at("slug", "%v", err))
	} else if l.file != "" {
		if want := "profile." + p.Slug + ".yaml"; trimExt(filepath.Base(l.file)) != trimExt(want) {
			ps = append(ps, l.at("slug", "profile %q must be declared in %s, not %s", p.Slug, want, filepath.Base(l.file)))
		}
	}
	switch {
	case p.Extension == "" && len(p.Candidates) == 0:
		ps = append(ps, l.at("extension", "required: the extension this profile binds (or candidates to route over)"))
	case p.Extension != "" && len(p.Candidates) > 0:
		ps = append(ps, l.at("candidates", "give extension or candidates, not both"))
	}
	seen := map[string]bool{}
	for i, c := range p.Candidates {
		path := fmt.Sprintf("candidates[%d].extension", i)
		switch {
		case c.Extension == "":
			ps = append(ps, l.at(path, "required"))
		case event.CheckName("extension name", c.Extension) != nil:
			ps = append(ps, l.at(path, "%v", event.CheckName("extension name", c.Extension)))
		case seen[c.Extension]:
			ps = append(ps, l.at(path, "extension %q is already a candidate", c.Extension))
		}
		seen[c.Extension] = true
	}
	if p.Placement != "" && !slices.Contains(Placements, p.Placement) {
		ps = append(ps, l.at("placement", "unknown placement %q (known: %v)", p.Placement, Placements))
	}
	if p.Isolation != "" && !slices.Contains(IsolationLevels, p.Isolation) {
		ps = append(ps, l.at("isolation", "unknown isolation level %q (known: %v)", p.Isolation, IsolationLevels))
	}
	if p.TTL.Default < 0 || p.TTL.Max < 0 {
		ps = append(ps, l.at("ttl", "durations must not be negative"))
	}
	if p.TTL.Max > 0 && p.TTL.Default > p.TTL.Max {
		ps = append(ps, l.at("ttl.default", "default %s exceeds max %s", p.TTL.Default, p.TTL.Max))
	}
	for _, k := range []struct {
		path string
		d    Duration
	}{{"deadlines.provision", p.Deadlines.Provision}, {"deadlines.ready", p.Deadlines.Ready}, {"deadlines.teardown", p.Deadlines.Teardown}} {
		if k.d < 0 {
			ps = append(ps, l.at(k.path, "must not be negative"))
		}
	}
	for _, k := range slices.Sorted(maps.Keys(p.Labels)) {
		if err := CheckLabel(k, p.Labels[k]); err != nil {
			ps = append(ps, l.at("labels."+k, "%v", err))
		}
	}
	ps = append(ps, p.Price.check(l)...)
	return ps
}

// ConsumerPolicy returns the worker policy with defaults applied.
func (w WorkerPolicy) WithDefaults() WorkerPolicy {
	if w.Concurrency <= 0 {
		w.Concurrency = 8
	}
	if w.AckWait <= 0 {
		w.AckWait = Duration(30 * time.Second)
	}
	if w.MaxDeliver <= 0 {
		w.MaxDeliver = 5
	}
	if len(w.Backoff) == 0 {
		w.Backoff = []Duration{Duration(time.Second), Duration(5 * time.Second), Duration(15 * time.Second), Duration(30 * time.Second)}
	}
	return w
}

// HostList returns the manifest's hosts, or ["localhost"].
func (m *Manifest) HostList() []string {
	if len(m.Hosts) == 0 {
		return []string{"localhost"}
	}
	return m.Hosts
}

// LoadManifestFile reads and checks one manifest file.
func LoadManifestFile(path string) (*Manifest, Problems) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, Problems{{File: path, Message: err.Error()}}
	}
	return ParseManifest(path, data)
}

// LoadProfileFile reads and checks one profile file.
func LoadProfileFile(path string) (*Profile, Problems) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, Problems{{File: path, Message: err.Error()}}
	}
	return ParseProfile(path, data)
}

// CheckLabel validates one label: keys are names with optional dotted or
// slashed prefixes, values are short and safe.
func CheckLabel(k, v string) error {
	if !labelKeyRE.MatchString(k) {
		return fmt.Errorf("invalid label key %q: want [a-z0-9] words joined by . / - _, at most 63 characters", k)
	}
	if len(v) > 128 || !labelValueRE.MatchString(v) {
		return fmt.Errorf("invalid label value %q for %q: want at most 128 of [A-Za-z0-9._-]", v, k)
	}
	return nil
}

// trimExt trims ".yaml" or ".yml".
func trimExt(name string) string {
	return strings.TrimSuffix(strings.TrimSuffix(name, ".yaml"), ".yml")
}
