package auth

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
)

// AccountName is the name of the application account every sand-boxer
// user belongs to.
const AccountName = "SANDBOXER"

// Files of an authority directory.
const (
	fileOperator    = "operator.nk"
	fileOperatorJWT = "operator.jwt"
	fileSysAccount  = "system-account.nk"
	fileSysJWT      = "system-account.jwt"
	fileAccount     = "account.nk"
	fileAccountJWT  = "account.jwt"
	fileSysCreds    = "sys.creds"
	dirUsers        = "users"
)

// Authority holds the keys of sand-boxer's bus: the operator, the system
// account (for the server's own traffic and for pushing account updates)
// and the SANDBOXER account that signs every user. It lives in a directory
// of mode 0700 whose files are mode 0600; whoever can read it can mint any
// identity, so only operators should.
//
// An Authority is safe for concurrent use within one process. Two
// processes that revoke users from one directory at the same moment may
// lose one of the revocations; revoke from one place.
type Authority struct {
	dir string

	mu                   sync.Mutex
	operator, sys, acct  nkeys.KeyPair
	operatorJWT, sysJWT  string
	accountJWT, sysCreds string
}

// User is a user an authority issued.
type User struct {
	// PublicKey is the user's nkey, the subject of its JWT.
	PublicKey string `json:"public_key"`
	// Name is the user's name ([Identity.UserName]).
	Name     string   `json:"name"`
	Identity Identity `json:"identity"`
	// Note says what the credentials are for.
	Note      string    `json:"note,omitempty"`
	IssuedAt  time.Time `json:"issued_at"`
	ExpiresAt time.Time `json:"expires_at,omitzero"`
	// RevokedAt is set once the user is revoked.
	RevokedAt time.Time `json:"revoked_at,omitzero"`
}

// Open loads the authority in dir, creating its keys when dir holds none.
func Open(dir string) (*Authority, error) {
	a := &Authority{dir: dir}
	if err := os.MkdirAll(filepath.Join(dir, dirUsers), 0o700); err != nil {
		return nil, fmt.Errorf("opening authority %s: %w", dir, err)
	}
	_, err := os.Stat(filepath.Join(dir, fileOperator))
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if err := a.create(); err != nil {
			return nil, fmt.Errorf("creating authority in %s: %w", dir, err)
		}
		return a, nil
	case err != nil:
		return nil, fmt.Errorf("opening authority %s: %w", dir, err)
	}
	if err := a.load(); err != nil {
		return nil, fmt.Errorf("opening authority %s: %w", dir, err)
	}
	return a, nil
}

// Load loads the authority in dir, which must exist.
func Load(dir string) (*Authority, error) {
	if _, err := os.Stat(filepath.Join(dir, fileOperator)); err != nil {
		return nil, fmt.Errorf("no authority in %s (run `sandboxer creds init` or `sandboxer up` first): %w", dir, err)
	}
	return Open(dir)
}

// Dir is the authority's directory.
func (a *Authority) Dir() string { return a.dir }

