// Command billing-consumer rebuilds every consumer's credit balance from
// sand-boxer's metering stream, the way a billing system would.
//
// It relies on the documented contract only (docs/payments.md): a billing
// identity's .creds file, the stream SANDBOXER_METERING and the durable
// consumer the operator's setup made for that identity (named after its
// user name). Of sand-boxer it imports only the credits contract,
// pkg/credits: the ledger entry and the event kinds, as metering
// publishes them (pkg/credits links no server).
//
// At start it resets its durable to --since (default 1: the whole stream),
// so every run is a replay; reads and acks every message up to the end of
// the stream; folds the ledger entries into each consumer's balance and
// held, checking them as a bank statement is checked (no gaps in seq, the
// running sums equal balance_after and held_after); and prints one JSON
// line per consumer. With --follow it keeps reading and prints a
// consumer's line again after each of its entries.
//
//	billing-consumer --creds ~/.local/share/sandboxer/creds/billing.creds
//
// Exit status 1 on any failure (including a ledger that does not add up),
// 2 on a usage error.
package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/cloudevents/sdk-go/v2/binding"
	"github.com/cloudevents/sdk-go/v2/binding/format"
	"github.com/cloudevents/sdk-go/v2/binding/spec"
	cloudevents "github.com/cloudevents/sdk-go/v2/event"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/credits"
)

const (
	streamMetering = "SANDBOXER_METERING"
	defaultNATS    = "nats://127.0.0.1:4222"
	// fetchBatch is how many messages one pull asks for while catching
	// up; well under the durable's ack-pending limit.
	fetchBatch = 100
)

// ledgerKinds are the metering subjects' kinds that carry a ledger entry;
// the others (usage, low, exhausted) move no credit.
var ledgerKinds = map[credits.Kind]bool{
	credits.KindGranted: true, credits.KindReserved: true, credits.KindDebited: true,
	credits.KindReleased: true, credits.KindRefunded: true, credits.KindExpired: true,
}

// The ways a ledger can fail to add up.
var (
	errGap      = errors.New("gap in the ledger")
	errMismatch = errors.New("the ledger does not add up")
	errConflict = errors.New("two entries with one seq")
)

