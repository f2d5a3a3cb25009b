package bus

import (
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/event"
)

// Key-value bucket names.
const (
	BucketCatalog     = "catalog"
	BucketCredits     = "credits"
	BucketWorkers     = "workers"
	BucketAPIKeys     = "apikeys"
	BucketIdempotency = "idempotency"
)

// LedgerPrefix starts the keys of ledger entries in the credits bucket:
// ledger.<consumer>.<derivation of the cause>. The ledger lives in the
// same stream as the accounts so that one atomic batch commits both.
const LedgerPrefix = "ledger."

// atomicBucket reports whether bucket's stream takes atomic batch
// publishes (AllowAtomicPublish): the credits bucket, where metering
// commits an account change, its ledger entries and its holds as one.
func atomicBucket(bucket string) bool { return bucket == BucketCredits }

// KVStream is the stream behind bucket: KV_<bucket>.
func KVStream(bucket string) string { return "KV_" + bucket }

// Durable consumers of the design, created by setup ([Setup]) and only
// used by the services.
const (
	// DurableRegistry is the registry's consumer of the lifecycle stream.
	DurableRegistry = "registry"
	// DurableRegistryTimers is the registry's consumer of fired expiries.
	DurableRegistryTimers = "registry-timers"
	// DurableMetering is metering's consumer of the lifecycle stream.
	DurableMetering = "metering"
	// DurableMeteringAccrual is metering's consumer of accrual ticks.
	DurableMeteringAccrual = "metering-accrual"
)

// DurableProvisioner is the durable consumer every worker of extension's
// pool shares on the commands stream: provisioner-<extension>.
func DurableProvisioner(extension string) string { return "provisioner-" + extension }

// DurableProvisionerHost is the durable consumer of the commands bound to
// one placement host of a placement: host pool, shared by the workers on
// that host: provisioner-<extension>@<host>. Setup creates one for each
// host of the manifest; a command bound to a host waits in it, durably,
// until a worker of that host takes it.
func DurableProvisionerHost(extension, host string) string {
	return "provisioner-" + extension + "@" + host
}

// Topology sizes the streams and buckets of the design. The zero value is
// the single-machine default; a three-node cluster sets Replicas to 3.
type Topology struct {
	// Replicas of every stream and bucket. Default 1.
	Replicas int
	// MemoryStorage keeps everything in memory (tests, benchmarks of the
	// bus alone). Default file storage.
	MemoryStorage bool
	// CommandsMaxMsgs bounds the commands stream; a publish beyond it is
	// refused (discard new), which is back-pressure, never silent loss.
	// Default 100,000.
	CommandsMaxMsgs int64
	// LifecycleMaxAge is how long lifecycle events are kept. Default 90 days.
	LifecycleMaxAge time.Duration
	// MeteringMaxAge is how long metering events are kept. Default 400 days.
	MeteringMaxAge time.Duration
	// DLQMaxAge is how long dead letters are kept. Default 30 days.
	DLQMaxAge time.Duration
	// Duplicates is the de-duplication window of every stream. Default 2m.
	Duplicates time.Duration
	// WorkerTTL is how long a worker heartbeat lives. Default 30s.
	WorkerTTL time.Duration
	// IdempotencyTTL is how long an Idempotency-Key is remembered. Default 24h.
	IdempotencyTTL time.Duration
}

func (t Topology) withDefaults() Topology {
	if t.Replicas <= 0 {
		t.Replicas = 1
	}
	if t.CommandsMaxMsgs <= 0 {
		t.CommandsMaxMsgs = 100_000
	}
	if t.LifecycleMaxAge <= 0 {
		t.LifecycleMaxAge = 90 * 24 * time.Hour
	}
	if t.MeteringMaxAge <= 0 {
		t.MeteringMaxAge = 400 * 24 * time.Hour
	}
	if t.DLQMaxAge <= 0 {
		t.DLQMaxAge = 30 * 24 * time.Hour
	}
	if t.Duplicates <= 0 {
		t.Duplicates = 2 * time.Minute
	}
	if t.WorkerTTL <= 0 {
		t.WorkerTTL = 30 * time.Second
	}
	if t.IdempotencyTTL <= 0 {
		t.IdempotencyTTL = 24 * time.Hour
	}
	return t
}

func (t Topology) storage() jetstream.StorageType {
	if t.MemoryStorage {
		return jetstream.MemoryStorage
	}
	return jetstream.FileStorage
}

