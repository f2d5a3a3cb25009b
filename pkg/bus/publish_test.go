package bus_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
)

func TestPublishDeduplicates(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	js := srv.JetStream(t)
	pub := bus.NewPublisher(js)
	subj := event.LifecycleSubject("dev", "local", "sbx-1", event.StateReady)
	first, err := pub.Publish(testCtx(t), subj, readyEvent(t, "sbx-1"))
	if err != nil {
		t.Fatal(err)
	}
	// A second publisher of the same fact: same source and id, another time.
	second, err := pub.Publish(testCtx(t), subj, readyEvent(t, "sbx-1"))
	if err != nil {
		t.Fatalf("duplicate publish: %v, want success", err)
	}
	if first.Duplicate || !second.Duplicate || second.Sequence != first.Sequence {
		t.Errorf("acks %+v then %+v, want the second a duplicate of the first", first, second)
	}
	s, err := js.Stream(testCtx(t), event.StreamLifecycle)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != 1 {
		t.Errorf("lifecycle stream holds %d events, want 1", info.State.Msgs)
	}
	m, err := s.GetMsg(testCtx(t), first.Sequence)
	if err != nil {
		t.Fatal(err)
	}
	if m.Header.Get(event.HeaderMsgID) != "sandboxer/test#sbx-1.ready" || m.Header.Get("ce-type") != string(event.TypeReady) {
		t.Errorf("stored headers %v", m.Header)
	}
}

func TestPublishAll(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	js := srv.JetStream(t)
	pub := bus.NewPublisher(js)
	if err := pub.PublishAll(testCtx(t), nil); err != nil {
		t.Errorf("PublishAll(nil) = %v", err)
	}
	var outs []bus.Out
	for i := range 5 {
		id := fmt.Sprintf("sbx-%d", i)
		outs = append(outs, bus.Out{Subject: event.LifecycleSubject("dev", "local", id, event.StateReady), Event: readyEvent(t, id)})
	}
	if err := pub.PublishAll(testCtx(t), outs); err != nil {
		t.Fatal(err)
	}
	s, err := js.Stream(testCtx(t), event.StreamLifecycle)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != 5 {
		t.Errorf("lifecycle stream holds %d events, want 5", info.State.Msgs)
	}

	bad := readyEvent(t, "sbx-x")
	bad.SetID("")
	if err := pub.PublishAll(testCtx(t), append(outs[:1:1], bus.Out{Subject: "sandboxer.evt.dev.local.x.ready", Event: bad})); err == nil {
		t.Error("PublishAll of an invalid event succeeded")
	}
	if _, err := pub.Publish(testCtx(t), "sandboxer.evt.dev.local.x.ready", bad); err == nil {
		t.Error("Publish of an invalid event succeeded")
	}
}

// TestPublishAllBoundsTheWait publishes to a subject whose only
// subscriber never acknowledges: without a deadline on ctx, PublishAll
// still returns, after the JetStream context's default timeout.
func TestPublishAllBoundsTheWait(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	nc := srv.Conn(t)
	if _, err := srv.Conn(t).Subscribe("blackhole.>", func(*nats.Msg) {}); err != nil {
		t.Fatal(err)
	}
	js, err := jetstream.New(nc, jetstream.WithDefaultTimeout(300*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	pub := bus.NewPublisher(js)
	outs := []bus.Out{
		{Subject: "blackhole.a", Event: readyEvent(t, "sbx-1")},
		{Subject: "blackhole.b", Event: readyEvent(t, "sbx-2")},
	}
	done := make(chan error, 1)
	go func() { done <- pub.PublishAll(context.Background(), outs) }()
	select {
	case err := <-done:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("PublishAll = %v, want a deadline error", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("PublishAll without a deadline waits forever for an ack that never comes")
	}
}

// TestPublishBackPressure fills a bounded commands stream: the server
// refuses the next publish (discard new), and the Publisher reports it as
// ErrBackPressure. The server's error code is checked first, so a server
// upgrade that changes it fails here, not in production.
func TestPublishBackPressure(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	js := srv.JetStream(t)
	ctx := testCtx(t)
	if _, err := (bus.Topology{CommandsMaxMsgs: 3}).Setup(ctx, js, bus.SetupOptions{Force: true}); err != nil {
		t.Fatal(err)
	}
	pub := bus.NewPublisher(js)
	for i := range 3 {
		id := fmt.Sprintf("sbx-%d", i)
		if _, err := pub.Publish(ctx, event.CommandSubject("local", event.VerbCreate, "dev", id), createEvent(t, id)); err != nil {
			t.Fatalf("publish %d of 3: %v", i, err)
		}
	}

	// What the server says, unwrapped.
	raw, err := event.Encode(ctx, event.CommandSubject("local", event.VerbCreate, "dev", "sbx-raw"), createEvent(t, "sbx-raw"))
	if err != nil {
		t.Fatal(err)
	}
	_, err = js.PublishMsg(ctx, raw)
	var apiErr *jetstream.APIError
	if !errors.As(err, &apiErr) {
		t.Fatalf("publishing to a full stream: %v, want a JetStream API error", err)
	}
	if apiErr.ErrorCode != 10077 || apiErr.Code != 503 {
		t.Errorf("server error %+v, want code 503 / err_code 10077 (maximum messages exceeded)", apiErr)
	}

	cases := []struct {
		name    string
		publish func() error
	}{
		{"Publish", func() error {
			_, err := pub.Publish(ctx, event.CommandSubject("local", event.VerbCreate, "dev", "sbx-4"), createEvent(t, "sbx-4"))
			return err
		}},
		{"PublishMsg", func() error { _, err := pub.PublishMsg(ctx, raw); return err }},
		{"PublishAll", func() error {
			return pub.PublishAll(ctx, []bus.Out{
				{Subject: event.CommandSubject("local", event.VerbCreate, "dev", "sbx-5"), Event: createEvent(t, "sbx-5")},
				{Subject: event.CommandSubject("local", event.VerbCreate, "dev", "sbx-6"), Event: createEvent(t, "sbx-6")},
			})
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.publish()
			if !errors.Is(err, bus.ErrBackPressure) {
				t.Errorf("%s to a full stream = %v, want ErrBackPressure", tc.name, err)
			}
		})
	}

	// Other failures are not back-pressure.
	_, err = pub.Publish(ctx, "nostream.anywhere", createEvent(t, "sbx-7"))
	if err == nil || errors.Is(err, bus.ErrBackPressure) {
		t.Errorf("publish with no stream = %v, want an error that is not back-pressure", err)
	}

	// Draining a command makes room again.
	s, err := js.Stream(ctx, event.StreamCommands)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != 3 {
		t.Errorf("commands stream holds %d, want 3: refused publishes are not stored", info.State.Msgs)
	}
	if err := s.DeleteMsg(ctx, info.State.FirstSeq); err != nil {
		t.Fatal(err)
	}
	if _, err := pub.Publish(ctx, event.CommandSubject("local", event.VerbCreate, "dev", "sbx-8"), createEvent(t, "sbx-8")); err != nil {
		t.Errorf("publish after draining one: %v", err)
	}
}
