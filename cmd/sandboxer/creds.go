package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/spf13/cobra"

	"github.com/sand-boxer/sandboxer/cmd/sandboxer/internal/catalogfs"
	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// credsFlags locate the authority every creds verb works with.
type credsFlags struct {
	g   *globals
	dir string
}

// authority opens the authority, which must exist.
func (c *credsFlags) authority() (*auth.Authority, error) { return auth.Load(c.path()) }

func (c *credsFlags) path() string {
	if c.dir != "" {
		return c.dir
	}
	return authDir(c.g.dataDir)
}

func newCredsCmd(g *globals) *cobra.Command {
	cf := &credsFlags{g: g}
	cmd := &cobra.Command{
		Use:   "creds",
		Short: "Manage the bus's identities: NATS credentials per process and client (an operator's tool)",
		Long: `Every process and client of sand-boxer is its own NATS user, with exactly the
permissions of its role. The authority (operator and account keys) lives in
--auth-dir, by default <data-dir>/auth, which sandboxer up creates; whoever can
read it can mint any identity.`,
	}
	cmd.PersistentFlags().StringVar(&cf.dir, "auth-dir", os.Getenv("SANDBOXER_AUTH_DIR"), "authority directory (env SANDBOXER_AUTH_DIR; default <data-dir>/auth)")
	cmd.AddCommand(credsInit(cf), credsIssue(cf), credsRevoke(cf), credsList(cf), credsServerConfig(cf))
	return cmd
}

func credsInit(cf *credsFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "init",
		Short: "Create the authority (operator, system and SANDBOXER account keys) unless it exists",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			a, err := auth.Open(cf.path())
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "authority  %s\naccount    %s %s\nnext       sandboxer creds server-config > auth.conf, include it in each nats-server's config\n",
				a.Dir(), auth.AccountName, a.AccountPublicKey())
			return nil
		},
	}
}

func credsIssue(cf *credsFlags) *cobra.Command {
	var (
		id      auth.Identity
		role    string
		expires time.Duration
		note    string
		out     string
	)
	cmd := &cobra.Command{
		Use:   "issue --role ROLE [--extension X] [--consumer C] [--billing NAME] [--out FILE]",
		Short: "Issue credentials for one identity: a .creds file the nats CLI and any NATS client accept",
		Long: `Roles: admin, gateway, registry, metering, provisioner (one per extension:
--extension), tenant (one per consumer: --consumer), billing (its durable is
named after it: billing, or billing-<name> with --billing).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			id.Role = auth.Role(role)
			id.Extension = extension.CanonicalName(id.Extension)
			if err := id.Validate(); err != nil {
				return &exitError{2, err}
			}
			a, err := cf.authority()
			if err != nil {
				return err
			}
			creds, u, err := a.Issue(id, auth.IssueOptions{Expires: expires, Note: note})
			if err != nil {
				return err
			}
			if out == "" || out == "-" {
				_, err := cmd.OutOrStdout().Write(creds)
				return err
			}
			if err := auth.WriteSecret(out, creds); err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "wrote %s: user %s (%s)\n", out, u.Name, u.PublicKey)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&role, "role", "", "gateway, registry, metering, provisioner, tenant, billing or admin")
	f.StringVar(&id.Extension, "extension", "", "a provisioner's extension (local or ext.local)")
	f.StringVar(&id.Host, "host", "", "a provisioner's placement host, as its serve provisioner --host (default localhost)")
	f.StringVar(&id.Consumer, "consumer", "", "a tenant's consumer name")
	f.StringVar(&id.Billing, "billing", "", "a billing reader's name (default billing)")
	f.DurationVar(&expires, "expires", 0, "valid for this long from now (default: until revoked)")
	f.StringVar(&note, "note", "", "what the credentials are for, shown by creds ls")
	f.StringVar(&out, "out", "", "write the .creds file here, mode 0600 (default: standard output)")
	return cmd
}

func credsRevoke(cf *credsFlags) *cobra.Command {
	var (
		url     string
		offline bool
	)
	cmd := &cobra.Command{
		Use:   "revoke USER...",
		Short: "Revoke users (public keys or user names) now: the servers close their connections and refuse them",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			a, err := cf.authority()
			if err != nil {
				return err
			}
			users, err := a.Users()
			if err != nil {
				return err
			}
			var keys []string
			for _, arg := range args {
				n := 0
				for _, u := range users {
					if (u.PublicKey == arg || u.Name == arg) && u.RevokedAt.IsZero() {
						keys = append(keys, u.PublicKey)
						n++
					}
				}
				if n == 0 && strings.HasPrefix(arg, "U") && len(arg) == 56 {
					keys = append(keys, arg) // a user this directory did not record
					n++
				}
				if n == 0 {
					return &exitError{2, fmt.Errorf("no user %q to revoke (see sandboxer creds ls)", arg)}
				}
			}
			for _, k := range keys {
				if _, err := a.Revoke(k); err != nil {
					return err
				}
				fmt.Fprintln(cmd.OutOrStdout(), "revoked", k)
			}
			if offline {
				fmt.Fprintln(cmd.OutOrStdout(), "not pushed: give the servers", a.Dir()+"/account.jwt, or run creds revoke again without --offline")
				return nil
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 10*time.Second)
			defer cancel()
			if err := pushAccount(ctx, a, url); err != nil {
				return fmt.Errorf("revoked in %s, but the servers do not know yet: %w", a.Dir(), err)
			}
			fmt.Fprintln(cmd.OutOrStdout(), "pushed to", url)
			return nil
		},
	}
	cmd.Flags().StringVar(&url, "nats", envOr("NATS_URL", nats.DefaultURL), "a server of the cluster to push the revocation to (env NATS_URL)")
	cmd.Flags().BoolVar(&offline, "offline", false, "only record the revocation; push it later")
	return cmd
}

func credsList(cf *credsFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "ls",
		Short: "List the users the authority issued, with their revocations",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			asJSON, err := cf.g.json()
			if err != nil {
				return err
			}
			a, err := cf.authority()
			if err != nil {
				return err
			}
			users, err := a.Users()
			if err != nil {
				return err
			}
			if asJSON {
				if users == nil {
					users = []auth.User{}
				}
				return json.NewEncoder(cmd.OutOrStdout()).Encode(users)
			}
			printUsers(cmd.OutOrStdout(), users)
			return nil
		},
	}
}

func printUsers(w io.Writer, users []auth.User) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tROLE\tISSUED\tEXPIRES\tREVOKED\tPUBLIC KEY\tNOTE")
	day := func(t time.Time) string {
		if t.IsZero() {
			return "-"
		}
		return t.Format(time.RFC3339)
	}
	for _, u := range users {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", u.Name, u.Identity.Role, day(u.IssuedAt), day(u.ExpiresAt), day(u.RevokedAt), u.PublicKey, u.Note)
	}
	_ = tw.Flush()
}

func credsServerConfig(cf *credsFlags) *cobra.Command {
	var resolverDir string
	cmd := &cobra.Command{
		Use:   "server-config [--resolver-dir DIR]",
		Short: "Print the nats-server configuration that trusts the authority (operator, system account, full resolver)",
		Long: `Include the output in every nats-server of the cluster (include auth.conf), with
JetStream on. Each server keeps the accounts in its own resolver directory and
they share updates (revocations) over the system account.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			a, err := cf.authority()
			if err != nil {
				return err
			}
			_, err = io.WriteString(cmd.OutOrStdout(), a.ServerConfig(resolverDir))
			return err
		},
	}
	cmd.Flags().StringVar(&resolverDir, "resolver-dir", "/data/jwt", "where each server keeps account JWTs")
	return cmd
}

