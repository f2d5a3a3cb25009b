package gateway

import (
	"context"
	"errors"
	"net/http"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
)

// queueInfoTimeout bounds the consumer info reads of one GET /v1/workers.
const queueInfoTimeout = 5 * time.Second

// workerPools handles GET /v1/workers: per extension of the catalog, its
// capacities (sandboxes it may have, commands in flight), its live workers (the Workers option's heartbeats) and the
// pending and in-flight commands of its pool's durable consumer. Any key
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
		p.Pending, p.InFlight, p.QueueError = g.queueDepth(ctx, m.Name)
		out.Pools = append(out.Pools, p)
	}
	writeJSON(w, http.StatusOK, out)
}

// queueDepth reads the pending and in-flight commands of extension's pool
// durable, or says why it cannot.
func (g *Gateway) queueDepth(ctx context.Context, extension string) (pending uint64, inFlight int, why string) {
	name := bus.DurableProvisioner(extension)
	cons, err := g.opts.JS.Consumer(ctx, event.StreamCommands, name)
	switch {
	case errors.Is(err, jetstream.ErrConsumerNotFound):
		return 0, 0, "no durable consumer " + name + " on " + event.StreamCommands + " (run sandboxer setup)"
	case err != nil:
		g.log.Warn("reading pool consumer", "extension", extension, "consumer", name, "err", err)
		return 0, 0, "cannot read the queue right now"
	}
	info := cons.CachedInfo() // just read by Consumer
	return info.NumPending, info.NumAckPending, ""
}
