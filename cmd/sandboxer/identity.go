package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/bus"
	"github.com/sand-boxer/sandboxer/pkg/bus/embedded"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/services/metering"
	"github.com/sand-boxer/sandboxer/services/provisioner"
	"github.com/sand-boxer/sandboxer/services/registry"
)

// authDir is where `sandboxer up` keeps its authority: the operator and
// account keys that sign every identity.
func authDir(dataDir string) string { return filepath.Join(dataDir, "auth") }

// credsDir is where `sandboxer up` writes the credentials it hands out.
func credsDir(dataDir string) string { return filepath.Join(dataDir, "creds") }

// credsPath is the file of one identity's credentials under dataDir:
// <user name>.creds (dev.creds for the dev tenant).
func credsPath(dataDir string, id auth.Identity) string {
	name := id.UserName()
	if id.Role == auth.RoleTenant {
		name = id.Consumer
	}
	return filepath.Join(credsDir(dataDir), name+".creds")
}

// DevConsumer is the tenant `sandboxer up` makes credentials and a key for.
const DevConsumer = "dev"

// upIdentities are the identities `sandboxer up` writes credentials for:
// the admin, the dev tenant, the billing reader, and one provisioner per
// shipped pool.
func upIdentities(pools []string) []auth.Identity {
	ids := []auth.Identity{
		{Role: auth.RoleAdmin},
		{Role: auth.RoleTenant, Consumer: DevConsumer},
		{Role: auth.RoleBilling},
	}
	for _, p := range pools {
		ids = append(ids, auth.Identity{Role: auth.RoleProvisioner, Extension: p})
	}
	return ids
}

// ensureCreds writes, mode 0600, the credentials of each identity under
// dataDir/creds, unless a file there already holds valid credentials of
// it: issued by a's account, for the same user name, not revoked and not
// expired. It returns the paths.
func ensureCreds(a *auth.Authority, dataDir string, ids []auth.Identity) ([]string, error) {
	var paths []string
	for _, id := range ids {
		path := credsPath(dataDir, id)
		paths = append(paths, path)
		if b, err := os.ReadFile(path); err == nil && credsValid(a, b, id) {
			continue
		} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("reading %s: %w", path, err)
		}
		creds, _, err := a.Issue(id, auth.IssueOptions{Note: "written by sandboxer up"})
		if err != nil {
			return nil, err
		}
		if err := auth.WriteSecret(path, creds); err != nil {
			return nil, err
		}
	}
	return paths, nil
}

func credsValid(a *auth.Authority, creds []byte, id auth.Identity) bool {
	uc, err := auth.UserOf(creds)
	if err != nil {
		return false
	}
	vr := jwt.ValidationResults{}
	uc.Validate(&vr)
	return uc.Issuer == a.AccountPublicKey() && uc.Name == id.UserName() && !vr.IsBlocking(true) && !a.IsRevoked(uc.Subject) &&
		slices.Equal(uc.Permissions.Pub.Allow, id.Permissions().Pub.Allow)
}

// setupConsumers are the durable consumers of every service, for the
// extensions of cat: the registry's, metering's, each pool's, and the
// billing readers'.
func setupConsumers(cat *extension.Catalog, billing []string) []bus.ConsumerSpec {
	specs := append(registry.Consumers(bus.ConsumerPolicy{}), metering.Consumers(bus.ConsumerPolicy{})...)
	specs = append(specs, provisioner.Consumers(cat)...)
	for _, b := range billing {
		specs = append(specs, billingConsumer(auth.Identity{Role: auth.RoleBilling, Billing: b}))
	}
	return specs
}

// billingConsumer is the durable a billing identity reads the metering
// stream through: every event, never given up on.
func billingConsumer(id auth.Identity) bus.ConsumerSpec {
	return bus.ConsumerSpec{
		Stream: event.StreamMetering, Name: id.BillingDurable(), Filters: []string{event.SubjectMetering},
		Policy:      bus.ConsumerPolicy{MaxDeliver: -1, MaxAckPending: 1000},
		Description: "billing reader " + id.UserName() + ": the whole metering stream",
	}
}

// connectAs opens an in-process connection to srv as id, with
// credentials issued for this process only.
func connectAs(srv *embedded.Server, a *auth.Authority, id auth.Identity, name string) (*nats.Conn, jetstream.JetStream, error) {
	creds, _, err := a.Issue(id, auth.IssueOptions{Unlisted: true})
	if err != nil {
		return nil, nil, err
	}
	opts, err := auth.ConnectOptions(creds)
	if err != nil {
		return nil, nil, err
	}
	nc, err := srv.Connect(name, opts...)
	if err != nil {
		return nil, nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, fmt.Errorf("opening jetstream: %w", err)
	}
	return nc, js, nil
}

// readCreds reads a .creds file into connection options.
func readCreds(path string) ([]nats.Option, error) {
	if path == "" {
		return nil, &exitError{2, errors.New("no credentials: give --creds FILE (env NATS_CREDS); the bus refuses anonymous clients")}
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading credentials: %w", err)
	}
	return auth.ConnectOptions(b)
}

// pushAccount gives the servers at url the authority's current account
// (after a revocation), as the system user.
func pushAccount(ctx context.Context, a *auth.Authority, url string) error {
	opts, err := auth.ConnectOptions(a.SystemCreds())
	if err != nil {
		return err
	}
	nc, err := bus.Connect(ctx, bus.ConnConfig{URL: url, Name: "sandboxer-creds", Options: opts})
	if err != nil {
		return err
	}
	defer nc.Close()
	return auth.Push(ctx, nc, a.AccountJWT())
}
