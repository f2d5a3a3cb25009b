package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/event"
)

func parsePairs(kind string, pairs []string) (map[string]string, error) {
	if len(pairs) == 0 {
		return nil, nil
	}
	out := make(map[string]string, len(pairs))
	for _, p := range pairs {
		k, v, ok := strings.Cut(p, "=")
		if !ok || k == "" {
			return nil, &exitError{2, fmt.Errorf("--%s %q: want key=value", kind, p)}
		}
		out[k] = v
	}
	return out, nil
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// printSandbox writes s as a table. The state row says what the API
// answered, and that the sandbox failed when it did and has moved on
// since (its cleanup after the failure).
func printSandbox(w io.Writer, s *api.Sandbox) { printSandboxState(w, s, stateText(s)) }

// stateText is the state row of s: its state, or "failed (now S)" for a
// sandbox that failed and is now in state S.
func stateText(s *api.Sandbox) string {
	if s.State != event.StateFailed && failed(s) {
		return fmt.Sprintf("%s (now %s)", event.StateFailed, s.State)
	}
	return string(s.State)
}

// failed reports whether s failed: its state, its history or its reason
// says so.
func failed(s *api.Sandbox) bool {
	return s.State == event.StateFailed || s.Reason == event.ReasonFailed || hasState(s, event.StateFailed)
}

// printSandboxState writes s as a table with state as its state row.
func printSandboxState(w io.Writer, s *api.Sandbox, state string) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "id\t%s\n", s.ID)
	fmt.Fprintf(tw, "state\t%s\n", state)
	fmt.Fprintf(tw, "profile\t%s\n", s.Profile)
	fmt.Fprintf(tw, "extension\t%s\n", s.Extension)
	fmt.Fprintf(tw, "consumer\t%s\n", s.Consumer)
	if s.Host != "" {
		fmt.Fprintf(tw, "host\t%s\n", s.Host)
	}
	if r := s.Reachability; r != nil {
		if r.SSH != "" {
			fmt.Fprintf(tw, "ssh\t%s\n", r.SSH)
		}
		if r.RemoteDir != "" {
			fmt.Fprintf(tw, "remote_dir\t%s\n", r.RemoteDir)
		}
		if r.ComposeProject != "" {
			fmt.Fprintf(tw, "compose_project\t%s\n", r.ComposeProject)
		}
		for _, k := range slices.Sorted(maps.Keys(r.Ports)) {
			fmt.Fprintf(tw, "port %s\t%s\n", k, r.Ports[k])
		}
	}
	if !s.ExpiresAt.IsZero() && s.State.Rank() < event.StateExpired.Rank() && s.State != event.StateFailed {
		// Only while it lives: an ended sandbox expires no more.
		fmt.Fprintf(tw, "expires_at\t%s\n", s.ExpiresAt.Format(time.RFC3339))
	}
	if s.Reason != "" {
		fmt.Fprintf(tw, "reason\t%s\n", s.Reason)
	}
	if s.DestroyAttempt > 0 {
		fmt.Fprintf(tw, "destroy_attempt\t%d\n", s.DestroyAttempt)
	}
	if s.TeardownError != "" {
		// The last failed teardown: retried with back-off; destroy again
		// to re-drive it at once.
		fmt.Fprintf(tw, "teardown_error\t%s (%s)\n", s.TeardownError, s.TeardownFailedAt.Format(time.RFC3339))
	}
	for _, k := range slices.Sorted(maps.Keys(s.Labels)) {
		fmt.Fprintf(tw, "label\t%s=%s\n", k, s.Labels[k])
	}
	_ = tw.Flush()
}

// waitFor follows a sandbox until until accepts its state, reporting each
// state on stderr when it is a terminal.
func waitFor(ctx context.Context, c *api.Client, id string, until func(event.State) bool) (*api.Sandbox, error) {
	tty := isTerminal(os.Stderr)
	return c.Wait(ctx, id, until, func(s event.State, e *event.Event) {
		if tty {
			fmt.Fprintf(os.Stderr, "%s  %s  %s\n", e.Time().Local().Format("15:04:05.000"), id, s)
		}
	})
}

