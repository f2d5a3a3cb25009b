// Command bus-request asks sand-boxer for a sandbox with one CloudEvent on
// NATS, waits until the sandbox is ready, prints it, and destroys it again.
//
// It relies on the documented contract only (docs/events.md): a tenant's
// .creds file, the request subjects sandboxer.req.<consumer>.create and
// .destroy, the gateway's reply ({"sandbox": ...} or {"problem": ...}) and
// the lifecycle events on sandboxer.evt.<consumer>.>. It imports nothing
// from sand-boxer itself: the few JSON shapes it needs are declared here.
//
// Events are sent in CloudEvents binary content mode: the event is built
// with the CloudEvents SDK and written into NATS headers (ce-*, lower case,
// percent-encoded as the CloudEvents HTTP binding says) by a small binding
// writer below; data is the JSON body.
//
//	bus-request --creds ~/.local/share/sandboxer/creds/dev.creds --profile local
//
// Output: the ready sandbox as one JSON line, then (unless --keep) the
// destroyed sandbox as a second one. Exit status 1 on any failure (a
// refused request, a failed or rejected sandbox, a timeout), 2 on a usage
// error.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
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
	"github.com/cloudevents/sdk-go/v2/types"
	"github.com/nats-io/nats.go"
)

// The contract's names.
const (
	typeCreate    = "dev.sandboxer.request.create.v1"
	typeDestroy   = "dev.sandboxer.request.destroy.v1"
	typeGet       = "dev.sandboxer.request.get.v1"
	defaultSource = "/examples/bus-request"
	defaultNATS   = "nats://127.0.0.1:4222"
)

// attemptTimeout bounds one request attempt (and one direct get). A
// request that gets no reply in time is sent again, unchanged, until
// --timeout runs out.
const attemptTimeout = 10 * time.Second

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
		fmt.Fprintln(stderr, "bus-request:", err)
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
		fmt.Fprintln(stderr, "bus-request:", err)
		return 1
	}
	return 0
}

// config is what the flags say.
type config struct {
	natsURL  string
	creds    string
	consumer string // empty: from the creds' user name
	profile  string
	inputs   kvFlag
	labels   kvFlag
	ttl      string
	source   string
	id       string // ce-id of the create request; empty: random
	keep     bool
	timeout  time.Duration
}

func parseFlags(args []string, stderr io.Writer) (*config, error) {
	cfg := &config{inputs: kvFlag{}, labels: kvFlag{}}
	fs := flag.NewFlagSet("bus-request", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: bus-request [flags]\n\nAsks for a sandbox with one CloudEvent, waits for ready, prints it, destroys it.\n\nflags:")
		fs.PrintDefaults()
	}
	fs.StringVar(&cfg.natsURL, "nats", envOr("NATS_URL", defaultNATS), "NATS server URL (env NATS_URL)")
	fs.StringVar(&cfg.creds, "creds", envOr("NATS_CREDS", filepath.Join(dataDir(), "creds", "dev.creds")), "tenant credentials file (env NATS_CREDS)")
	fs.StringVar(&cfg.consumer, "consumer", "", "consumer to ask as (default: the creds' user name without tenant-)")
	fs.StringVar(&cfg.profile, "profile", "local", "profile to create the sandbox from")
	fs.Var(cfg.inputs, "input", "input `k=v` (repeatable)")
	fs.Var(cfg.labels, "label", "label `k=v` (repeatable)")
	fs.StringVar(&cfg.ttl, "ttl", "", "time to live once ready, a Go duration such as 30m (default: the profile's)")
	fs.StringVar(&cfg.source, "source", defaultSource, "ce-source of the request events (a URI-reference naming this requester)")
	fs.StringVar(&cfg.id, "id", "", "ce-id of the create request; reuse it to get the same sandbox again (default: random)")
	fs.BoolVar(&cfg.keep, "keep", false, "keep the sandbox: do not destroy it")
	fs.DurationVar(&cfg.timeout, "timeout", 2*time.Minute, "bound of each wait: a reply, ready, destroyed")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	switch {
	case fs.NArg() > 0:
		return nil, fmt.Errorf("%w: unexpected arguments %q", errUsage, fs.Args())
	case cfg.profile == "":
		return nil, fmt.Errorf("%w: --profile is required", errUsage)
	case cfg.creds == "":
		return nil, fmt.Errorf("%w: --creds is required", errUsage)
	case cfg.timeout <= 0:
		return nil, fmt.Errorf("%w: --timeout must be positive", errUsage)
	case cfg.source == "":
		return nil, fmt.Errorf("%w: --source must not be empty", errUsage)
	}
	if cfg.ttl != "" {
		if d, err := time.ParseDuration(cfg.ttl); err != nil || d <= 0 {
			return nil, fmt.Errorf("%w: --ttl %q is not a positive Go duration such as 30m", errUsage, cfg.ttl)
		}
	}
	return cfg, nil
}

