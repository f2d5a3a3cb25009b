// Package echo is ext.echo, a no-op backend that is ready at once, or
// after a fixed delay (config.delay, or a request's delay input). It
// exists to isolate the control plane from backend time in tests and
// benchmarks, and is linked only into those: no shipped manifest uses it.
package echo

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// Handler is the manifest handler name of this backend.
const Handler = "echo"

// Info registers the backend.
var Info = extension.Info{Handler: Handler, New: func() extension.Extension { return New() }}

// Config is the config block of an echo manifest.
type Config struct {
	// Delay is how long every Provision takes, as a backend that builds
	// something does: what the benchmark's scaling figure needs. A
	// request's delay input wins. Default 0: ready at once.
	Delay extension.Duration `yaml:"delay,omitempty" json:"delay,omitempty"`
}

// Echo keeps its sandboxes in memory.
type Echo struct {
	mu        sync.Mutex
	sandboxes map[string]extension.Handle
	// teardowns counts the failed teardowns of each sandbox asked to
	// fail some (the fail_teardown input).
	teardowns map[string]int
	delay     time.Duration // config.delay
}

// New returns an empty backend.
func New() *Echo {
	return &Echo{sandboxes: make(map[string]extension.Handle), teardowns: make(map[string]int)}
}

// MaxFailTeardown bounds the fail_teardown input.
const MaxFailTeardown = 100

// Manifest returns a manifest for the backend, with inputs delay (how long
// Provision takes), fail (provision or ready, to make that phase fail) and
// fail_teardown (how many teardowns of the sandbox fail before one
// succeeds, in this backend's memory).
func Manifest(name string) *extension.Manifest {
	return &extension.Manifest{
		Name:    name,
		Handler: Handler,
		Capabilities: extension.Capabilities{
			IsolationLevels: []extension.IsolationLevel{extension.IsolationProcess},
			PricingModel:    extension.PricingSelfHosted,
		},
		Inputs: map[string]extension.InputSpec{
			"delay": {Type: extension.TypeDuration, Description: "how long Provision takes"},
			"fail":  {Type: extension.TypeString, Enum: []string{"provision", "ready"}, Description: "phase to fail"},
			"fail_teardown": {Type: extension.TypeInt, Min: ptr(int64(0)), Max: ptr(int64(MaxFailTeardown)),
				Description: "how many teardowns fail before one succeeds"},
		},
	}
}

// Configure reads the manifest's config block, strictly.
func (e *Echo) Configure(_ context.Context, env extension.Env) error {
	var cfg Config
	if err := env.Manifest.Config.Decode(&cfg); err != nil {
		return err
	}
	if cfg.Delay < 0 {
		return fmt.Errorf("echo: config.delay %s must not be negative", cfg.Delay)
	}
	e.delay = cfg.Delay.D()
	return nil
}

// CheckManifest checks the config block.
func (e *Echo) CheckManifest(m *extension.Manifest) []extension.Problem {
	var cfg Config
	if ps := m.Config.CheckDecode(&cfg, m.File); ps != nil {
		return ps
	}
	if cfg.Delay < 0 {
		return []extension.Problem{{File: m.File, Path: "config.delay", Message: "must not be negative"}}
	}
	return nil
}

// Provision records the sandbox, after the delay input, else the
// configured delay, if any.
func (e *Echo) Provision(ctx context.Context, _ extension.Profile, in extension.Inputs, host string) (extension.Handle, error) {
	if host == "" {
		host = "localhost"
	}
	h := extension.Handle{SandboxID: in.SandboxID(), Host: host}
	if h.SandboxID == "" {
		return h, fmt.Errorf("echo: missing sandbox id")
	}
	dur := e.delay
	if d := in["delay"]; d != "" {
		var err error
		if dur, err = time.ParseDuration(d); err != nil {
			return h, fmt.Errorf("echo: delay: %w", err)
		}
	}
	if dur > 0 {
		t := time.NewTimer(dur)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			return h, ctx.Err()
		}
	}
	if err := ctx.Err(); err != nil {
		return h, err
	}
	if in["fail"] == "provision" {
		return h, fmt.Errorf("echo: failing provision as asked")
	}
	if in["fail"] == "ready" {
		h.Data = map[string]string{"fail": "ready"}
	}
	if v := in["fail_teardown"]; v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 || n > MaxFailTeardown {
			return h, fmt.Errorf("echo: fail_teardown %q: want 0 to %d", v, MaxFailTeardown)
		}
		if h.Data == nil {
			h.Data = map[string]string{}
		}
		h.Data["fail_teardown"] = strconv.Itoa(n)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if prev, ok := e.sandboxes[h.SandboxID]; ok {
		return prev, nil
	}
	e.sandboxes[h.SandboxID] = h
	return h, nil
}

// WaitReady is immediate.
func (e *Echo) WaitReady(ctx context.Context, h extension.Handle) (extension.Reachability, error) {
	if err := ctx.Err(); err != nil {
		return extension.Reachability{}, err
	}
	if h.Data["fail"] == "ready" {
		return extension.Reachability{}, fmt.Errorf("echo: failing ready as asked")
	}
	e.mu.Lock()
	_, ok := e.sandboxes[h.SandboxID]
	e.mu.Unlock()
	if !ok {
		return extension.Reachability{}, fmt.Errorf("echo: sandbox %s not provisioned", h.SandboxID)
	}
	return extension.Reachability{Host: h.Host, RemoteDir: "/echo/" + h.SandboxID}, nil
}

// Teardown forgets the sandbox. A sandbox provisioned with fail_teardown
// n fails its first n teardowns (counted by this backend), then succeeds.
func (e *Echo) Teardown(ctx context.Context, h extension.Handle) (extension.CleanupReport, error) {
	if err := ctx.Err(); err != nil {
		return extension.CleanupReport{}, err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if n, _ := strconv.Atoi(h.Data["fail_teardown"]); e.teardowns[h.SandboxID] < n {
		e.teardowns[h.SandboxID]++
		return extension.CleanupReport{}, fmt.Errorf("echo: failing teardown %d of %d as asked", e.teardowns[h.SandboxID], n)
	}
	delete(e.teardowns, h.SandboxID)
	if _, ok := e.sandboxes[h.SandboxID]; !ok {
		return extension.CleanupReport{AlreadyGone: true}, nil
	}
	delete(e.sandboxes, h.SandboxID)
	return extension.CleanupReport{Removed: []string{"echo:" + h.SandboxID}}, nil
}

// Instances reports 1 while the sandbox exists.
func (e *Echo) Instances(sandboxID string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	if _, ok := e.sandboxes[sandboxID]; ok {
		return 1
	}
	return 0
}

// FailedTeardowns reports how many teardowns of the sandbox failed as
// asked (fail_teardown) and have not been followed by a success yet.
func (e *Echo) FailedTeardowns(sandboxID string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.teardowns[sandboxID]
}

func ptr[T any](v T) *T { return &v }

// Len reports how many sandboxes exist.
func (e *Echo) Len() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.sandboxes)
}

var (
	_ extension.Extension       = (*Echo)(nil)
	_ extension.Configurer      = (*Echo)(nil)
	_ extension.ManifestChecker = (*Echo)(nil)
)
