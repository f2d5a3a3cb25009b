package bus_test

import (
	"errors"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
)

// TestSetupIsIdempotent runs Setup again on a server natstest already
// declared the topology on: nothing is re-created, no configuration
// changes, the report says so, and stored messages and keys stay.
func TestSetupIsIdempotent(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	js := srv.JetStream(t)
	ctx := testCtx(t)
	top := bus.Topology{}

	if _, err := bus.NewPublisher(js).Publish(ctx, event.LifecycleSubject("dev", "local", "sbx-1", event.StateReady), readyEvent(t, "sbx-1")); err != nil {
		t.Fatal(err)
	}
	kv, err := js.KeyValue(ctx, bus.BucketCatalog)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, "sbx-1", []byte(`{"state":"ready"}`)); err != nil {
		t.Fatal(err)
	}

	before := map[string]*jetstream.StreamInfo{}
	for _, cfg := range top.Streams() {
		s, err := js.Stream(ctx, cfg.Name)
		if err != nil {
			t.Fatalf("stream %s missing after Ensure: %v", cfg.Name, err)
		}
		before[cfg.Name] = s.CachedInfo()
	}
	for i := range 2 {
		rep, err := top.Setup(ctx, js, bus.SetupOptions{})
		if err != nil {
			t.Fatalf("Setup #%d: %v", i+2, err)
		}
		for _, c := range rep {
			if c.Action != bus.ActionUnchanged {
				t.Errorf("Setup #%d: %s %s %s (%s), want unchanged", i+2, c.Kind, c.Name, c.Action, c.Detail)
			}
		}
	}
	for _, cfg := range top.Streams() {
		s, err := js.Stream(ctx, cfg.Name)
		if err != nil {
			t.Fatal(err)
		}
		after := s.CachedInfo()
		if !after.Created.Equal(before[cfg.Name].Created) {
			t.Errorf("stream %s re-created", cfg.Name)
		}
		if !reflect.DeepEqual(after.Config, before[cfg.Name].Config) {
			t.Errorf("stream %s config changed:\n%+v\n%+v", cfg.Name, before[cfg.Name].Config, after.Config)
		}
	}
	if info := before[event.StreamLifecycle]; info.State.Msgs != 1 {
		t.Errorf("lifecycle stream held %d before, want 1", info.State.Msgs)
	}
	s, err := js.Stream(ctx, event.StreamLifecycle)
	if err != nil {
		t.Fatal(err)
	}
	if s.CachedInfo().State.Msgs != 1 {
		t.Errorf("lifecycle stream holds %d after Ensure, want 1", s.CachedInfo().State.Msgs)
	}
	for _, b := range top.Buckets() {
		if _, err := js.KeyValue(ctx, b.Bucket); err != nil {
			t.Errorf("bucket %s: %v", b.Bucket, err)
		}
	}
	if e, err := kv.Get(ctx, "sbx-1"); err != nil || string(e.Value()) != `{"state":"ready"}` {
		t.Errorf("sandboxes key after Ensure: %v %v", e, err)
	}

	maxMsgs := func() int64 {
		cs, err := js.Stream(ctx, event.StreamCommands)
		if err != nil {
			t.Fatal(err)
		}
		return cs.CachedInfo().Config.MaxMsgs
	}
	// Setup applies what keeps more.
	rep, err := (bus.Topology{CommandsMaxMsgs: 200_000}).Setup(ctx, js, bus.SetupOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if n := maxMsgs(); n != 200_000 {
		t.Errorf("commands MaxMsgs = %d after raising it, want 200000 (%+v)", n, rep)
	}
	// It refuses what keeps less, says so, and changes nothing...
	rep, err = (bus.Topology{CommandsMaxMsgs: 10}).Setup(ctx, js, bus.SetupOptions{})
	if !errors.Is(err, bus.ErrRefused) {
		t.Fatalf("lowering MaxMsgs: %v, want ErrRefused", err)
	}
	if r := rep.Refused(); len(r) != 1 || r[0].Name != event.StreamCommands || !strings.Contains(r[0].Detail, "max_msgs 200000 -> 10") {
		t.Errorf("refused %+v, want the commands stream's max_msgs", r)
	}
	if n := maxMsgs(); n != 200_000 {
		t.Errorf("commands MaxMsgs = %d after a refused setup, want 200000", n)
	}
	// ...unless forced.
	if _, err := (bus.Topology{CommandsMaxMsgs: 10}).Setup(ctx, js, bus.SetupOptions{Force: true}); err != nil {
		t.Fatal(err)
	}
	if n := maxMsgs(); n != 10 {
		t.Errorf("commands MaxMsgs = %d after a forced setup, want 10", n)
	}
}