// kvFlag is a repeatable k=v flag.
type kvFlag map[string]string

func (f kvFlag) String() string {
	keys := make([]string, 0, len(f))
	for k := range f {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for i, k := range keys {
		keys[i] = k + "=" + f[k]
	}
	return strings.Join(keys, ",")
}

func (f kvFlag) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("%q is not k=v", s)
	}
	if _, dup := f[k]; dup {
		return fmt.Errorf("%q given twice", k)
	}
	f[k] = v
	return nil
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

// consumerOf is the consumer a tenant user acts for: its name without
// "tenant-".
func consumerOf(userName string) (string, error) {
	c, ok := strings.CutPrefix(userName, "tenant-")
	if !ok || c == "" {
		return "", fmt.Errorf("user %q is not a tenant (tenant-<consumer>); pass --consumer", userName)
	}
	return c, nil
}

// connect opens a connection as the creds' user, with the inbox prefix
// that user may receive replies on.
func connect(url, creds, userName string, stderr io.Writer, refused func(error)) (*nats.Conn, error) {
	nc, err := nats.Connect(url,
		nats.Name("sandboxer examples/bus-request"),
		nats.UserCredentials(creds),
		nats.CustomInboxPrefix("_INBOX."+userName),
		// Errors the server reports arrive asynchronously: a
		// permissions violation ends the run (refused), others are said.
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			if errors.Is(err, nats.ErrPermissionViolation) {
				refused(err)
				return
			}
			fmt.Fprintln(stderr, "bus-request: nats:", err)
		}),
	)
	if err != nil {
		return nil, fmt.Errorf("connecting to %s as %s: %w", url, userName, err)
	}
	return nc, nil
}

// --- the contract's JSON ---

// createRequest is the data of dev.sandboxer.request.create.v1.
type createRequest struct {
	Profile string            `json:"profile"`
	Inputs  map[string]string `json:"inputs,omitempty"`
	Labels  map[string]string `json:"labels,omitempty"`
	TTL     string            `json:"ttl,omitempty"`
}

// destroyRequest is the data of dev.sandboxer.request.destroy.v1.
type destroyRequest struct {
	SandboxID string `json:"sandbox_id"`
}

// getRequest is the data of dev.sandboxer.request.get.v1.
type getRequest struct {
	SandboxID string `json:"sandbox_id"`
}

// reply is the gateway's answer to a request: exactly one of the two.
type reply struct {
	Sandbox *sandbox `json:"sandbox"`
	Problem *problem `json:"problem"`
}

// sandbox is the part of the HTTP API's sandbox object this client reads.
type sandbox struct {
	ID           string        `json:"id"`
	State        string        `json:"state"`
	Consumer     string        `json:"consumer"`
	Profile      string        `json:"profile"`
	Extension    string        `json:"extension"`
	Host         string        `json:"host,omitempty"`
	Reachability *reachability `json:"reachability,omitempty"`
	ReadyAt      string        `json:"ready_at,omitempty"`
	ExpiresAt    string        `json:"expires_at,omitempty"`
	Reason       string        `json:"reason"`
	Code         string        `json:"code"`
}

// problem is an RFC 9457 problem.
type problem struct {
	Title    string `json:"title"`
	Status   int    `json:"status"`
	Detail   string `json:"detail"`
	Instance string `json:"instance"`
	Errors   []struct {
		Field  string `json:"field"`
		Detail string `json:"detail"`
	} `json:"errors"`
}

func (p *problem) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "refused: %d %s", p.Status, p.Title)
	if p.Detail != "" {
		b.WriteString(": " + p.Detail)
	}
	for _, e := range p.Errors {
		fmt.Fprintf(&b, "; %s: %s", e.Field, e.Detail)
	}
	return b.String()
}

