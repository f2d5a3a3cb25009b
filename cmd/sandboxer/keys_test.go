package main

import (
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/auth"
)

// TestKeysCLI issues, lists and revokes API keys with the CLI, over the
// gateway's HTTP API with the admin key of the data directory: no NATS
// connection. A key's scopes decide what it may do, and a revoked key
// stops working at once.
func TestKeysCLI(t *testing.T) {
	cs := startCreditsSystem(t, nil)
	ctx := testContext(t)

	// The keys sandboxer up wrote, listed with the admin key.
	var up api.KeyList
	decodeJSON(t, cs.mustCLI(t, "keys", "ls", "-o", "json"), &up)
	if len(up.Keys) != 2 || up.Keys[0].Consumer != "admin" || !slices.Equal(up.Keys[0].Scopes, []string{"admin"}) ||
		up.Keys[1].Consumer != "dev" || !slices.Equal(up.Keys[1].Scopes, []string{"read", "create", "destroy", "credits"}) {
		t.Fatalf("keys ls after up: %+v", up.Keys)
	}
	if _, err := cs.cli(t, "keys", "ls", "--as", "dev"); api.StatusOf(err) != http.StatusForbidden {
		t.Fatalf("keys ls with the dev key: %v, want 403", err)
	}

	tok := strings.TrimSpace(cs.mustCLI(t, "keys", "issue", "--consumer", "team-a", "--scope", "read", "--expires", "720h", "--name", "dashboard"))
	lines := strings.Split(tok, "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "sbx_") || !strings.Contains(lines[1], "team-a (read)") || !strings.Contains(lines[1], "shown once") {
		t.Fatalf("keys issue printed\n%s\nwant the token, then what it is", tok)
	}
	tok = lines[0]
	if out, err := cs.cli(t, "profiles", "--token", tok); err != nil || !strings.Contains(out, "local") {
		t.Fatalf("profiles with a read key: %v\n%s", err, out)
	}
	if _, err := cs.cli(t, "create", "--profile", "local", "--token", tok); api.StatusOf(err) != http.StatusForbidden || !strings.Contains(err.Error(), "create scope") {
		t.Fatalf("create with a read key: %v, want 403 naming the scope", err)
	}

	var full api.IssuedKey
	decodeJSON(t, cs.mustCLI(t, "keys", "issue", "--consumer", "team-a", "-o", "json"), &full)
	if full.Token == "" || !slices.Equal(full.Scopes, []string{"read", "create", "destroy", "credits"}) || !full.ExpiresAt.IsZero() {
		t.Fatalf("keys issue -o json: %+v", full)
	}
	if _, err := cs.cli(t, "keys", "issue", "--consumer", "team-a", "--scope", "root"); api.StatusOf(err) != http.StatusUnprocessableEntity {
		t.Fatalf("an unknown scope: %v", err)
	}
	if _, err := cs.cli(t, "keys", "issue"); err == nil {
		t.Fatal("keys issue without --consumer succeeded")
	}

	var l api.KeyList
	decodeJSON(t, cs.mustCLI(t, "keys", "ls", "--consumer", "team-a", "-o", "json"), &l)
	if len(l.Keys) != 2 || strings.Contains(mustJSON(t, l), "sbx_") {
		t.Fatalf("keys ls --consumer team-a: %+v", l)
	}
	var dash api.APIKey
	for _, k := range l.Keys {
		if k.Name == "dashboard" {
			dash = k
		}
	}
	if dash.ID == "" || time.Until(dash.ExpiresAt) < 719*time.Hour {
		t.Fatalf("the dashboard key: %+v", dash)
	}
	table := cs.mustCLI(t, "keys", "ls")
	for _, want := range []string{dash.ID, "dashboard", "team-a", "dev", "admin"} {
		if !strings.Contains(table, want) {
			t.Errorf("keys ls does not show %q:\n%s", want, table)
		}
	}
	if out := cs.mustCLI(t, "keys", "revoke", dash.ID); !strings.Contains(out, "revoked "+dash.ID+" of team-a") {
		t.Fatalf("keys revoke: %s", out)
	}
	if _, err := api.NewClient(cs.sys.URL, tok, nil).Profiles(ctx); api.StatusOf(err) != http.StatusUnauthorized {
		t.Fatalf("a revoked key: %v, want 401", err)
	}
	if _, err := cs.cli(t, "keys", "revoke", dash.ID); api.StatusOf(err) != http.StatusNotFound {
		t.Fatalf("revoking twice: %v, want 404", err)
	}
	// The keys sandboxer up wrote still work.
	if _, err := cs.dev.Profiles(ctx); err != nil {
		t.Fatal(err)
	}
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestKeysBootstrap writes a cluster's first admin key with the admin's
// NATS credentials (file mode 0600), and the key is an admin key of the
// gateway.
func TestKeysBootstrap(t *testing.T) {
	b := startBusSystem(t, t.TempDir())
	file := filepath.Join(t.TempDir(), "admin.token")
	out, err := runCLI(t, "keys", "bootstrap", "--nats", b.sys.NATS.ClientURL(),
		"--creds", credsPath(b.dir, auth.Identity{Role: auth.RoleAdmin}), "--out", file)
	if err != nil || !strings.Contains(out, "admin key k") {
		t.Fatalf("keys bootstrap: %v\n%s", err, out)
	}
	fi, err := os.Stat(file)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("token file: %v, %v; want mode 0600", fi, err)
	}
	tok, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var l api.KeyList
	decodeJSON(t, mustRun(t, "keys", "ls", "--url", b.sys.URL, "--token", strings.TrimSpace(string(tok)), "-o", "json"), &l)
	found := false
	for _, k := range l.Keys {
		found = found || (k.Consumer == "admin" && slices.Equal(k.Scopes, []string{"admin"}) && strings.Contains(k.Name, "bootstrap"))
	}
	if !found {
		t.Fatalf("the bootstrapped key is not listed as an admin key: %+v", l.Keys)
	}
}

func mustRun(t *testing.T, args ...string) string {
	t.Helper()
	out, err := runCLI(t, args...)
	if err != nil {
		t.Fatalf("sandboxer %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}
