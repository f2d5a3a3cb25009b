package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/event"
)

// buildExample builds one of the examples, which are modules of their
// own that know the documented contract and nothing of this project.
func buildExample(t *testing.T, name string) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), name)
	// Built in its own directory, as a module of its own: with or
	// without the workspace (make test runs with GOWORK=off).
	cmd := exec.Command("go", "build", "-o", bin, ".")
	cmd.Dir = filepath.Join("..", "..", "examples", name)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("building examples/%s: %v\n%s", name, err, out)
	}
	return bin
}

// runExample runs an example binary and returns its standard output lines.
func runExample(t *testing.T, bin string, args ...string) ([]string, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.Env = append(os.Environ(), "NATS_URL=", "NATS_CREDS=")
	err := cmd.Run()
	var lines []string
	sc := bufio.NewScanner(&stdout)
	for sc.Scan() {
		if l := strings.TrimSpace(sc.Text()); l != "" {
			lines = append(lines, l)
		}
	}
	return lines, stderr.String(), err
}

// TestExamplesAgainstTheSystem runs both examples as the README does,
// against the whole system with its own credentials: bus-request prints a
// ready sandbox and then its destruction; billing-consumer prints
// balances equal to the credits API's; a refused request exits non-zero
// with the reason.
func TestExamplesAgainstTheSystem(t *testing.T) {
	busRequest := buildExample(t, "bus-request")
	billing := buildExample(t, "billing-consumer")
	b := startBusSystem(t, t.TempDir())
	url := b.sys.NATS.ClientURL()
	creds := func(file string) string { return filepath.Join(credsDir(b.dir), file) }

	lines, stderr, err := runExample(t, busRequest, "--nats", url, "--creds", creds("dev.creds"), "--profile", "local")
	if err != nil || len(lines) != 2 {
		t.Fatalf("bus-request: %v, %d lines %q\n%s", err, len(lines), lines, stderr)
	}
	var ready struct {
		ID           string              `json:"id"`
		State        string              `json:"state"`
		Reachability *event.Reachability `json:"reachability"`
	}
	if err := json.Unmarshal([]byte(lines[0]), &ready); err != nil || ready.State != "ready" || ready.Reachability == nil || !event.ValidName(ready.ID) {
		t.Fatalf("first line %s (%v): want a ready sandbox with its reachability", lines[0], err)
	}
	var gone struct {
		ID, State string
	}
	if err := json.Unmarshal([]byte(lines[1]), &gone); err != nil || gone.ID != ready.ID || gone.State != "destroyed" {
		t.Fatalf("second line %s (%v): want %s destroyed", lines[1], err, ready.ID)
	}
	if _, err := os.Stat(ready.Reachability.RemoteDir); !os.IsNotExist(err) {
		t.Fatalf("workspace after the example destroyed it: %v", err)
	}

	// A refusal: an exit status of 1 and the reason.
	_, stderr, err = runExample(t, busRequest, "--nats", url, "--creds", creds("dev.creds"), "--profile", "nope")
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(stderr, "unknown profile") {
		t.Fatalf("bus-request of an unknown profile: %v\n%s", err, stderr)
	}

	// Money moves, then the billing reader folds the stream.
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	admin := api.NewClient(b.sys.URL, readKey(t, b.dir, "admin"), hc)
	dev := api.NewClient(b.sys.URL, readKey(t, b.dir, "dev"), hc)
	ctx := testContext(t)
	if _, err := admin.Grant(ctx, api.GrantRequest{Consumer: DevConsumer, Amount: 1000}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.Grant(ctx, api.GrantRequest{Consumer: "team-b", Amount: 40}); err != nil {
		t.Fatal(err)
	}
	sb, err := dev.Create(ctx, api.CreateRequest{Profile: "saas"}, "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dev.Wait(ctx, sb.ID, func(s event.State) bool { return s == event.StateReady }, nil); err != nil {
		t.Fatal(err)
	}
	// A running sandbox holds credit: the fold must say so too.
	lines, stderr, err = runExample(t, billing, "--nats", url, "--creds", creds("billing.creds"))
	if err != nil {
		t.Fatalf("billing-consumer: %v\n%s", err, stderr)
	}
	type account struct {
		Consumer string `json:"consumer"`
		Balance  int64  `json:"balance"`
		Held     int64  `json:"held"`
	}
	got := map[string]account{}
	for _, l := range lines {
		var a account
		if err := json.Unmarshal([]byte(l), &a); err != nil {
			t.Fatalf("billing line %q: %v", l, err)
		}
		got[a.Consumer] = a
	}
	for _, c := range []string{DevConsumer, "team-b"} {
		want, err := admin.CreditBalance(ctx, c)
		if err != nil {
			t.Fatal(err)
		}
		if a, ok := got[c]; !ok || a.Balance != want.Balance || a.Held != want.Held {
			t.Errorf("billing-consumer says %s has %+v, the credits API balance %d held %d", c, a, want.Balance, want.Held)
		}
	}
	if got[DevConsumer].Held == 0 {
		t.Errorf("dev holds nothing while a metered sandbox runs: %+v", got[DevConsumer])
	}
	// A second run replays the same history and says the same.
	again, _, err := runExample(t, billing, "--nats", url, "--creds", creds("billing.creds"))
	if err != nil || strings.Join(again, "\n") != strings.Join(lines, "\n") {
		t.Fatalf("a second billing run: %v\n%q\nwant\n%q", err, again, lines)
	}
}

func readKey(t *testing.T, dir, who string) string {
	t.Helper()
	b, err := os.ReadFile(keyPath(dir, who))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}
