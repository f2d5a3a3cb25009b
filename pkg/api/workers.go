package api

import "time"

// WorkerList is the body of GET /v1/workers: one pool per extension of
// the catalog, by extension name. Any API key may read it; it says
// nothing about any consumer.
type WorkerList struct {
	Pools []WorkerPool `json:"pools"`
}

// WorkerPool is the worker pool of one backend: who is consuming its
// commands, and how many wait.
type WorkerPool struct {
	Extension string `json:"extension"`
	// Capacity is the manifest's capacity.max_sandboxes, how many
	// sandboxes the backend may have: 0 is unbounded.
	Capacity int `json:"capacity"`
	// MaxInFlight is the manifest's capacity.max_in_flight (its default
	// when absent), how many commands the whole pool may run at once:
	// its durable's MaxAckPending. Each worker runs its own Concurrency.
	MaxInFlight int `json:"max_in_flight"`
	// LiveWorkers are the workers whose heartbeat is in the workers
	// bucket (seen within its TTL), by worker id.
	LiveWorkers []Worker `json:"live_workers"`
	// Pending counts the commands of the pool's durable consumers
	// (provisioner-<extension> on the commands stream and, for a pool
	// bound to hosts, provisioner-<extension>@<host> of each host) that no
	// worker has taken yet; InFlight those taken and not yet acknowledged.
	Pending  uint64 `json:"pending"`
	InFlight int    `json:"in_flight"`
	// QueueError, when set, says why Pending and InFlight could not be
	// read (they count only what could be read then).
	QueueError string `json:"queue_error,omitempty"`
	// Hosts, for a pool whose backend is bound to hosts (the manifest's
	// capabilities.locality: host), has one entry per placement host of
	// the manifest, in its order: what waits for a worker on that host.
	Hosts []WorkerHost `json:"hosts,omitempty"`
}

// WorkerHost is one placement host of a host-bound pool: its durable's
// commands and the live workers on it. Commands pending on a host with
// no live worker wait for one (a destroy of a sandbox built there).
type WorkerHost struct {
	Host string `json:"host"`
	// LiveWorkers counts the pool's live workers whose heartbeat names
	// this host.
	LiveWorkers int    `json:"live_workers"`
	Pending     uint64 `json:"pending"`
	InFlight    int    `json:"in_flight"`
	// QueueError, when set, says why Pending and InFlight could not be
	// read (they are 0 then).
	QueueError string `json:"queue_error,omitempty"`
}

// Worker is one live worker of a pool, as its last heartbeat says.
type Worker struct {
	Worker string `json:"worker"`
	Host   string `json:"host"`
	PID    int    `json:"pid"`
	// Concurrency is how many commands the worker handles at once;
	// InFlight how many it was handling when it last beat.
	Concurrency int       `json:"concurrency"`
	InFlight    int       `json:"in_flight"`
	StartedAt   time.Time `json:"started_at"`
	SeenAt      time.Time `json:"seen_at"`
}
