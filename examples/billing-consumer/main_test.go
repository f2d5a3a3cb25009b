package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// The ledger of docs/payments.md's example: a grant, then a sandbox held
// for 65, settled at 15, the rest released.
var docExample = []entry{
	{Key: "dev.grant.welcome", Seq: 1, Consumer: "dev", Kind: "grant", Amount: 1000, Held: 0, BalanceAfter: 1000, HeldAfter: 0},
	{Key: "dev.sb.sb1.hold", Seq: 2, Consumer: "dev", Kind: "hold", Amount: 0, Held: 65, BalanceAfter: 1000, HeldAfter: 65},
	{Key: "dev.sb.sb1.settle", Seq: 3, Consumer: "dev", Kind: "debit", Amount: -15, Held: -15, BalanceAfter: 985, HeldAfter: 50},
	{Key: "dev.sb.sb1.release", Seq: 4, Consumer: "dev", Kind: "release", Amount: 0, Held: -50, BalanceAfter: 985, HeldAfter: 0},
}

// ent is a shorthand for an entry of consumer c.
func ent(c string, seq uint64, amount, held, balanceAfter, heldAfter int64) entry {
	return entry{Key: c + ".k." + string(rune('a'+seq)), Seq: seq, Consumer: c, Amount: amount, Held: held, BalanceAfter: balanceAfter, HeldAfter: heldAfter}
}

func TestFold(t *testing.T) {
	type want struct {
		consumer                 string
		balance, held, available int64
		entries                  int
		firstSeq, lastSeq        uint64
		duplicates               int
	}
	tests := []struct {
		name      string
		fromStart bool
		entries   []entry
		want      []want
		err       error // of the last entry; the others must apply
	}{
		{
			name: "docs example", fromStart: true, entries: docExample,
			want: []want{{"dev", 985, 0, 985, 4, 1, 4, 0}},
		},
		{
			name: "two consumers interleaved", fromStart: true,
			entries: []entry{
				ent("zed", 1, 100, 0, 100, 0),
				ent("amy", 1, 50, 0, 50, 0),
				ent("zed", 2, 0, 30, 100, 30),
				ent("amy", 2, -5, 0, 45, 0),
				ent("zed", 3, -10, -10, 90, 20),
			},
			want: []want{{"amy", 45, 0, 45, 2, 1, 2, 0}, {"zed", 90, 20, 70, 3, 1, 3, 0}},
		},
		{
			name: "republish is skipped", fromStart: true,
			entries: []entry{docExample[0], docExample[1], docExample[1], docExample[2], docExample[3], docExample[2]},
			want:    []want{{"dev", 985, 0, 985, 4, 1, 4, 2}},
		},
		{
			name: "gap", fromStart: true,
			entries: []entry{docExample[0], docExample[2]},
			want:    []want{{"dev", 1000, 0, 1000, 1, 1, 1, 0}},
			err:     errGap,
		},
		{
			name: "from the start, history missing", fromStart: true,
			entries: []entry{docExample[1]},
			err:     errGap,
		},
		{
			name: "balance does not add up", fromStart: true,
			entries: []entry{docExample[0], docExample[1], func() entry { e := docExample[2]; e.BalanceAfter = 990; return e }()},
			want:    []want{{"dev", 1000, 65, 935, 2, 1, 2, 0}},
			err:     errMismatch,
		},
		{
			name: "held does not add up", fromStart: true,
			entries: []entry{docExample[0], func() entry { e := docExample[1]; e.HeldAfter = 60; return e }()},
			want:    []want{{"dev", 1000, 0, 1000, 1, 1, 1, 0}},
			err:     errMismatch,
		},
		{
			name: "first entry does not add up from zero", fromStart: true,
			entries: []entry{ent("dev", 1, 100, 0, 90, 0)},
			err:     errMismatch,
		},
		{
			name: "one seq, two keys", fromStart: true,
			entries: []entry{docExample[0], docExample[1], func() entry { e := docExample[1]; e.Key = "dev.sb.other.hold"; return e }()},
			want:    []want{{"dev", 1000, 65, 935, 2, 1, 2, 0}},
			err:     errConflict,
		},
		{
			// --since N: a consumer opens with its first entry's after values.
			name: "since: opens with balance_after", fromStart: false,
			entries: []entry{docExample[2], docExample[3]},
			want:    []want{{"dev", 985, 0, 985, 2, 3, 4, 0}},
		},
		{
			name: "since: one entry", fromStart: false,
			entries: []entry{ent("dev", 7, 0, 20, 500, 20)},
			want:    []want{{"dev", 500, 20, 480, 1, 7, 7, 0}},
		},
		{
			name: "since: later entries are still checked", fromStart: false,
			entries: []entry{ent("dev", 7, 0, 20, 500, 20), ent("dev", 8, -5, -5, 490, 15)},
			want:    []want{{"dev", 500, 20, 480, 1, 7, 7, 0}},
			err:     errMismatch,
		},
		{
			name: "since: gap after the first entry", fromStart: false,
			entries: []entry{ent("dev", 7, 0, 20, 500, 20), ent("dev", 9, -5, -5, 495, 15)},
			want:    []want{{"dev", 500, 20, 480, 1, 7, 7, 0}},
			err:     errGap,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := newLedger(tt.fromStart)
			for i, e := range tt.entries {
				changed, err := l.apply(e)
				last := i == len(tt.entries)-1
				if last && tt.err != nil {
					if !errors.Is(err, tt.err) {
						t.Fatalf("entry %d: err = %v, want %v", i, err, tt.err)
					}
					if changed {
						t.Fatalf("entry %d: a refused entry changed the ledger", i)
					}
					break
				}
				if err != nil {
					t.Fatalf("entry %d: %v", i, err)
				}
			}
			got := l.sorted()
			if len(got) != len(tt.want) {
				t.Fatalf("%d accounts, want %d: %+v", len(got), len(tt.want), got)
			}
			for i, w := range tt.want {
				a := got[i]
				g := want{a.Consumer, a.Balance, a.Held, a.Available, a.Entries, a.FirstSeq, a.LastSeq, a.Duplicates}
				if g != w {
					t.Errorf("account %d = %+v, want %+v", i, g, w)
				}
			}
		})
	}
}

