package bus_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
)

// TestSetupClusterReplicas runs Setup on a three-node cluster: at R3 it
// creates every stream, bucket and consumer on three peers; asked for R1
// it refuses, changes nothing and loses nothing; at R3 again it changes
// nothing; with Force it lowers everything to R1, keeping the messages.
// The steps run in order on one cluster, the one that changes it last.
func TestSetupClusterReplicas(t *testing.T) {
	t.Parallel()
	c := natstest.StartCluster(t, 3)
	js := c.JetStream(t)
	ctx := testCtx(t)
	r3, r1 := bus.Topology{Replicas: 3}, bus.Topology{Replicas: 1}
	durable := bus.ConsumerSpec{Stream: event.StreamLifecycle, Name: "cluster-test", Filters: []string{event.SubjectLifecycle}}
	withDurable := bus.SetupOptions{Consumers: []bus.ConsumerSpec{durable}}

	// Every stream and bucket of the design, and the streams behind them.
	var declared []string
	var streams []string
	for _, cfg := range r3.Streams() {
		declared = append(declared, "stream "+cfg.Name)
		streams = append(streams, cfg.Name)
	}
	for _, cfg := range r3.Buckets() {
		declared = append(declared, "bucket "+cfg.Bucket)
		streams = append(streams, bus.KVStream(cfg.Bucket))
	}
	consumerLine := "consumer " + durable.Stream + "/" + durable.Name

	var held map[string]uint64 // messages per stream, before anything is refused
	if !t.Run("R3 creates everything on three peers", func(t *testing.T) {
		rep, err := r3.Setup(ctx, js, withDurable)
		if err != nil {
			t.Fatalf("Setup R3: %v", err)
		}
		checkReport(t, rep, append(slices.Clone(declared), consumerLine), func(c bus.Change) string {
			if c.Action != bus.ActionCreated {
				return "want created"
			}
			return ""
		})
		awaitReplicas(t, js, streams, 3, nil)
		awaitConsumerPeers(t, js, durable, 3)

		// A few messages on every stream and keys in every bucket.
		for _, cfg := range r3.Streams() {
			subj := strings.ReplaceAll(cfg.Subjects[0], ">", "cluster-test")
			for i := range 3 {
				if _, err := js.Publish(ctx, subj, fmt.Appendf(nil, "%d", i)); err != nil {
					t.Fatalf("publishing to %s: %v", cfg.Name, err)
				}
			}
		}
		for _, cfg := range r3.Buckets() {
			kv, err := js.KeyValue(ctx, cfg.Bucket)
			if err != nil {
				t.Fatal(err)
			}
			for _, k := range []string{"a", "b"} {
				if _, err := kv.Put(ctx, k, []byte(k)); err != nil {
					t.Fatalf("putting %s in %s: %v", k, cfg.Bucket, err)
				}
			}
		}
		held = map[string]uint64{}
		for _, name := range streams {
			held[name] = streamInfo(t, js, name).State.Msgs
			if held[name] == 0 {
				t.Errorf("stream %s holds nothing after the writes", name)
			}
		}
	}) {
		return
	}

	if !t.Run("R1 without force is refused and changes nothing", func(t *testing.T) {
		rep, err := r1.Setup(ctx, js, bus.SetupOptions{})
		if !errors.Is(err, bus.ErrRefused) {
			t.Fatalf("Setup R1 returned %v, want an error wrapping ErrRefused", err)
		}
		checkReport(t, rep, declared, func(c bus.Change) string {
			if c.Action != bus.ActionRefused || !strings.Contains(c.Detail, "replicas 3 -> 1") {
				return `want refused, "replicas 3 -> 1"`
			}
			return ""
		})
		if got := len(rep.Refused()); got != len(declared) {
			t.Errorf("Refused() lists %d changes, want %d", got, len(declared))
		}
		awaitReplicas(t, js, streams, 3, held)
	}) {
		return
	}

	if !t.Run("R3 again changes nothing", func(t *testing.T) {
		rep, err := r3.Setup(ctx, js, withDurable)
		if err != nil {
			t.Fatalf("Setup R3 again: %v", err)
		}
		checkReport(t, rep, append(slices.Clone(declared), consumerLine), func(c bus.Change) string {
			if c.Action != bus.ActionUnchanged {
				return "want unchanged"
			}
			return ""
		})
		awaitReplicas(t, js, streams, 3, held)
	}) {
		return
	}

	t.Run("R1 with force lowers everything and keeps the messages", func(t *testing.T) {
		// The durable goes first: nats-server (2.15.2) now and then leaves
		// a durable that inherits its stream's replicas without a leader
		// when the stream goes from R3 to R1, and Setup's migration reads
		// every durable of the lifecycle stream.
		if err := js.DeleteConsumer(ctx, durable.Stream, durable.Name); err != nil {
			t.Fatalf("deleting consumer %s: %v", durable.Name, err)
		}
		rep, err := r1.Setup(ctx, js, bus.SetupOptions{Force: true})
		if err != nil {
			t.Fatalf("Setup R1 with force: %v", err)
		}
		checkReport(t, rep, declared, func(c bus.Change) string {
			if c.Action != bus.ActionUpdated || !strings.Contains(c.Detail, "replicas 3 -> 1") {
				return `want updated, "replicas 3 -> 1"`
			}
			return ""
		})
		awaitReplicas(t, js, streams, 1, held)

		rep, err = r1.Setup(ctx, js, bus.SetupOptions{})
		if err != nil {
			t.Fatalf("Setup R1 after force: %v", err)
		}
		checkReport(t, rep, declared, func(c bus.Change) string {
			if c.Action != bus.ActionUnchanged {
				return "want unchanged"
			}
			return ""
		})
	})
}