// errUsage marks a command-line mistake: exit status 2.
var errUsage = errors.New("usage")

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run is the whole program; it returns the exit status.
func run(args []string, stdout, stderr io.Writer) int {
	cfg, err := parseFlags(args, stderr)
	switch {
	case errors.Is(err, flag.ErrHelp):
		return 0
	case err != nil:
		fmt.Fprintln(stderr, "billing-consumer:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// A permissions violation ends every wait at once, with the
	// violation as the cause, instead of letting it run into --timeout.
	ctx, refused := context.WithCancelCause(ctx)
	defer refused(nil)
	if err := cfg.execute(ctx, stdout, stderr, refused); err != nil {
		if c := context.Cause(ctx); errors.Is(c, nats.ErrPermissionViolation) && !errors.Is(err, c) {
			err = fmt.Errorf("%w: %w", err, c)
		}
		fmt.Fprintln(stderr, "billing-consumer:", err)
		return 1
	}
	return 0
}

// config is what the flags say.
type config struct {
	natsURL string
	creds   string
	durable string // empty: the creds' user name
	since   uint64
	follow  bool
	timeout time.Duration
}

func parseFlags(args []string, stderr io.Writer) (*config, error) {
	cfg := &config{}
	fs := flag.NewFlagSet("billing-consumer", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: billing-consumer [flags]\n\nFolds the metering stream into one balance line per consumer.\n\nflags:")
		fs.PrintDefaults()
	}
	fs.StringVar(&cfg.natsURL, "nats", envOr("NATS_URL", defaultNATS), "NATS server URL (env NATS_URL)")
	fs.StringVar(&cfg.creds, "creds", envOr("NATS_CREDS", filepath.Join(dataDir(), "creds", "billing.creds")), "billing credentials file (env NATS_CREDS)")
	fs.StringVar(&cfg.durable, "durable", "", "durable consumer on "+streamMetering+" to read through (default: the creds' user name)")
	fs.Uint64Var(&cfg.since, "since", 1, "stream sequence to replay from; 1 is the whole stream, which is checked in full")
	fs.BoolVar(&cfg.follow, "follow", false, "keep reading after catching up, printing a consumer's line after each change, until interrupted")
	fs.DurationVar(&cfg.timeout, "timeout", 2*time.Minute, "bound of connecting, resetting and catching up")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	switch {
	case fs.NArg() > 0:
		return nil, fmt.Errorf("%w: unexpected arguments %q", errUsage, fs.Args())
	case cfg.since < 1:
		return nil, fmt.Errorf("%w: --since must be a stream sequence, 1 or more", errUsage)
	case cfg.creds == "":
		return nil, fmt.Errorf("%w: --creds is required", errUsage)
	case cfg.timeout <= 0:
		return nil, fmt.Errorf("%w: --timeout must be positive", errUsage)
	}
	return cfg, nil
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// dataDir is where `sandboxer up` writes its credentials:
// SANDBOXER_DATA_DIR, else $XDG_DATA_HOME/sandboxer, else
// ~/.local/share/sandboxer.
func dataDir() string {
	if v := os.Getenv("SANDBOXER_DATA_DIR"); v != "" {
		return v
	}
	if v := os.Getenv("XDG_DATA_HOME"); v != "" {
		return filepath.Join(v, "sandboxer")
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return ".sandboxer"
	}
	return filepath.Join(home, ".local", "share", "sandboxer")
}

// --- credentials ---

// credsUserName is the name claim of the user JWT in a .creds file.
func credsUserName(creds []byte) (string, error) {
	token, err := userJWT(creds)
	if err != nil {
		return "", err
	}
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return "", errors.New("the user JWT does not have three dot-separated parts")
	}
	// base64url without padding; tolerate padding anyway.
	payload, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(parts[1], "="))
	if err != nil {
		return "", fmt.Errorf("decoding the user JWT's claims: %w", err)
	}
	var claims struct {
		Name string `json:"name"`
	}
	if err := json.Unmarshal(payload, &claims); err != nil {
		return "", fmt.Errorf("decoding the user JWT's claims: %w", err)
	}
	if claims.Name == "" {
		return "", errors.New("the user JWT has no name claim")
	}
	return claims.Name, nil
}

// userJWT is the text between the BEGIN and END NATS USER JWT lines.
func userJWT(creds []byte) (string, error) {
	var token strings.Builder
	in := false
	for _, line := range strings.Split(string(creds), "\n") {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "-----BEGIN NATS USER JWT"):
			in = true
		case in && strings.HasPrefix(line, "------END NATS USER JWT"):
			if token.Len() == 0 {
				return "", errors.New("the user JWT block is empty")
			}
			return token.String(), nil
		case in:
			token.WriteString(line)
		}
	}
	return "", errors.New("no NATS USER JWT block found")
}

// connect opens a connection as the creds' user, with the inbox prefix
// that user may receive replies on (every JetStream API call needs it).
func connect(url, creds, userName string, stderr io.Writer, refused func(error)) (*nats.Conn, error) {
	nc, err := nats.Connect(url,
		nats.Name("sandboxer examples/billing-consumer"),
		nats.UserCredentials(creds),
		nats.CustomInboxPrefix("_INBOX."+userName),
		// Errors the server reports arrive asynchronously: a
		// permissions violation ends the run (refused), others are said.
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			if errors.Is(err, nats.ErrPermissionViolation) {
				refused(err)
				return
			}
			fmt.Fprintln(stderr, "billing-consumer: nats:", err)
		}),
	)
	if err != nil {
		return nil, fmt.Errorf("connecting to %s as %s: %w", url, userName, err)
	}
	return nc, nil
}

// --- the metering events ---

// entry is a ledger entry, the data of the ledger kinds' events: the
// credits contract's.
type entry = credits.Entry

