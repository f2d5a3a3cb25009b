package metering

import (
	"github.com/nats-io/nats.go"

	"github.com/sand-boxer/sandboxer/pkg/credits"
)

// The credits contract moved to pkg/credits. These names stay for callers
// not yet moved (the benchmark in cmd/sandboxer).

// Client is [credits.Client].
//
// Deprecated: use [credits.Client].
type Client = credits.Client

// HoldRequest is [credits.HoldRequest].
//
// Deprecated: use [credits.HoldRequest].
type HoldRequest = credits.HoldRequest

// GrantRequest is [credits.GrantRequest].
//
// Deprecated: use [credits.GrantRequest].
type GrantRequest = credits.GrantRequest

// NewClient is [credits.NewClient].
//
// Deprecated: use [credits.NewClient].
func NewClient(nc *nats.Conn) *Client { return credits.NewClient(nc) }