func isTerminal(f *os.File) bool {
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// failedState turns a sandbox that ended badly into a non-zero exit.
func failedState(s *api.Sandbox) error {
	switch {
	case s.State == event.StateFailed, s.State == event.StateRejected:
		return &exitError{1, fmt.Errorf("sandbox %s %s: %s", s.ID, s.State, s.Reason)}
	case failed(s):
		return &exitError{1, fmt.Errorf("sandbox %s failed (now %s): %s", s.ID, s.State, s.Reason)}
	}
	return nil
}

func hasState(s *api.Sandbox, st event.State) bool {
	for _, t := range s.History {
		if t.State == st {
			return true
		}
	}
	return false
}

func newCreateCmd(g *globals) *cobra.Command {
	var (
		profile, ttl, idem string
		inputs, labels     []string
		wait               bool
		timeout            time.Duration
	)
	cmd := &cobra.Command{
		Use:   "create --profile SLUG [--input k=v]... [--label k=v]... [--ttl D] [--wait]",
		Short: "Ask for a sandbox",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			asJSON, err := g.json()
			if err != nil {
				return err
			}
			if profile == "" {
				return &exitError{2, fmt.Errorf("--profile is required")}
			}
			in, err := parsePairs("input", inputs)
			if err != nil {
				return err
			}
			lb, err := parsePairs("label", labels)
			if err != nil {
				return err
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			s, err := c.Create(ctx, api.CreateRequest{Profile: profile, Inputs: in, Labels: lb, TTL: ttl}, idem)
			if err != nil {
				return err
			}
			if wait {
				s, err = waitFor(ctx, c, s.ID, func(st event.State) bool {
					return st.Rank() >= event.StateReady.Rank()
				})
				if err != nil {
					return err
				}
			}
			if asJSON {
				if err := printJSON(cmd.OutOrStdout(), s); err != nil {
					return err
				}
			} else {
				printSandbox(cmd.OutOrStdout(), s)
			}
			if wait {
				return failedState(s)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&profile, "profile", "", "profile slug, one of those sandboxer profiles lists")
	f.StringArrayVar(&inputs, "input", nil, "input key=value, repeatable")
	f.StringArrayVar(&labels, "label", nil, "label key=value, repeatable")
	f.StringVar(&ttl, "ttl", "", "time to live, such as 30m (default: the profile's)")
	f.StringVar(&idem, "idempotency-key", "", "repeat-safe key: the same key returns the same sandbox")
	f.BoolVar(&wait, "wait", false, "wait until the sandbox is ready (or failed)")
	f.DurationVar(&timeout, "timeout", 15*time.Minute, "give up after this long")
	return cmd
}

func newGetCmd(g *globals) *cobra.Command {
	return readCmd(g, &cobra.Command{Use: "get ID", Short: "Show a sandbox", Args: cobra.ExactArgs(1)},
		func(ctx context.Context, c *api.Client, args []string) (*api.Sandbox, error) {
			return c.Get(ctx, args[0])
		},
		func(w io.Writer, s *api.Sandbox) error { printSandbox(w, s); return nil })
}

func newListCmd(g *globals) *cobra.Command {
	var (
		f     api.ListFilter
		limit int
	)
	cmd := &cobra.Command{
		Use:   "list [--state S] [--profile P] [--label k=v]... [--limit N]",
		Short: "List sandboxes",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if limit < 0 || limit > api.MaxPageSize {
				return &exitError{2, fmt.Errorf("--limit %d: want 1 to %d, or 0 for every sandbox", limit, api.MaxPageSize)}
			}
			asJSON, c, err := g.prepare()
			if err != nil {
				return err
			}
			var page api.SandboxList
			if limit > 0 {
				page, err = c.ListPage(cmd.Context(), f, limit, "")
			} else {
				page.Sandboxes, err = c.List(cmd.Context(), f)
			}
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), page)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tSTATE\tPROFILE\tHOST\tCREATED")
			for _, s := range page.Sandboxes {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", s.ID, s.State, s.Profile, s.Host, s.CreatedAt.Local().Format(time.DateTime))
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVar(&f.State, "state", "", "only sandboxes in this state")
	cmd.Flags().StringVar(&f.Profile, "profile", "", "only sandboxes of this profile")
	cmd.Flags().StringArrayVar(&f.Labels, "label", nil, "only sandboxes with label k=v, repeatable")
	cmd.Flags().IntVar(&limit, "limit", 0, "only the first N sandboxes, in id order (default: every one)")
	return cmd
}

func newDestroyCmd(g *globals) *cobra.Command {
	var (
		wait    bool
		timeout time.Duration
	)
	cmd := &cobra.Command{
		Use:   "destroy ID [--wait]",
		Short: "Destroy a sandbox",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			asJSON, c, err := g.prepare()
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			s, err := c.Destroy(ctx, args[0])
			if err != nil {
				return err
			}
			if wait {
				s, err = waitFor(ctx, c, s.ID, event.State.Terminal)
				if err != nil {
					return err
				}
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), s)
			}
			if !wait {
				// The answer is the sandbox as it was when the destroy
				// was asked for: say that, not "ready".
				printSandboxState(cmd.OutOrStdout(), s, destroyRequested(s))
				return nil
			}
			printSandbox(cmd.OutOrStdout(), s)
			return nil
		},
	}
	cmd.Flags().BoolVar(&wait, "wait", false, "wait until the sandbox is destroyed")
	cmd.Flags().DurationVar(&timeout, "timeout", 15*time.Minute, "give up after this long")
	return cmd
}

