// Package saasstub is ext.saas-stub, a metered backend that stands in for a
// SaaS sandbox provider. It provisions nothing real: a sandbox is a session
// recorded in the backend's own state directory. Like a real provider it
// bills by its own meter and price list (a start fee plus a rate per second
// or per started minute, from the manifest's config block), keeps its own
// usage record from its own clock (from Provision to Teardown, not from
// ready to destroyed), and reports it through [extension.Metered]. Its
// numbers therefore differ from the lifecycle timestamps the way a real
// provider's do.
//
// The state lives in files under the data directory, so that the worker
// that tears a sandbox down, or reads its meter afterwards, need not be the
// one that provisioned it, as long as the workers share the directory.
//
// The package must never import the bus or a service.
package saasstub

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// Handler is the manifest handler name of this backend.
const Handler = "saas-stub"

// Info registers the backend.
var Info = extension.Info{Handler: Handler, New: func() extension.Extension { return New() }}

// DefaultHost is the host of a sandbox when none is given.
const DefaultHost = "saas-stub"

// Config is the manifest's config block: the provider's price list, in
// credit minor units, and where the backend keeps its state.
type Config struct {
	// StartFee is charged once per session. Default 0.
	StartFee int64 `yaml:"start_fee,omitempty" json:"start_fee,omitempty"`
	// PerSecond is charged for every second of a session, a started second
	// counting whole. At most one of PerSecond and PerStartedMinute is set.
	PerSecond int64 `yaml:"per_second,omitempty" json:"per_second,omitempty"`
	// PerStartedMinute is charged for every minute a session has started.
	PerStartedMinute int64 `yaml:"per_started_minute,omitempty" json:"per_started_minute,omitempty"`
	// StateDir holds the sessions and usage records. Relative paths are
	// under the data directory. Default "saas-stub".
	StateDir string `yaml:"state_dir,omitempty" json:"state_dir,omitempty"`
}

// check lists what is wrong with c.
func (c Config) check() []string {
	var out []string
	for _, f := range []struct {
		name string
		v    int64
	}{{"start_fee", c.StartFee}, {"per_second", c.PerSecond}, {"per_started_minute", c.PerStartedMinute}} {
		if f.v < 0 || f.v > extension.MaxPriceAmount {
			out = append(out, fmt.Sprintf("config.%s must be from 0 to %d credit minor units", f.name, int64(extension.MaxPriceAmount)))
		}
	}
	if c.PerSecond != 0 && c.PerStartedMinute != 0 {
		out = append(out, "config: set per_second or per_started_minute, not both")
	}
	return out
}

// SaaSStub is the backend. Configure it before use; [New] with
// [SaaSStub.Configure] or [Open] does.
type SaaSStub struct {
	cfg   Config
	dir   string
	clock func() time.Time
}

// New returns an unconfigured backend.
func New() *SaaSStub { return &SaaSStub{clock: time.Now} }

// Open returns a backend configured with cfg, keeping its state in dir,
// reading time from clock (nil: time.Now). It is what tests and tools use
// without a manifest.
func Open(cfg Config, dir string, clock func() time.Time) (*SaaSStub, error) {
	if ps := cfg.check(); len(ps) > 0 {
		return nil, fmt.Errorf("saas-stub: %s", ps[0])
	}
	if clock == nil {
		clock = time.Now
	}
	s := &SaaSStub{cfg: cfg, dir: dir, clock: clock}
	if err := s.mkdirs(); err != nil {
		return nil, err
	}
	return s, nil
}

// Configure reads the price list and creates the state directory.
func (s *SaaSStub) Configure(_ context.Context, env extension.Env) error {
	var cfg Config
	if err := env.Manifest.Config.Decode(&cfg); err != nil {
		return err
	}
	if ps := cfg.check(); len(ps) > 0 {
		return fmt.Errorf("saas-stub: %s", ps[0])
	}
	dir := cfg.StateDir
	if dir == "" {
		dir = "saas-stub"
	}
	if !filepath.IsAbs(dir) {
		if env.DataDir == "" {
			return errors.New("saas-stub: relative state_dir needs a data directory")
		}
		dir = filepath.Join(env.DataDir, dir)
	}
	s.cfg, s.dir = cfg, dir
	if s.clock == nil {
		s.clock = time.Now
	}
	return s.mkdirs()
}

