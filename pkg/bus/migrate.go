package bus

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/event"
)

// HeaderMigratedFrom marks a message setup moved from a subject of an
// earlier version: <stream>:<sequence> of the original.
const HeaderMigratedFrom = "Sandboxer-Migrated-From"

// legacy is a subject form of the first version, before subjects carried
// the consumer: commands sandboxer.cmd.<extension>.<verb>.<sandbox> and
// lifecycle events sandboxer.evt.<extension>.<sandbox>.<state>. Both have
// one token fewer than today's, so a filter of five tokens selects exactly
// them.
type legacy struct {
	stream, filter string
	// rewrite is the current subject of an old one, for the sandbox ref.
	rewrite func(old string, ref event.Ref) (string, error)
}

var legacyForms = []legacy{
	{event.StreamCommands, "sandboxer.cmd.*.*.*", func(old string, ref event.Ref) (string, error) {
		t := strings.Split(old, ".") // sandboxer cmd <ext> <verb> <sandbox>
		if t[2] != ref.Extension || t[4] != ref.SandboxID {
			return "", fmt.Errorf("%s carries the data of sandbox %s on %s", old, ref.SandboxID, ref.Extension)
		}
		return event.CommandSubject(t[2], t[3], ref.Consumer, t[4]), nil
	}},
	{event.StreamLifecycle, "sandboxer.evt.*.*.*", func(old string, ref event.Ref) (string, error) {
		t := strings.Split(old, ".") // sandboxer evt <ext> <sandbox> <state>
		if t[2] != ref.Extension || t[3] != ref.SandboxID {
			return "", fmt.Errorf("%s carries the data of sandbox %s on %s", old, ref.SandboxID, ref.Extension)
		}
		return event.LifecycleSubject(ref.Consumer, t[2], t[3], event.State(t[4])), nil
	}},
}

// migrate moves every message of the first version's subject forms to the
// current subjects: a copy with the same headers and body on the subject
// that carries the consumer (taken from the message's own data), then the
// original is removed. Each durable consumer of the stream resumes where
// it was: the copies of what it had acknowledged are skipped, the others
// delivered. Running it again finds nothing to move.
//
// It runs with the services stopped (sandboxer up runs it before starting
// them; on a cluster, stop them for the setup that upgrades).
func migrate(ctx context.Context, js jetstream.JetStream) (Report, []resume, error) {
	var (
		rep     Report
		resumes []resume
	)
	for _, l := range legacyForms {
		c, rs, err := migrateStream(ctx, js, l)
		if err != nil {
			return rep, nil, err
		}
		if c != nil {
			rep = append(rep, *c)
		}
		resumes = append(resumes, rs...)
	}
	return rep, resumes, nil
}

// resume is where a durable consumer goes on after a migration, once its
// filters name the current subjects.
type resume struct {
	stream, consumer string
	seq              uint64
}

func (r resume) apply(ctx context.Context, js jetstream.JetStream) error {
	if _, err := js.ResetConsumerToSequence(ctx, r.stream, r.consumer, r.seq); err != nil {
		return fmt.Errorf("migrating %s: resuming consumer %s at %d: %w", r.stream, r.consumer, r.seq, err)
	}
	return nil
}

// serverHeaders are the headers a direct get adds, which a copy must not
// carry.
var serverHeaders = []string{"Nats-Stream", "Nats-Subject", "Nats-Sequence", "Nats-Time-Stamp", "Nats-Num-Pending", "Nats-Last-Sequence"}

// durableAt is a durable consumer as it was before a migration.
type durableAt struct {
	name    string
	floor   uint64   // last acknowledged stream sequence
	pending uint64   // messages matching its filters after floor
	filters []string // its filters then
}

