package bus

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// ConsumerSpec is one durable consumer of the design. Setup creates it;
// the services only use it.
type ConsumerSpec struct {
	// Stream and Name name the consumer.
	Stream, Name string
	// Filters are its filter subjects; one or more.
	Filters []string
	// Policy is its delivery policy.
	Policy ConsumerPolicy
	// Description says what it is for.
	Description string
}

// Config is the server configuration of c: a pull consumer with explicit
// acks, delivering from the start of the stream.
func (c ConsumerSpec) Config() jetstream.ConsumerConfig {
	p := c.Policy.WithDefaults()
	desc := c.Description
	if desc == "" {
		desc = "sand-boxer " + c.Name
	}
	cfg := jetstream.ConsumerConfig{
		Durable:       c.Name,
		Description:   desc,
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       p.AckWait,
		MaxDeliver:    p.MaxDeliver,
		MaxAckPending: p.MaxAckPending,
		DeliverPolicy: jetstream.DeliverAllPolicy,
	}
	if len(c.Filters) == 1 {
		cfg.FilterSubject = c.Filters[0]
	} else {
		cfg.FilterSubjects = c.Filters
	}
	return cfg
}

// Action is what setup did, or would not do, to one stream, bucket or
// consumer.
type Action string

// Actions.
const (
	ActionCreated   Action = "created"
	ActionUpdated   Action = "updated"
	ActionUnchanged Action = "unchanged"
	// ActionRefused is a change setup would not make without Force: it
	// would lower replicas or keep less of a stream.
	ActionRefused Action = "refused"
)

// Change is one line of a setup report.
type Change struct {
	// Kind is stream, bucket or consumer.
	Kind   string `json:"kind"`
	Name   string `json:"name"`
	Action Action `json:"action"`
	// Detail says what differs, for updated and refused changes.
	Detail string `json:"detail,omitempty"`
}

// Report is what one setup did.
type Report []Change

// Refused lists the changes setup would not make.
func (r Report) Refused() []Change {
	var out []Change
	for _, c := range r {
		if c.Action == ActionRefused {
			out = append(out, c)
		}
	}
	return out
}

// ErrRefused is wrapped by the error Setup returns when it left a stream
// or bucket as it was rather than lower its replicas or keep less.
var ErrRefused = errors.New("setup refused changes that would lower replicas or keep less")

// SetupOptions tunes [Setup].
type SetupOptions struct {
	// Consumers are the durable consumers to create or update.
	Consumers []ConsumerSpec
	// Force makes changes setup otherwise refuses: fewer replicas, less
	// retention, another retention policy or storage.
	Force bool
}

// Setup creates or updates every stream, bucket and consumer of t and o.
// It is the one step that declares the bus; it needs an identity allowed
// to manage streams (auth.RoleAdmin), and services never call it.
//
// It never lowers the replicas of an existing stream or bucket, nor makes
// it keep less (a shorter age, fewer messages or bytes, a smaller history,
// another retention policy or storage): such a difference is reported as
// [ActionRefused], the stream is left as it is, and the error wraps
// [ErrRefused], unless o.Force. Every other difference is applied.
// Running it again changes nothing.
func (t Topology) Setup(ctx context.Context, js jetstream.JetStream, o SetupOptions) (Report, error) {
	var rep Report
	for _, cfg := range t.Streams() {
		c, err := setupStream(ctx, js, cfg, o.Force)
		if err != nil {
			return rep, err
		}
		c.Kind = "stream"
		rep = append(rep, c)
	}
	for _, cfg := range t.Buckets() {
		c, err := setupBucket(ctx, js, cfg, o.Force)
		if err != nil {
			return rep, err
		}
		rep = append(rep, c)
	}
	// On a cluster, the servers learn of a new or changed stream's
	// direct-get responders a moment after the change: wait, so that the
	// migration below and whoever reads after setup find them.
	if err := awaitDirectGets(ctx, js, t.streamNames()); err != nil {
		return rep, err
	}
	// Messages of an earlier version's subjects move first, while the
	// durables still filter on them; then the durables take today's
	// filters and resume where they were.
	moved, resumes, err := migrate(ctx, js)
	if err != nil {
		return rep, err
	}
	rep = append(rep, moved...)
	if c, err := migrateLedger(ctx, js); err != nil {
		return rep, err
	} else if c != nil {
		rep = append(rep, *c)
	}
	for _, spec := range o.Consumers {
		c, err := setupConsumer(ctx, js, spec)
		if err != nil {
			return rep, err
		}
		rep = append(rep, c)
	}
	for _, r := range resumes {
		if err := r.apply(ctx, js); err != nil {
			return rep, err
		}
	}
	if r := rep.Refused(); len(r) > 0 {
		var names []string
		for _, c := range r {
			names = append(names, c.Kind+" "+c.Name+" ("+c.Detail+")")
		}
		return rep, fmt.Errorf("%w: %s; nothing of them was changed (--force changes them)", ErrRefused, strings.Join(names, "; "))
	}
	return rep, nil
}

