package main

import (
	"slices"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// commands returns every command of the tree under root, root included,
// parents before their children.
func commands(root *cobra.Command) []*cobra.Command {
	out := []*cobra.Command{root}
	for _, c := range root.Commands() {
		out = append(out, commands(c)...)
	}
	return out
}

// shownFlags are the flags a command's help lists: its own and those it
// inherits, without --help.
func shownFlags(c *cobra.Command) []*pflag.Flag {
	var out []*pflag.Flag
	add := func(f *pflag.Flag) {
		if f.Name != "help" {
			out = append(out, f)
		}
	}
	c.LocalFlags().VisitAll(add)
	c.InheritedFlags().VisitAll(add)
	return out
}

// TestHelpTypeColumns renders every command's help and checks that each
// flag's type column is its value's type: pflag takes a backquoted word of
// a usage string as the type's name (UnquoteUsage), so a usage that says
// "see `sandboxer profiles`" renders as "--profile sandboxer profiles".
func TestHelpTypeColumns(t *testing.T) {
	for _, c := range commands(newRoot()) {
		c.InitDefaultHelpFlag()
		help := c.UsageString()
		for _, f := range shownFlags(c) {
			got, _ := pflag.UnquoteUsage(f)
			want, _ := pflag.UnquoteUsage(&pflag.Flag{Value: f.Value})
			if strings.Contains(f.Usage, "`") || got != want {
				t.Errorf("%s --%s: type column %q comes from a backquote in its usage %q (want %q)", c.CommandPath(), f.Name, got, f.Usage, want)
				continue
			}
			line := "--" + f.Name
			if want != "" {
				line += " " + want
			}
			if !strings.Contains(help, line+" ") {
				t.Errorf("%s: help does not show %q:\n%s", c.CommandPath(), line, help)
			}
		}
	}
}

// client are the flags of every client verb of the HTTP API.
var client = []string{"url", "token", "as", "data-dir", "output"}

// connect are the flags of every verb that dials a NATS cluster.
var connect = []string{"nats", "creds", "tls-ca", "tls-cert", "tls-key"}

// allowedFlags are, for each command, the flags its help may show. A
// command missing here fails the test: decide what it takes.
var allowedFlags = map[string][]string{
	"sandboxer":                 nil,
	"sandboxer dlq":             nil,
	"sandboxer dlq ls":          append([]string{"consumer", "limit", "output"}, connect...),
	"sandboxer dlq show":        connect,
	"sandboxer dlq replay":      connect,
	"sandboxer dlq discard":     connect,
	"sandboxer bench":           {"cpuprofile", "json", "live", "only", "priced", "quick", "require-targets", "scaling"},
	"sandboxer bench serve":     {"dir", "heapprofile", "idle-release", "priced"},
	"sandboxer bench worker":    append([]string{"extension", "concurrency", "worker-id"}, connect...),
	"sandboxer create":          append([]string{"profile", "input", "label", "ttl", "idempotency-key", "wait", "timeout"}, client...),
	"sandboxer get":             client,
	"sandboxer list":            append([]string{"state", "profile", "label", "limit"}, client...),
	"sandboxer destroy":         append([]string{"wait", "timeout"}, client...),
	"sandboxer events":          append([]string{"follow"}, client...),
	"sandboxer profiles":        client,
	"sandboxer extensions":      client,
	"sandboxer credits":         client,
	"sandboxer credits balance": client,
	"sandboxer credits grant":   append([]string{"expires", "id", "priority", "promo"}, client...),
	"sandboxer credits ledger":  append([]string{"since"}, client...),
	"sandboxer credits usage":   append([]string{"consumer", "from", "to"}, client...),
	"sandboxer workers":         client,
	"sandboxer keys":            client,
	"sandboxer keys issue":      append([]string{"consumer", "scope", "expires", "name"}, client...),
	"sandboxer keys ls":         append([]string{"consumer"}, client...),
	"sandboxer keys revoke":     client,
	// A setup step: the first admin key, straight into the bucket.
	"sandboxer keys bootstrap":      append([]string{"consumer", "out"}, connect...),
	"sandboxer creds":               {"auth-dir", "data-dir"},
	"sandboxer creds init":          {"auth-dir", "data-dir"},
	"sandboxer creds issue":         {"auth-dir", "data-dir", "role", "extension", "host", "consumer", "billing", "expires", "note", "out"},
	"sandboxer creds revoke":        {"auth-dir", "data-dir", "nats", "offline"},
	"sandboxer creds ls":            {"auth-dir", "data-dir", "output"},
	"sandboxer creds server-config": {"auth-dir", "data-dir", "resolver-dir"},
	"sandboxer setup":               append([]string{"replicas", "force", "extensions", "profiles", "billing", "output"}, connect...),
	"sandboxer serve":               nil,
	"sandboxer serve gateway":       append([]string{"http", "metrics", "retention", "idle-release", "log-level", "log-format"}, connect...),
	"sandboxer serve metering":      append([]string{"metrics", "idle-release", "log-level", "log-format"}, connect...),
	"sandboxer serve registry":      append([]string{"extensions", "profiles", "metrics", "retention", "idle-release", "log-level", "log-format"}, connect...),
	"sandboxer serve provisioner":   append([]string{"extension", "concurrency", "worker-id", "host", "data-dir", "metrics", "idle-release", "log-level", "log-format"}, connect...),
	"sandboxer up": {"data-dir", "http", "nats-listen", "nats-tls-cert", "nats-tls-key", "insecure-nats", "extensions", "profiles",
		"extension", "log-level", "log-format", "nats-logs", "idle-release", "retention"},
}

// TestFlagsPerCommand: each verb shows only the flags it uses, the ones
// allowedFlags lists for it.
func TestFlagsPerCommand(t *testing.T) {
	for _, c := range commands(newRoot()) {
		path := c.CommandPath()
		allowed, ok := allowedFlags[path]
		if !ok {
			t.Errorf("%s: not in allowedFlags; list the flags it may show", path)
			continue
		}
		for _, f := range shownFlags(c) {
			if !slices.Contains(allowed, f.Name) {
				t.Errorf("%s shows --%s, which it does not use (allowed: %s)", path, f.Name, strings.Join(allowed, ", "))
			}
		}
	}
}