func (a *Authority) create() error {
	op, err := nkeys.CreateOperator()
	if err != nil {
		return err
	}
	sys, err := nkeys.CreateAccount()
	if err != nil {
		return err
	}
	acct, err := nkeys.CreateAccount()
	if err != nil {
		return err
	}
	a.operator, a.sys, a.acct = op, sys, acct
	opPub, _ := op.PublicKey()
	sysPub, _ := sys.PublicKey()
	acctPub, _ := acct.PublicKey()

	oc := jwt.NewOperatorClaims(opPub)
	oc.Name = "sandboxer"
	oc.SystemAccount = sysPub
	if a.operatorJWT, err = oc.Encode(op); err != nil {
		return fmt.Errorf("signing operator: %w", err)
	}
	sc := jwt.NewAccountClaims(sysPub)
	sc.Name = "SYS"
	if a.sysJWT, err = sc.Encode(op); err != nil {
		return fmt.Errorf("signing system account: %w", err)
	}
	ac := jwt.NewAccountClaims(acctPub)
	ac.Name = AccountName
	ac.Limits.JetStreamLimits = jwt.JetStreamLimits{MemoryStorage: -1, DiskStorage: -1, Streams: -1, Consumer: -1, MaxAckPending: -1}
	if a.accountJWT, err = ac.Encode(op); err != nil {
		return fmt.Errorf("signing account: %w", err)
	}
	// The system user pushes account updates (revocations) to the
	// servers' resolvers.
	creds, _, err := issueUser(sys, sysPub, "sys", jwt.Permissions{}, nil, 0)
	if err != nil {
		return err
	}
	a.sysCreds = string(creds)
	files := map[string][]byte{
		fileOperatorJWT: []byte(a.operatorJWT), fileSysJWT: []byte(a.sysJWT), fileAccountJWT: []byte(a.accountJWT),
		fileSysCreds: creds,
	}
	for name, kp := range map[string]nkeys.KeyPair{fileOperator: op, fileSysAccount: sys, fileAccount: acct} {
		seed, err := kp.Seed()
		if err != nil {
			return err
		}
		files[name] = seed
	}
	// The operator's key last: its presence says the directory is whole.
	for _, name := range []string{fileOperatorJWT, fileSysJWT, fileAccountJWT, fileSysCreds, fileSysAccount, fileAccount, fileOperator} {
		if err := WriteSecret(filepath.Join(a.dir, name), files[name]); err != nil {
			return err
		}
	}
	return nil
}

func (a *Authority) load() error {
	read := func(name string) (string, error) {
		b, err := os.ReadFile(filepath.Join(a.dir, name))
		return strings.TrimSpace(string(b)), err
	}
	seed := func(name string) (nkeys.KeyPair, error) {
		s, err := read(name)
		if err != nil {
			return nil, err
		}
		return nkeys.FromSeed([]byte(s))
	}
	var err error
	if a.operator, err = seed(fileOperator); err != nil {
		return err
	}
	if a.sys, err = seed(fileSysAccount); err != nil {
		return err
	}
	if a.acct, err = seed(fileAccount); err != nil {
		return err
	}
	if a.operatorJWT, err = read(fileOperatorJWT); err != nil {
		return err
	}
	if a.sysJWT, err = read(fileSysJWT); err != nil {
		return err
	}
	if a.accountJWT, err = read(fileAccountJWT); err != nil {
		return err
	}
	b, err := os.ReadFile(filepath.Join(a.dir, fileSysCreds))
	if err != nil {
		return err
	}
	a.sysCreds = string(b)
	return nil
}

// AccountPublicKey is the SANDBOXER account's public key.
func (a *Authority) AccountPublicKey() string {
	pub, _ := a.acct.PublicKey()
	return pub
}

// AccountJWT is the SANDBOXER account's current JWT, revocations
// included.
func (a *Authority) AccountJWT() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.accountJWT
}

// SystemCreds are the credentials of the system user, which pushes
// account updates to the servers. They are not for services.
func (a *Authority) SystemCreds() []byte { return []byte(a.sysCreds) }

// IssueOptions tunes one issued user.
type IssueOptions struct {
	// Expires is how long the credentials are valid. Zero: until revoked.
	Expires time.Duration
	// Note says what the credentials are for (shown by `creds ls`).
	Note string
	// Unlisted users are not recorded in the authority's directory: the
	// in-process services of `sandboxer up`, issued at every start.
	Unlisted bool
}

// Issue signs a user for id and returns its .creds file, which the `nats`
// CLI and every NATS client accept, and its record.
func (a *Authority) Issue(id Identity, o IssueOptions) ([]byte, User, error) {
	if err := id.Validate(); err != nil {
		return nil, User{}, fmt.Errorf("issuing credentials: %w", err)
	}
	creds, pub, err := issueUser(a.acct, "", id.UserName(), id.Permissions(), id.Tags(), o.Expires)
	if err != nil {
		return nil, User{}, err
	}
	u := User{PublicKey: pub, Name: id.UserName(), Identity: id, Note: o.Note, IssuedAt: time.Now().UTC()}
	if o.Expires > 0 {
		u.ExpiresAt = u.IssuedAt.Add(o.Expires)
	}
	if !o.Unlisted {
		b, _ := json.MarshalIndent(u, "", "  ")
		if err := WriteSecret(filepath.Join(a.dir, dirUsers, pub+".json"), b); err != nil {
			return nil, User{}, fmt.Errorf("recording issued user: %w", err)
		}
	}
	return creds, u, nil
}