// streamNames are the names of every stream of t, the buckets' included.
func (t Topology) streamNames() []string {
	var names []string
	for _, cfg := range t.Streams() {
		names = append(names, cfg.Name)
	}
	for _, cfg := range t.Buckets() {
		names = append(names, KVStream(cfg.Bucket))
	}
	return names
}

// directGetTimeout bounds how long setup waits for a stream's direct gets.
const directGetTimeout = 10 * time.Second

// awaitDirectGets waits until the server js is connected to routes both
// forms of direct get ($JS.API.DIRECT.GET.<stream> and the one naming a
// subject) of every stream of names that allows them to a responder: any
// answer, a message or a status, will do; "no responders" will not.
func awaitDirectGets(ctx context.Context, js jetstream.JetStream, names []string) error {
	ctx, cancel := context.WithTimeout(ctx, directGetTimeout)
	defer cancel()
	tick := time.NewTicker(25 * time.Millisecond)
	defer tick.Stop()
	nc := js.Conn()
	for _, name := range names {
		s, err := js.Stream(ctx, name)
		if err != nil {
			return fmt.Errorf("reading stream %s: %w", name, err)
		}
		cfg := s.CachedInfo().Config
		if !cfg.AllowDirect || len(cfg.Subjects) == 0 {
			continue
		}
		for _, subj := range []string{"$JS.API.DIRECT.GET." + name, "$JS.API.DIRECT.GET." + name + "." + cfg.Subjects[0]} {
			for {
				_, err := nc.RequestWithContext(ctx, subj, []byte(`{"seq":1}`))
				if err == nil {
					break
				}
				if !errors.Is(err, nats.ErrNoResponders) {
					return fmt.Errorf("awaiting direct gets of stream %s: %w", name, err)
				}
				select {
				case <-ctx.Done():
					return fmt.Errorf("awaiting direct gets of stream %s: %w", name, ctx.Err())
				case <-tick.C:
				}
			}
		}
	}
	return nil
}

func setupStream(ctx context.Context, js jetstream.JetStream, cfg jetstream.StreamConfig, force bool) (Change, error) {
	s, err := js.Stream(ctx, cfg.Name)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		if _, err := js.CreateStream(ctx, cfg); err != nil {
			return Change{}, fmt.Errorf("creating stream %s: %w", cfg.Name, err)
		}
		return Change{Name: cfg.Name, Action: ActionCreated}, nil
	}
	if err != nil {
		return Change{}, fmt.Errorf("reading stream %s: %w", cfg.Name, err)
	}
	have := s.CachedInfo().Config
	if losing := keepsLess(have, cfg); len(losing) > 0 && !force {
		return Change{Name: cfg.Name, Action: ActionRefused, Detail: strings.Join(losing, ", ")}, nil
	}
	if diff := streamDiff(have, cfg); len(diff) > 0 {
		if _, err := js.UpdateStream(ctx, cfg); err != nil {
			return Change{}, fmt.Errorf("updating stream %s (%s): %w", cfg.Name, strings.Join(diff, ", "), err)
		}
		return Change{Name: cfg.Name, Action: ActionUpdated, Detail: strings.Join(diff, ", ")}, nil
	}
	return Change{Name: cfg.Name, Action: ActionUnchanged}, nil
}

