// Package extension is the extension SDK: the interface every sandbox
// backend implements, the registry of backend factories by handler name,
// the strict loaders and linters of extension manifests and profiles, the
// per-extension input spec, and the capability vocabulary.
//
// The package owns what a backend is and how it is described. It must never
// import the bus or a service: extensions know nothing of NATS, and a
// service links an extension only through a [Registry].
package extension

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/event"
)

// Handle is what Provision returns and Teardown needs. SandboxID and Host
// are always set.
type Handle = event.Handle

// Reachability says where a ready sandbox is.
type Reachability = event.Reachability

// CleanupReport lists what a teardown removed.
type CleanupReport = event.CleanupReport

// Inputs are the validated, typed-as-text inputs of one sandbox request.
type Inputs map[string]string

// Extension is a sandbox backend.
//
// Provision is keyed by h.SandboxID: calling it twice for one sandbox finds
// what the first call made rather than making a second sandbox. On error it
// still returns whatever handle it has, so the caller can tear it down.
// WaitReady returns once the sandbox is usable or ctx ends. Teardown removes
// everything Provision made; it succeeds on a partial handle and on a
// sandbox that is already gone. Every method honours ctx cancellation.
type Extension interface {
	Provision(ctx context.Context, p Profile, in Inputs, host string) (Handle, error)
	WaitReady(ctx context.Context, h Handle) (Reachability, error)
	Teardown(ctx context.Context, h Handle) (CleanupReport, error)
}

// Metered is implemented by backends that bill by their own meter. Metering
// asks them for a quote before a sandbox starts and for the actual usage
// when it ends.
type Metered interface {
	EstimateCost(ctx context.Context, p Profile, d time.Duration) (MeterQuote, error)
	MeterActual(ctx context.Context, h Handle, u Usage) (MeterReading, error)
}

// MeterQuote is a price estimate in credit minor units.
type MeterQuote struct {
	// Amount is the estimated cost in minor units.
	Amount int64 `json:"amount"`
	// Duration is the duration the quote covers.
	Duration time.Duration `json:"duration"`
	// Breakdown explains the amount, line by line.
	Breakdown []string `json:"breakdown,omitempty"`
}

// Usage is what the control plane observed of a sandbox's life.
type Usage struct {
	ReadyAt     time.Time `json:"ready_at"`
	DestroyedAt time.Time `json:"destroyed_at"`
}

// MeterReading is a backend's own account of what a sandbox used.
type MeterReading struct {
	// Amount is the cost in minor units.
	Amount int64 `json:"amount"`
	// Quantity and Unit say what was measured (for example 125 seconds).
	Quantity int64  `json:"quantity"`
	Unit     string `json:"unit"`
	// Breakdown explains the amount, line by line.
	Breakdown []string `json:"breakdown,omitempty"`
}

// Env is what a backend is configured with.
type Env struct {
	// Manifest is the validated manifest that chose this handler.
	Manifest *Manifest
	// DataDir is a directory the backend may keep state in.
	DataDir string
	// Logger logs on behalf of the backend.
	Logger *slog.Logger
	// Host is the placement host of the worker running the backend: for
	// a placement: host backend, the host of every sandbox it holds (the
	// handles its Lister returns). Empty: "localhost".
	Host string
}

// Configurer is implemented by backends that need their manifest's config
// block, a data directory or a logger. Configure is called once, before any
// other method, and must not start background work that outlives ctx.
type Configurer interface {
	Configure(ctx context.Context, env Env) error
}

// ManifestChecker is implemented by backends that require something of the
// manifest that selects them (inputs they depend on, config keys). It is
// called when the catalog is loaded, so a bad manifest stops start-up.
type ManifestChecker interface {
	CheckManifest(m *Manifest) []Problem
}

// Closer is implemented by backends holding resources (connections,
// tunnels) beyond a single call.
type Closer interface {
	Close() error
}

// Info registers a backend: its handler name and a constructor with no side
// effects.
type Info struct {
	// Handler is the name a manifest's handler: field uses.
	Handler string
	// New returns a new, unconfigured backend.
	New func() Extension
}

// Registry maps handler names to backends. Its zero value is not usable;
// use [NewRegistry]. A binary builds one registry listing every backend it
// links, in one place.
type Registry struct {
	m map[string]Info
}

// NewRegistry returns a registry holding infos. It panics on a programmer
// error, as Register does.
func NewRegistry(infos ...Info) *Registry {
	r := &Registry{m: make(map[string]Info)}
	for _, i := range infos {
		r.Register(i)
	}
	return r
}

// Register adds info. It panics on an empty handler, a nil constructor or a
// duplicate: those are programmer errors, found the first time the binary
// runs.
func (r *Registry) Register(info Info) {
	if info.Handler == "" {
		panic("extension: Register with empty handler name")
	}
	if info.New == nil {
		panic(fmt.Sprintf("extension: Register %q with nil constructor", info.Handler))
	}
	if _, dup := r.m[info.Handler]; dup {
		panic(fmt.Sprintf("extension: Register called twice for handler %q", info.Handler))
	}
	r.m[info.Handler] = info
}

// Lookup returns the backend registered as handler.
func (r *Registry) Lookup(handler string) (Info, error) {
	i, ok := r.m[handler]
	if !ok {
		return Info{}, fmt.Errorf("unknown extension handler %q (not linked into this binary; known: %v)", handler, r.Handlers())
	}
	return i, nil
}

// Handlers lists the registered handler names, sorted.
func (r *Registry) Handlers() []string {
	out := make([]string, 0, len(r.m))
	for h := range r.m {
		out = append(out, h)
	}
	slices.Sort(out)
	return out
}

// Open looks up m's handler, constructs it and configures it with env. The
// caller closes the result with [Close].
func (r *Registry) Open(ctx context.Context, m *Manifest, env Env) (Extension, error) {
	info, err := r.Lookup(m.Handler)
	if err != nil {
		return nil, err
	}
	ext := info.New()
	env.Manifest = m
	if env.Logger == nil {
		env.Logger = slog.New(slog.DiscardHandler)
	}
	if c, ok := ext.(Configurer); ok {
		if err := c.Configure(ctx, env); err != nil {
			return nil, fmt.Errorf("configuring extension %s (handler %s): %w", m.Name, m.Handler, err)
		}
	}
	return ext, nil
}

// Close releases ext's resources if it holds any.
func Close(ext Extension) error {
	if c, ok := ext.(Closer); ok {
		return c.Close()
	}
	return nil
}

// InputSandboxID is the reserved input that carries the sandbox id to
// Provision. The control plane always sets it; a request may not.
const InputSandboxID = "sandbox_id"

// SandboxID returns the sandbox id Provision is keyed by.
func (in Inputs) SandboxID() string { return in[InputSandboxID] }

// CanonicalName is an extension name as the catalog knows it: manifests
// are files called ext.<name>.yaml and people say ext.local, so a leading
// "ext." is dropped, and both spellings name the same extension.
func CanonicalName(s string) string { return strings.TrimPrefix(s, "ext.") }
