package natstest_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/goleak"

	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
)

// TestStartCluster starts three nodes and checks each is reachable on its
// own URL, a stream replicated on all three can be declared and written,
// and a least-privileged identity is refused what its role does not
// allow, on one authority.
func TestStartCluster(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t) }) // runs last, after the nodes stopped
	c := natstest.StartCluster(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	urls := strings.Split(c.ClientURLs(), ",")
	if len(urls) != 3 || len(c.Servers()) != 3 {
		t.Fatalf("ClientURLs %q, %d servers; want 3 of each", urls, len(c.Servers()))
	}
	for i, s := range c.Servers() {
		if want := "n" + string(rune('1'+i)); s.Name() != want {
			t.Errorf("server %d named %q, want %q", i, s.Name(), want)
		}
		if s.ClusterName() != natstest.ClusterName {
			t.Errorf("%s in cluster %q, want %q", s.Name(), s.ClusterName(), natstest.ClusterName)
		}
	}
	if c.Leader() == nil {
		t.Error("no meta leader after StartCluster")
	}

	// Each node on its own answers for the account.
	opts, err := auth.ConnectOptions(c.Creds(t, natstest.Admin))
	if err != nil {
		t.Fatal(err)
	}
	for _, u := range urls {
		nc, err := nats.Connect(u, opts...)
		if err != nil {
			t.Fatalf("connecting to %s: %v", u, err)
		}
		js, err := jetstream.New(nc)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := js.AccountInfo(ctx); err != nil {
			t.Errorf("account info from %s: %v", u, err)
		}
		nc.Close()
	}

	js := c.JetStream(t)
	s, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "R3", Subjects: []string{"r3.>"}, Replicas: 3})
	if err != nil {
		t.Fatalf("creating an R3 stream: %v", err)
	}
	if _, err := js.Publish(ctx, "r3.one", []byte("1")); err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.Cluster == nil || info.Cluster.Name != natstest.ClusterName || info.Cluster.Leader == "" || len(info.Cluster.Replicas) != 2 {
		t.Errorf("R3 stream cluster info %+v, want a leader and 2 replicas in %s", info.Cluster, natstest.ClusterName)
	}
	if info.State.Msgs != 1 {
		t.Errorf("R3 stream holds %d messages, want 1", info.State.Msgs)
	}

	nc, v := c.ConnRefusable(t, auth.Identity{Role: auth.RoleTenant, Consumer: "dev"})
	if err := nc.Publish("r3.two", []byte("2")); err != nil {
		t.Fatal(err)
	}
	if !v.Await("r3.two", 10*time.Second) {
		t.Errorf("a tenant published to r3.two unrefused (violations %v)", v.Errors())
	}
}
