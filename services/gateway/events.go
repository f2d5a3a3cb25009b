package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// events handles GET /v1/sandboxes/{id}/events?follow=true|false: the
// sandbox's lifecycle events as server-sent events, oldest first, each
// with the lifecycle stream sequence as its id, the CloudEvents type as its
// name and the event in structured JSON as its data. Without follow the
// stream ends after the events so far; with follow it ends after a
// terminal state (destroyed or rejected), when the client goes away or at
// Shutdown, with a keep-alive comment every KeepAlive meanwhile. A client
// reconnecting with Last-Event-ID resumes after that event. A consumer
// has at most MaxStreamsPerConsumer streams open at once: one more is
// answered 429. A stream lifts the server's write deadline: it outlives
// an http.Server's WriteTimeout (and its ReadTimeout, which bounds reading
// the request only).
func (g *Gateway) events(w http.ResponseWriter, r *http.Request, c caller) {
	st := g.current()
	if st == nil {
		g.writeProblem(w, r, newProblem(http.StatusServiceUnavailable, "gateway is not ready"))
		return
	}
	follow := false
	if s := r.URL.Query().Get("follow"); s != "" {
		b, err := strconv.ParseBool(s)
		if err != nil {
			g.writeProblem(w, r, newProblem(http.StatusBadRequest, "invalid query",
				extension.FieldError{Field: "follow", Detail: "want true or false"}))
			return
		}
		follow = b
	}
	rec := g.visible(r.Context(), w, r, st, c, r.PathValue("id"))
	if rec == nil {
		return
	}
	if rec.State.Terminal() {
		// Nothing follows a terminal state: the history is everything.
		follow = false
	}
	cfg := jetstream.OrderedConsumerConfig{
		FilterSubjects:    []string{rec.Ref().RefFilter()},
		DeliverPolicy:     jetstream.DeliverAllPolicy,
		InactiveThreshold: 30 * time.Second,
	}
	if last, err := strconv.ParseUint(r.Header.Get("Last-Event-ID"), 10, 64); err == nil {
		cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, last+1
	}

	if !g.openStream(c.Consumer) {
		w.Header().Set("Retry-After", strconv.Itoa(max(1, int(g.opts.RetryAfter.Seconds()))))
		g.writeProblem(w, r, newProblem(http.StatusTooManyRequests,
			fmt.Sprintf("%d event streams of consumer %s are open, the most at once: close one first", g.opts.MaxStreamsPerConsumer, c.Consumer)))
		return
	}
	defer g.closeStream(c.Consumer)
	if !g.track() {
		g.writeProblem(w, r, newProblem(http.StatusServiceUnavailable, "gateway is shutting down"))
		return
	}
	defer g.wg.Done()
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	defer context.AfterFunc(g.bg, cancel)()

	cons, err := g.opts.JS.OrderedConsumer(ctx, event.StreamLifecycle, cfg)
	if err != nil {
		g.log.Error("opening lifecycle consumer", "sandbox", rec.ID, "err", err)
		g.writeProblem(w, r, newProblem(http.StatusServiceUnavailable, "cannot read events right now"))
		return
	}
	out := &sseWriter{w: w, rc: http.NewResponseController(w), g: g}
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	_ = out.rc.SetWriteDeadline(time.Time{}) // the stream outlives the server's WriteTimeout
	if err := out.rc.Flush(); err != nil {
		return
	}
	if follow {
		g.follow(ctx, cons, out)
	} else {
		g.history(ctx, cons, out)
	}
}

// history sends the events stored now, then returns.
func (g *Gateway) history(ctx context.Context, cons jetstream.Consumer, out *sseWriter) {
	const (
		batch = 64
		// rounds bounds the loop; a sandbox has a handful of events.
		rounds = 1000
	)
	for range rounds {
		b, err := cons.FetchNoWait(batch)
		if err != nil {
			g.log.Warn("fetching lifecycle events", "err", err)
			return
		}
		n := 0
		var werr error
		for m := range b.Messages() { // always drained, so the fetch ends
			n++
			if werr == nil && ctx.Err() == nil {
				_, werr = out.send(ctx, m)
			}
		}
		if werr != nil || ctx.Err() != nil || n < batch {
			return
		}
	}
}

