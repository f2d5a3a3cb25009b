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
	"slices"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/extension"
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

// globals are the values of the flags several verbs share. Each verb
// shows only the ones it uses: the client verbs of the HTTP API take the
// client flags (--url, --token, --as, --data-dir, --output, added by
// [globals.clientFlags]); up, serve provisioner and creds take --data-dir;
// setup and creds ls take --output. newRoot decides for the verbs defined
// elsewhere.
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
	creds := newCredsCmd(g)
	dataDirFlag(creds.PersistentFlags(), &g.dataDir, "data directory whose auth/ holds the authority")
	if ls, _, err := creds.Find([]string{"ls"}); err == nil && ls != creds {
		g.outputFlag(ls.Flags(), "output format: table or json")
	}
	setup := newSetupCmd(g)
	g.outputFlag(setup.Flags(), "output format: table or json")

	root.AddCommand(
		newUpCmd(),
		newServeCmd(),
		g.clientFlags(newCreateCmd(g)),
		g.clientFlags(newGetCmd(g)),
		g.clientFlags(newListCmd(g)),
		g.clientFlags(newDestroyCmd(g)),
		g.clientFlags(newEventsCmd(g)),
		g.clientFlags(newProfilesCmd(g)),
		g.clientFlags(newExtensionsCmd(g)),
		newKeysCmd(g),
		creds,
		setup,
		g.clientFlags(newCreditsCmd(g)),
		g.clientFlags(newWorkersCmd(g)),
		newDLQCmd(g),
		newBenchCmd(g),
	)
	return root
}

// clientFlags gives cmd and its subcommands the flags of a client of the
// gateway's HTTP API, and returns it.
func (g *globals) clientFlags(cmd *cobra.Command) *cobra.Command {
	pf := cmd.PersistentFlags()
	pf.StringVar(&g.url, "url", envOr("SANDBOXER_URL", "http://127.0.0.1:8080"), "gateway URL (env SANDBOXER_URL)")
	pf.StringVar(&g.token, "token", os.Getenv("SANDBOXER_TOKEN"), "API key (env SANDBOXER_TOKEN; default: the key of --as read from --data-dir)")
	pf.StringVar(&g.as, "as", "dev", "which key from the data directory to use when no token is given: dev or admin")
	dataDirFlag(pf, &g.dataDir, "data directory whose keys/ sandboxer up wrote")
	formats := "table or json"
	if cmd.Name() == "credits" {
		formats = "table or json (ledger and usage also take csv)"
	}
	g.outputFlag(pf, "output format: "+formats)
	return cmd
}

// outputFlag adds -o, --output.
func (g *globals) outputFlag(f *pflag.FlagSet, usage string) {
	f.StringVarP(&g.output, "output", "o", "table", usage)
}

// dataDirFlag adds --data-dir, whose default is [defaultDataDir]; what
// names what the verb keeps or reads there.
func dataDirFlag(f *pflag.FlagSet, p *string, what string) {
	f.StringVar(p, "data-dir", defaultDataDir(), what+" (env SANDBOXER_DATA_DIR)")
}

// extensionNames is a repeatable flag of extension names, each in its
// canonical spelling ([extension.CanonicalName]) and listed once:
// --extension local and --extension ext.local name the same extension.
type extensionNames []string

func (e *extensionNames) String() string { return "[" + strings.Join(*e, ",") + "]" }
func (e *extensionNames) Type() string   { return "name" }

func (e *extensionNames) Set(s string) error {
	s = extension.CanonicalName(strings.TrimSpace(s))
	if s == "" {
		return errors.New("want an extension name, such as local or ext.local")
	}
	if !slices.Contains(*e, s) {
		*e = append(*e, s)
	}
	return nil
}

// extensionsFlag adds a repeatable --extension whose values are stored in
// canonical spelling in *p.
func extensionsFlag(f *pflag.FlagSet, p *[]string, usage string) {
	f.Var((*extensionNames)(p), "extension", usage+" (local or ext.local), repeatable")
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

// adminClient is client, with the admin key unless --as or --token says
// otherwise: for the verbs only an admin key may run.
func (g *globals) adminClient(cmd *cobra.Command) (*api.Client, error) {
	gg := *g
	if !cmd.Flags().Changed("as") && gg.token == "" {
		gg.as = "admin"
	}
	return gg.client()
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