// parseMeteringSubject splits sandboxer.meter.<consumer>.<kind>.
func parseMeteringSubject(subject string) (consumer, kind string, err error) {
	t := strings.Split(subject, ".")
	if len(t) != 4 || t[0] != "sandboxer" || t[1] != "meter" || t[2] == "" || t[3] == "" {
		return "", "", fmt.Errorf("%q is not a metering subject", subject)
	}
	return t[2], t[3], nil
}

// decodeMetering reads one metering event stored on subject. It returns
// its ledger entry, or nil for a kind that carries none.
func decodeMetering(msg *nats.Msg) (*entry, error) {
	consumer, kind, err := parseMeteringSubject(msg.Subject)
	if err != nil {
		return nil, err
	}
	e, err := fromMsg(msg)
	if err != nil {
		return nil, err
	}
	if want := string(credits.Kind(kind).Type()); e.Type() != want {
		return nil, fmt.Errorf("type %q on %s, want %q", e.Type(), msg.Subject, want)
	}
	if !ledgerKinds[credits.Kind(kind)] {
		return nil, nil
	}
	if ct := e.DataContentType(); ct != "" && ct != cloudevents.ApplicationJSON {
		return nil, fmt.Errorf("datacontenttype %q, want %s", ct, cloudevents.ApplicationJSON)
	}
	var en entry
	if err := json.Unmarshal(e.Data(), &en); err != nil {
		return nil, fmt.Errorf("ledger entry: %w", err)
	}
	switch {
	case en.Key == "" || en.Seq == 0:
		return nil, fmt.Errorf("ledger entry %q without a key or seq", e.ID())
	case en.Consumer != consumer:
		return nil, fmt.Errorf("ledger entry %s is for consumer %q, on %s's subject", en.Key, en.Consumer, consumer)
	}
	return &en, nil
}

// --- the fold ---

// account is one consumer's fold, and its output line.
type account struct {
	Consumer  string `json:"consumer"`
	Balance   int64  `json:"balance"`
	Held      int64  `json:"held"`
	Available int64  `json:"available"` // balance - held
	Entries   int    `json:"entries"`   // entries folded
	FirstSeq  uint64 `json:"first_seq"` // 1 when the whole history was folded
	LastSeq   uint64 `json:"last_seq"`
	// Duplicates are entries seen again (a republish): skipped.
	Duplicates int `json:"duplicates,omitempty"`

	keys map[uint64]string // seq: key, to tell a republish from a conflict
}

// ledger folds entries into accounts. fromStart says the fold starts at
// the beginning of the stream: every consumer's first entry must then be
// seq 1, and balances start at zero. Otherwise a consumer first seen
// mid-stream opens with what its first entry says it left
// (balance_after, held_after). Either way every later entry must follow
// its predecessor's seq and its after values must equal the running sums.
type ledger struct {
	fromStart bool
	accounts  map[string]*account
}

func newLedger(fromStart bool) *ledger {
	return &ledger{fromStart: fromStart, accounts: map[string]*account{}}
}

// apply folds e. It returns false for a duplicate, and an error (errGap,
// errMismatch, errConflict) when the ledger cannot be trusted; then
// nothing changes.
func (l *ledger) apply(e entry) (bool, error) {
	a := l.accounts[e.Consumer]
	switch {
	case a != nil && e.Seq <= a.LastSeq:
		if a.keys[e.Seq] == e.Key {
			a.Duplicates++
			return false, nil
		}
		return false, fmt.Errorf("%w: consumer %s seq %d is %s, already folded as %s", errConflict, e.Consumer, e.Seq, e.Key, a.keys[e.Seq])
	case a != nil && e.Seq != a.LastSeq+1:
		return false, fmt.Errorf("%w: consumer %s seq %d (%s) follows seq %d", errGap, e.Consumer, e.Seq, e.Key, a.LastSeq)
	case a == nil && l.fromStart && e.Seq != 1:
		return false, fmt.Errorf("%w: consumer %s starts at seq %d (%s), not 1", errGap, e.Consumer, e.Seq, e.Key)
	}
	var balance, held int64 // the opening: zero from the start
	switch {
	case a != nil:
		balance, held = a.Balance, a.Held
	case !l.fromStart:
		balance, held = e.BalanceAfter-e.Amount, e.HeldAfter-e.Held
	}
	balance += e.Amount
	held += e.Held
	if balance != e.BalanceAfter || held != e.HeldAfter {
		return false, fmt.Errorf("%w: consumer %s seq %d (%s): the sums are balance %d, held %d; the entry says balance_after %d, held_after %d",
			errMismatch, e.Consumer, e.Seq, e.Key, balance, held, e.BalanceAfter, e.HeldAfter)
	}
	if a == nil {
		a = &account{Consumer: e.Consumer, FirstSeq: e.Seq, keys: map[uint64]string{}}
		l.accounts[e.Consumer] = a
	}
	a.Balance, a.Held, a.Available = balance, held, balance-held
	a.Entries++
	a.LastSeq = e.Seq
	a.keys[e.Seq] = e.Key
	return true, nil
}