func TestFoldErrorText(t *testing.T) {
	l := newLedger(true)
	if _, err := l.apply(docExample[0]); err != nil {
		t.Fatal(err)
	}
	e := docExample[2]
	e.Seq = 2
	_, err := l.apply(e)
	want := "the ledger does not add up: consumer dev seq 2 (dev.sb.sb1.settle): the sums are balance 985, held -15; the entry says balance_after 985, held_after 50"
	if err == nil || err.Error() != want {
		t.Fatalf("err = %v\nwant %s", err, want)
	}
}

// meterMsg is a metering event as metering stores it, in binary mode.
func meterMsg(subject, typ string, data any) *nats.Msg {
	m := nats.NewMsg(subject)
	m.Header.Set("ce-specversion", "1.0")
	m.Header.Set("ce-id", "dev.grant.welcome")
	m.Header.Set("ce-source", "/sandboxer/metering")
	m.Header.Set("ce-type", typ)
	m.Header.Set("ce-subject", "welcome")
	m.Header.Set("ce-time", "2030-01-02T03:04:05.123456789Z")
	m.Header.Set("ce-datacontenttype", "application/json")
	m.Header.Set("Nats-Msg-Id", "/sandboxer/metering#dev.grant.welcome")
	m.Data, _ = json.Marshal(data)
	return m
}

