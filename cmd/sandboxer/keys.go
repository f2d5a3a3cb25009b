package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/sand-boxer/sandboxer/pkg/api"
	"github.com/sand-boxer/sandboxer/pkg/apikey"
	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/bus"
)

// svcDeps are what a served service gets.
type svcDeps struct {
	js  jetstream.JetStream
	nc  *nats.Conn
	log *slog.Logger
}

// newKeysCmd is `sandboxer keys`: API keys over the gateway's /v1/keys,
// with the admin key unless --as or --token says otherwise.
func newKeysCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "keys issue|ls|revoke|bootstrap",
		Short: "Manage API keys through the gateway (admin key)",
	}
	cmd.AddCommand(
		g.clientFlags(newKeysIssueCmd(g)),
		g.clientFlags(newKeysListCmd(g)),
		g.clientFlags(newKeysRevokeCmd(g)),
		newKeysBootstrapCmd(),
	)
	return cmd
}

// newKeysBootstrapCmd is `sandboxer keys bootstrap`: a cluster's first
// admin API key, written into the apikeys bucket with the admin's NATS
// credentials (a setup step: sandboxer up writes its own keys). Every
// other key is issued over HTTP with an admin key.
func newKeysBootstrapCmd() *cobra.Command {
	var (
		c        connectFlags
		consumer string
		out      string
	)
	cmd := &cobra.Command{
		Use:   "bootstrap --nats URL --creds ADMIN.creds [--out FILE]",
		Short: "Write a first admin API key straight into the bus's apikeys bucket (admin NATS credentials; a setup step)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			// Credentials without the rights get no answer, not a
			// refusal: bound the wait.
			ctx, cancel := context.WithTimeout(cmd.Context(), 30*time.Second)
			defer cancel()
			nc, js, err := c.connect(ctx, "sandboxer-keys")
			if err != nil {
				return err
			}
			defer nc.Close()
			kv, err := js.KeyValue(ctx, bus.BucketAPIKeys)
			if err != nil {
				return fmt.Errorf("opening bucket %s: %w", bus.BucketAPIKeys, err)
			}
			tok, k, err := apikey.NewStore(kv).IssueKey(ctx, apikey.Spec{
				Consumer: consumer, Scopes: []apikey.Scope{apikey.ScopeAdmin}, Name: "admin key of sandboxer keys bootstrap",
			})
			if err != nil {
				return err
			}
			if out == "" || out == "-" {
				fmt.Fprintln(cmd.OutOrStdout(), tok)
			} else if err := auth.WriteSecret(out, []byte(tok+"\n")); err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "admin key %s for %s; the token is shown once\n", k.ID, k.Consumer)
			return nil
		},
	}
	c.add(cmd)
	cmd.Flags().StringVar(&consumer, "consumer", "admin", "consumer the admin key acts for")
	cmd.Flags().StringVar(&out, "out", "", "write the token here, mode 0600 (default: standard output)")
	return cmd
}

func newKeysIssueCmd(g *globals) *cobra.Command {
	var (
		consumer, name, expires string
		scopes                  []string
	)
	cmd := &cobra.Command{
		Use:   "issue --consumer NAME [--scope S]... [--expires 720h] [--name N]",
		Short: "Issue an API key and print its token (shown once)",
		Long: `Scopes: read (sandboxes, their events, profiles, extensions, workers), create,
destroy, credits (the consumer's own credits) and admin (everything, any
consumer). Default: every scope but admin. The token goes to standard output
alone (-o json: the whole key); what it is, to standard error.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			asJSON, err := g.json()
			if err != nil {
				return err
			}
			if consumer == "" {
				return &exitError{2, errors.New("--consumer is required")}
			}
			req := api.KeyRequest{Consumer: consumer, Scopes: scopes, Name: name}
			if expires != "" {
				now := time.Now()
				at, err := parseWhen("expires", expires, now, fromNow)
				if err != nil {
					return err
				}
				if !at.After(now) {
					return &exitError{2, fmt.Errorf("--expires %q: already past", expires)}
				}
				req.ExpiresIn = at.Sub(now).Round(time.Second).String()
			}
			c, err := g.adminClient(cmd)
			if err != nil {
				return err
			}
			k, err := c.IssueKey(cmd.Context(), req)
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), k)
			}
			fmt.Fprintln(cmd.OutOrStdout(), k.Token)
			fmt.Fprintf(cmd.ErrOrStderr(), "key %s for %s (%s), %s; the token above is shown once\n",
				k.ID, k.Consumer, strings.Join(k.Scopes, ", "), expiry(k.APIKey))
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&consumer, "consumer", "", "consumer the key acts for")
	f.StringArrayVar(&scopes, "scope", nil, "read, create, destroy, credits or admin, repeatable (default: all but admin)")
	f.StringVar(&expires, "expires", "", "when the key stops working: an RFC 3339 time, a date or "+durationUsage(fromNow)+" (default: until revoked)")
	f.StringVar(&name, "name", "", "a note on what the key is for")
	return cmd
}

// expiry says when k expires.
func expiry(k api.APIKey) string {
	switch {
	case k.ExpiresAt.IsZero():
		return "valid until revoked"
	case k.Expired:
		return "expired " + k.ExpiresAt.Format(time.RFC3339)
	}
	return "expires " + k.ExpiresAt.Format(time.RFC3339)
}

func newKeysListCmd(g *globals) *cobra.Command {
	var consumer string
	cmd := &cobra.Command{
		Use:   "ls [--consumer C]",
		Short: "List API keys (never their tokens)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			asJSON, err := g.json()
			if err != nil {
				return err
			}
			c, err := g.adminClient(cmd)
			if err != nil {
				return err
			}
			l, err := c.Keys(cmd.Context(), consumer)
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), l)
			}
			printKeys(cmd.OutOrStdout(), l.Keys)
			return nil
		},
	}
	cmd.Flags().StringVar(&consumer, "consumer", "", "only this consumer's keys")
	return cmd
}

func printKeys(w io.Writer, keys []api.APIKey) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tCONSUMER\tSCOPES\tCREATED\tEXPIRES\tNAME")
	for _, k := range keys {
		exp := "-"
		if !k.ExpiresAt.IsZero() {
			exp = k.ExpiresAt.Local().Format(time.DateTime)
			if k.Expired {
				exp += " (expired)"
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", k.ID, k.Consumer, strings.Join(k.Scopes, ","), k.CreatedAt.Local().Format(time.DateTime), exp, k.Name)
	}
	_ = tw.Flush()
}

func newKeysRevokeCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "revoke ID",
		Short: "Revoke an API key: it stops working at once on the gateway asked, within its key cache TTL (30s) on the others",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			asJSON, err := g.json()
			if err != nil {
				return err
			}
			c, err := g.adminClient(cmd)
			if err != nil {
				return err
			}
			k, err := c.RevokeKey(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), k)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "revoked %s of %s\n", k.ID, k.Consumer)
			return nil
		},
	}
}