func setupBucket(ctx context.Context, js jetstream.JetStream, cfg jetstream.KeyValueConfig, force bool) (Change, error) {
	c := Change{Kind: "bucket", Name: cfg.Bucket}
	s, err := js.Stream(ctx, KVStream(cfg.Bucket))
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		kv, err := js.CreateKeyValue(ctx, cfg)
		if err != nil {
			return Change{}, fmt.Errorf("creating bucket %s: %w", cfg.Bucket, err)
		}
		if atomicBucket(cfg.Bucket) {
			// KeyValueConfig cannot say it: the bucket's stream is
			// updated to take atomic batches right after.
			s, err := js.Stream(ctx, KVStream(kv.Bucket()))
			if err != nil {
				return Change{}, fmt.Errorf("reading bucket %s: %w", cfg.Bucket, err)
			}
			want := s.CachedInfo().Config
			want.AllowAtomicPublish = true
			if _, err := js.UpdateStream(ctx, want); err != nil {
				return Change{}, fmt.Errorf("creating bucket %s: allowing atomic publish: %w", cfg.Bucket, err)
			}
		}
		c.Action = ActionCreated
		return c, nil
	}
	if err != nil {
		return Change{}, fmt.Errorf("reading bucket %s: %w", cfg.Bucket, err)
	}
	have := s.CachedInfo().Config
	want := have
	want.Replicas = cfg.Replicas
	want.MaxAge = cfg.TTL
	want.MaxMsgsPerSubject = int64(max(cfg.History, 1))
	want.Description = cfg.Description
	want.SubjectDeleteMarkerTTL = cfg.LimitMarkerTTL
	if cfg.LimitMarkerTTL > 0 {
		want.AllowMsgTTL = true
	}
	if cfg.Storage != have.Storage {
		want.Storage = cfg.Storage
	}
	want.AllowAtomicPublish = atomicBucket(cfg.Bucket)
	if losing := keepsLess(have, want); len(losing) > 0 && !force {
		c.Action, c.Detail = ActionRefused, strings.Join(losing, ", ")
		return c, nil
	}
	if diff := streamDiff(have, want); len(diff) > 0 && want.AllowAtomicPublish {
		// UpdateKeyValue would turn atomic publish off: the stream's own
		// configuration, changed, is written instead.
		if want.Storage != have.Storage {
			return Change{}, fmt.Errorf("updating bucket %s (%s): a stream's storage cannot change in place", cfg.Bucket, strings.Join(diff, ", "))
		}
		if _, err := js.UpdateStream(ctx, want); err != nil {
			return Change{}, fmt.Errorf("updating bucket %s (%s): %w", cfg.Bucket, strings.Join(diff, ", "), err)
		}
		c.Action, c.Detail = ActionUpdated, strings.Join(diff, ", ")
		return c, nil
	}
	if diff := streamDiff(have, want); len(diff) > 0 {
		if _, err := js.UpdateKeyValue(ctx, cfg); err != nil {
			return Change{}, fmt.Errorf("updating bucket %s (%s): %w", cfg.Bucket, strings.Join(diff, ", "), err)
		}
		c.Action, c.Detail = ActionUpdated, strings.Join(diff, ", ")
		return c, nil
	}
	c.Action = ActionUnchanged
	return c, nil
}

func setupConsumer(ctx context.Context, js jetstream.JetStream, spec ConsumerSpec) (Change, error) {
	c := Change{Kind: "consumer", Name: spec.Stream + "/" + spec.Name}
	want := spec.Config()
	cons, err := js.Consumer(ctx, spec.Stream, spec.Name)
	switch {
	case errors.Is(err, jetstream.ErrConsumerNotFound):
		if _, err := js.CreateConsumer(ctx, spec.Stream, want); err != nil {
			return Change{}, fmt.Errorf("creating consumer %s: %w", c.Name, err)
		}
		c.Action = ActionCreated
		return c, nil
	case err != nil:
		return Change{}, fmt.Errorf("reading consumer %s: %w", c.Name, err)
	}
	have := cons.CachedInfo().Config
	var diff []string
	if have.AckWait != want.AckWait {
		diff = append(diff, fmt.Sprintf("ack_wait %s -> %s", have.AckWait, want.AckWait))
	}
	if have.MaxDeliver != want.MaxDeliver {
		diff = append(diff, fmt.Sprintf("max_deliver %d -> %d", have.MaxDeliver, want.MaxDeliver))
	}
	if have.MaxAckPending != want.MaxAckPending {
		diff = append(diff, fmt.Sprintf("max_ack_pending %d -> %d", have.MaxAckPending, want.MaxAckPending))
	}
	if !slices.Equal(filtersOf(have), filtersOf(want)) {
		diff = append(diff, fmt.Sprintf("filters %v -> %v", filtersOf(have), filtersOf(want)))
	}
	if have.Description != want.Description {
		diff = append(diff, "description")
	}
	if len(diff) == 0 {
		c.Action = ActionUnchanged
		return c, nil
	}
	if _, err := js.UpdateConsumer(ctx, spec.Stream, want); err != nil {
		return Change{}, fmt.Errorf("updating consumer %s (%s): %w", c.Name, strings.Join(diff, ", "), err)
	}
	c.Action, c.Detail = ActionUpdated, strings.Join(diff, ", ")
	return c, nil
}

func filtersOf(c jetstream.ConsumerConfig) []string {
	f := slices.Clone(c.FilterSubjects)
	if c.FilterSubject != "" {
		f = append(f, c.FilterSubject)
	}
	slices.Sort(f)
	return f
}