// checkReport fails t unless rep has exactly one line for each of want
// ("kind name") and bad accepts each line.
func checkReport(t *testing.T, rep bus.Report, want []string, bad func(bus.Change) string) {
	t.Helper()
	got := map[string]bus.Change{}
	for _, c := range rep {
		k := c.Kind + " " + c.Name
		if _, dup := got[k]; dup {
			t.Errorf("report names %s twice", k)
		}
		got[k] = c
		if why := bad(c); why != "" {
			t.Errorf("%s: %s (%s), %s", k, c.Action, c.Detail, why)
		}
	}
	if !slices.Equal(slices.Sorted(maps.Keys(got)), slices.Sorted(slices.Values(want))) {
		t.Errorf("report names %v, want %v", slices.Sorted(maps.Keys(got)), slices.Sorted(slices.Values(want)))
	}
}

// awaitReplicas waits until every stream of names is configured with
// replicas and the cluster shows a leader and replicas-1 other peers, all
// current, and, when msgs is not nil, holds msgs[name] messages.
func awaitReplicas(t *testing.T, js jetstream.JetStream, names []string, replicas int, msgs map[string]uint64) {
	t.Helper()
	for _, name := range names {
		await(t, 10*time.Second, fmt.Sprintf("stream %s at R%d", name, replicas), func() (bool, string) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			s, err := js.Stream(ctx, name)
			if err != nil {
				return false, err.Error()
			}
			info := s.CachedInfo()
			if info.Config.Replicas != replicas {
				return false, fmt.Sprintf("config replicas %d", info.Config.Replicas)
			}
			if why := peers(info.Cluster, replicas); why != "" {
				return false, why
			}
			if msgs != nil && info.State.Msgs != msgs[name] {
				return false, fmt.Sprintf("%d messages, want %d", info.State.Msgs, msgs[name])
			}
			return true, ""
		})
	}
}

// awaitConsumerPeers waits until spec's consumer runs on n peers.
func awaitConsumerPeers(t *testing.T, js jetstream.JetStream, spec bus.ConsumerSpec, n int) {
	t.Helper()
	await(t, 10*time.Second, fmt.Sprintf("consumer %s/%s on %d peers", spec.Stream, spec.Name, n), func() (bool, string) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		c, err := js.Consumer(ctx, spec.Stream, spec.Name)
		if err != nil {
			return false, err.Error()
		}
		info := c.CachedInfo()
		if info.Config.Replicas != 0 && info.Config.Replicas != n {
			return false, fmt.Sprintf("config replicas %d", info.Config.Replicas)
		}
		if why := peers(info.Cluster, n); why != "" {
			return false, why
		}
		return true, ""
	})
}

// peers says how ci differs from a leader and n-1 current replicas, or ""
// when it does not.
func peers(ci *jetstream.ClusterInfo, n int) string {
	if ci == nil || ci.Leader == "" {
		return fmt.Sprintf("no leader (cluster %+v)", ci)
	}
	if len(ci.Replicas) != n-1 {
		return fmt.Sprintf("leader %s and %d replicas, want %d", ci.Leader, len(ci.Replicas), n-1)
	}
	for _, p := range ci.Replicas {
		if !p.Current {
			return "replica " + p.Name + " not current"
		}
	}
	return ""
}

func streamInfo(t *testing.T, js jetstream.JetStream, name string) *jetstream.StreamInfo {
	t.Helper()
	s, err := js.Stream(testCtx(t), name)
	if err != nil {
		t.Fatalf("reading stream %s: %v", name, err)
	}
	return s.CachedInfo()
}
