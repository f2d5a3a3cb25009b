package main

import (
	"errors"
	"fmt"
	"log/slog"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/sand-boxer/sandboxer/pkg/apikey"
	"github.com/sand-boxer/sandboxer/pkg/bus"
)

// svcDeps are what a served service gets.
type svcDeps struct {
	js  jetstream.JetStream
	nc  *nats.Conn
	log *slog.Logger
}

func newKeysCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "keys",
		Short: "Manage API keys (talks to NATS directly; an operator's tool)",
	}
	var (
		c              connectFlags
		consumer, role string
		name           string
	)
	issue := &cobra.Command{
		Use:   "issue --consumer NAME [--role consumer|admin]",
		Short: "Issue an API key and print its token (shown once)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if consumer == "" {
				return &exitError{2, errors.New("--consumer is required")}
			}
			nc, js, err := c.connect(cmd.Context(), "sandboxer-keys")
			if err != nil {
				return err
			}
			defer nc.Close()
			kv, err := js.KeyValue(cmd.Context(), bus.BucketAPIKeys)
			if err != nil {
				return fmt.Errorf("opening apikeys bucket: %w", err)
			}
			tok, err := apikey.NewStore(kv).Issue(cmd.Context(), consumer, role, name)
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), tok)
			return nil
		},
	}
	c.add(issue)
	issue.Flags().StringVar(&consumer, "consumer", "", "consumer the key acts for")
	issue.Flags().StringVar(&role, "role", apikey.RoleConsumer, "consumer or admin")
	issue.Flags().StringVar(&name, "name", "", "a note on what the key is for")
	cmd.AddCommand(issue)
	return cmd
}