// Streams returns the stream configurations of the design.
func (t Topology) Streams() []jetstream.StreamConfig {
	t = t.withDefaults()
	st := t.storage()
	return []jetstream.StreamConfig{
		{
			Name:        event.StreamCommands,
			Description: "sandbox create and destroy commands, one durable work-queue consumer per extension",
			Subjects:    []string{event.SubjectCommands},
			Retention:   jetstream.WorkQueuePolicy,
			Discard:     jetstream.DiscardNew,
			MaxMsgs:     t.CommandsMaxMsgs,
			// Setup reads commands by subject (a migration); no service may.
			AllowDirect: true,
			Storage:     st,
			Replicas:    t.Replicas,
			Duplicates:  t.Duplicates,
		},
		{
			Name:        event.StreamLifecycle,
			Description: "sandbox lifecycle events",
			Subjects:    []string{event.SubjectLifecycle},
			Retention:   jetstream.LimitsPolicy,
			MaxAge:      t.LifecycleMaxAge,
			// Workers read one sandbox's last event by subject.
			AllowDirect: true,
			Storage:     st,
			Replicas:    t.Replicas,
			Duplicates:  t.Duplicates,
		},
		{
			Name:        event.StreamMetering,
			Description: "credits and usage events for billing consumers",
			Subjects:    []string{event.SubjectMetering},
			Retention:   jetstream.LimitsPolicy,
			MaxAge:      t.MeteringMaxAge,
			// Tenants read their own account's events by subject.
			AllowDirect: true,
			Storage:     st,
			Replicas:    t.Replicas,
			Duplicates:  t.Duplicates,
		},
		{
			Name:        event.StreamDLQ,
			Description: "messages that exhausted their deliveries, with the reason",
			Subjects:    []string{event.SubjectDLQ},
			Retention:   jetstream.LimitsPolicy,
			MaxAge:      t.DLQMaxAge,
			Storage:     st,
			Replicas:    t.Replicas,
			Duplicates:  t.Duplicates,
		},
		{
			// Message schedules cannot live on a discard-new stream, so timers
			// get their own: a schedule sits on sandboxer.timer.schedule.<id>
			// (one per subject, rolled up) until it fires onto
			// sandboxer.timer.fire.<id>, which the registry consumes. Work-queue
			// retention removes a fired timer once it is handled. A schedule
			// is cancelled by a marker that rolls its subject up and expires
			// a second later (CancelSchedule): per-message TTLs.
			Name:              event.StreamTimers,
			Description:       "scheduled timers: sandbox expiry",
			Subjects:          []string{event.SubjectTimers},
			Retention:         jetstream.WorkQueuePolicy,
			Discard:           jetstream.DiscardOld,
			Storage:           st,
			Replicas:          t.Replicas,
			Duplicates:        t.Duplicates,
			AllowMsgSchedules: true,
			AllowRollup:       true,
			AllowMsgTTL:       true,
		},
	}
}

// Buckets returns the key-value bucket configurations of the design.
func (t Topology) Buckets() []jetstream.KeyValueConfig {
	t = t.withDefaults()
	st := t.storage()
	return []jetstream.KeyValueConfig{
		{Bucket: BucketCatalog, Description: "validated extension manifests and profiles", History: 5, Storage: st, Replicas: t.Replicas},
		{Bucket: BucketCredits, Description: "credit accounts, holds, usage records and the append-only ledger keyed by causing event", History: 1, Storage: st, Replicas: t.Replicas},
		{Bucket: BucketWorkers, Description: "worker heartbeats", History: 1, TTL: t.WorkerTTL, Storage: st, Replicas: t.Replicas},
		{Bucket: BucketAPIKeys, Description: "hashed API keys to consumer and role", History: 1, Storage: st, Replicas: t.Replicas},
		{Bucket: BucketIdempotency, Description: "Idempotency-Key to sandbox id", History: 1, TTL: t.IdempotencyTTL, Storage: st, Replicas: t.Replicas},
	}
}

// ConsumerPolicy is the delivery policy of a durable consumer.
type ConsumerPolicy struct {
	// AckWait is how long a delivery may go without ack or heartbeat before
	// it is redelivered. Default 30s.
	AckWait time.Duration
	// MaxDeliver bounds deliveries; the last failure goes to the dead-letter
	// stream. Default 5; -1 never gives up.
	MaxDeliver int
	// Backoff is the delay before redelivery after the n-th failure; the
	// last entry repeats. Default 1s, 5s, 15s, 30s.
	Backoff []time.Duration
	// MaxAckPending caps deliveries in flight across every instance sharing
	// the consumer: the concurrency of a worker pool. Default 64.
	MaxAckPending int
}

// WithDefaults fills the zero fields of p.
func (p ConsumerPolicy) WithDefaults() ConsumerPolicy {
	if p.AckWait <= 0 {
		p.AckWait = 30 * time.Second
	}
	if p.MaxDeliver == 0 {
		p.MaxDeliver = 5
	}
	if len(p.Backoff) == 0 {
		p.Backoff = []time.Duration{time.Second, 5 * time.Second, 15 * time.Second, 30 * time.Second}
	}
	if p.MaxAckPending <= 0 {
		p.MaxAckPending = 64
	}
	return p
}

// Delay returns the redelivery delay after the n-th delivery failed.
func (p ConsumerPolicy) Delay(delivered uint64) time.Duration {
	if len(p.Backoff) == 0 {
		return 0
	}
	i := int(delivered) - 1
	if i < 0 {
		i = 0
	}
	if i >= len(p.Backoff) {
		i = len(p.Backoff) - 1
	}
	return p.Backoff[i]
}

// EnsureConsumer creates or updates the durable pull consumer name on
// stream, filtered on filter, with explicit acks and policy p, as
// [Topology.Setup] does for its consumers. It needs an identity allowed to
// manage consumers: setup and tests, never a service.
func EnsureConsumer(ctx context.Context, js jetstream.JetStream, stream, name, filter string, p ConsumerPolicy) (jetstream.Consumer, error) {
	return EnsureConsumerFilters(ctx, js, stream, name, []string{filter}, p)
}

// EnsureConsumerFilters is [EnsureConsumer] with several filter subjects.
func EnsureConsumerFilters(ctx context.Context, js jetstream.JetStream, stream, name string, filters []string, p ConsumerPolicy) (jetstream.Consumer, error) {
	return EnsureSpec(ctx, js, ConsumerSpec{Stream: stream, Name: name, Filters: filters, Policy: p})
}

// EnsureSpec creates or updates the consumer spec describes.
func EnsureSpec(ctx context.Context, js jetstream.JetStream, spec ConsumerSpec) (jetstream.Consumer, error) {
	if _, err := setupConsumer(ctx, js, spec); err != nil {
		return nil, err
	}
	c, err := js.Consumer(ctx, spec.Stream, spec.Name)
	if err != nil {
		return nil, fmt.Errorf("reading consumer %s on %s: %w", spec.Name, spec.Stream, err)
	}
	return c, nil
}