// keepsLess lists how want would make a stream configured as have hold
// less, or less safely: fewer replicas, a shorter age, lower limits, a
// smaller history, another retention policy or storage. A limit of 0 or
// less means none.
func keepsLess(have, want jetstream.StreamConfig) []string {
	var out []string
	if want.Replicas < have.Replicas {
		out = append(out, fmt.Sprintf("replicas %d -> %d", have.Replicas, want.Replicas))
	}
	if lower(have.MaxAge, want.MaxAge) {
		out = append(out, fmt.Sprintf("max_age %s -> %s", age(have.MaxAge), age(want.MaxAge)))
	}
	if lower(have.MaxMsgs, want.MaxMsgs) {
		out = append(out, fmt.Sprintf("max_msgs %d -> %d", have.MaxMsgs, want.MaxMsgs))
	}
	if lower(have.MaxBytes, want.MaxBytes) {
		out = append(out, fmt.Sprintf("max_bytes %d -> %d", have.MaxBytes, want.MaxBytes))
	}
	if lower(have.MaxMsgsPerSubject, want.MaxMsgsPerSubject) {
		out = append(out, fmt.Sprintf("max_msgs_per_subject %d -> %d", have.MaxMsgsPerSubject, want.MaxMsgsPerSubject))
	}
	if want.Retention != have.Retention {
		out = append(out, fmt.Sprintf("retention %s -> %s", have.Retention, want.Retention))
	}
	if want.Storage != have.Storage {
		out = append(out, fmt.Sprintf("storage %s -> %s", have.Storage, want.Storage))
	}
	return out
}

// lower reports whether limit want is stricter than have; 0 or less is
// no limit.
func lower[T int64 | time.Duration](have, want T) bool {
	if want <= 0 {
		return false
	}
	return have <= 0 || want < have
}

func age(d time.Duration) string {
	if d <= 0 {
		return "forever"
	}
	return d.String()
}

// streamDiff lists the differences setup manages between two stream
// configurations.
func streamDiff(have, want jetstream.StreamConfig) []string {
	var out []string
	add := func(cond bool, format string, args ...any) {
		if cond {
			out = append(out, fmt.Sprintf(format, args...))
		}
	}
	add(have.Replicas != want.Replicas, "replicas %d -> %d", have.Replicas, want.Replicas)
	add(have.MaxAge != want.MaxAge, "max_age %s -> %s", age(have.MaxAge), age(want.MaxAge))
	add(have.MaxMsgs != want.MaxMsgs && !(have.MaxMsgs <= 0 && want.MaxMsgs <= 0), "max_msgs %d -> %d", have.MaxMsgs, want.MaxMsgs)
	add(have.MaxBytes != want.MaxBytes && !(have.MaxBytes <= 0 && want.MaxBytes <= 0), "max_bytes %d -> %d", have.MaxBytes, want.MaxBytes)
	add(have.MaxMsgsPerSubject != want.MaxMsgsPerSubject && !(have.MaxMsgsPerSubject <= 0 && want.MaxMsgsPerSubject <= 0),
		"max_msgs_per_subject %d -> %d", have.MaxMsgsPerSubject, want.MaxMsgsPerSubject)
	add(have.Retention != want.Retention, "retention %s -> %s", have.Retention, want.Retention)
	add(have.Storage != want.Storage, "storage %s -> %s", have.Storage, want.Storage)
	add(have.Discard != want.Discard, "discard %s -> %s", have.Discard, want.Discard)
	add(have.Duplicates != want.Duplicates && want.Duplicates > 0, "duplicates %s -> %s", have.Duplicates, want.Duplicates)
	add(!slices.Equal(sorted(have.Subjects), sorted(want.Subjects)), "subjects %v -> %v", have.Subjects, want.Subjects)
	add(have.AllowDirect != want.AllowDirect, "allow_direct %v -> %v", have.AllowDirect, want.AllowDirect)
	add(have.AllowMsgSchedules != want.AllowMsgSchedules, "allow_msg_schedules %v -> %v", have.AllowMsgSchedules, want.AllowMsgSchedules)
	add(have.AllowRollup != want.AllowRollup, "allow_rollup %v -> %v", have.AllowRollup, want.AllowRollup)
	add(have.AllowMsgTTL != want.AllowMsgTTL, "allow_msg_ttl %v -> %v", have.AllowMsgTTL, want.AllowMsgTTL)
	add(have.AllowAtomicPublish != want.AllowAtomicPublish, "allow_atomic %v -> %v", have.AllowAtomicPublish, want.AllowAtomicPublish)
	add(have.SubjectDeleteMarkerTTL != want.SubjectDeleteMarkerTTL, "subject_delete_marker_ttl %s -> %s", have.SubjectDeleteMarkerTTL, want.SubjectDeleteMarkerTTL)
	add(have.Description != want.Description, "description")
	return out
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}