// reachability says where a ready sandbox is.
type reachability struct {
	Host           string            `json:"host"`
	SSH            string            `json:"ssh,omitempty"`
	RemoteDir      string            `json:"remote_dir,omitempty"`
	ComposeProject string            `json:"compose_project,omitempty"`
	Ports          map[string]string `json:"ports,omitempty"`
}

type origin struct {
	Source string `json:"source"`
	ID     string `json:"id"`
}

type cleanup struct {
	Removed     []string `json:"removed,omitempty"`
	AlreadyGone bool     `json:"already_gone,omitempty"`
}

// lifecycleData holds the fields of the lifecycle events this client
// reads (ready, failed, rejected, destroyed). Unknown fields are ignored,
// so newer events still decode.
type lifecycleData struct {
	SandboxID    string        `json:"sandbox_id"`
	Consumer     string        `json:"consumer"`
	Profile      string        `json:"profile"`
	Extension    string        `json:"extension"`
	Host         string        `json:"host,omitempty"`
	Request      *origin       `json:"request,omitempty"`
	Reachability *reachability `json:"reachability,omitempty"`
	ReadyAt      string        `json:"ready_at,omitempty"`
	ExpiresAt    string        `json:"expires_at,omitempty"`
	Phase        string        `json:"phase,omitempty"`  // failed
	Reason       string        `json:"reason,omitempty"` // failed, rejected, destroyed
	Code         string        `json:"code,omitempty"`   // rejected
	Cleanup      *cleanup      `json:"cleanup,omitempty"`
}

// readyLine is the first line printed: the ready sandbox.
type readyLine struct {
	ID           string       `json:"id"`
	State        string       `json:"state"`
	Consumer     string       `json:"consumer"`
	Profile      string       `json:"profile"`
	Extension    string       `json:"extension"`
	Host         string       `json:"host,omitempty"`
	Reachability reachability `json:"reachability"`
	ReadyAt      string       `json:"ready_at,omitempty"`
	ExpiresAt    string       `json:"expires_at,omitempty"`
	Request      *origin      `json:"request,omitempty"`
}

// destroyedLine is the second line printed: what teardown did.
type destroyedLine struct {
	ID      string  `json:"id"`
	State   string  `json:"state"`
	Reason  string  `json:"reason"`
	Cleanup cleanup `json:"cleanup"`
}

// --- CloudEvents over NATS ---

// newEvent builds a request event: CloudEvents 1.0 with JSON data.
func newEvent(typ, source, id string, at time.Time, data any) (cloudevents.Event, error) {
	e := cloudevents.New(cloudevents.CloudEventsVersionV1)
	e.SetType(typ)
	e.SetSource(source)
	e.SetID(id)
	e.SetTime(at)
	if err := e.SetData(cloudevents.ApplicationJSON, data); err != nil {
		return e, err
	}
	return e, e.Validate()
}

// toMsg writes e into a NATS message on subject in binary content mode.
func toMsg(ctx context.Context, subject string, e cloudevents.Event) (*nats.Msg, error) {
	msg := nats.NewMsg(subject)
	if _, err := binding.Write(ctx, binding.ToMessage(&e), nil, headerWriter{msg}); err != nil {
		return nil, fmt.Errorf("encoding event %s: %w", e.ID(), err)
	}
	return msg, nil
}

// headerWriter is a binding.BinaryWriter into a NATS message: one
// lower-case ce-<attribute> header per attribute, in its canonical string
// form, percent-encoded; the data is the body.
type headerWriter struct{ msg *nats.Msg }

func (w headerWriter) Start(context.Context) error { return nil }
func (w headerWriter) End(context.Context) error   { return nil }

func (w headerWriter) SetAttribute(a spec.Attribute, v any) error { return w.set(a.Name(), v) }
func (w headerWriter) SetExtension(name string, v any) error      { return w.set(name, v) }

func (w headerWriter) set(name string, v any) error {
	key := "ce-" + strings.ToLower(name)
	if v == nil {
		w.msg.Header.Del(key)
		return nil
	}
	s, err := types.Format(v)
	if err != nil {
		return fmt.Errorf("attribute %s: %w", name, err)
	}
	w.msg.Header.Set(key, percentEncode(s))
	return nil
}

func (w headerWriter) SetData(r io.Reader) (err error) {
	w.msg.Data, err = io.ReadAll(r)
	return err
}

// fromMsg reads the CloudEvent in msg: structured mode when its
// content-type is application/cloudevents+json, else binary content mode
// (ce-* headers, data in the body).
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