// sorted is every account, by consumer.
func (l *ledger) sorted() []*account {
	out := make([]*account, 0, len(l.accounts))
	for _, a := range l.accounts {
		out = append(out, a)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Consumer < out[j].Consumer })
	return out
}

// process folds one message of the stream and acks it. It returns the
// account the message changed, if any. A message that cannot be folded
// is left unacked and stops the run.
func (l *ledger) process(msg jetstream.Msg) (*account, error) {
	var seq uint64
	if md, err := msg.Metadata(); err == nil {
		seq = md.Sequence.Stream
	}
	en, err := decodeMetering(&nats.Msg{Subject: msg.Subject(), Header: msg.Headers(), Data: msg.Data()})
	if err != nil {
		return nil, fmt.Errorf("stream sequence %d (%s): %w", seq, msg.Subject(), err)
	}
	var changed *account
	if en != nil {
		ok, err := l.apply(*en)
		if err != nil {
			return nil, fmt.Errorf("stream sequence %d: %w", seq, err)
		}
		if ok {
			changed = l.accounts[en.Consumer]
		}
	}
	if err := msg.Ack(); err != nil {
		return nil, fmt.Errorf("acking stream sequence %d: %w", seq, err)
	}
	return changed, nil
}

// caughtUp says whether a message is the last one to read at start: none
// left pending for the durable, or the stream's last sequence when the
// run started is reached.
func caughtUp(md *jetstream.MsgMetadata, lastSeq uint64) bool {
	return md.NumPending == 0 || md.Sequence.Stream >= lastSeq
}

// catchUp reads the durable until caughtUp, folding and acking each
// message.
func catchUp(ctx context.Context, cons jetstream.Consumer, l *ledger, lastSeq uint64) error {
	for {
		batch, err := cons.FetchNoWait(fetchBatch)
		if err != nil {
			return fmt.Errorf("fetching: %w", err)
		}
		n, done := 0, false
		for msg := range batch.Messages() {
			n++
			if _, err := l.process(msg); err != nil {
				return err
			}
			if md, err := msg.Metadata(); err == nil && caughtUp(md, lastSeq) {
				done = true
			}
		}
		if err := batch.Error(); err != nil {
			return fmt.Errorf("fetching: %w", err)
		}
		if done {
			return nil
		}
		if n == 0 {
			// Nothing came: done if nothing is pending, else try again.
			info, err := cons.Info(ctx)
			if err != nil {
				return fmt.Errorf("reading the durable's state: %w", err)
			}
			if info.NumPending == 0 {
				return nil
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("catching up: %w (%d messages still pending)", context.Cause(ctx), info.NumPending)
			case <-time.After(200 * time.Millisecond):
			}
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("catching up: %w", context.Cause(ctx))
		}
	}
}

// follow reads the durable until ctx ends, printing an account's line
// after each change of it.
func follow(ctx context.Context, cons jetstream.Consumer, l *ledger, stdout io.Writer) error {
	it, err := cons.Messages()
	if err != nil {
		return fmt.Errorf("following: %w", err)
	}
	defer it.Stop()
	for {
		msg, err := it.Next(jetstream.NextContext(ctx))
		if err != nil {
			if ctx.Err() != nil {
				return nil // interrupted: a normal end of --follow
			}
			return fmt.Errorf("following: %w", err)
		}
		a, err := l.process(msg)
		if err != nil {
			return err
		}
		if a != nil {
			if err := printJSON(stdout, a); err != nil {
				return err
			}
		}
	}
}

