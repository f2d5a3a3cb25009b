package auth_test

import (
	"bytes"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"

	"github.com/sand-boxer/sandboxer/pkg/auth"
	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/natstest"
)

// TestOpenKeepsSecrets: an authority's directory is mode 0700 and every
// file in it mode 0600, users' records included.
func TestOpenKeepsSecrets(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "authority")
	a, err := auth.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	_, u, err := a.Issue(dev, auth.IssueOptions{Note: "recorded"})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"account.jwt", "account.nk", "operator.jwt", "operator.nk", "sys.creds", "system-account.jwt", "system-account.nk",
		"users/" + u.PublicKey + ".json"}
	var files []string
	err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		switch {
		case d.IsDir() && info.Mode().Perm() != 0o700:
			t.Errorf("directory %s has mode %v, want 0700", rel, info.Mode().Perm())
		case !d.IsDir() && info.Mode().Perm() != 0o600:
			t.Errorf("file %s has mode %v, want 0600", rel, info.Mode().Perm())
		}
		if !d.IsDir() {
			files = append(files, filepath.ToSlash(rel))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(files)
	if !slices.Equal(files, want) {
		t.Fatalf("files %v, want %v", files, want)
	}
}

// TestWriteSecret: a secret is written mode 0600 in a 0700 directory,
// replacing a file of looser mode.
func TestWriteSecret(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "new", "secret")
	if err := auth.WriteSecret(path, []byte("one")); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := auth.WriteSecret(path, []byte("two")); err != nil {
		t.Fatal(err)
	}
	for p, want := range map[string]fs.FileMode{filepath.Dir(path): 0o700, path: 0o600} {
		info, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if info.Mode().Perm() != want {
			t.Errorf("%s has mode %v, want %v", p, info.Mode().Perm(), want)
		}
	}
	if b, _ := os.ReadFile(path); string(b) != "two" {
		t.Fatalf("content %q", b)
	}
}

// TestReopen: opening an authority's directory again loads the same
// keys, revocations included; Load wants one there.
func TestReopen(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "authority")
	a, err := auth.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	_, u, err := a.Issue(dev, auth.IssueOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Revoke(u.PublicKey); err != nil {
		t.Fatal(err)
	}
	for name, open := range map[string]func(string) (*auth.Authority, error){"Open": auth.Open, "Load": auth.Load} {
		b, err := open(dir)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if b.AccountPublicKey() != a.AccountPublicKey() || b.AccountJWT() != a.AccountJWT() ||
			!bytes.Equal(b.SystemCreds(), a.SystemCreds()) || b.ServerConfig("/r") != a.ServerConfig("/r") || b.Dir() != dir {
			t.Fatalf("%s loaded other keys than the authority's", name)
		}
		if !b.IsRevoked(u.PublicKey) {
			t.Fatalf("%s lost the revocation", name)
		}
	}
	if _, err := auth.Load(filepath.Join(t.TempDir(), "none")); err == nil {
		t.Fatal("Load of an empty directory succeeded")
	}
}

// TestIssue: Issue writes a standard .creds file, which nats.go's own
// loader accepts and the server lets in with the identity's rights.
func TestIssue(t *testing.T) {
	t.Parallel()
	srv := natstest.Start(t)
	creds, u, err := srv.Auth.Issue(dev, auth.IssueOptions{Expires: time.Hour, Note: "a file"})
	if err != nil {
		t.Fatal(err)
	}
	for _, block := range []string{"-----BEGIN NATS USER JWT-----", "------END NATS USER JWT------", "-----BEGIN USER NKEY SEED-----"} {
		if !bytes.Contains(creds, []byte(block)) {
			t.Fatalf("creds lack %q:\n%s", block, creds)
		}
	}
	uc, err := auth.UserOf(creds)
	if err != nil {
		t.Fatal(err)
	}
	if uc.Subject != u.PublicKey || uc.Name != dev.UserName() || uc.Issuer != srv.Auth.AccountPublicKey() || uc.IssuerAccount != "" {
		t.Fatalf("claims: subject %s name %s issuer %s issuer account %q", uc.Subject, uc.Name, uc.Issuer, uc.IssuerAccount)
	}
	if got, err := auth.IdentityFromTags(uc.Tags); err != nil || got != dev {
		t.Fatalf("identity from the JWT's tags: %+v, %v", got, err)
	}
	if !reflect.DeepEqual(uc.Permissions, dev.Permissions()) {
		t.Fatalf("permissions %+v, want %+v", uc.Permissions, dev.Permissions())
	}
	if exp := time.Unix(uc.Expires, 0); exp.Before(time.Now().Add(59*time.Minute)) || exp.After(time.Now().Add(61*time.Minute)) {
		t.Fatalf("expires %v, want in an hour", exp)
	}
	if !u.ExpiresAt.Equal(u.IssuedAt.Add(time.Hour)) || u.Note != "a file" || u.Identity != dev || u.Name != dev.UserName() {
		t.Fatalf("record %+v", u)
	}

	path := filepath.Join(t.TempDir(), "dev.creds")
	if err := auth.WriteSecret(path, creds); err != nil {
		t.Fatal(err)
	}
	nc, err := nats.Connect(srv.ClientURL(), nats.UserCredentials(path), nats.CustomInboxPrefix(dev.InboxPrefix()))
	if err != nil {
		t.Fatalf("connecting with nats.UserCredentials: %v", err)
	}
	defer nc.Close()
	watcher := srv.Conn(t)
	sub, err := watcher.SubscribeSync(event.RequestSubject("dev", event.VerbCreate))
	if err != nil {
		t.Fatal(err)
	}
	if err := watcher.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := nc.Publish(event.RequestSubject("dev", event.VerbCreate), []byte("{}")); err != nil {
		t.Fatal(err)
	}
	if _, err := sub.NextMsgWithContext(testCtx(t)); err != nil {
		t.Fatalf("the creds file's user could not ask for a sandbox: %v", err)
	}

	if _, _, err := srv.Auth.Issue(auth.Identity{Role: auth.RoleTenant}, auth.IssueOptions{}); err == nil {
		t.Fatal("issued credentials for a tenant without a consumer")
	}
}