func TestDecodeMetering(t *testing.T) {
	grant := map[string]any{
		"key": "dev.grant.welcome", "seq": 1, "consumer": "dev", "kind": "grant", "amount": 1000, "held": 0,
		"balance_after": 1000, "held_after": 0, "grant": "welcome", "cause": "grant.welcome", "reason": "paid credit",
		"at": "2030-01-02T03:04:05Z", "draws": []any{},
	}
	e, err := decodeMetering(meterMsg("sandboxer.meter.dev.granted", "dev.sandboxer.credits.granted.v1", grant))
	if err != nil {
		t.Fatal(err)
	}
	if e == nil || e.Key != "dev.grant.welcome" || e.Seq != 1 || e.Amount != 1000 || e.BalanceAfter != 1000 {
		t.Fatalf("entry %+v", e)
	}

	usage := map[string]any{"key": "usage.dev.sb1", "consumer": "dev", "sandbox_id": "sb1", "charged": 15}
	if e, err := decodeMetering(meterMsg("sandboxer.meter.dev.usage", "dev.sandboxer.credits.usage.v1", usage)); err != nil || e != nil {
		t.Fatalf("usage: %+v, %v; want no entry", e, err)
	}
	if e, err := decodeMetering(meterMsg("sandboxer.meter.dev.low", "dev.sandboxer.credits.low.v1", map[string]any{"key": "dev.sb.sb1.low"})); err != nil || e != nil {
		t.Fatalf("low: %+v, %v; want no entry", e, err)
	}

	// Structured mode reads the same.
	s := nats.NewMsg("sandboxer.meter.dev.granted")
	s.Header.Set("content-type", "application/cloudevents+json")
	s.Data, _ = json.Marshal(map[string]any{"specversion": "1.0", "id": "dev.grant.welcome", "source": "/sandboxer/metering",
		"type": "dev.sandboxer.credits.granted.v1", "datacontenttype": "application/json", "data": grant})
	if e, err := decodeMetering(s); err != nil || e == nil || e.Amount != 1000 {
		t.Fatalf("structured: %+v, %v", e, err)
	}

	other := func(f func(map[string]any)) map[string]any {
		m := map[string]any{}
		for k, v := range grant {
			m[k] = v
		}
		f(m)
		return m
	}
	for name, m := range map[string]*nats.Msg{
		"type differs from kind": meterMsg("sandboxer.meter.dev.granted", "dev.sandboxer.credits.debited.v1", grant),
		"not a metering subject": meterMsg("sandboxer.evt.dev.granted", "dev.sandboxer.credits.granted.v1", grant),
		"consumer differs":       meterMsg("sandboxer.meter.eve.granted", "dev.sandboxer.credits.granted.v1", grant),
		"no seq":                 meterMsg("sandboxer.meter.dev.granted", "dev.sandboxer.credits.granted.v1", other(func(m map[string]any) { delete(m, "seq") })),
		"no key":                 meterMsg("sandboxer.meter.dev.granted", "dev.sandboxer.credits.granted.v1", other(func(m map[string]any) { m["key"] = "" })),
		"data not an entry":      meterMsg("sandboxer.meter.dev.granted", "dev.sandboxer.credits.granted.v1", []int{1}),
		"not a CloudEvent":       {Subject: "sandboxer.meter.dev.granted", Data: []byte(`{}`)},
		"bad escape": func() *nats.Msg {
			m := meterMsg("sandboxer.meter.dev.granted", "dev.sandboxer.credits.granted.v1", grant)
			m.Header.Set("ce-source", "/x%2")
			return m
		}(),
	} {
		if e, err := decodeMetering(m); err == nil {
			t.Errorf("%s: decoded %+v, want an error", name, e)
		}
	}
}

func TestCaughtUp(t *testing.T) {
	md := func(stream, pending uint64) *jetstream.MsgMetadata {
		return &jetstream.MsgMetadata{Sequence: jetstream.SequencePair{Stream: stream}, NumPending: pending}
	}
	tests := []struct {
		md      *jetstream.MsgMetadata
		lastSeq uint64
		want    bool
	}{
		{md(3, 7), 10, false},
		{md(10, 0), 10, true},
		{md(5, 0), 10, true},  // nothing pending for the filter
		{md(10, 4), 10, true}, // the stream's end at start: later messages wait for --follow
		{md(12, 1), 10, true},
	}
	for _, tt := range tests {
		if got := caughtUp(tt.md, tt.lastSeq); got != tt.want {
			t.Errorf("caughtUp(stream %d, pending %d, last %d) = %v", tt.md.Sequence.Stream, tt.md.NumPending, tt.lastSeq, got)
		}
	}
}