// percentEncode escapes a header value as the CloudEvents HTTP binding
// says: space, '"', '%' and every byte outside printable ASCII become %XX.
func percentEncode(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= ' ' || c > '~' || c == '"' || c == '%' {
			fmt.Fprintf(&b, "%%%02X", c)
		} else {
			b.WriteByte(c)
		}
	}
	return b.String()
}

// percentDecode reverses percentEncode; it refuses a bad escape or a
// result that is not UTF-8.
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

// --- requests ---

// parseReply decodes a gateway reply: the sandbox, or the problem as the
// error.
func parseReply(data []byte) (*sandbox, error) {
	var r reply
	if err := json.Unmarshal(data, &r); err != nil {
		return nil, fmt.Errorf("the gateway's reply is not JSON: %w (%q)", err, truncate(data))
	}
	switch {
	case r.Problem != nil:
		return nil, r.Problem
	case r.Sandbox == nil || r.Sandbox.ID == "":
		return nil, fmt.Errorf("the gateway's reply has neither a sandbox nor a problem: %q", truncate(data))
	}
	return r.Sandbox, nil
}

func truncate(b []byte) string {
	if len(b) > 200 {
		return string(b[:200]) + "..."
	}
	return string(b)
}

// request sends msg as a NATS request and decodes the reply. When no
// reply comes within attemptTimeout it sends msg again, unchanged: the
// same ce-source and ce-id, which the gateway answers with the same
// sandbox. It gives up when ctx ends.
func request(ctx context.Context, nc *nats.Conn, msg *nats.Msg, stderr io.Writer) (*sandbox, error) {
	id := msg.Header.Get("ce-id")
	for {
		actx, cancel := context.WithTimeout(ctx, attemptTimeout)
		res, err := nc.RequestMsgWithContext(actx, msg)
		cancel()
		switch {
		case err == nil:
			return parseReply(res.Data)
		case errors.Is(err, nats.ErrNoResponders):
			return nil, fmt.Errorf("no gateway answers on %s (is it running?)", msg.Subject)
		case ctx.Err() != nil:
			return nil, fmt.Errorf("no reply on %s: %w", msg.Subject, context.Cause(ctx))
		case errors.Is(err, context.DeadlineExceeded), errors.Is(err, nats.ErrTimeout):
			fmt.Fprintf(stderr, "bus-request: no reply on %s within %s; sending request %s again\n", msg.Subject, attemptTimeout, id)
		default:
			return nil, fmt.Errorf("request on %s: %w", msg.Subject, err)
		}
	}
}

// --- lifecycle ---

// lifecycleEvent is one decoded lifecycle event.
type lifecycleEvent struct {
	Subject   string
	Consumer  string
	Extension string
	Sandbox   string
	State     string
	Data      lifecycleData
}

// parseLifecycleSubject splits sandboxer.evt.<consumer>.<extension>.<sandbox>.<state>.
func parseLifecycleSubject(subject string) (consumer, extension, sandbox, state string, err error) {
	t := strings.Split(subject, ".")
	if len(t) != 6 || t[0] != "sandboxer" || t[1] != "evt" {
		return "", "", "", "", fmt.Errorf("%q is not a lifecycle subject", subject)
	}
	for _, tok := range t[2:] {
		if tok == "" {
			return "", "", "", "", fmt.Errorf("%q has an empty token", subject)
		}
	}
	return t[2], t[3], t[4], t[5], nil
}

// parseLifecycle decodes a lifecycle event stored (or published) on
// subject and checks its type against the subject's state.
func parseLifecycle(subject string, msg *nats.Msg) (*lifecycleEvent, error) {
	c, x, s, st, err := parseLifecycleSubject(subject)
	if err != nil {
		return nil, err
	}
	e, err := fromMsg(msg)
	if err != nil {
		return nil, fmt.Errorf("event on %s: %w", subject, err)
	}
	if want := "dev.sandboxer.sandbox." + st + ".v1"; e.Type() != want {
		return nil, fmt.Errorf("event on %s has type %q, want %q", subject, e.Type(), want)
	}
	ev := &lifecycleEvent{Subject: subject, Consumer: c, Extension: x, Sandbox: s, State: st}
	if err := json.Unmarshal(e.Data(), &ev.Data); err != nil {
		return nil, fmt.Errorf("event on %s: data: %w", subject, err)
	}
	return ev, nil
}

