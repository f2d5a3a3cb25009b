package main

import (
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// timeFlags are the time flags of the CLI and which way a duration goes
// for each.
var timeFlags = []struct {
	path []string
	flag string
	dir  int
}{
	{[]string{"credits", "grant"}, "expires", fromNow},
	{[]string{"credits", "ledger"}, "since", ago},
	{[]string{"credits", "usage"}, "from", ago},
	{[]string{"credits", "usage"}, "to", ago},
	{[]string{"keys", "issue"}, "expires", fromNow},
}

// TestTimeFlagsSayWhichWay: each time flag's help says whether a duration
// is from now or ago, it parses that way, a refusal says it again, and
// the README says the same.
func TestTimeFlagsSayWhichWay(t *testing.T) {
	now := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	for _, tf := range timeFlags {
		cmd, _, err := newRoot().Find(tf.path)
		if err != nil {
			t.Fatal(err)
		}
		f := cmd.Flags().Lookup(tf.flag)
		want, wrong := "a duration ago", "from now"
		if tf.dir == fromNow {
			want, wrong = "a duration from now", " ago"
		}
		if f == nil || !strings.Contains(f.Usage, want) || strings.Contains(f.Usage, wrong) {
			t.Errorf("%s --%s: usage %q, want it to say %q", cmd.CommandPath(), tf.flag, f.Usage, want)
		}
		got, err := parseWhen(tf.flag, "24h", now, tf.dir)
		if err != nil || !got.Equal(now.Add(time.Duration(tf.dir)*24*time.Hour)) {
			t.Errorf("--%s 24h: %v, %v", tf.flag, got, err)
		}
		var ee *exitError
		if _, err := parseWhen(tf.flag, "soon", now, tf.dir); !errors.As(err, &ee) || ee.code != 2 || !strings.Contains(err.Error(), want) {
			t.Errorf("--%s soon: %v, want a usage error saying %q", tf.flag, err, want)
		}
	}
	for _, s := range []string{"2030-01-02T00:00:00Z", "2030-01-02"} {
		if got, err := parseWhen("since", s, now, ago); err != nil || !got.Equal(time.Date(2030, 1, 2, 0, 0, 0, 0, time.UTC)) {
			t.Errorf("--since %s: %v, %v", s, got, err)
		}
	}
	readme := readRepoFile(t, "README.md")
	for _, want := range []string{"from now for `--expires`", "ago for `--since`, `--from` and `--to`"} {
		if !strings.Contains(readme, want) {
			t.Errorf("README does not say %q", want)
		}
	}
	if strings.Contains(readme, "or a duration ago (`24h`); ") {
		t.Error("README still says every time flag's duration is ago")
	}
}

// TestREADMEStatesLocalTTL: the README states profile.local's default and
// maximum TTL as the shipped profile declares them.
func TestREADMEStatesLocalTTL(t *testing.T) {
	p, ps := extension.LoadProfileFile("../../profiles/profile.local.yaml")
	if len(ps) > 0 {
		t.Fatal(ps)
	}
	want := "`profile.local` sandboxes live " + shortDuration(p.TTL.Default.D()) + " by default (at most " + shortDuration(p.TTL.Max.D())
	if !strings.Contains(strings.Join(strings.Fields(readRepoFile(t, "README.md")), " "), want) {
		t.Fatalf("README does not say %q", want)
	}
}

// shortDuration formats d without zero trailing units: 1h, not 1h0m0s.
func shortDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

func readRepoFile(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile("../../" + name)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