func TestAccountLine(t *testing.T) {
	l := newLedger(true)
	for _, e := range docExample {
		if _, err := l.apply(e); err != nil {
			t.Fatal(err)
		}
	}
	var b bytes.Buffer
	if err := printJSON(&b, l.accounts["dev"]); err != nil {
		t.Fatal(err)
	}
	want := `{"consumer":"dev","balance":985,"held":0,"available":985,"entries":4,"first_seq":1,"last_seq":4}` + "\n"
	if b.String() != want {
		t.Fatalf("line %s want %s", b.String(), want)
	}
}

func fakeCreds(claims string) string {
	h := base64.RawURLEncoding.EncodeToString([]byte(`{"typ":"JWT","alg":"ed25519-nkey"}`))
	p := base64.RawURLEncoding.EncodeToString([]byte(claims))
	return "-----BEGIN NATS USER JWT-----\n" + h + "." + p + ".c2ln\n------END NATS USER JWT------\n\n" +
		"-----BEGIN USER NKEY SEED-----\nSUAEXAMPLE\n------END USER NKEY SEED------\n"
}

func TestCredsUserName(t *testing.T) {
	tests := []struct{ creds, want string }{
		{fakeCreds(`{"name":"billing"}`), "billing"},
		{fakeCreds(`{"name":"billing-acme","nats":{"tags":["role:billing"]}}`), "billing-acme"},
		{fakeCreds(`{}`), ""},
		{"no jwt here", ""},
		{"-----BEGIN NATS USER JWT-----\nabc\n------END NATS USER JWT------\n", ""},
	}
	for _, tt := range tests {
		got, err := credsUserName([]byte(tt.creds))
		if tt.want == "" {
			if err == nil {
				t.Errorf("credsUserName(%q) = %q, want an error", tt.creds, got)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("credsUserName = %q, %v; want %q", got, err, tt.want)
		}
	}
}

func TestParseFlags(t *testing.T) {
	t.Setenv("NATS_URL", "")
	t.Setenv("NATS_CREDS", "")
	t.Setenv("SANDBOXER_DATA_DIR", "/data")
	cfg, err := parseFlags(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.natsURL != defaultNATS || cfg.creds != "/data/creds/billing.creds" || cfg.since != 1 || cfg.durable != "" || cfg.follow {
		t.Fatalf("defaults %+v", cfg)
	}
	cfg, err = parseFlags([]string{"--since", "42", "--durable", "books", "--follow"}, io.Discard)
	if err != nil || cfg.since != 42 || cfg.durable != "books" || !cfg.follow {
		t.Fatalf("%+v, %v", cfg, err)
	}
	for _, args := range [][]string{{"--since", "0"}, {"--since", "-1"}, {"--timeout", "0s"}, {"extra"}, {"--nope"}} {
		if _, err := parseFlags(args, io.Discard); err == nil {
			t.Errorf("parseFlags(%q) succeeded", args)
		}
	}
}

func TestRunExitStatus(t *testing.T) {
	dir := t.TempDir()
	creds := filepath.Join(dir, "billing.creds")
	if err := os.WriteFile(creds, []byte(fakeCreds(`{"name":"billing"}`)), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		args []string
		want int
		err  string
	}{
		{"help", []string{"-h"}, 0, ""},
		{"usage", []string{"--since", "0"}, 2, "--since"},
		{"no creds file", []string{"--creds", filepath.Join(dir, "missing.creds")}, 1, "reading credentials"},
		// Nothing listens on port 1.
		{"no server", []string{"--creds", creds, "--nats", "nats://127.0.0.1:1"}, 1, "connecting to nats://127.0.0.1:1 as billing"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stderr bytes.Buffer
			if got := run(tt.args, io.Discard, &stderr); got != tt.want {
				t.Fatalf("run = %d, want %d (stderr %q)", got, tt.want, stderr.String())
			}
			if !strings.Contains(stderr.String(), tt.err) {
				t.Fatalf("stderr %q does not say %q", stderr.String(), tt.err)
			}
		})
	}
}
