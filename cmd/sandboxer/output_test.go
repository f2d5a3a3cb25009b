package main

import (
	"encoding/json"
	"errors"
	"net/http"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/event"
)

// stateRow is the state row of a sandbox table.
var stateRow = regexp.MustCompile(`(?m)^state\s+(.+)$`)

func stateOf(t *testing.T, table string) string {
	t.Helper()
	m := stateRow.FindStringSubmatch(table)
	if m == nil {
		t.Fatalf("no state row in\n%s", table)
	}
	return strings.TrimSpace(m[1])
}

// TestCLIOutputDoesNotMislead: destroy without --wait says a destroy was
// requested (not "ready"); a failed create shows the failure in the table
// as in JSON, and exits non-zero; a destroyed sandbox shows no expiry;
// events of an unknown sandbox print the 404 and nothing else.
func TestCLIOutputDoesNotMislead(t *testing.T) {
	cs := startCreditsSystem(t, nil)
	ctx := testContext(t)

	t.Run("destroy without --wait", func(t *testing.T) {
		sb, err := cs.dev.Create(ctx, api.CreateRequest{Profile: "local", TTL: "10m"}, "")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := cs.dev.Wait(ctx, sb.ID, func(s event.State) bool { return s.Rank() >= event.StateReady.Rank() }, nil); err != nil {
			t.Fatal(err)
		}
		out := cs.mustCLI(t, "destroy", sb.ID)
		if got := stateOf(t, out); got != "destroy requested (was ready)" {
			t.Fatalf("destroy without --wait shows state %q, want a destroy requested of the ready sandbox:\n%s", got, out)
		}
		var answered api.Sandbox
		decodeJSON(t, cs.mustCLI(t, "destroy", sb.ID, "-o", "json"), &answered)
		if answered.ID != sb.ID {
			t.Fatalf("destroy -o json: %+v", answered)
		}
		gone, err := cs.dev.Wait(ctx, sb.ID, event.State.Terminal, nil)
		if err != nil {
			t.Fatal(err)
		}
		if !gone.ExpiresAt.IsZero() {
			t.Errorf("the API shows a destroyed sandbox expiring at %s", gone.ExpiresAt)
		}
		out = cs.mustCLI(t, "get", sb.ID)
		if stateOf(t, out) != string(event.StateDestroyed) || strings.Contains(out, "expires_at") {
			t.Fatalf("get of a destroyed sandbox:\n%s\nwant destroyed and no expires_at", out)
		}
		if out := cs.mustCLI(t, "destroy", sb.ID); stateOf(t, out) != "destroyed (nothing to destroy)" {
			t.Fatalf("destroy of a destroyed sandbox:\n%s", out)
		}
	})

	t.Run("failed create", func(t *testing.T) {
		missing := filepath.Join(t.TempDir(), "no-such-repo")
		out, err := cs.cli(t, "create", "--profile", "local", "--input", "repo="+missing, "--wait")
		var ee *exitError
		if !errors.As(err, &ee) || ee.code != 1 {
			t.Fatalf("failed create --wait: %v, want exit 1\n%s", err, out)
		}
		if st := stateOf(t, out); !strings.HasPrefix(st, string(event.StateFailed)) {
			t.Fatalf("failed create's table shows state %q, want the failure:\n%s", st, out)
		}
		if !strings.Contains(err.Error(), "failed") {
			t.Fatalf("failed create's error %q does not say it failed", err)
		}
		out, err = cs.cli(t, "create", "--profile", "local", "--input", "repo="+missing, "--wait", "-o", "json")
		if !errors.As(err, &ee) || ee.code != 1 {
			t.Fatalf("failed create --wait -o json: %v, want exit 1\n%s", err, out)
		}
		var sb api.Sandbox
		if jerr := json.Unmarshal([]byte(out[:strings.LastIndex(out, "}")+1]), &sb); jerr != nil {
			t.Fatalf("%v:\n%s", jerr, out)
		}
		if !failed(&sb) {
			t.Fatalf("failed create's JSON does not show the failure: %+v", sb)
		}
		// Both say failed, whatever the sandbox's cleanup did since.
		if got, want := stateText(&sb), "failed"; !strings.HasPrefix(got, want) {
			t.Fatalf("the table of the JSON's sandbox would show %q", got)
		}
		if _, err := cs.dev.Wait(ctx, sb.ID, event.State.Terminal, nil); err != nil {
			t.Fatal(err)
		}
		if out := cs.mustCLI(t, "get", sb.ID); stateOf(t, out) != "failed (now destroyed)" {
			t.Fatalf("get of a sandbox destroyed after it failed:\n%s\nwant the failure", out)
		}
		var after api.Sandbox
		decodeJSON(t, cs.mustCLI(t, "get", sb.ID, "-o", "json"), &after)
		if !failed(&after) || after.State != event.StateDestroyed {
			t.Fatalf("get -o json of a sandbox destroyed after it failed: %+v", after)
		}
	})

	t.Run("events of an unknown sandbox", func(t *testing.T) {
		out, err := cs.cli(t, "events", "sbx-doesnotexist")
		if api.StatusOf(err) != http.StatusNotFound {
			t.Fatalf("events of an unknown sandbox: %v, want the 404", err)
		}
		if out != "" {
			t.Fatalf("events of an unknown sandbox printed\n%s\nbefore the error", out)
		}
	})
}