// TestUsers: Users lists the issued users, not the unlisted ones, oldest
// first, with their revocations.
func TestUsers(t *testing.T) {
	t.Parallel()
	a, err := auth.Open(filepath.Join(t.TempDir(), "authority"))
	if err != nil {
		t.Fatal(err)
	}
	_, first, err := a.Issue(dev, auth.IssueOptions{Note: "first"})
	if err != nil {
		t.Fatal(err)
	}
	_, second, err := a.Issue(local, auth.IssueOptions{Note: "second"})
	if err != nil {
		t.Fatal(err)
	}
	_, unlisted, err := a.Issue(billing, auth.IssueOptions{Unlisted: true})
	if err != nil {
		t.Fatal(err)
	}
	users, err := a.Users()
	if err != nil {
		t.Fatal(err)
	}
	if len(users) != 2 || !reflect.DeepEqual(users, []auth.User{first, second}) && !reflect.DeepEqual(users, []auth.User{second, first}) {
		t.Fatalf("users %+v, want %+v and %+v", users, first, second)
	}
	if users[0].IssuedAt.After(users[1].IssuedAt) {
		t.Fatalf("users not oldest first: %v then %v", users[0].IssuedAt, users[1].IssuedAt)
	}

	before := time.Now().Truncate(time.Second)
	if _, err := a.Revoke(second.PublicKey); err != nil {
		t.Fatal(err)
	}
	after := time.Now().Add(2 * time.Second)
	users, err = a.Users()
	if err != nil {
		t.Fatal(err)
	}
	for _, u := range users {
		switch u.PublicKey {
		case first.PublicKey:
			if !u.RevokedAt.IsZero() {
				t.Fatalf("%s revoked at %v", u.Name, u.RevokedAt)
			}
		case second.PublicKey:
			if u.RevokedAt.Before(before) || u.RevokedAt.After(after) {
				t.Fatalf("%s revoked at %v, want between %v and %v", u.Name, u.RevokedAt, before, after)
			}
		default:
			t.Fatalf("unexpected user %+v", u)
		}
	}
	if !a.IsRevoked(second.PublicKey) || a.IsRevoked(first.PublicKey) || a.IsRevoked(unlisted.PublicKey) {
		t.Fatal("IsRevoked disagrees with Revoke")
	}
	ac, err := jwt.DecodeAccountClaims(a.AccountJWT())
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := ac.Revocations[second.PublicKey]; !ok || len(ac.Revocations) != 1 {
		t.Fatalf("account JWT revocations %v", ac.Revocations)
	}
	for _, bad := range []string{"", "not-a-key", a.AccountPublicKey()} {
		if _, err := a.Revoke(bad); err == nil {
			t.Fatalf("revoked %q", bad)
		}
	}
}