func TestTopologyDesign(t *testing.T) {
	t.Parallel()
	streams := map[string]jetstream.StreamConfig{}
	var subjects []string
	for _, s := range (bus.Topology{}).Streams() {
		streams[s.Name] = s
		for _, subj := range s.Subjects {
			if slices.Contains(subjects, subj) {
				t.Errorf("subject %s captured twice", subj)
			}
			subjects = append(subjects, subj)
		}
		if s.Replicas != 1 || s.Storage != jetstream.FileStorage || s.Duplicates != 2*time.Minute {
			t.Errorf("%s: replicas %d storage %v duplicates %s, want 1, file, 2m", s.Name, s.Replicas, s.Storage, s.Duplicates)
		}
	}
	cmd := streams[event.StreamCommands]
	if cmd.Retention != jetstream.WorkQueuePolicy || cmd.Discard != jetstream.DiscardNew || cmd.MaxMsgs != 100_000 {
		t.Errorf("commands stream %+v: want a bounded discard-new work queue", cmd)
	}
	for name, age := range map[string]time.Duration{
		event.StreamLifecycle: 90 * 24 * time.Hour,
		event.StreamMetering:  400 * 24 * time.Hour,
		event.StreamDLQ:       30 * 24 * time.Hour,
	} {
		if s := streams[name]; s.Retention != jetstream.LimitsPolicy || s.MaxAge != age {
			t.Errorf("%s: retention %v max age %s, want limits and %s", name, s.Retention, s.MaxAge, age)
		}
	}
	if tm := streams[event.StreamTimers]; !tm.AllowMsgSchedules || !tm.AllowRollup || tm.Retention != jetstream.WorkQueuePolicy {
		t.Errorf("timers stream %+v: want schedules, rollup and work-queue retention", tm)
	}

	big := bus.Topology{Replicas: 3, MemoryStorage: true, CommandsMaxMsgs: 7, Duplicates: time.Second}
	for _, s := range big.Streams() {
		if s.Replicas != 3 || s.Storage != jetstream.MemoryStorage || s.Duplicates != time.Second {
			t.Errorf("%s ignores the topology: %+v", s.Name, s)
		}
	}
	for _, b := range big.Buckets() {
		if b.Replicas != 3 || b.Storage != jetstream.MemoryStorage {
			t.Errorf("bucket %s ignores the topology: %+v", b.Bucket, b)
		}
	}
	ttls := map[string]time.Duration{}
	for _, b := range (bus.Topology{}).Buckets() {
		ttls[b.Bucket] = b.TTL
	}
	if ttls[bus.BucketWorkers] != 30*time.Second || ttls[bus.BucketIdempotency] != 24*time.Hour || ttls[bus.BucketCatalog] != 0 {
		t.Errorf("bucket TTLs %v", ttls)
	}
}

func TestEnsureConsumerIsIdempotent(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	js := srv.JetStream(t)
	ctx := testCtx(t)
	c1, err := bus.EnsureConsumer(ctx, js, event.StreamCommands, "local", event.CommandFilter("local"), testPolicy)
	if err != nil {
		t.Fatal(err)
	}
	c2, err := bus.EnsureConsumer(ctx, js, event.StreamCommands, "local", event.CommandFilter("local"), testPolicy)
	if err != nil {
		t.Fatal(err)
	}
	i1, i2 := c1.CachedInfo(), c2.CachedInfo()
	if !i1.Created.Equal(i2.Created) || !reflect.DeepEqual(i1.Config, i2.Config) {
		t.Errorf("second EnsureConsumer changed the consumer:\n%+v\n%+v", i1.Config, i2.Config)
	}
	cfg := i2.Config
	if cfg.Durable != "local" || cfg.FilterSubject != "sandboxer.cmd.local.>" || cfg.AckPolicy != jetstream.AckExplicitPolicy ||
		cfg.AckWait != time.Second || cfg.MaxDeliver != 3 || cfg.MaxAckPending != 64 {
		t.Errorf("consumer config %+v", cfg)
	}

	updated := testPolicy
	updated.MaxDeliver = 7
	c3, err := bus.EnsureConsumer(ctx, js, event.StreamCommands, "local", event.CommandFilter("local"), updated)
	if err != nil {
		t.Fatal(err)
	}
	if c3.CachedInfo().Config.MaxDeliver != 7 || !c3.CachedInfo().Created.Equal(i1.Created) {
		t.Errorf("update gave %+v", c3.CachedInfo())
	}

	// Two extensions' consumers share the work-queue stream without
	// overlapping.
	if _, err := bus.EnsureConsumer(ctx, js, event.StreamCommands, "compose-ssh", event.CommandFilter("compose-ssh"), testPolicy); err != nil {
		t.Errorf("a second extension's consumer: %v", err)
	}
	if _, err := bus.EnsureConsumer(ctx, js, "NOPE", "x", "x.>", testPolicy); err == nil {
		t.Error("EnsureConsumer on a missing stream succeeded")
	}
}

