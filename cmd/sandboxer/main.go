// Command sandboxer is the one binary of sand-boxer: `sandboxer up` runs
// the whole control plane in one process on an embedded NATS server,
// `sandboxer serve <service>` runs one service against a NATS cluster, and
// the other verbs are the client CLI of the gateway's HTTP API.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/sand-boxer/sandboxer/pkg/api"
)

// exitError carries an exit code out of a command.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	root := newRoot()
	err := root.ExecuteContext(ctx)
	if err == nil {
		return
	}
	code := 1
	var ee *exitError
	if errors.As(err, &ee) {
		code = ee.code
	}
	fmt.Fprintln(os.Stderr, "sandboxer:", err)
	os.Exit(code)
}

// globals are the flags every client verb shares.
type globals struct {
	url     string
	token   string
	dataDir string
	as      string
	output  string
}

func newRoot() *cobra.Command {
	g := &globals{}
	root := &cobra.Command{
		Use:           "sandboxer",
		Short:         "sand-boxer: sandboxes on demand, through events on NATS JetStream",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	pf := root.PersistentFlags()
	pf.StringVar(&g.url, "url", envOr("SANDBOXER_URL", "http://127.0.0.1:8080"), "gateway URL (env SANDBOXER_URL)")
	pf.StringVar(&g.token, "token", os.Getenv("SANDBOXER_TOKEN"), "API key (env SANDBOXER_TOKEN; default: the key of --as read from --data-dir)")
	pf.StringVar(&g.dataDir, "data-dir", defaultDataDir(), "data directory (env SANDBOXER_DATA_DIR)")
	pf.StringVar(&g.as, "as", "dev", "which key from the data directory to use when no token is given: dev or admin")
	pf.StringVarP(&g.output, "output", "o", "table", "output format: table or json (credits ledger and usage also take csv)")

	root.AddCommand(
		newUpCmd(g),
		newServeCmd(g),
		newCreateCmd(g),
		newGetCmd(g),
		newListCmd(g),
		newDestroyCmd(g),
		newEventsCmd(g),
		newProfilesCmd(g),
		newExtensionsCmd(g),
		newKeysCmd(g),
		newCredsCmd(g),
		newSetupCmd(g),
		newCreditsCmd(g),
		newBenchCmd(g),
	)
	return root
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

// defaultDataDir is SANDBOXER_DATA_DIR, else $XDG_DATA_HOME/sandboxer,
// else ~/.local/share/sandboxer.
func defaultDataDir() string {
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

// keyPath is where `sandboxer up` writes the key of who.
func keyPath(dataDir, who string) string { return filepath.Join(dataDir, "keys", who+".token") }

// client returns an API client authenticated as the globals say.
func (g *globals) client() (*api.Client, error) {
	tok := g.token
	if tok == "" {
		if g.as != "dev" && g.as != "admin" {
			return nil, &exitError{2, fmt.Errorf("--as must be dev or admin, not %q", g.as)}
		}
		b, err := os.ReadFile(keyPath(g.dataDir, g.as))
		if err != nil {
			return nil, fmt.Errorf("no --token and no %s key in %s (run `sandboxer up` first, or set SANDBOXER_TOKEN): %w", g.as, g.dataDir, err)
		}
		tok = strings.TrimSpace(string(b))
	}
	return api.NewClient(g.url, tok, nil), nil
}

// outputFormat checks -o against the formats a verb supports.
func (g *globals) outputFormat(allowed ...string) (string, error) {
	f := g.output
	if f == "" {
		f = "table"
	}
	for _, a := range allowed {
		if f == a {
			return f, nil
		}
	}
	return "", &exitError{2, fmt.Errorf("unknown output format %q (want %s)", g.output, strings.Join(allowed, ", "))}
}

// json reports whether -o asks for JSON, for verbs that print a table or
// JSON.
func (g *globals) json() (bool, error) {
	f, err := g.outputFormat("table", "json")
	return f == "json", err
}

// prepare is the start of every table-or-JSON client verb: the output
// format and an authenticated client.
func (g *globals) prepare() (asJSON bool, c *api.Client, err error) {
	if asJSON, err = g.json(); err != nil {
		return false, nil, err
	}
	c, err = g.client()
	return asJSON, c, err
}