// TestValidate: an identity is a known role with exactly the scope it
// takes.
func TestValidate(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name string
		id   auth.Identity
		want string // "" when valid
	}{
		{"admin", admin, ""},
		{"gateway", gateway, ""},
		{"registry", registry, ""},
		{"metering", metering, ""},
		{"provisioner", local, ""},
		{"tenant", dev, ""},
		{"default billing", billing, ""},
		{"named billing", auth.Identity{Role: auth.RoleBilling, Billing: "audit"}, ""},
		{"unknown role", auth.Identity{Role: "root"}, `unknown role "root"`},
		{"no role", auth.Identity{}, `unknown role ""`},
		{"provisioner without extension", auth.Identity{Role: auth.RoleProvisioner}, "role provisioner needs --extension"},
		{"tenant without consumer", auth.Identity{Role: auth.RoleTenant}, "role tenant needs --consumer"},
		{"tenant with an invalid consumer", auth.Identity{Role: auth.RoleTenant, Consumer: "Dev Team"}, `invalid consumer "Dev Team"`},
		{"provisioner with an invalid extension", auth.Identity{Role: auth.RoleProvisioner, Extension: "a.b"}, `invalid extension "a.b"`},
		{"admin with an extension", auth.Identity{Role: auth.RoleAdmin, Extension: "local"}, "role admin takes no --extension"},
		{"gateway with a consumer", auth.Identity{Role: auth.RoleGateway, Consumer: "dev"}, "role gateway takes no --consumer"},
		{"provisioner with a consumer", auth.Identity{Role: auth.RoleProvisioner, Extension: "local", Consumer: "dev"}, "role provisioner takes no --consumer"},
		{"provisioner with an invalid host", auth.Identity{Role: auth.RoleProvisioner, Extension: "local", Host: "box.example.com"}, `invalid host "box.example.com"`},
		{"gateway with a host", auth.Identity{Role: auth.RoleGateway, Host: "box-2"}, "role gateway takes no --host"},
		{"tenant with a billing name", auth.Identity{Role: auth.RoleTenant, Consumer: "dev", Billing: "audit"}, "role tenant takes no billing name"},
		{"billing with an invalid name", auth.Identity{Role: auth.RoleBilling, Billing: "a>"}, `invalid billing name "a>"`},
		{"billing with an extension", auth.Identity{Role: auth.RoleBilling, Extension: "local"}, "role billing takes no --extension"},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			err := c.id.Validate()
			switch {
			case c.want == "" && err != nil:
				t.Fatalf("Validate: %v", err)
			case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
				t.Fatalf("Validate: %v, want %q", err, c.want)
			}
		})
	}
}

// TestNames: user names, inbox prefixes and tags, and the identity read
// back from the tags.
func TestNames(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		id   auth.Identity
		user string
		tags []string
		// back is the identity the tags say, when not id itself.
		back *auth.Identity
	}{
		{admin, "admin", []string{"role:admin"}, nil},
		{gateway, "gateway", []string{"role:gateway"}, nil},
		{registry, "registry", []string{"role:registry"}, nil},
		{metering, "metering", []string{"role:metering"}, nil},
		{local, "provisioner-local", []string{"role:provisioner", "extension:local"}, nil},
		{auth.Identity{Role: auth.RoleProvisioner, Extension: "local", Host: "box-2"}, "provisioner-local@box-2", []string{"role:provisioner", "extension:local", "host:box-2"}, nil},
		// Naming the default host is not naming one: same user.
		{auth.Identity{Role: auth.RoleProvisioner, Extension: "local", Host: auth.DefaultHost}, "provisioner-local", []string{"role:provisioner", "extension:local"}, &local},
		{dev, "tenant-dev", []string{"role:tenant", "consumer:dev"}, nil},
		{billing, "billing", []string{"role:billing", "durable:billing"}, nil},
		{auth.Identity{Role: auth.RoleBilling, Billing: "audit"}, "billing-audit", []string{"role:billing", "durable:billing-audit"}, nil},
		// Naming the default billing reader is not naming one: same user.
		{auth.Identity{Role: auth.RoleBilling, Billing: auth.DefaultBilling}, "billing", []string{"role:billing", "durable:billing"}, &billing},
	} {
		t.Run(c.user+" "+strings.Join(c.tags, ","), func(t *testing.T) {
			t.Parallel()
			if got := c.id.UserName(); got != c.user {
				t.Fatalf("UserName %q, want %q", got, c.user)
			}
			if got, want := c.id.InboxPrefix(), "_INBOX."+c.user; got != want || auth.InboxPrefix(c.user) != want {
				t.Fatalf("InboxPrefix %q, want %q", got, want)
			}
			if c.id.Role == auth.RoleBilling && c.id.BillingDurable() != c.user {
				t.Fatalf("BillingDurable %q, want %q", c.id.BillingDurable(), c.user)
			}
			if got := c.id.Tags(); !slices.Equal(got, c.tags) {
				t.Fatalf("Tags %v, want %v", got, c.tags)
			}
			back, err := auth.IdentityFromTags(c.id.Tags())
			if err != nil {
				t.Fatal(err)
			}
			want := c.id
			if c.back != nil {
				want = *c.back
			}
			if back != want || back.UserName() != c.user {
				t.Fatalf("IdentityFromTags %+v, want %+v", back, want)
			}
		})
	}
	for _, tags := range [][]string{nil, {"role:root"}, {"role:tenant"}, {"consumer:dev"}, {"role:provisioner", "extension:Local"}} {
		if id, err := auth.IdentityFromTags(tags); err == nil {
			t.Errorf("IdentityFromTags(%v) = %+v, want an error", tags, id)
		}
	}
}

// TestNoResponsePermissions: no identity may answer on an arbitrary reply
// subject; services answer in inboxes (see TestReplies).
func TestNoResponsePermissions(t *testing.T) {
	t.Parallel()
	for _, id := range []auth.Identity{admin, gateway, registry, metering, local, dev, billing} {
		p := id.Permissions()
		if p.Resp != nil {
			t.Errorf("%s has response permissions %+v", id.UserName(), p.Resp)
		}
		if id.Role != auth.RoleAdmin && !slices.Contains(p.Sub.Allow, id.InboxPrefix()+".>") {
			t.Errorf("%s may not read its own inbox: %v", id.UserName(), p.Sub.Allow)
		}
	}
}
