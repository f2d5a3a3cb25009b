// Package metering owns credits: accounts, holds, the ledger and usage, and
// the metering stream billing systems subscribe to. It consumes lifecycle
// events and never links extension code: metered backends answer quotes
// through their own provisioner workers over the bus.
//
// Until credits land, the service declares its place in the topology and
// does nothing else.
package metering

import (
	"context"
	"errors"
	"log/slog"

	"github.com/nats-io/nats.go/jetstream"
)

// Options configures the metering service.
type Options struct {
	// JS is the JetStream context. Required.
	JS jetstream.JetStream
	// Logger logs. Default: discard.
	Logger *slog.Logger
}

// Metering is the metering service.
type Metering struct {
	opts Options
}

// New returns a metering service that has not started.
func New(opts Options) (*Metering, error) {
	if opts.JS == nil {
		return nil, errors.New("metering: JS is required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Metering{opts: opts}, nil
}

// Start starts the service.
func (m *Metering) Start(ctx context.Context) error { return nil }

// Shutdown stops the service.
func (m *Metering) Shutdown(ctx context.Context) error { return nil }