func migrateStream(ctx context.Context, js jetstream.JetStream, l legacy) (*Change, []resume, error) {
	s, err := js.Stream(ctx, l.stream)
	if err != nil {
		return nil, nil, fmt.Errorf("migrating %s: %w", l.stream, err)
	}
	// Nothing of the old forms (the usual case): nothing to read, not
	// even the durables, which a cluster may be moving right now.
	if first, _, err := LastPerSubject(ctx, js.Conn(), l.stream, []string{l.filter}); err != nil {
		return nil, nil, fmt.Errorf("migrating %s: %w", l.stream, err)
	} else if len(first) == 0 {
		return nil, nil, nil
	}
	// Where each durable consumer was, before anything moves.
	var durables []durableAt
	names := s.ConsumerNames(ctx)
	for name := range names.Name() {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		c, err := s.Consumer(cctx, name)
		cancel()
		if err != nil {
			return nil, nil, fmt.Errorf("migrating %s: reading consumer %s: %w", l.stream, name, err)
		}
		info := c.CachedInfo()
		if info.Config.Durable != "" {
			durables = append(durables, durableAt{name: name, floor: info.AckFloor.Stream, pending: info.NumPending + uint64(info.NumAckPending),
				filters: filtersOf(info.Config)})
		}
	}
	if err := names.Err(); err != nil && !errors.Is(err, jetstream.ErrEndOfData) {
		return nil, nil, fmt.Errorf("migrating %s: listing consumers: %w", l.stream, err)
	}
	type moved struct {
		from, to uint64
		subject  string // the original's
	}
	var done []moved
	for {
		msgs, _, err := LastPerSubject(ctx, js.Conn(), l.stream, []string{l.filter})
		if err != nil {
			return nil, nil, fmt.Errorf("migrating %s: %w", l.stream, err)
		}
		if len(msgs) == 0 {
			break
		}
		slices.SortFunc(msgs, func(a, b *StoredMsg) int { return cmp.Compare(a.Sequence, b.Sequence) })
		for _, m := range msgs {
			to, err := copyLegacy(ctx, js, l, m)
			if err != nil {
				return nil, nil, err
			}
			if err := s.DeleteMsg(ctx, m.Sequence); err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
				return nil, nil, fmt.Errorf("migrating %s: removing %d: %w", l.stream, m.Sequence, err)
			}
			done = append(done, moved{m.Sequence, to, m.Subject})
		}
	}
	if len(done) == 0 {
		return nil, nil, nil
	}
	slices.SortFunc(done, func(a, b moved) int { return cmp.Compare(a.to, b.to) })
	var (
		resumes []resume
		said    []string
	)
	if l.stream != event.StreamCommands { // a work queue delivers the copies as it would have the originals
		for _, d := range durables {
			// The copies of what it acknowledged are skipped; it resumes at
			// the copy of the first original it had not.
			next := done[len(done)-1].to + 1
			var legacyPending uint64
			for _, m := range done {
				if m.from > d.floor && matchesAny(d.filters, m.subject) {
					legacyPending++
					if m.to < next {
						next = m.to
					}
				}
			}
			if d.pending > legacyPending {
				// It had not seen messages of today's form either: deliver
				// everything after its floor again, copies included; every
				// handler is idempotent.
				next = d.floor + 1
			}
			resumes = append(resumes, resume{stream: l.stream, consumer: d.name, seq: next})
			said = append(said, fmt.Sprintf("%s at %d", d.name, next))
		}
		slices.Sort(said)
	}
	detail := fmt.Sprintf("moved %d messages to subjects that carry the consumer", len(done))
	if len(said) > 0 {
		detail += "; consumers resume: " + strings.Join(said, ", ")
	}
	return &Change{Kind: "migration", Name: l.stream, Action: ActionUpdated, Detail: detail}, resumes, nil
}

// matchesAny reports whether subject matches one of filters (none: every
// subject).
func matchesAny(filters []string, subject string) bool {
	if len(filters) == 0 {
		return true
	}
	for _, f := range filters {
		if subjectMatches(f, subject) {
			return true
		}
	}
	return false
}

// subjectMatches is NATS subject matching: * one token, > the rest.
func subjectMatches(filter, subject string) bool {
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

// copyLegacy republishes one old message on its current subject and
// returns the copy's sequence.
func copyLegacy(ctx context.Context, js jetstream.JetStream, l legacy, m *StoredMsg) (uint64, error) {
	_, e, err := event.Decode(ctx, m.Header, m.Data)
	if err != nil {
		return 0, fmt.Errorf("migrating %s message %d on %s: %w", l.stream, m.Sequence, m.Subject, err)
	}
	ref, err := event.RefOf(e)
	if err != nil {
		return 0, fmt.Errorf("migrating %s message %d: %w", l.stream, m.Sequence, err)
	}
	if err := event.CheckName("consumer", ref.Consumer); err != nil {
		return 0, fmt.Errorf("migrating %s message %d: %w", l.stream, m.Sequence, err)
	}
	subject, err := l.rewrite(m.Subject, ref)
	if err != nil {
		return 0, fmt.Errorf("migrating %s message %d: %w", l.stream, m.Sequence, err)
	}
	h := nats.Header{}
	for k, v := range m.Header {
		if !slices.Contains(serverHeaders, k) {
			h[k] = slices.Clone(v)
		}
	}
	from := l.stream + ":" + strconv.FormatUint(m.Sequence, 10)
	h.Set(HeaderMigratedFrom, from)
	// A new id: the original's may still be in the duplicate window.
	h.Set(event.HeaderMsgID, "migrated:"+from)
	ack, err := js.PublishMsg(ctx, &nats.Msg{Subject: subject, Header: h, Data: m.Data})
	if err != nil {
		return 0, fmt.Errorf("migrating %s message %d to %s: %w", l.stream, m.Sequence, subject, err)
	}
	return ack.Sequence, nil
}