func issueUser(signer nkeys.KeyPair, issuerAccount, name string, p jwt.Permissions, tags []string, expires time.Duration) ([]byte, string, error) {
	ukp, err := nkeys.CreateUser()
	if err != nil {
		return nil, "", fmt.Errorf("creating user key: %w", err)
	}
	pub, _ := ukp.PublicKey()
	uc := jwt.NewUserClaims(pub)
	uc.Name = name
	uc.IssuerAccount = issuerAccount
	uc.Permissions = p
	uc.Tags.Add(tags...)
	if expires > 0 {
		uc.Expires = time.Now().Add(expires).Unix()
	}
	token, err := uc.Encode(signer)
	if err != nil {
		return nil, "", fmt.Errorf("signing user %s: %w", name, err)
	}
	seed, _ := ukp.Seed()
	creds, err := jwt.FormatUserConfig(token, seed)
	if err != nil {
		return nil, "", fmt.Errorf("formatting credentials of %s: %w", name, err)
	}
	return creds, pub, nil
}

// Users lists the users the authority issued, oldest first, with their
// revocations.
func (a *Authority) Users() ([]User, error) {
	entries, err := os.ReadDir(filepath.Join(a.dir, dirUsers))
	if err != nil {
		return nil, fmt.Errorf("listing users: %w", err)
	}
	ac, err := jwt.DecodeAccountClaims(a.AccountJWT())
	if err != nil {
		return nil, fmt.Errorf("reading account: %w", err)
	}
	var out []User
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(a.dir, dirUsers, e.Name()))
		if err != nil {
			return nil, fmt.Errorf("reading user %s: %w", e.Name(), err)
		}
		var u User
		if err := json.Unmarshal(b, &u); err != nil {
			return nil, fmt.Errorf("reading user %s: %w", e.Name(), err)
		}
		if at, ok := ac.Revocations[u.PublicKey]; ok {
			u.RevokedAt = time.Unix(at, 0).UTC()
		}
		out = append(out, u)
	}
	slices.SortFunc(out, func(x, y User) int { return x.IssuedAt.Compare(y.IssuedAt) })
	return out, nil
}

