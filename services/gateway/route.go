package gateway

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/credits"
	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// ErrNoRoute is wrapped by a [Resolver] that finds nowhere to put a
// sandbox. The gateway rejects the sandbox (code no_route) and answers 503.
var ErrNoRoute = errors.New("no route")

// ErrInsufficientCredits is wrapped by an [Admitter] refusing a sandbox for
// lack of credit. The gateway rejects the sandbox (code
// insufficient_credits) and answers 402. It is the credits contract's
// [credits.ErrInsufficientCredits], which metering's refusals wrap.
var ErrInsufficientCredits = credits.ErrInsufficientCredits

// Rejection codes of the rejected events the gateway publishes.
const (
	CodeInsufficientCredits = "insufficient_credits"
	CodeNoRoute             = "no_route"
	// CodeBackPressure: the commands stream was full.
	CodeBackPressure = "back_pressure"
	// CodeUnavailable: the create command could not be published.
	CodeUnavailable = "unavailable"
)

// Route is where a sandbox goes.
type Route struct {
	// Extension is the extension whose workers get the create command.
	Extension string
	// Host is the machine the extension places the sandbox on.
	Host string
}

// RouteRequest is what a [Resolver] decides on. The profile and manifest
// come from the catalog and must not be modified.
type RouteRequest struct {
	SandboxID string
	Consumer  string
	Profile   *extension.Profile
	// Manifest is the profile's extension, or its first candidate.
	Manifest *extension.Manifest
	// Candidates are the manifests of every extension the profile may
	// use, in order of preference (Manifest first). A route must name one
	// of them.
	Candidates []*extension.Manifest
	// Load is the gateway's view of live sandboxes.
	Load Load
}

// Resolver maps a valid request to the place its sandbox goes. An error
// wrapping [ErrNoRoute] rejects the sandbox; any other error is a failure
// of the resolver, answered 503 without a rejection.
type Resolver interface {
	Resolve(ctx context.Context, req RouteRequest) (Route, error)
}

// ResolverFunc adapts a function to [Resolver].
type ResolverFunc func(ctx context.Context, req RouteRequest) (Route, error)

// Resolve calls f.
func (f ResolverFunc) Resolve(ctx context.Context, req RouteRequest) (Route, error) {
	return f(ctx, req)
}

// StaticResolver routes every profile to its own extension (a routed
// profile to its first candidate) and spreads its sandboxes over the
// manifest's hosts: each request gets the host picked
// least recently in this process. The zero value is ready to use and safe
// for concurrent use.
type StaticResolver struct {
	mu   sync.Mutex
	seq  uint64
	last map[string]uint64 // "<extension>\x00<host>" -> seq of its last pick
}

// Resolve picks the least recently picked host of req.Manifest.HostList().
func (s *StaticResolver) Resolve(_ context.Context, req RouteRequest) (Route, error) {
	if req.Profile == nil || req.Manifest == nil {
		return Route{}, fmt.Errorf("resolving route: %w: profile and manifest are required", ErrNoRoute)
	}
	hosts := req.Manifest.HostList()
	if len(hosts) == 0 {
		return Route{}, fmt.Errorf("resolving route: %w: extension %s has no hosts", ErrNoRoute, req.Manifest.Name)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.last == nil {
		s.last = make(map[string]uint64)
	}
	best, bestSeq := "", uint64(0)
	for i, h := range hosts {
		seq := s.last[req.Manifest.Name+"\x00"+h]
		if i == 0 || seq < bestSeq {
			best, bestSeq = h, seq
		}
	}
	s.seq++
	s.last[req.Manifest.Name+"\x00"+best] = s.seq
	return Route{Extension: req.Manifest.Name, Host: best}, nil
}

// AdmitRequest is what an [Admitter] decides on. The profile comes from the
// catalog and must not be modified.
type AdmitRequest struct {
	SandboxID string
	Consumer  string
	Profile   *extension.Profile
	Route     Route
	// Manifest is the manifest of Route.Extension, from the catalog; it
	// must not be modified.
	Manifest *extension.Manifest
	// TTL is the sandbox's time to live; zero means no expiry.
	TTL time.Duration
}

// Admitter reserves credit for a sandbox before anything is published and
// returns the hold it made ("" for none), which travels in the create
// command. An error wrapping [ErrInsufficientCredits] rejects the sandbox;
// any other error is a failure of the admitter, answered 503 without a
// rejection. Admit must be idempotent per SandboxID.
type Admitter interface {
	Admit(ctx context.Context, req AdmitRequest) (hold string, err error)
}

// AdmitterFunc adapts a function to [Admitter].
type AdmitterFunc func(ctx context.Context, req AdmitRequest) (string, error)

// Admit calls f.
func (f AdmitterFunc) Admit(ctx context.Context, req AdmitRequest) (string, error) {
	return f(ctx, req)
}

var (
	_ Resolver = (*StaticResolver)(nil)
	_ Resolver = ResolverFunc(nil)
	_ Admitter = AdmitterFunc(nil)
)