// follow sends events as they come until a terminal one, ctx ends or the
// client cannot be written to.
func (g *Gateway) follow(ctx context.Context, cons jetstream.Consumer, out *sseWriter) {
	// A short heartbeat: on a cluster the first pull can reach the
	// consumer before it is ready; the ordered consumer then starts again
	// after two missed heartbeats, in 2s instead of the default 10s.
	it, err := cons.Messages(jetstream.PullHeartbeat(time.Second), jetstream.PullExpiry(10*time.Second))
	if err != nil {
		g.log.Warn("following lifecycle events", "err", err)
		return
	}
	msgs := make(chan jetstream.Msg)
	go func() {
		defer close(msgs)
		failures := 0
		for {
			m, err := it.Next()
			switch {
			case err == nil:
				failures = 0
			case errors.Is(err, jetstream.ErrMsgIteratorClosed) || ctx.Err() != nil:
				return
			default:
				// Missed heartbeats and the like: the ordered consumer
				// recovers by itself, and the stream goes on; a consumer
				// that keeps failing ends it.
				if failures++; failures > 20 {
					g.log.Warn("following lifecycle events: giving up", "err", err)
					return
				}
				g.log.Debug("following lifecycle events", "err", err)
				select {
				case <-ctx.Done():
					return
				case <-time.After(100 * time.Millisecond):
				}
				continue
			}
			select {
			case msgs <- m:
			case <-ctx.Done():
				return
			}
		}
	}()
	defer func() {
		it.Stop()
		for range msgs { // wait for the reader to end
		}
	}()
	tick := time.NewTicker(g.opts.KeepAlive)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			if err := out.comment("keepalive"); err != nil {
				return
			}
		case m, ok := <-msgs:
			if !ok {
				return
			}
			terminal, err := out.send(ctx, m)
			if err != nil || terminal {
				return
			}
		}
	}
}

// sseWriter writes server-sent events and flushes each.
type sseWriter struct {
	w  http.ResponseWriter
	rc *http.ResponseController
	g  *Gateway
}

// send writes one lifecycle message as an event and reports whether it
// announced a terminal state. A message that is not a valid CloudEvent is
// skipped.
func (s *sseWriter) send(ctx context.Context, m jetstream.Msg) (terminal bool, err error) {
	meta, err := m.Metadata()
	if err != nil {
		return false, fmt.Errorf("reading message metadata: %w", err)
	}
	_, e, err := event.Decode(ctx, m.Headers(), m.Data())
	if err != nil {
		s.g.log.Warn("skipping malformed lifecycle event", "subject", m.Subject(), "seq", meta.Sequence.Stream, "err", err)
		return false, nil
	}
	data, err := json.Marshal(e)
	if err != nil {
		s.g.log.Warn("skipping unencodable lifecycle event", "subject", m.Subject(), "seq", meta.Sequence.Stream, "err", err)
		return false, nil
	}
	typ := strings.NewReplacer("\r", "", "\n", "").Replace(e.Type())
	if _, err := fmt.Fprintf(s.w, "id: %d\nevent: %s\ndata: %s\n\n", meta.Sequence.Stream, typ, data); err != nil {
		return false, fmt.Errorf("writing event: %w", err)
	}
	if err := s.rc.Flush(); err != nil {
		return false, fmt.Errorf("flushing event: %w", err)
	}
	st, ok := event.StateOf(event.Type(e.Type()))
	return ok && st.Terminal(), nil
}

// comment writes an SSE comment line, which clients ignore.
func (s *sseWriter) comment(text string) error {
	if _, err := fmt.Fprintf(s.w, ": %s\n\n", text); err != nil {
		return fmt.Errorf("writing comment: %w", err)
	}
	if err := s.rc.Flush(); err != nil {
		return fmt.Errorf("flushing comment: %w", err)
	}
	return nil
}
