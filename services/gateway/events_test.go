package gateway_test

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/services/gateway"
)

func TestEvents(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	ctx := testCtx(t)
	alice := e.client("alice")
	sb, err := alice.Create(ctx, api.CreateRequest{Profile: "echo"}, "")
	if err != nil {
		t.Fatal(err)
	}
	// Another sandbox's events must not show up.
	other, err := alice.Create(ctx, api.CreateRequest{Profile: "echo"}, "")
	if err != nil {
		t.Fatal(err)
	}
	e.advance(t, other.ID, event.StateProvisioning)
	e.advance(t, sb.ID, event.StateProvisioning)

	type result struct {
		got []api.StreamEvent
		err error
	}
	first := make(chan struct{})
	done := make(chan result, 1)
	go func() {
		var r result
		r.err = alice.Events(ctx, sb.ID, true, func(se api.StreamEvent) error {
			r.got = append(r.got, se)
			if len(r.got) == 1 {
				close(first)
			}
			return nil
		})
		done <- r
	}()
	select { // the stream is open and has sent the history
	case <-first:
	case r := <-done:
		t.Fatalf("stream ended early: %+v", r)
	case <-ctx.Done():
		t.Fatal("no event")
	}
	e.advance(t, sb.ID, event.StateReady, event.StateDestroying, event.StateDestroyed)
	var r result
	select {
	case r = <-done:
	case <-ctx.Done():
		t.Fatal("follow stream did not end at destroyed")
	}
	if r.err != nil {
		t.Fatal(r.err)
	}
	want := []event.State{event.StateRequested, event.StateProvisioning, event.StateReady, event.StateDestroying, event.StateDestroyed}
	check := func(what string, got []api.StreamEvent) {
		t.Helper()
		if len(got) != len(want) {
			t.Fatalf("%s: %d events, want %d", what, len(got), len(want))
		}
		for i, se := range got {
			st, _ := event.StateOf(event.Type(se.Type))
			if st != want[i] || se.Event.Type() != se.Type || se.Event.Subject() != sb.ID || se.Event.ID() != sb.ID+"."+string(st) {
				t.Fatalf("%s: event %d is %s %s %s, want %s of %s", what, i, se.Type, se.Event.Subject(), se.Event.ID(), want[i], sb.ID)
			}
			if i > 0 && se.Seq <= got[i-1].Seq {
				t.Fatalf("%s: sequences not increasing: %d after %d", what, se.Seq, got[i-1].Seq)
			}
			var ref struct {
				SandboxID string `json:"sandbox_id"`
			}
			if err := se.Event.DataAs(&ref); err != nil || ref.SandboxID != sb.ID {
				t.Fatalf("%s: event %d data %s: %v", what, i, se.Event.Data(), err)
			}
		}
	}
	check("follow", r.got)

	// Without follow: the history, then the end.
	var hist []api.StreamEvent
	if err := alice.Events(ctx, sb.ID, false, func(se api.StreamEvent) error { hist = append(hist, se); return nil }); err != nil {
		t.Fatal(err)
	}
	check("history", hist)
	if !slices.EqualFunc(hist, r.got, func(a, b api.StreamEvent) bool { return a.Seq == b.Seq }) {
		t.Fatal("history and follow disagree on sequences")
	}

	// Following a destroyed sandbox ends after its history.
	var again []api.StreamEvent
	if err := alice.Events(ctx, sb.ID, true, func(se api.StreamEvent) error { again = append(again, se); return nil }); err != nil {
		t.Fatal(err)
	}
	check("follow after destroyed", again)

	// A reconnecting client resumes after Last-Event-ID.
	lines, resp := e.sseLines(t, ctx, "/v1/sandboxes/"+sb.ID+"/events?follow=false", "alice",
		map[string]string{"Last-Event-ID": strconv.FormatUint(hist[1].Seq, 10)})
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("status %d content type %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	var ids []string
	for l := range lines {
		if id, ok := strings.CutPrefix(l, "id: "); ok {
			ids = append(ids, id)
		}
	}
	wantIDs := []string{strconv.FormatUint(hist[2].Seq, 10), strconv.FormatUint(hist[3].Seq, 10), strconv.FormatUint(hist[4].Seq, 10)}
	if !slices.Equal(ids, wantIDs) {
		t.Fatalf("resumed with ids %v, want %v", ids, wantIDs)
	}
}

func TestEventsEmptyHistory(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	ctx := testCtx(t)
	alice := e.client("alice")
	sb, err := alice.Create(ctx, api.CreateRequest{Profile: "echo"}, "")
	if err != nil {
		t.Fatal(err)
	}
	// Just created: its one event is its record.
	var types []string
	if err := alice.Events(ctx, sb.ID, false, func(se api.StreamEvent) error { types = append(types, se.Type); return nil }); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(types, []string{string(event.TypeRequested)}) {
		t.Fatalf("events of a sandbox just created: %v, want its requested event", types)
	}
	r := e.do(t, http.MethodGet, "/v1/sandboxes/"+sb.ID+"/events?follow=maybe", "alice", "", nil)
	if r.Status != http.StatusBadRequest || !slices.Contains(fields(r.Problem), "follow") {
		t.Fatalf("follow=maybe: %d %s", r.Status, r.Body)
	}
}

func TestWait(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{})
	ctx := testCtx(t)
	alice := e.client("alice")
	sb, err := alice.Create(ctx, api.CreateRequest{Profile: "echo"}, "")
	if err != nil {
		t.Fatal(err)
	}
	seen := make(chan event.State, 8)
	done := make(chan error, 1)
	go func() {
		got, err := alice.Wait(ctx, sb.ID, func(s event.State) bool { return s == event.StateReady }, func(s event.State, _ *event.Event) { seen <- s })
		if err == nil && got.ID != sb.ID {
			err = errors.New("waited for the wrong sandbox")
		}
		done <- err
	}()
	e.advance(t, sb.ID, event.StateProvisioning)
	for _, want := range []event.State{event.StateRequested, event.StateProvisioning} {
		select {
		case s := <-seen:
			if s != want {
				t.Fatalf("state seen %s, want %s", s, want)
			}
		case <-ctx.Done():
			t.Fatal("Wait saw nothing")
		}
	}
	e.advance(t, sb.ID, event.StateReady)
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-ctx.Done():
		t.Fatal("Wait did not return at ready")
	}
}

func TestEventsKeepAliveAndShutdown(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envConfig{opts: func(o *gateway.Options) { o.KeepAlive = 20 * time.Millisecond }})
	ctx := testCtx(t)
	sb, err := e.client("alice").Create(ctx, api.CreateRequest{Profile: "echo"}, "")
	if err != nil {
		t.Fatal(err)
	}
	lines, resp := e.sseLines(t, ctx, "/v1/sandboxes/"+sb.ID+"/events?follow=true", "alice", nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", resp.StatusCode)
	}
	keepalives := 0
	for keepalives < 2 {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatal("stream ended")
			}
			if l == ": keepalive" {
				keepalives++
			}
		case <-ctx.Done():
			t.Fatal("no keepalive")
		}
	}
	// Shutdown ends open streams.
	sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := e.gw.Shutdown(sctx); err != nil {
		t.Fatal(err)
	}
	for range lines { // ends: the server closed the stream
	}
	if r := e.do(t, http.MethodGet, "/readyz", "", "", nil); r.Status != http.StatusServiceUnavailable {
		t.Fatalf("readyz after shutdown: %d", r.Status)
	}
}
