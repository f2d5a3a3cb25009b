package gateway

import (
	"cmp"
	"context"
	"errors"
	"net/http"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// queueInfoTimeout bounds the consumer info reads of one GET /v1/workers.
const queueInfoTimeout = 5 * time.Second

// workerPools handles GET /v1/workers: per extension of the catalog, its
// capacities (sandboxes it may have, commands in flight), its live
// workers (the Workers option's heartbeats), the pending and in-flight
// commands of its pool's durable consumers and, for a pool bound to
// hosts, of each placement host's with the live workers on it. Any key
// may read it: it tells nothing about any consumer. A durable that cannot
// be read leaves that pool's counts at 0 with the reason in queue_error.
func (g *Gateway) workerPools(w http.ResponseWriter, r *http.Request, _ caller) {
	if g.opts.Workers == nil {
		g.writeProblem(w, r, newProblem(http.StatusServiceUnavailable, "workers are not served by this gateway"))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), queueInfoTimeout)
	defer cancel()
	exts := g.opts.Catalog.Current().ExtensionList()
	out := api.WorkerList{Pools: make([]api.WorkerPool, 0, len(exts))}
	for _, m := range exts {
		p := api.WorkerPool{Extension: m.Name, Capacity: m.Capacity.MaxSandboxes, MaxInFlight: m.Capacity.InFlight(), LiveWorkers: []api.Worker{}}
		for _, h := range g.opts.Workers.List(m.Name) {
			p.LiveWorkers = append(p.LiveWorkers, api.Worker{
				Worker: h.Worker, Host: h.Host, PID: h.PID, Concurrency: h.Concurrency,
				InFlight: h.InFlight, StartedAt: h.StartedAt, SeenAt: h.SeenAt,
			})
		}
		d := g.poolDepth(ctx, m)
		p.Pending, p.InFlight, p.QueueError = d.pending, d.inFlight, d.why
		for _, h := range d.hosts {
			wh := api.WorkerHost{Host: h.host, Pending: h.pending, InFlight: h.inFlight, QueueError: h.why}
			for _, w := range p.LiveWorkers {
				if w.Host == h.host {
					wh.LiveWorkers++
				}
			}
			p.Hosts = append(p.Hosts, wh)
		}
		out.Pools = append(out.Pools, p)
	}
	writeJSON(w, http.StatusOK, out)
}

// depth is what waits in one durable, or in a pool's: pending and
// in-flight commands, or why they could not be read.
type depth struct {
	host     string // a placement host's durable; "" for the pool's
	pending  uint64
	inFlight int
	why      string
	hosts    []depth // a host-bound pool's hosts, in the manifest's order
}

// poolDepth reads every durable of m's pool: the pool's own and, for a
// pool bound to hosts, each placement host's. The pool's counts are the
// sums of what could be read; its why, the first reason one could not.
func (g *Gateway) poolDepth(ctx context.Context, m *extension.Manifest) depth {
	d := g.queueDepth(ctx, m.Name, bus.DurableProvisioner(m.Name))
	if !m.HostBound() {
		return d
	}
	for _, h := range m.HostList() {
		hd := g.queueDepth(ctx, m.Name, bus.DurableProvisionerHost(m.Name, h))
		hd.host = h
		d.pending += hd.pending
		d.inFlight += hd.inFlight
		d.why = cmp.Or(d.why, hd.why)
		d.hosts = append(d.hosts, hd)
	}
	return d
}

// queueDepth reads the pending and in-flight commands of durable name of
// extension's pool, or says why it cannot.
func (g *Gateway) queueDepth(ctx context.Context, extension, name string) depth {
	cons, err := g.opts.JS.Consumer(ctx, event.StreamCommands, name)
	switch {
	case errors.Is(err, jetstream.ErrConsumerNotFound):
		return depth{why: "no durable consumer " + name + " on " + event.StreamCommands + " (run sandboxer setup)"}
	case err != nil:
		g.log.Warn("reading pool consumer", "extension", extension, "consumer", name, "err", err)
		return depth{why: "cannot read the queue " + name + " right now"}
	}
	info := cons.CachedInfo() // just read by Consumer
	return depth{pending: info.NumPending, inFlight: info.NumAckPending}
}