func (s *SaaSStub) mkdirs() error {
	for _, d := range []string{s.liveDir(), s.usageDir()} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("saas-stub: creating state dir: %w", err)
		}
	}
	return nil
}

// CheckManifest checks the price list.
func (s *SaaSStub) CheckManifest(m *extension.Manifest) []extension.Problem {
	var cfg Config
	if ps := m.Config.CheckDecode(&cfg, m.File); len(ps) > 0 {
		return ps
	}
	var ps []extension.Problem
	for _, msg := range cfg.check() {
		ps = append(ps, extension.Problem{File: m.File, Path: "config", Message: msg})
	}
	if m.Capabilities.PricingModel != extension.PricingMetered {
		ps = append(ps, extension.Problem{File: m.File, Path: "capabilities.pricing_model", Message: "ext.saas-stub bills by its own meter: pricing_model must be metered"})
	}
	return ps
}

// Session is one stretch a sandbox ran, by the provider's clock.
type Session struct {
	StartedAt time.Time `json:"started_at"`
	StoppedAt time.Time `json:"stopped_at,omitzero"`
}

// Usage is the provider's own usage record of one sandbox: every session it
// ran, keyed by sandbox id.
type Usage struct {
	SandboxID string    `json:"sandbox_id"`
	Sessions  []Session `json:"sessions"`
}

// live is the marker of a running session.
type live struct {
	SandboxID string    `json:"sandbox_id"`
	Host      string    `json:"host"`
	StartedAt time.Time `json:"started_at"`
}

func (s *SaaSStub) liveDir() string            { return filepath.Join(s.dir, "live") }
func (s *SaaSStub) usageDir() string           { return filepath.Join(s.dir, "usage") }
func (s *SaaSStub) livePath(id string) string  { return filepath.Join(s.liveDir(), id+".json") }
func (s *SaaSStub) usagePath(id string) string { return filepath.Join(s.usageDir(), id+".json") }
func (s *SaaSStub) handle(id, host string) extension.Handle {
	return extension.Handle{SandboxID: id, Host: host}
}