// destroyRequested is the state row of the answer to a destroy that was
// not waited for: a destroy was requested of a sandbox in the state the
// answer shows, or none was needed.
func destroyRequested(s *api.Sandbox) string {
	switch s.State {
	case event.StateDestroying, event.StateExpired:
		return stateText(s) + " (being destroyed already)"
	case event.StateDestroyed, event.StateRejected:
		return stateText(s) + " (nothing to destroy)"
	}
	return "destroy requested (was " + stateText(s) + ")"
}

func newEventsCmd(g *globals) *cobra.Command {
	var follow bool
	cmd := &cobra.Command{
		Use:   "events ID [--follow]",
		Short: "Show a sandbox's lifecycle events",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			asJSON, c, err := g.prepare()
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			// The header waits for the stream: a refusal (no such
			// sandbox) prints only the error. JSON lines have none.
			headed := asJSON
			header := func() {
				if !headed {
					fmt.Fprintln(tw, "SEQ\tTIME\tSTATE\tTYPE")
					headed = true
				}
			}
			err = c.Events(cmd.Context(), args[0], follow, func(se api.StreamEvent) error {
				header()
				if asJSON {
					b, err := json.Marshal(se.Event)
					if err != nil {
						return err
					}
					_, err = fmt.Fprintf(w, "%s\n", b)
					return err
				}
				st, _ := event.StateOf(event.Type(se.Event.Type()))
				fmt.Fprintf(tw, "%d\t%s\t%s\t%s\n", se.Seq, se.Event.Time().Local().Format(time.DateTime), st, se.Event.Type())
				if follow {
					return tw.Flush()
				}
				return nil
			})
			if errors.Is(err, context.Canceled) {
				err = nil
			}
			if err == nil {
				header() // a sandbox without events yet
			}
			if ferr := tw.Flush(); err == nil {
				err = ferr
			}
			return err
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep streaming until the sandbox is destroyed")
	return cmd
}

// readCmd is a client verb that fetches one thing and prints it as a
// table, or as JSON with -o json.
func readCmd[T any](g *globals, cmd *cobra.Command, fetch func(ctx context.Context, c *api.Client, args []string) (T, error), table func(w io.Writer, v T) error) *cobra.Command {
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		asJSON, c, err := g.prepare()
		if err != nil {
			return err
		}
		v, err := fetch(cmd.Context(), c, args)
		if err != nil {
			return err
		}
		if asJSON {
			return printJSON(cmd.OutOrStdout(), v)
		}
		return table(cmd.OutOrStdout(), v)
	}
	return cmd
}

func newProfilesCmd(g *globals) *cobra.Command {
	return readCmd(g, &cobra.Command{Use: "profiles", Short: "List the profiles sandboxes can be asked for", Args: cobra.NoArgs},
		func(ctx context.Context, c *api.Client, _ []string) (*api.ProfileList, error) { return c.Profiles(ctx) },
		func(w io.Writer, list *api.ProfileList) error {
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "SLUG\tEXTENSION\tTTL\tDESCRIPTION")
			for _, p := range list.Profiles {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", p.Slug, strings.Join(p.ExtensionNames(), ","), p.TTL.Default, p.Description)
			}
			return tw.Flush()
		})
}

func newExtensionsCmd(g *globals) *cobra.Command {
	return readCmd(g, &cobra.Command{Use: "extensions", Short: "List the backends", Args: cobra.NoArgs},
		func(ctx context.Context, c *api.Client, _ []string) (*api.ExtensionList, error) {
			return c.Extensions(ctx)
		},
		func(w io.Writer, list *api.ExtensionList) error {
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tHANDLER\tISOLATION\tPRICING\tINPUTS")
			for _, m := range list.Extensions {
				var lv []string
				for _, l := range m.Capabilities.IsolationLevels {
					lv = append(lv, string(l))
				}
				var in []string
				for k, s := range m.Inputs {
					if s.Required {
						k += "*"
					}
					in = append(in, k)
				}
				sort.Strings(in)
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", m.Name, m.Handler, strings.Join(lv, ","), m.Capabilities.PricingModel, strings.Join(in, ","))
			}
			return tw.Flush()
		})
}