// --- the program ---

// execute runs the program on cfg; refused cancels ctx with a
// permissions violation as its cause.
func (cfg *config) execute(ctx context.Context, stdout, stderr io.Writer, refused func(error)) error {
	creds, err := os.ReadFile(cfg.creds)
	if err != nil {
		return fmt.Errorf("reading credentials: %w", err)
	}
	user, err := credsUserName(creds)
	if err != nil {
		return fmt.Errorf("reading credentials %s: %w", cfg.creds, err)
	}
	durable := cfg.durable
	if durable == "" {
		durable = user
	}
	nc, err := connect(cfg.natsURL, cfg.creds, user, stderr, refused)
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}

	start, cancel := context.WithTimeout(ctx, cfg.timeout)
	defer cancel()

	// Replay from --since: the durable delivers from there again.
	if _, err := js.ResetConsumerToSequence(start, streamMetering, durable, cfg.since); err != nil {
		switch {
		case errors.Is(err, jetstream.ErrConsumerNotFound):
			return fmt.Errorf("no durable %s on %s: the operator's setup creates it", durable, streamMetering)
		case errors.Is(err, jetstream.ErrConsumerInvalidReset):
			return fmt.Errorf("durable %s cannot start at sequence %d: its deliver policy starts later", durable, cfg.since)
		}
		return fmt.Errorf("resetting durable %s to sequence %d: %w", durable, cfg.since, err)
	}
	stream, err := js.Stream(start, streamMetering)
	if err != nil {
		return fmt.Errorf("reading stream %s: %w", streamMetering, err)
	}
	state := stream.CachedInfo().State
	cons, err := js.Consumer(start, streamMetering, durable)
	if err != nil {
		return fmt.Errorf("opening durable %s: %w", durable, err)
	}

	// A replay from 1 checks every consumer's whole history, unless the
	// stream no longer holds it (its oldest messages aged out).
	fromStart := cfg.since == 1 && state.FirstSeq <= 1
	if cfg.since == 1 && !fromStart {
		fmt.Fprintf(stderr, "billing-consumer: %s starts at sequence %d (older messages are gone): each consumer opens with its first entry's balance_after\n", streamMetering, state.FirstSeq)
	}
	l := newLedger(fromStart)
	if err := catchUp(start, cons, l, state.LastSeq); err != nil {
		return err
	}
	if err := nc.FlushWithContext(start); err != nil { // the acks
		return fmt.Errorf("flushing acks: %w", err)
	}
	for _, a := range l.sorted() {
		if err := printJSON(stdout, a); err != nil {
			return err
		}
	}
	if !cfg.follow {
		return nil
	}
	return follow(ctx, cons, l, stdout)
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	return enc.Encode(v)
}

// --- CloudEvents over NATS ---

// fromMsg reads the CloudEvent in msg: structured mode when its
// content-type is application/cloudevents+json, else binary content mode
// (ce-* headers, percent-encoded, data in the body).
func fromMsg(msg *nats.Msg) (*cloudevents.Event, error) {
	m := newNATSMessage(msg)
	if m.ReadEncoding() == binding.EncodingUnknown {
		if sv, ok := m.hdr["ce-specversion"]; ok {
			return nil, fmt.Errorf("unsupported ce-specversion %q", sv)
		}
		return nil, errors.New("not a CloudEvent: no ce-specversion header, no content-type application/cloudevents+json")
	}
	e, err := binding.ToEvent(context.Background(), m)
	if err != nil {
		return nil, err
	}
	if err := e.Validate(); err != nil {
		return nil, err
	}
	return e, nil
}

// natsMessage is a binding.Message over a NATS message, for
// binding.ToEvent.
type natsMessage struct {
	msg     *nats.Msg
	hdr     map[string]string // lower-case header name: its first value, as sent
	version spec.Version      // the ce-specversion's; nil unless binary
}

