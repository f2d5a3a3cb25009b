package gateway

import (
	"context"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
	inv "github.com/sand-boxer/sandboxer/pkg/inventory"
	"github.com/sand-boxer/sandboxer/pkg/sandbox"
)

// The record of a sandbox is its lifecycle events: the gateway writes the
// first (requested), guarded by the sandbox having no event, before the
// create command; a rejection when the command could not be published;
// and the claim of a re-driven destroy attempt. Each is guarded by the
// sequence of the sandbox's last event it was decided on
// ([bus.Publisher.PublishTransition]), so it is the compare-and-swap of
// the sandbox's state: nothing else writes a record.

// errNotRecorded is a requested event the stream refused: the sandbox
// already had an event (its id is new, so only on a replayed publish).
var errNotRecorded = errors.New("the sandbox already has events")

// record stores the requested event of the sandbox cr creates, with the
// traceparent of its create: its record. It is guarded by the sandbox
// having no event at all. It returns the record, its Seq the event's
// stream sequence.
func (g *Gateway) record(ctx context.Context, st *state, cr event.Create, trace string) (*sandbox.Record, error) {
	id := cr.SandboxID
	ev, err := event.New(event.TypeRequested, Source, id, id+"."+string(event.StateRequested), event.RequestedOf(cr, trace))
	if err != nil {
		return nil, fmt.Errorf("building requested event: %w", err)
	}
	ack, err := g.pub.PublishTransition(ctx, cr.Ref.LifecycleSubject(event.StateRequested), ev, cr.Ref.RefFilter(), 0)
	if errors.Is(err, bus.ErrConflict) {
		return nil, fmt.Errorf("recording sandbox %s: %w", id, errNotRecorded)
	}
	if err != nil {
		return nil, fmt.Errorf("recording sandbox %s: %w", id, err)
	}
	rec := &sandbox.Record{}
	if _, err := sandbox.Apply(rec, ev); err != nil {
		return nil, fmt.Errorf("recording sandbox %s: %w", id, err)
	}
	rec.Seq = ack.Sequence
	st.inv.put(id, rec, ack.Sequence)
	return rec, nil
}

// reject publishes the rejected event of sandbox cr.SandboxID, so
// metering releases any hold and watchers see the end, guarded by the
// sandbox's last event being seq, the one the gateway stored (its
// requested event; 0 when it stored none). When the sandbox moved on
// meanwhile (its create command did arrive after an ambiguous publish
// error), it rejects nothing and returns the record as it is; a record
// stored after all while seq is 0 is followed. It is best effort
// otherwise: a failure is logged, and the registry's reconciler fails a
// requested sandbox past its deadline.
func (g *Gateway) reject(ctx context.Context, st *state, cr event.Create, seq uint64, code, reason string) (movedOn *sandbox.Record) {
	id := cr.SandboxID
	ev, err := event.New(event.TypeRejected, Source, id, id+"."+string(event.StateRejected),
		event.Rejected{Ref: cr.Ref, Code: code, Reason: reason})
	if err != nil {
		g.log.ErrorContext(ctx, "building rejected event", "sandbox", id, "err", err)
		return nil
	}
	var ack *jetstream.PubAck
	for range 3 {
		ack, err = g.pub.PublishTransition(ctx, cr.Ref.LifecycleSubject(event.StateRejected), ev, cr.Ref.RefFilter(), seq)
		if !errors.Is(err, bus.ErrConflict) {
			break
		}
		rec, rerr := inv.Read(ctx, st.nc, cr.Ref.RefFilter())
		switch {
		case rerr != nil || rec == nil:
			g.log.WarnContext(ctx, "rejecting a sandbox: reading it", "sandbox", id, "err", rerr)
			return nil
		case rec.State == event.StateRejected:
			return nil // rejected already
		case rec.State != event.StateRequested:
			g.log.WarnContext(ctx, "not rejecting a sandbox that moved on", "sandbox", id, "state", rec.State)
			return rec
		}
		// Its record was stored after all (an ambiguous error): the
		// rejection follows it.
		seq = rec.Seq
	}
	if err != nil {
		g.log.ErrorContext(ctx, "publishing rejected event", "sandbox", id, "code", code, "err", err)
		return nil
	}
	if seq == 0 {
		// Rejected before anything was recorded: the event is the
		// whole record.
		rec := &sandbox.Record{}
		if _, err := sandbox.Apply(rec, ev); err == nil {
			rec.Seq = ack.Sequence
			st.inv.put(id, rec, ack.Sequence)
		}
		return nil
	}
	if cur, _, ok := st.inv.get(id); ok {
		rec := cur.Clone()
		if changed, err := sandbox.Apply(rec, ev); err == nil && changed {
			rec.Seq = ack.Sequence
			st.inv.put(id, rec, ack.Sequence)
		}
	}
	return nil
}

// errNotFound is a sandbox with no event: never recorded, or gone with
// the lifecycle stream's max age.
var errNotFound = errors.New("no such sandbox")

// getRecord reads one sandbox's record as it is now: the fold of its
// lifecycle events. When the inventory holds the sandbox, one direct get
// of its last event says whether the inventory's record is current (the
// same sequence: nothing came after it); otherwise, or when it is not,
// its events are read with one batched direct get, over its own subjects
// when the inventory knows whose sandbox it is (the server finds them by
// their literal prefix), else by id. A key that is not a valid sandbox id
// is not found ([errNotFound]).
func getRecord(ctx context.Context, st *state, id string) (*sandbox.Record, uint64, error) {
	if !event.ValidName(id) {
		return nil, 0, errNotFound
	}
	// On a cluster a read may be answered by a replica that has not yet
	// stored this gateway's own event (a sandbox it recorded a moment
	// ago): what the inventory holds at a newer sequence wins.
	mine, mySeq, ok := st.inv.get(id)
	filter := event.SandboxFilter(id)
	if ok {
		filter = mine.Ref().RefFilter()
		last, err := bus.LastMsg(ctx, st.nc, event.StreamLifecycle, filter)
		if err != nil && !errors.Is(err, bus.ErrNoMessage) {
			return nil, 0, err
		}
		if err != nil || last.Sequence <= mySeq {
			return mine, mySeq, nil
		}
	}
	rec, err := inv.Read(ctx, st.nc, filter)
	if err != nil {
		return nil, 0, err
	}
	if rec == nil && ok {
		return mine, mySeq, nil
	}
	if rec == nil {
		return nil, 0, errNotFound
	}
	if ok && mySeq > rec.Seq {
		return mine, mySeq, nil
	}
	return rec, rec.Seq, nil
}
