package sshx_test

import (
	"bytes"
	"os/exec"
	"strings"
	"testing"

	"pgregory.net/rapid"

	"github.com/sand-boxer/sandboxer/pkg/sshx"
)

// shellWords runs the joined command line through a real /bin/sh and
// returns the words printf received, one per argument.
func shellWords(t interface {
	Helper()
	Fatalf(string, ...any)
}, args []string) []string {
	t.Helper()
	line, err := sshx.Join(append([]string{"printf", `%s\0`}, args...))
	if err != nil {
		t.Fatalf("Join: %v", err)
	}
	out, err := exec.Command("/bin/sh", "-c", line).Output()
	if err != nil {
		t.Fatalf("sh -c %s: %v", line, err)
	}
	words := strings.Split(string(out), "\x00")
	return words[:len(words)-1]
}

func TestQuote(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, in, want string
	}{
		{"empty", "", "''"},
		{"plain", "abc", "'abc'"},
		{"single quote", "it's", `'it'\''s'`},
		{"only quotes", "''", `''\'''\'''`},
		{"dollar", "$HOME", "'$HOME'"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := sshx.Quote(tc.in); got != tc.want {
				t.Errorf("Quote(%q) = %s, want %s", tc.in, got, tc.want)
			}
		})
	}
}

func TestJoinReachesTheProgramAsIs(t *testing.T) {
	t.Parallel()
	hostile := []string{
		"", " ", "a b", "it's", `"double"`, "$(touch /tmp/sshx-pwned)", "`id`", "; rm -rf /",
		"a\nb", "tab\there", `back\slash`, "*", "?", "~", "!", "#comment", "--upload-pack=x", "-n",
		"&& echo", "| cat", "> /tmp/x", "${IFS}", "\x01\x7f", "ünïcödé", "'\\''",
	}
	got := shellWords(t, hostile)
	if len(got) != len(hostile) {
		t.Fatalf("shell saw %d words, want %d: %q", len(got), len(hostile), got)
	}
	for i := range hostile {
		if got[i] != hostile[i] {
			t.Errorf("word %d: shell saw %q, want %q", i, got[i], hostile[i])
		}
	}
}

func TestJoinProperty(t *testing.T) {
	t.Parallel()
	rapid.Check(t, func(rt *rapid.T) {
		args := rapid.SliceOfN(rapid.StringMatching(`[^\x00]*`), 1, 5).Draw(rt, "args")
		got := shellWords(rt, args)
		if len(got) != len(args) {
			rt.Fatalf("shell saw %q, want %q", got, args)
		}
		for i := range args {
			if !bytes.Equal([]byte(got[i]), []byte(args[i])) {
				rt.Fatalf("word %d: shell saw %q, want %q", i, got[i], args[i])
			}
		}
	})
}

func TestJoinRefuses(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		argv []string
	}{
		{"empty argv", nil},
		{"NUL byte", []string{"echo", "a\x00b"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if line, err := sshx.Join(tc.argv); err == nil {
				t.Fatalf("Join(%q) = %q, want an error", tc.argv, line)
			}
		})
	}
}