func newNATSMessage(msg *nats.Msg) *natsMessage {
	m := &natsMessage{msg: msg, hdr: make(map[string]string, len(msg.Header))}
	for k, vs := range msg.Header {
		if len(vs) > 0 {
			m.hdr[strings.ToLower(k)] = vs[0]
		}
	}
	if format.Lookup(m.hdr["content-type"]) != format.JSON {
		if sv, err := percentDecode(m.hdr["ce-specversion"]); err == nil {
			m.version = spec.VS.Version(sv)
		}
	}
	return m
}

func (m *natsMessage) ReadEncoding() binding.Encoding {
	switch {
	case format.Lookup(m.hdr["content-type"]) == format.JSON:
		return binding.EncodingStructured
	case m.version != nil:
		return binding.EncodingBinary
	}
	return binding.EncodingUnknown
}

func (m *natsMessage) ReadStructured(ctx context.Context, w binding.StructuredWriter) error {
	if m.ReadEncoding() != binding.EncodingStructured {
		return binding.ErrNotStructured
	}
	return w.SetStructuredEvent(ctx, format.JSON, bytes.NewReader(m.msg.Data))
}

func (m *natsMessage) ReadBinary(_ context.Context, w binding.BinaryWriter) error {
	if m.version == nil {
		return binding.ErrNotBinary
	}
	// The spec version first: it decides how the others are read.
	if err := w.SetAttribute(m.version.AttributeFromKind(spec.SpecVersion), m.version.String()); err != nil {
		return err
	}
	for k, raw := range m.hdr {
		name, ok := strings.CutPrefix(k, "ce-")
		if !ok || name == "specversion" {
			continue
		}
		v, err := percentDecode(raw)
		if err != nil {
			return fmt.Errorf("header %s: %w", k, err)
		}
		if a := m.version.Attribute(name); a != nil {
			err = w.SetAttribute(a, v)
		} else {
			err = w.SetExtension(name, v)
		}
		if err != nil {
			return fmt.Errorf("header %s: %w", k, err)
		}
	}
	// A content-type header stands in for a missing ce-datacontenttype.
	if ct, ok := m.hdr["content-type"]; ok {
		if _, set := m.hdr["ce-datacontenttype"]; !set {
			if err := w.SetAttribute(m.version.AttributeFromKind(spec.DataContentType), ct); err != nil {
				return err
			}
		}
	}
	if len(m.msg.Data) > 0 {
		return w.SetData(bytes.NewReader(m.msg.Data))
	}
	return nil
}

// GetAttribute and GetExtension make natsMessage a
// binding.MessageMetadataReader, which the SDK asks of binary messages.
func (m *natsMessage) GetAttribute(k spec.Kind) (spec.Attribute, any) {
	if m.version == nil {
		return nil, nil
	}
	a := m.version.AttributeFromKind(k)
	if a == nil {
		return nil, nil
	}
	if v := m.GetExtension(a.Name()); v != nil {
		return a, v
	}
	return a, nil
}

func (m *natsMessage) GetExtension(name string) any {
	raw, ok := m.hdr["ce-"+strings.ToLower(name)]
	if !ok {
		return nil
	}
	v, err := percentDecode(raw)
	if err != nil {
		return nil
	}
	return v
}

func (m *natsMessage) Finish(error) error { return nil }

// percentDecode reverses the CloudEvents HTTP binding's percent-encoding
// of header values; it refuses a bad escape or a result that is not UTF-8.
func percentDecode(s string) (string, error) {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '%' {
			b.WriteByte(s[i])
			continue
		}
		if i+2 >= len(s) {
			return "", fmt.Errorf("truncated escape in %q", s)
		}
		hi, ok1 := unhex(s[i+1])
		lo, ok2 := unhex(s[i+2])
		if !ok1 || !ok2 {
			return "", fmt.Errorf("bad escape %q in %q", s[i:i+3], s)
		}
		b.WriteByte(hi<<4 | lo)
		i += 2
	}
	if !utf8.ValidString(b.String()) {
		return "", fmt.Errorf("%q is not UTF-8", s)
	}
	return b.String(), nil
}

func unhex(c byte) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	case 'A' <= c && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}