// Revoke revokes user (its public key) from now on, and returns the
// account JWT that says so, which the servers must be given ([Push]) for
// the revocation to take effect: they then close the user's connections
// and refuse it from then on.
func (a *Authority) Revoke(user string) (string, error) {
	if !nkeys.IsValidPublicUserKey(user) {
		return "", fmt.Errorf("revoking: %q is not a user public key", user)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	ac, err := jwt.DecodeAccountClaims(a.accountJWT)
	if err != nil {
		return "", fmt.Errorf("reading account: %w", err)
	}
	// Revocations take effect for credentials issued up to the second
	// after now, so a user issued this very second is revoked too.
	ac.RevokeAt(user, time.Now().Add(time.Second))
	token, err := ac.Encode(a.operator)
	if err != nil {
		return "", fmt.Errorf("signing account: %w", err)
	}
	if err := WriteSecret(filepath.Join(a.dir, fileAccountJWT), []byte(token)); err != nil {
		return "", err
	}
	a.accountJWT = token
	return token, nil
}

// IsRevoked reports whether user is revoked in the account.
func (a *Authority) IsRevoked(user string) bool {
	ac, err := jwt.DecodeAccountClaims(a.AccountJWT())
	if err != nil {
		return false
	}
	_, ok := ac.Revocations[user]
	return ok
}

// ServerConfig is the nats-server configuration that trusts the
// authority: its operator, its system account, and a full account
// resolver in resolverDir preloaded with both accounts. Every node of a
// cluster takes the same; resolvers then share account updates over the
// system account. Append it to (or include it from) a server's config.
func (a *Authority) ServerConfig(resolverDir string) string {
	sysPub, _ := a.sys.PublicKey()
	var b strings.Builder
	b.WriteString("# sand-boxer: trust this operator; resolve its accounts from a directory\n")
	b.WriteString("operator: " + strconv.Quote(a.operatorJWT) + "\n")
	b.WriteString("system_account: " + sysPub + "\n")
	// A user's JWT travels in its CONNECT line; a service's permissions
	// make it longer than the 4 KiB a server takes by default.
	b.WriteString("max_control_line: 16384\n")
	b.WriteString("resolver: {\n  type: full\n  dir: " + strconv.Quote(resolverDir) + "\n  allow_delete: false\n  interval: \"2m\"\n  timeout: \"5s\"\n}\n")
	b.WriteString("resolver_preload: {\n")
	b.WriteString("  " + sysPub + ": " + strconv.Quote(a.sysJWT) + "\n")
	b.WriteString("  " + a.AccountPublicKey() + ": " + strconv.Quote(a.AccountJWT()) + "\n")
	b.WriteString("}\n")
	return b.String()
}

// claimsReply is the server's answer to an account update.
type claimsReply struct {
	Data *struct {
		Code    int    `json:"code"`
		Account string `json:"account"`
		Message string `json:"message"`
	} `json:"data"`
	Error *struct {
		Code        int    `json:"code"`
		Description string `json:"description"`
	} `json:"error"`
}

// Push gives accountJWT to the servers of nc, a connection of the system
// user ([Authority.SystemCreds]), which store it in their resolvers and
// apply it at once.
func Push(ctx context.Context, nc *nats.Conn, accountJWT string) error {
	msg, err := nc.RequestWithContext(ctx, "$SYS.REQ.CLAIMS.UPDATE", []byte(accountJWT))
	if err != nil {
		return fmt.Errorf("pushing account update: %w", err)
	}
	var r claimsReply
	if err := json.Unmarshal(msg.Data, &r); err != nil {
		return fmt.Errorf("pushing account update: reading reply %q: %w", msg.Data, err)
	}
	if r.Error != nil {
		return fmt.Errorf("pushing account update: server refused it: %s (%d)", r.Error.Description, r.Error.Code)
	}
	return nil
}

// WriteSecret writes b to path with mode 0600, making its directory with
// mode 0700, through a temporary file renamed into place.
func WriteSecret(path string, b []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	defer func() { _ = os.Remove(tmp.Name()) }()
	if err := tmp.Chmod(0o600); err != nil {
		_ = tmp.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if _, err := tmp.Write(b); err != nil {
		_ = tmp.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}

// UserOf reads the user JWT of a .creds file: its public key, name and
// tags.
func UserOf(creds []byte) (*jwt.UserClaims, error) {
	token, err := jwt.ParseDecoratedJWT(creds)
	if err != nil {
		return nil, fmt.Errorf("reading credentials: %w", err)
	}
	uc, err := jwt.DecodeUserClaims(token)
	if err != nil {
		return nil, fmt.Errorf("reading credentials: %w", err)
	}
	return uc, nil
}

// ConnectOptions are the NATS options that connect as the user of creds:
// its JWT and seed, and its inbox prefix ([InboxPrefix] of its name), so
// its replies arrive where it may read them.
func ConnectOptions(creds []byte) ([]nats.Option, error) {
	uc, err := UserOf(creds)
	if err != nil {
		return nil, err
	}
	token, _ := jwt.ParseDecoratedJWT(creds)
	kp, err := jwt.ParseDecoratedUserNKey(creds)
	if err != nil {
		return nil, fmt.Errorf("reading credentials: %w", err)
	}
	seed, err := kp.Seed()
	if err != nil {
		return nil, fmt.Errorf("reading credentials: %w", err)
	}
	opts := []nats.Option{nats.UserJWTAndSeed(token, string(seed))}
	if uc.Name != "" && uc.Name != "sys" {
		opts = append(opts, nats.CustomInboxPrefix(InboxPrefix(uc.Name)))
	}
	return opts, nil
}