func TestConsumerPolicy(t *testing.T) {
	t.Parallel()
	d := bus.ConsumerPolicy{}.WithDefaults()
	if d.AckWait != 30*time.Second || d.MaxDeliver != 5 || d.MaxAckPending != 64 ||
		!slices.Equal(d.Backoff, []time.Duration{time.Second, 5 * time.Second, 15 * time.Second, 30 * time.Second}) {
		t.Errorf("defaults %+v", d)
	}
	kept := bus.ConsumerPolicy{AckWait: time.Second, MaxDeliver: 2, Backoff: []time.Duration{time.Millisecond}, MaxAckPending: 1}
	if got := kept.WithDefaults(); !reflect.DeepEqual(got, kept) {
		t.Errorf("WithDefaults changed set fields: %+v", got)
	}
	cases := []struct {
		name      string
		backoff   []time.Duration
		delivered uint64
		want      time.Duration
	}{
		{"no back-off", nil, 1, 0},
		{"first failure", []time.Duration{1, 2, 3}, 1, 1},
		{"second failure", []time.Duration{1, 2, 3}, 2, 2},
		{"last entry repeats", []time.Duration{1, 2, 3}, 9, 3},
		{"zero deliveries", []time.Duration{1, 2, 3}, 0, 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := (bus.ConsumerPolicy{Backoff: tc.backoff}).Delay(tc.delivered); got != tc.want {
				t.Errorf("Delay(%d) = %s, want %s", tc.delivered, got, tc.want)
			}
		})
	}
}

// TestTimersCaptureEverySchedule: every schedule and fire subject of the
// design is stored by the timers stream (which allows schedules), and by
// no other stream.
func TestTimersCaptureEverySchedule(t *testing.T) {
	t.Parallel()
	match := func(filter, subject string) bool {
		f, s := strings.Split(filter, "."), strings.Split(subject, ".")
		for i, tok := range f {
			if tok == ">" {
				return len(s) > i
			}
			if i >= len(s) || (tok != "*" && tok != s[i]) {
				return false
			}
		}
		return len(f) == len(s)
	}
	const sb = "sbx-1"
	for _, subject := range []string{
		event.ExpiryScheduleSubject(sb), event.ExpiryFireSubject(sb),
		event.AccrualScheduleSubject(sb), event.AccrualFireSubject(sb),
		event.RetryScheduleSubject(sb), event.RetryFireSubject(sb),
		event.HoldDeadlineScheduleSubject(sb), event.HoldDeadlineFireSubject(sb),
	} {
		var in []string
		for _, sc := range (bus.Topology{}).Streams() {
			for _, f := range sc.Subjects {
				if match(f, subject) {
					in = append(in, sc.Name)
				}
			}
		}
		if !slices.Equal(in, []string{event.StreamTimers}) {
			t.Errorf("%s is stored by %v, want %s alone", subject, in, event.StreamTimers)
		}
	}
	for _, pair := range [][2]string{
		{event.ExpiryFireFilter, event.ExpiryFireSubject(sb)}, {event.AccrualFireFilter, event.AccrualFireSubject(sb)},
		{event.RetryFireFilter, event.RetryFireSubject(sb)}, {event.HoldDeadlineFireFilter, event.HoldDeadlineFireSubject(sb)},
	} {
		if !match(pair[0], pair[1]) {
			t.Errorf("filter %s misses its fire subject %s", pair[0], pair[1])
		}
		for _, other := range []string{event.ExpiryScheduleSubject(sb), event.RetryScheduleSubject(sb), event.HoldDeadlineScheduleSubject(sb), event.AccrualScheduleSubject(sb)} {
			if match(pair[0], other) {
				t.Errorf("fire filter %s takes the schedule %s", pair[0], other)
			}
		}
	}
}
