package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/event"
)

// deadLetter is one message of the dead-letter stream, as the operator's
// verbs show it.
type deadLetter struct {
	Seq       uint64    `json:"seq"`
	At        time.Time `json:"at"`
	Stream    string    `json:"stream"`
	Consumer  string    `json:"consumer"`
	Subject   string    `json:"subject"`
	StreamSeq uint64    `json:"stream_seq"`
	Delivered int       `json:"delivered"`
	Reason    string    `json:"reason"`
	Type      string    `json:"type,omitempty"`
	ID        string    `json:"id,omitempty"`
	// Header and Data are the original message's, for show.
	Header nats.Header `json:"header,omitempty"`
	Data   string      `json:"data,omitempty"`
}

func deadLetterOf(m *jetstream.RawStreamMsg) deadLetter {
	h := m.Header
	d := deadLetter{
		Seq: m.Sequence, At: m.Time.UTC(), Stream: h.Get(bus.HeaderDLQStream), Consumer: h.Get(bus.HeaderDLQConsumer),
		Subject: h.Get(bus.HeaderDLQSubject), Reason: h.Get(bus.HeaderDLQReason),
		Type: h.Get("ce-type"), ID: h.Get("ce-id"),
	}
	d.StreamSeq, _ = strconv.ParseUint(h.Get(bus.HeaderDLQStreamSeq), 10, 64)
	d.Delivered, _ = strconv.Atoi(h.Get(bus.HeaderDLQDelivered))
	return d
}

func newDLQCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "dlq",
		Short: "Dead letters: messages a consumer gave up on, with the reason (an operator's tool; admin credentials)",
	}
	var c connectFlags
	open := func(ctx context.Context) (*nats.Conn, jetstream.Stream, error) {
		nc, js, err := c.connect(ctx, "sandboxer-dlq")
		if err != nil {
			return nil, nil, err
		}
		s, err := js.Stream(ctx, event.StreamDLQ)
		if err != nil {
			nc.Close()
			return nil, nil, fmt.Errorf("opening the dead-letter stream: %w", err)
		}
		return nc, s, nil
	}
	seqArg := func(args []string) ([]uint64, error) {
		var out []uint64
		for _, a := range args {
			n, err := strconv.ParseUint(a, 10, 64)
			if err != nil || n == 0 {
				return nil, &exitError{2, fmt.Errorf("%q is not a dead letter's sequence (see sandboxer dlq ls)", a)}
			}
			out = append(out, n)
		}
		return out, nil
	}

	var (
		consumer string
		limit    int
	)
	ls := &cobra.Command{
		Use:   "ls [--consumer NAME] [--limit N]",
		Short: "List dead letters, oldest first",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			asJSON, err := g.json()
			if err != nil {
				return err
			}
			nc, s, err := open(cmd.Context())
			if err != nil {
				return err
			}
			defer nc.Close()
			list, err := listDeadLetters(cmd.Context(), s, consumer, limit)
			if err != nil {
				return err
			}
			if asJSON {
				return json.NewEncoder(cmd.OutOrStdout()).Encode(list)
			}
			printDeadLetters(cmd.OutOrStdout(), list)
			return nil
		},
	}
	ls.Flags().StringVar(&consumer, "consumer", "", "only this consumer's (e.g. provisioner-local)")
	ls.Flags().IntVar(&limit, "limit", 100, "at most this many")

	show := &cobra.Command{
		Use:   "show SEQ",
		Short: "Show one dead letter: why, where from, and the original message",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			seqs, err := seqArg(args)
			if err != nil {
				return err
			}
			nc, s, err := open(cmd.Context())
			if err != nil {
				return err
			}
			defer nc.Close()
			m, err := s.GetMsg(cmd.Context(), seqs[0])
			if err != nil {
				return fmt.Errorf("reading dead letter %d: %w", seqs[0], err)
			}
			d := deadLetterOf(m)
			d.Header = nats.Header{}
			for k, v := range m.Header {
				if !strings.HasPrefix(k, "Sandboxer-Dlq-") {
					d.Header[k] = v
				}
			}
			d.Data = string(m.Data)
			enc := json.NewEncoder(cmd.OutOrStdout())
			enc.SetIndent("", "  ")
			return enc.Encode(d)
		},
	}

	replay := &cobra.Command{
		Use:   "replay SEQ...",
		Short: "Publish dead letters again to their original subjects, then remove them",
		Long: `Replay publishes each dead letter's original message, headers and body, to its
original subject (with a new Nats-Msg-Id, so the stream's de-duplication does
not drop it), and removes the dead letter once the stream acknowledged the copy.
Every handler is idempotent: a replayed create of a sandbox that moved on, or a
replayed event already applied, changes nothing. A command whose deliveries ran
out was compensated before it was dead-lettered: a create's sandbox was failed
(and torn down, its hold released), a destroy's next attempt was scheduled by
the registry. Replaying either changes nothing more; a stuck teardown is
re-driven at once with sandboxer destroy (DELETE) instead.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			seqs, err := seqArg(args)
			if err != nil {
				return err
			}
			nc, s, err := open(cmd.Context())
			if err != nil {
				return err
			}
			defer nc.Close()
			js, err := jetstream.New(nc)
			if err != nil {
				return err
			}
			for _, seq := range seqs {
				d, err := replayDeadLetter(cmd.Context(), js, s, seq)
				if err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "replayed %d to %s\n", seq, d.Subject)
			}
			return nil
		},
	}

	discard := &cobra.Command{
		Use:   "discard SEQ...",
		Short: "Remove dead letters for good",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			seqs, err := seqArg(args)
			if err != nil {
				return err
			}
			nc, s, err := open(cmd.Context())
			if err != nil {
				return err
			}
			defer nc.Close()
			for _, seq := range seqs {
				if err := s.DeleteMsg(cmd.Context(), seq); err != nil {
					return fmt.Errorf("discarding dead letter %d: %w", seq, err)
				}
				fmt.Fprintln(cmd.OutOrStdout(), "discarded", seq)
			}
			return nil
		},
	}
	for _, sub := range []*cobra.Command{ls, show, replay, discard} {
		c.add(sub)
		cmd.AddCommand(sub)
	}
	g.outputFlag(ls.Flags(), "output format: table or json")
	return cmd
}

// listDeadLetters reads up to limit dead letters, oldest first, of one
// consumer or of all.
func listDeadLetters(ctx context.Context, s jetstream.Stream, consumer string, limit int) ([]deadLetter, error) {
	info, err := s.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("reading the dead-letter stream: %w", err)
	}
	out := []deadLetter{}
	if info.State.Msgs == 0 {
		return out, nil
	}
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && len(out) < limit; seq++ {
		m, err := s.GetMsg(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue // discarded or replayed
		}
		if err != nil {
			return nil, fmt.Errorf("reading dead letter %d: %w", seq, err)
		}
		d := deadLetterOf(m)
		if consumer == "" || d.Consumer == consumer {
			out = append(out, d)
		}
	}
	return out, nil
}

func printDeadLetters(w io.Writer, list []deadLetter) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SEQ\tTIME\tCONSUMER\tSUBJECT\tDELIVERED\tREASON")
	for _, d := range list {
		reason := d.Reason
		if len(reason) > 120 {
			reason = reason[:120] + "..."
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%d\t%s\n", d.Seq, d.At.Format(time.DateTime), d.Consumer, d.Subject, d.Delivered, reason)
	}
	_ = tw.Flush()
}

// replayDeadLetter publishes dead letter seq's original message to its
// original subject and removes the dead letter.
func replayDeadLetter(ctx context.Context, js jetstream.JetStream, s jetstream.Stream, seq uint64) (deadLetter, error) {
	m, err := s.GetMsg(ctx, seq)
	if err != nil {
		return deadLetter{}, fmt.Errorf("reading dead letter %d: %w", seq, err)
	}
	d := deadLetterOf(m)
	if d.Subject == "" {
		return d, fmt.Errorf("dead letter %d names no original subject", seq)
	}
	h := nats.Header{}
	for k, v := range m.Header {
		if !strings.HasPrefix(k, "Sandboxer-Dlq-") {
			h[k] = slices.Clone(v)
		}
	}
	h.Set(event.HeaderMsgID, "replay:"+event.StreamDLQ+":"+strconv.FormatUint(seq, 10))
	if _, err := js.PublishMsg(ctx, &nats.Msg{Subject: d.Subject, Header: h, Data: m.Data}); err != nil {
		return d, fmt.Errorf("replaying dead letter %d to %s: %w", seq, d.Subject, err)
	}
	if err := s.DeleteMsg(ctx, seq); err != nil {
		return d, fmt.Errorf("replayed dead letter %d, but removing it: %w", seq, err)
	}
	return d, nil
}