func newSetupCmd(g *globals) *cobra.Command {
	var (
		c               connectFlags
		replicas        int
		force           bool
		extDir, profDir string
		billing         []string
	)
	cmd := &cobra.Command{
		Use:   "setup --creds ADMIN.creds [--replicas N] [--force]",
		Short: "Create or update every stream, bucket and durable consumer (the one step that declares the bus)",
		Long: `Setup is the only writer of the bus's shape: services and workers declare
nothing. It never lowers the replicas of an existing stream or bucket nor makes
it keep less (age, limits, history, retention, storage): such a difference is
reported and nothing of it is changed, unless --force. Run it with the admin's
credentials, again after adding an extension or a billing reader.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			asJSON, err := g.json()
			if err != nil {
				return err
			}
			// The manifests built into the binary unless a directory is
			// given or present, as for up and serve registry.
			ext := catalogDir(extDir, cmd.Flags().Changed("extensions"), catalogfs.Extensions)
			prof := catalogDir(profDir, cmd.Flags().Changed("profiles"), catalogfs.Profiles)
			cat, ps := extension.LoadCatalogDirs(ext, prof, linkedExtensions())
			if len(ps) > 0 {
				return fmt.Errorf("loading catalog: %w", ps)
			}
			nc, js, err := c.connect(cmd.Context(), "sandboxer-setup")
			if err != nil {
				return err
			}
			defer nc.Close()
			rep, serr := (bus.Topology{Replicas: replicas}).Setup(cmd.Context(), js, bus.SetupOptions{
				Consumers: setupConsumers(cat, billing), Force: force,
			})
			if asJSON {
				if rep == nil {
					rep = bus.Report{}
				}
				if err := json.NewEncoder(cmd.OutOrStdout()).Encode(rep); err != nil {
					return err
				}
			} else {
				tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "KIND\tNAME\tACTION\tDETAIL")
				for _, ch := range rep {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", ch.Kind, ch.Name, ch.Action, ch.Detail)
				}
				_ = tw.Flush()
			}
			if errors.Is(serr, bus.ErrRefused) {
				return &exitError{1, serr}
			}
			return serr
		},
	}
	c.add(cmd)
	f := cmd.Flags()
	f.IntVar(&replicas, "replicas", 1, "replicas of every stream and bucket (3 on a three-node cluster)")
	f.BoolVar(&force, "force", false, "also make changes that lower replicas or keep less")
	f.StringVar(&extDir, "extensions", "extensions", "directory of ext.<name>.yaml manifests: one pool's durable each")
	f.StringVar(&profDir, "profiles", "profiles", "directory of profile.<slug>.yaml profiles")
	f.StringArrayVar(&billing, "billing", []string{auth.DefaultBilling}, "billing readers to make a durable for, repeatable")
	return cmd
}
