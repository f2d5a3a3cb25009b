package sandbox

import (
	"time"

	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// StateDeadline is how long a sandbox may stay in transient state s under
// its profile's deadlines d: its create (queued, then Provision and
// WaitReady) until ready or failed; its cleanup (failed, expired,
// destroying: queued, then Teardown) until destroyed. It is the one
// notion of a late sandbox: the gateway's sandboxes_past_deadline counts
// by it and the registry's reconciler steps in by it.
func StateDeadline(s event.State, d extension.Deadlines) time.Duration {
	switch s {
	case event.StateRequested, event.StateProvisioning:
		return d.ProvisionDeadline() + d.ReadyDeadline()
	}
	return d.TeardownDeadline()
}

// EnteredState is when r entered its current state: its last transition
// to it, else when it was last updated, else created.
func (r *Record) EnteredState() time.Time {
	for i := len(r.History) - 1; i >= 0; i-- {
		if r.History[i].State == r.State {
			return r.History[i].At
		}
	}
	if !r.UpdatedAt.IsZero() {
		return r.UpdatedAt
	}
	return r.CreatedAt
}