// current asks the gateway for sandbox id as it is now, with a get
// request event on sandboxer.req.<consumer>.get: a tenant sends nothing
// to JetStream itself. The answer is the sandbox record, which may trail
// the lifecycle events by a moment; nil when there is no such sandbox.
func (cfg *config) current(ctx context.Context, nc *nats.Conn, consumer, id string, stderr io.Writer) (*lifecycleEvent, error) {
	sb, err := cfg.send(ctx, nc, consumer, "get", typeGet, "get-"+strings.ToLower(rand.Text()), getRequest{SandboxID: id}, stderr)
	var p *problem
	if errors.As(err, &p) && p.Status == 404 {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return &lifecycleEvent{Consumer: sb.Consumer, Extension: sb.Extension, Sandbox: sb.ID, State: sb.State, Data: lifecycleData{
		SandboxID: sb.ID, Consumer: sb.Consumer, Profile: sb.Profile, Extension: sb.Extension, Host: sb.Host,
		Reachability: sb.Reachability, ReadyAt: sb.ReadyAt, ExpiresAt: sb.ExpiresAt, Reason: sb.Reason, Code: sb.Code,
	}}, nil
}

// verdict says what ev means to someone waiting for state want: done
// (ev is it), an error (it will never come), or neither (keep waiting).
// inOrder is true for events read in stream order (the subscription):
// then a later state seen before want means want was skipped. The latest
// stored event (a direct get) is not in order with the subscription, so
// it only decides when it is want, failed or rejected.
func verdict(ev *lifecycleEvent, want string, inOrder bool) (done bool, err error) {
	d := ev.Data
	switch {
	case ev.State == want:
		return true, nil
	case ev.State == "failed":
		return true, fmt.Errorf("sandbox %s failed (%s): %s", ev.Sandbox, d.Phase, d.Reason)
	case ev.State == "rejected":
		return true, fmt.Errorf("sandbox %s rejected (%s): %s", ev.Sandbox, d.Code, d.Reason)
	case want == "ready" && inOrder && (ev.State == "expired" || ev.State == "destroying" || ev.State == "destroyed"):
		return true, fmt.Errorf("sandbox %s was %s before it was ready (%s)", ev.Sandbox, ev.State, d.Reason)
	}
	return false, nil
}

// waitState waits until sandbox id reaches state want. sub receives the
// consumer's lifecycle events and was subscribed before the request that
// leads there was sent, so nothing after it is missed; the sandbox as it
// is now is asked for first (current), in case it already says.
func waitState(ctx context.Context, sub *nats.Subscription, id, want string, current func(context.Context) (*lifecycleEvent, error), stderr io.Writer) (*lifecycleEvent, error) {
	ev, err := current(ctx)
	if err != nil {
		return nil, err
	}
	if ev != nil {
		if done, err := verdict(ev, want, false); done || err != nil {
			return ev, err
		}
	}
	for {
		msg, err := sub.NextMsgWithContext(ctx)
		if err != nil {
			if ctx.Err() != nil {
				err = context.Cause(ctx)
			}
			return nil, fmt.Errorf("waiting for sandbox %s to be %s: %w", id, want, err)
		}
		_, _, s, _, err := parseLifecycleSubject(msg.Subject)
		if err != nil || s != id {
			continue // another sandbox's event
		}
		ev, err := parseLifecycle(msg.Subject, msg)
		if err != nil {
			fmt.Fprintln(stderr, "bus-request: skipping", err)
			continue
		}
		if done, err := verdict(ev, want, true); done || err != nil {
			return ev, err
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
	consumer := cfg.consumer
	if consumer == "" {
		if consumer, err = consumerOf(user); err != nil {
			return err
		}
	}
	nc, err := connect(cfg.natsURL, cfg.creds, user, stderr, refused)
	if err != nil {
		return err
	}
	defer nc.Close()

	// Subscribe to the consumer's lifecycle before asking, so no event of
	// the new sandbox can slip by; the flush makes sure the server has the
	// subscription (and reports a refused one) before the request goes out.
	lifecycle := "sandboxer.evt." + consumer + ".>"
	sub, err := nc.SubscribeSync(lifecycle)
	if err != nil {
		return fmt.Errorf("subscribing to %s: %w", lifecycle, err)
	}
	defer sub.Unsubscribe()
	if err := flush(ctx, nc, cfg.timeout); err != nil {
		return fmt.Errorf("subscribing to %s: %w", lifecycle, err)
	}

	// Ask for the sandbox.
	id := cfg.id
	if id == "" {
		id = "req-" + strings.ToLower(rand.Text())
	}
	data := createRequest{Profile: cfg.profile, Inputs: cfg.inputs, Labels: cfg.labels, TTL: cfg.ttl}
	created, err := cfg.send(ctx, nc, consumer, "create", typeCreate, id, data, stderr)
	if err != nil {
		return err
	}
	if created.State == "rejected" || created.State == "failed" {
		return fmt.Errorf("sandbox %s %s (%s): %s", created.ID, created.State, created.Code, created.Reason)
	}

	// Wait until it is ready.
	wctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	now := func(ctx context.Context) (*lifecycleEvent, error) {
		return cfg.current(ctx, nc, consumer, created.ID, stderr)
	}
	ready, err := waitState(wctx, sub, created.ID, "ready", now, stderr)
	cancel()
	if err != nil {
		if ready == nil && !cfg.keep && !errors.Is(context.Cause(ctx), nats.ErrPermissionViolation) {
			// Given up (timeout, interrupt): do not leave it behind.
			cfg.abandon(nc, consumer, created.ID, stderr)
		}
		return err
	}
	d := ready.Data
	line := readyLine{ID: ready.Sandbox, State: "ready", Consumer: ready.Consumer, Profile: d.Profile,
		Extension: ready.Extension, Host: d.Host, ReadyAt: d.ReadyAt, ExpiresAt: d.ExpiresAt, Request: d.Request}
	if d.Reachability != nil {
		line.Reachability = *d.Reachability
	}
	if err := printJSON(stdout, line); err != nil {
		return err
	}
	if cfg.keep {
		return nil
	}

	// Destroy it, and wait until it is gone.
	if _, err := cfg.send(ctx, nc, consumer, "destroy", typeDestroy, "req-"+strings.ToLower(rand.Text()), destroyRequest{SandboxID: created.ID}, stderr); err != nil {
		return fmt.Errorf("destroying %s: %w", created.ID, err)
	}
	wctx, cancel = context.WithTimeout(ctx, cfg.timeout)
	defer cancel()
	gone, err := waitState(wctx, sub, created.ID, "destroyed", now, stderr)
	if err != nil {
		return err
	}
	out := destroyedLine{ID: gone.Sandbox, State: "destroyed", Reason: gone.Data.Reason}
	if gone.Data.Cleanup != nil {
		out.Cleanup = *gone.Data.Cleanup
	}
	return printJSON(stdout, out)
}

// send publishes one request event (verb create or destroy) and returns
// the sandbox of the gateway's reply.
func (cfg *config) send(ctx context.Context, nc *nats.Conn, consumer, verb, typ, id string, data any, stderr io.Writer) (*sandbox, error) {
	e, err := newEvent(typ, cfg.source, id, time.Now().UTC(), data)
	if err != nil {
		return nil, fmt.Errorf("building the %s request: %w", verb, err)
	}
	msg, err := toMsg(ctx, "sandboxer.req."+consumer+"."+verb, e)
	if err != nil {
		return nil, err
	}
	rctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	defer cancel()
	return request(rctx, nc, msg, stderr)
}

// abandon asks, once and briefly, for a sandbox this run gave up waiting
// for to be destroyed.
func (cfg *config) abandon(nc *nats.Conn, consumer, id string, stderr io.Writer) {
	ctx, cancel := context.WithTimeout(context.Background(), attemptTimeout)
	defer cancel()
	if _, err := cfg.send(ctx, nc, consumer, "destroy", typeDestroy, "req-"+strings.ToLower(rand.Text()), destroyRequest{SandboxID: id}, stderr); err != nil {
		fmt.Fprintf(stderr, "bus-request: could not ask to destroy %s: %v\n", id, err)
		return
	}
	fmt.Fprintf(stderr, "bus-request: asked to destroy %s, which this run no longer waits for\n", id)
}

// flush round-trips to the server and returns the error it reported on
// anything sent before (such as a refused subscription).
func flush(ctx context.Context, nc *nats.Conn, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if err := nc.FlushWithContext(ctx); err != nil {
		return err
	}
	return nc.LastError()
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	return enc.Encode(v)
}