// Provision starts a session for in's sandbox. A running session is found
// and returned as is: the live marker is created exclusively, so
// concurrent calls make one session.
func (s *SaaSStub) Provision(ctx context.Context, _ extension.Profile, in extension.Inputs, host string) (extension.Handle, error) {
	id := in.SandboxID()
	if host == "" {
		host = DefaultHost
	}
	h := s.handle(id, host)
	if err := ctx.Err(); err != nil {
		return h, err
	}
	if err := event.CheckName("sandbox id", id); err != nil {
		return h, fmt.Errorf("saas-stub: %w", err)
	}
	b, err := json.Marshal(live{SandboxID: id, Host: host, StartedAt: s.clock().UTC()})
	if err != nil {
		return h, fmt.Errorf("saas-stub: encoding session: %w", err)
	}
	// Write the marker aside and link it into place: the link either
	// creates the complete marker or finds one, never a half-written file.
	tmp, err := os.CreateTemp(s.liveDir(), ".tmp-"+id+"-")
	if err != nil {
		return h, fmt.Errorf("saas-stub: starting session: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		_ = tmp.Close()
		return h, fmt.Errorf("saas-stub: starting session: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return h, fmt.Errorf("saas-stub: starting session: %w", err)
	}
	if err := os.Link(tmp.Name(), s.livePath(id)); err != nil && !errors.Is(err, fs.ErrExist) {
		return h, fmt.Errorf("saas-stub: starting session: %w", err)
	}
	l, err := s.readLive(id)
	if err != nil {
		return h, err
	}
	if l != nil {
		h.Host = l.Host
	}
	return h, nil
}

// readLive returns the running session of id, or nil.
func (s *SaaSStub) readLive(id string) (*live, error) {
	b, err := os.ReadFile(s.livePath(id))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("saas-stub: reading session: %w", err)
	}
	var l live
	if err := json.Unmarshal(b, &l); err != nil {
		return nil, fmt.Errorf("saas-stub: reading session of %s: %w", id, err)
	}
	return &l, nil
}

// WaitReady returns at once for a running session.
func (s *SaaSStub) WaitReady(ctx context.Context, h extension.Handle) (extension.Reachability, error) {
	if err := ctx.Err(); err != nil {
		return extension.Reachability{}, err
	}
	if err := event.CheckName("sandbox id", h.SandboxID); err != nil {
		return extension.Reachability{}, fmt.Errorf("saas-stub: %w", err)
	}
	l, err := s.readLive(h.SandboxID)
	if err != nil {
		return extension.Reachability{}, err
	}
	if l == nil {
		return extension.Reachability{}, fmt.Errorf("saas-stub: sandbox %s has no running session", h.SandboxID)
	}
	return extension.Reachability{
		Host:      l.Host,
		RemoteDir: "/workspace",
		Ports:     map[string]string{"api": l.Host + ":443"},
	}, nil
}

// Teardown ends the running session, records it in the usage record and
// removes the marker. With no running session it reports nothing removed.
func (s *SaaSStub) Teardown(ctx context.Context, h extension.Handle) (extension.CleanupReport, error) {
	var rep extension.CleanupReport
	if err := ctx.Err(); err != nil {
		return rep, err
	}
	if err := event.CheckName("sandbox id", h.SandboxID); err != nil {
		return rep, fmt.Errorf("saas-stub: %w", err)
	}
	id := h.SandboxID
	l, err := s.readLive(id)
	if err != nil {
		return rep, err
	}
	if l == nil {
		rep.AlreadyGone = true
		return rep, nil
	}
	u, err := s.ReadUsage(id)
	if err != nil {
		return rep, err
	}
	found := false
	for _, ss := range u.Sessions {
		if ss.StartedAt.Equal(l.StartedAt) {
			found = true // recorded by a teardown that did not finish
		}
	}
	if !found {
		u.Sessions = append(u.Sessions, Session{StartedAt: l.StartedAt, StoppedAt: s.clock().UTC()})
		if err := s.writeUsage(u); err != nil {
			return rep, err
		}
	}
	if err := os.Remove(s.livePath(id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return rep, fmt.Errorf("saas-stub: ending session: %w", err)
	}
	rep.Removed = []string{"saas-stub:session:" + id}
	return rep, nil
}

// ReadUsage returns the usage record of a sandbox: an empty one when it
// never ran.
func (s *SaaSStub) ReadUsage(id string) (Usage, error) {
	u := Usage{SandboxID: id}
	if err := event.CheckName("sandbox id", id); err != nil {
		return u, fmt.Errorf("saas-stub: %w", err)
	}
	b, err := os.ReadFile(s.usagePath(id))
	if errors.Is(err, fs.ErrNotExist) {
		return u, nil
	}
	if err != nil {
		return u, fmt.Errorf("saas-stub: reading usage of %s: %w", id, err)
	}
	if err := json.Unmarshal(b, &u); err != nil {
		return u, fmt.Errorf("saas-stub: reading usage of %s: %w", id, err)
	}
	return u, nil
}

// writeUsage replaces the usage record atomically.
func (s *SaaSStub) writeUsage(u Usage) error {
	b, err := json.Marshal(u)
	if err != nil {
		return fmt.Errorf("saas-stub: encoding usage: %w", err)
	}
	tmp, err := os.CreateTemp(s.usageDir(), ".tmp-"+u.SandboxID+"-")
	if err != nil {
		return fmt.Errorf("saas-stub: writing usage: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		_ = tmp.Close()
		return fmt.Errorf("saas-stub: writing usage: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("saas-stub: writing usage: %w", err)
	}
	if err := os.Rename(tmp.Name(), s.usagePath(u.SandboxID)); err != nil {
		return fmt.Errorf("saas-stub: writing usage: %w", err)
	}
	return nil
}

// price is what one session of d costs, with its breakdown.
func (s *SaaSStub) price(d time.Duration) (amount, quantity int64, unit string, lines []string) {
	if d < 0 {
		d = 0
	}
	if s.cfg.StartFee > 0 {
		amount += s.cfg.StartFee
		lines = append(lines, fmt.Sprintf("start fee: %d", s.cfg.StartFee))
	}
	switch {
	case s.cfg.PerStartedMinute > 0:
		quantity, unit = int64((d+time.Minute-1)/time.Minute), "minute"
		amount += quantity * s.cfg.PerStartedMinute
		lines = append(lines, fmt.Sprintf("%d started minute(s) x %d: %d", quantity, s.cfg.PerStartedMinute, quantity*s.cfg.PerStartedMinute))
	default:
		quantity, unit = int64((d+time.Second-1)/time.Second), "second"
		amount += quantity * s.cfg.PerSecond
		lines = append(lines, fmt.Sprintf("%d second(s) x %d: %d", quantity, s.cfg.PerSecond, quantity*s.cfg.PerSecond))
	}
	return amount, quantity, unit, lines
}

// EstimateCost prices one session of d by the manifest's price list.
func (s *SaaSStub) EstimateCost(ctx context.Context, _ extension.Profile, d time.Duration) (extension.MeterQuote, error) {
	if err := ctx.Err(); err != nil {
		return extension.MeterQuote{}, err
	}
	if d < 0 {
		return extension.MeterQuote{}, fmt.Errorf("saas-stub: negative duration %s", d)
	}
	amount, _, _, lines := s.price(d)
	return extension.MeterQuote{Amount: amount, Duration: d, Breakdown: lines}, nil
}

// MeterActual reports what the sandbox of h used by the provider's own
// record: every session it ran, each billed on its own, a session still
// running billed up to u.DestroyedAt (or now). A sandbox that never ran
// costs nothing.
func (s *SaaSStub) MeterActual(ctx context.Context, h extension.Handle, u extension.Usage) (extension.MeterReading, error) {
	var r extension.MeterReading
	if err := ctx.Err(); err != nil {
		return r, err
	}
	rec, err := s.ReadUsage(h.SandboxID)
	if err != nil {
		return r, err
	}
	sessions := rec.Sessions
	if l, err := s.readLive(h.SandboxID); err != nil {
		return r, err
	} else if l != nil {
		end := u.DestroyedAt
		if end.IsZero() || end.Before(l.StartedAt) {
			end = s.clock().UTC()
		}
		sessions = append(sessions, Session{StartedAt: l.StartedAt, StoppedAt: end})
	}
	r.Unit = "second"
	if s.cfg.PerStartedMinute > 0 {
		r.Unit = "minute"
	}
	for i, ss := range sessions {
		amount, q, _, lines := s.price(ss.StoppedAt.Sub(ss.StartedAt))
		r.Amount += amount
		r.Quantity += q
		for _, l := range lines {
			r.Breakdown = append(r.Breakdown, fmt.Sprintf("session %d: %s", i+1, l))
		}
	}
	return r, nil
}

// Instances reports 1 while the sandbox has a running session. The
// conformance suite uses it.
func (s *SaaSStub) Instances(sandboxID string) int {
	if _, err := os.Stat(s.livePath(sandboxID)); err == nil {
		return 1
	}
	return 0
}

// List returns every running session, with the host it runs on and when
// it started by the provider's clock.
func (s *SaaSStub) List(ctx context.Context) ([]extension.Held, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	entries, err := os.ReadDir(s.liveDir())
	if err != nil {
		return nil, fmt.Errorf("saas-stub: listing sessions: %w", err)
	}
	var out []extension.Held
	for _, e := range entries {
		id, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || !event.ValidName(id) {
			continue // a marker being written (.tmp-*), or not one
		}
		l, err := s.readLive(id)
		if err != nil {
			return out, err
		}
		if l == nil {
			continue // ended meanwhile
		}
		out = append(out, extension.Held{
			Handle:    s.handle(id, l.Host),
			Resources: []string{"saas-stub:session:" + id},
			Since:     l.StartedAt,
		})
	}
	return out, nil
}

var (
	_ extension.Extension       = (*SaaSStub)(nil)
	_ extension.Lister          = (*SaaSStub)(nil)
	_ extension.Metered         = (*SaaSStub)(nil)
	_ extension.Configurer      = (*SaaSStub)(nil)
	_ extension.ManifestChecker = (*SaaSStub)(nil)
)
