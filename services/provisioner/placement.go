package provisioner

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/workers"
)

// Host-bound teardown. A backend of locality: host keeps each sandbox on
// the machine of the worker that made it, so only a worker of that host
// can tear it down. The sandbox's ready (or failed) event says where it
// is: its handle's host, the placement host of the worker that made it.
//
// Publishers outside the pool (the gateway, the registry, metering) need
// not know: they publish destroys unplaced, on the pool's shared durable.
// The worker that takes one reads the sandbox's create outcome, as every
// destroy does, and when the sandbox is on another host forwards the
// command there: the same destroy, bound to the host
// ([event.Ref.HostCommandSubject]), into that host's durable. The router
// publishes the forwarded command before it acknowledges the unplaced
// one, so a worker killed between the two leaves the unplaced command to
// be forwarded again, and the forwarded copy's id (the original's, with
// the host) makes the second forward a duplicate the stream drops. Nothing
// of the routing lives in memory.
//
// A host with no live worker keeps the forwarded command in its durable
// until one starts. So that the wait shows, the forwarding worker also
// announces the attempt's teardown failure with the reason (waiting for a
// worker on host X): the sandbox's record keeps it as its teardown error,
// and the registry schedules the next attempt as for any failed teardown.
// When a worker of the host starts, it takes the queued commands; the
// first tears the sandbox down, the rest find it destroyed.

// forward sends destroy d of a sandbox placed on host to that host's
// workers, and says so on the sandbox (ref, as its create announced it)
// when no worker of the host is live.
func (pl *pool) forward(ctx context.Context, m *bus.Message, d event.Destroy, ref event.Ref, host string) ([]bus.Out, error) {
	if !slices.Contains(pl.manifest.HostList(), host) {
		// No durable takes what is bound to it: nothing is forwarded,
		// and the failure of this command's last delivery says why.
		return nil, fmt.Errorf("sandbox %s is on host %q, which is not a placement host of %s (%s): add it to the manifest's hosts and run sandboxer setup, then start a worker with --host %s",
			d.SandboxID, host, pl.name, strings.Join(pl.manifest.HostList(), ", "), host)
	}
	d.Host = host
	e, err := event.New(event.TypeDestroy, pl.source, d.SandboxID, m.Event.ID()+"@"+host, d)
	if err != nil {
		return nil, bus.Permanent(err)
	}
	out := []bus.Out{{Subject: d.Ref.HostCommandSubject(event.VerbDestroy, host), Event: e}}
	live, err := pl.hostLive(ctx, host)
	if err != nil {
		return nil, err
	}
	if !live {
		ref.Host = host
		waiting, err := pl.lifecycleWithID(event.StateDestroying, ref, event.TeardownFailedID(d.SandboxID, d.Attempt), event.Destroying{
			Ref: ref, Reason: d.Reason, Attempt: d.Attempt,
			Error: WaitingForHost(host) + ": no live worker of " + pl.name + " serves it; the destroy waits in " + HostConsumer(pl.manifest, host).Name,
		})
		if err != nil {
			return nil, err
		}
		out = append(out, waiting)
		pl.log.WarnContext(ctx, "destroy waits for a worker on the sandbox's host", "sandbox", d.SandboxID, "host", host, "attempt", d.Attempt)
	} else {
		pl.log.DebugContext(ctx, "destroy forwarded to the sandbox's host", "sandbox", d.SandboxID, "host", host)
	}
	return out, nil
}

// WaitingForHost is how a sandbox's teardown error begins while its
// destroy waits for a worker on host: "waiting for a worker on host X".
func WaitingForHost(host string) string { return "waiting for a worker on host " + host }

// hostLiveTimeout bounds the read of the pool's heartbeats.
const hostLiveTimeout = 5 * time.Second

// hostLive reports whether a worker of the pool serving host has a
// heartbeat in the workers bucket (which forgets a worker one TTL after
// its last beat).
func (pl *pool) hostLive(ctx context.Context, host string) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, hostLiveTimeout)
	defer cancel()
	msgs, _, err := bus.LastPerSubject(ctx, pl.p.nc, bus.KVStream(bus.BucketWorkers), []string{"$KV." + bus.BucketWorkers + "." + pl.name + ".*"})
	if err != nil {
		return false, fmt.Errorf("reading the workers of host %s: %w", host, err)
	}
	for _, msg := range msgs {
		if len(msg.Data) == 0 {
			continue // a deleted heartbeat: a worker that shut down
		}
		h, err := workers.Decode(msg.Data)
		if err != nil {
			continue
		}
		if h.Extension == pl.name && h.Host == host {
			return true, nil
		}
	}
	return false, nil
}
