package extension

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// RepoPolicy is what the repo inputs of an extension may reach: the
// manifest's repo: block. A zero policy is the default: https and ssh to
// hosts whose every address is public, no local path.
//
// A reference is checked twice. At validation ([RepoPolicy.Check], no
// I/O): its shape, that it carries no credentials, that its scheme is
// allowed and, where that needs no name resolution, its host. Right before
// the clone, in the backend ([RepoChecker.Check]): its host's addresses,
// after resolution, and a local path's place under LocalRoots, symlinks
// resolved. The clone is then pinned to what was checked ([RepoTarget]).
type RepoPolicy struct {
	// Schemes are the kinds of reference allowed, among [RepoSchemes]:
	// https, http, ssh (ssh:// URLs and scp-like user@host:path), git
	// (git://) and file (file:// URLs and absolute paths). Default
	// [DefaultRepoSchemes].
	Schemes []string `yaml:"schemes,omitempty" json:"schemes,omitempty"`
	// Hosts are what a network reference may reach, each entry one of:
	//
	//	*                 any host name whose every address is public
	//	*.example.com     a name under example.com whose every address is public
	//	git.example.com   that name, whatever it resolves to (private too)
	//	10.20.0.7         that address
	//	10.20.0.0/16      any address in the network (a host name too,
	//	                  when every address it resolves to is in it)
	//
	// Any entry but a network may end in :port (an IPv6 address then in
	// brackets) to allow that port only; without one, every port. Every
	// address a host resolves to must be allowed by some entry. Loopback,
	// private, link-local, shared (100.64/10), unspecified, multicast and
	// reserved addresses, in IPv4, IPv6 and IPv4-mapped IPv6 form, are not
	// public: only an entry naming the host exactly, or an address or
	// network holding the address, allows them. Default
	// [DefaultRepoHosts].
	Hosts []string `yaml:"hosts,omitempty" json:"hosts,omitempty"`
	// LocalRoots are the directories a file reference must be in once
	// every symlink is resolved: absolute paths, "~" (or "~/dir") for the
	// home directory of the user running the clone, "{tmp}" (or
	// "{tmp}/dir") for its temporary directory ($TMPDIR, else /tmp). They
	// are expanded and resolved where the clone runs. Default none: no
	// local path is allowed. Required with the file scheme.
	LocalRoots []string `yaml:"local_roots,omitempty" json:"local_roots,omitempty"`
}

// Defaults of a [RepoPolicy].
var (
	DefaultRepoSchemes = []string{"https", "ssh"}
	DefaultRepoHosts   = []string{"*"}
)

// ErrRepoNotReachable is wrapped by every refused or failed clone of a
// repo input. Its text is all a requester is told; the detail is in the
// [RepoError] for the operator's log.
var ErrRepoNotReachable = errors.New("repository not reachable")

// RepoError is a repository refused by a policy right before a clone, or
// a clone that failed. Its Error is only [ErrRepoNotReachable]'s text, so
// it can become a sandbox's failure reason as is; Detail (and LogValue,
// which slog uses) says which rule or address, and what git said, with
// credentials redacted, for the operator's log.
type RepoError struct {
	// Repo is the reference, credentials redacted.
	Repo string
	// Reason says which rule refused it or what failed.
	Reason string
	// Output is what git printed on its standard error, credentials
	// redacted.
	Output string
}

// Error is "repository not reachable", whatever the detail.
func (e *RepoError) Error() string { return ErrRepoNotReachable.Error() }

// Unwrap returns [ErrRepoNotReachable].
func (e *RepoError) Unwrap() error { return ErrRepoNotReachable }

// Detail is the operator's account: the reference, the reason and git's
// output.
func (e *RepoError) Detail() string {
	s := "repository " + strconv.Quote(e.Repo) + ": " + e.Reason
	if o := strings.TrimSpace(e.Output); o != "" {
		s += ": git: " + o
	}
	return s
}

// LogValue logs the detail.
func (e *RepoError) LogValue() slog.Value {
	attrs := []slog.Attr{slog.String("repo", e.Repo), slog.String("reason", e.Reason)}
	if o := strings.TrimSpace(e.Output); o != "" {
		attrs = append(attrs, slog.String("git_stderr", o))
	}
	return slog.GroupValue(attrs...)
}

func refuse(repo, format string, args ...any) *RepoError {
	return &RepoError{Repo: RedactRepo(repo), Reason: fmt.Sprintf(format, args...)}
}

// RepoRef is a repository reference that passed
// CheckFormat(FormatRepo), split into its parts.
type RepoRef struct {
	// Scheme is https, http, ssh, git or file (an absolute path is file,
	// scp-like user@host:path is ssh).
	Scheme string
	// User is the ssh user, if any. No other scheme may carry one.
	User string
	// Host is the host name or IP address ("" for file).
	Host string
	// Port is the port connected to: the reference's, or the scheme's
	// default (0 for file).
	Port int
	// Path is the local path for file, the path on the server otherwise.
	Path string
	// SCP reports the scp-like form user@host:path.
	SCP bool
	// ExplicitPort reports a port written in the reference.
	ExplicitPort bool
	// URL reports a file reference written as a file:// URL.
	URL bool

	escPath string // Path as written, escapes kept
}

// defaultPorts are the ports of each network scheme.
var defaultPorts = map[string]int{"https": 443, "http": 80, "ssh": 22, "git": 9418}

// numericHostRE matches host names a resolver may read as an IPv4 address
// in a non-canonical form (2130706433, 0x7f.1, 127.1, 010.0.0.1).
// sshUserRE is the user of an ssh:// URL, as scp-like references allow.
var sshUserRE = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]*$`)

var numericHostRE = regexp.MustCompile(`(?i)^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+))*$`)

// ParseRepo checks repo as CheckFormat(FormatRepo) does and splits it.
// Its errors never repeat the reference, which may hold a secret.
func ParseRepo(repo string) (RepoRef, error) {
	if !repoCharsRE.MatchString(repo) {
		return RepoRef{}, fmt.Errorf("repository contains characters outside [A-Za-z0-9_./:@+~%%-]")
	}
	if strings.Contains(repo, "::") {
		return RepoRef{}, fmt.Errorf("git transport helpers (\"::\") are not allowed")
	}
	if strings.HasPrefix(repo, "/") {
		if strings.Contains(repo+"/", "/../") {
			return RepoRef{}, fmt.Errorf("local repository path must not contain '..'")
		}
		return RepoRef{Scheme: "file", Path: repo}, nil
	}
	if scpRepoRE.MatchString(repo) && !strings.Contains(repo, "://") {
		user, rest, _ := strings.Cut(repo, "@")
		host, p, _ := strings.Cut(rest, ":")
		ref := RepoRef{Scheme: "ssh", User: user, Host: host, Port: 22, Path: p, SCP: true}
		return ref, checkRepoHost(ref.Host)
	}
	u, err := url.Parse(repo)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // url.Error repeats the URL
		}
		return RepoRef{}, fmt.Errorf("want a repository URL or absolute path: %v", err)
	}
	if !slices.Contains(RepoSchemes, u.Scheme) {
		return RepoRef{}, fmt.Errorf("repository scheme %q not allowed (allowed: %v)", SafeField(u.Scheme), RepoSchemes)
	}
	if u.User != nil {
		if _, ok := u.User.Password(); ok {
			return RepoRef{}, fmt.Errorf("repository URL must not carry a password")
		}
		if u.Scheme != "ssh" {
			return RepoRef{}, fmt.Errorf("repository URL must not carry a user name (for %s, credentials belong in the backend's git configuration)", u.Scheme)
		}
		if !sshUserRE.MatchString(u.User.Username()) {
			return RepoRef{}, fmt.Errorf("invalid ssh user in the repository URL")
		}
	}
	if u.Opaque != "" || u.RawQuery != "" || u.Fragment != "" {
		return RepoRef{}, fmt.Errorf("want a repository URL such as %s://host/path", u.Scheme)
	}
	if u.Scheme == "file" {
		if u.Host != "" && u.Host != "localhost" || !strings.HasPrefix(u.Path, "/") {
			return RepoRef{}, fmt.Errorf("file URL must be file:///absolute/path")
		}
		if strings.Contains(u.Path+"/", "/../") {
			return RepoRef{}, fmt.Errorf("local repository path must not contain '..'")
		}
		return RepoRef{Scheme: "file", Path: u.Path, URL: true}, nil
	}
	if u.Host == "" || strings.HasPrefix(u.Host, "-") {
		return RepoRef{}, fmt.Errorf("repository URL needs a host")
	}
	ref := RepoRef{Scheme: u.Scheme, Host: u.Hostname(), Port: defaultPorts[u.Scheme], Path: u.Path, escPath: u.EscapedPath()}
	if u.User != nil {
		ref.User = u.User.Username()
	}
	if p := u.Port(); p != "" {
		n, err := strconv.Atoi(p)
		if err != nil || n < 1 || n > 65535 {
			return RepoRef{}, fmt.Errorf("repository port out of range")
		}
		ref.Port, ref.ExplicitPort = n, true
	}
	return ref, checkRepoHost(ref.Host)
}

func checkRepoHost(h string) error {
	if h == "" {
		return fmt.Errorf("repository URL needs a host")
	}
	if _, err := netip.ParseAddr(h); err == nil {
		return nil
	}
	switch {
	case !hostRE.MatchString(h) || strings.ContainsAny(h, ":[]"):
		return fmt.Errorf("invalid repository host %q", SafeField(h))
	case strings.HasSuffix(h, "."):
		return fmt.Errorf("repository host %q must not end with '.'", SafeField(h))
	case numericHostRE.MatchString(h):
		return fmt.Errorf("repository host %q is not a canonical IP address", SafeField(h))
	}
	return nil
}

// SchemeList returns the allowed schemes, or their default.
func (p RepoPolicy) SchemeList() []string {
	if len(p.Schemes) == 0 {
		return DefaultRepoSchemes
	}
	return p.Schemes
}

// HostList returns the host entries, or their default.
func (p RepoPolicy) HostList() []string {
	if len(p.Hosts) == 0 {
		return DefaultRepoHosts
	}
	return p.Hosts
}

// IsZero reports a policy that sets nothing (the defaults).
func (p RepoPolicy) IsZero() bool {
	return len(p.Schemes) == 0 && len(p.Hosts) == 0 && len(p.LocalRoots) == 0
}

// Check is the validation-time check of a reference: its format (as
// CheckFormat(FormatRepo): no credentials, no option, no transport
// helper), its scheme, and its host where the policy decides without
// resolving a name (an IP address; a name no entry can match). Its error
// is for the requester: it says which rule, never anything about the
// network.
func (p RepoPolicy) Check(repo string) error {
	ref, err := ParseRepo(repo)
	if err != nil {
		return err
	}
	return p.checkRef(ref)
}

func (p RepoPolicy) checkRef(ref RepoRef) error {
	if schemes := p.SchemeList(); !slices.Contains(schemes, ref.Scheme) {
		kind := ref.Scheme
		if ref.Scheme == "file" {
			kind = "file (a local path)"
		}
		return fmt.Errorf("repository scheme %s not allowed by this extension (allowed: %s)", kind, strings.Join(schemes, ", "))
	}
	if ref.Scheme == "file" {
		if len(p.LocalRoots) == 0 {
			return fmt.Errorf("local repositories are not allowed by this extension")
		}
		if systemPath(ref.Path) {
			return fmt.Errorf("local repository must not be under /proc, /sys or /dev")
		}
		return nil
	}
	rules, err := p.rules()
	if err != nil {
		return err
	}
	if a, err := netip.ParseAddr(ref.Host); err == nil {
		if !hostAllowed(rules, ref.Host, ref.Port, a.Unmap()) {
			return fmt.Errorf("repository address %s not allowed by this extension", a)
		}
		return nil
	}
	if !slices.ContainsFunc(rules, func(r hostRule) bool { return r.mayMatchName(ref.Host, ref.Port) }) {
		return fmt.Errorf("repository host %q not allowed by this extension", ref.Host)
	}
	return nil
}

// systemPath reports a path under /proc, /sys or /dev: never a repository,
// and where magic links (/proc/self/cwd) lead to the service's own files.
func systemPath(p string) bool {
	for _, d := range []string{"/proc", "/sys", "/dev"} {
		if p == d || strings.HasPrefix(p, d+"/") {
			return true
		}
	}
	return false
}

// hostRule is one parsed entry of RepoPolicy.Hosts.
type hostRule struct {
	any    bool         // "*"
	suffix string       // "*.example.com": ".example.com"
	name   string       // an exact host name, lower case
	prefix netip.Prefix // an address (/32 or /128) or a network
	port   int          // 0: any
}

func (r hostRule) portOK(port int) bool { return r.port == 0 || r.port == port }

// covers reports whether r allows address a of host (as written in the
// reference) on port.
func (r hostRule) covers(host string, port int, a netip.Addr) bool {
	if !r.portOK(port) {
		return false
	}
	h := strings.ToLower(host)
	switch {
	case r.any:
		return PublicAddr(a)
	case r.suffix != "":
		return strings.HasSuffix(h, r.suffix) && PublicAddr(a)
	case r.name != "":
		return h == r.name
	default:
		return r.prefix.Contains(a)
	}
}

// mayMatchName reports whether r could allow host name h on port once
// resolved.
func (r hostRule) mayMatchName(h string, port int) bool {
	if !r.portOK(port) {
		return false
	}
	h = strings.ToLower(h)
	switch {
	case r.any, r.prefix.IsValid():
		return true
	case r.suffix != "":
		return strings.HasSuffix(h, r.suffix)
	default:
		return h == r.name
	}
}

func hostAllowed(rules []hostRule, host string, port int, a netip.Addr) bool {
	return slices.ContainsFunc(rules, func(r hostRule) bool { return r.covers(host, port, a) })
}

// parseHostRule parses one entry of RepoPolicy.Hosts.
func parseHostRule(s string) (hostRule, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return hostRule{}, fmt.Errorf("invalid network %q: want an address/bits such as 10.0.0.0/8", s)
		}
		if p.Addr().Is4In6() {
			return hostRule{}, fmt.Errorf("network %q: write IPv4-mapped networks in IPv4 form", s)
		}
		if p != p.Masked() {
			return hostRule{}, fmt.Errorf("network %q has host bits set (want %s)", s, p.Masked())
		}
		return hostRule{prefix: p}, nil
	}
	host, port := s, 0
	if strings.HasPrefix(s, "[") || strings.Count(s, ":") == 1 {
		h, p, err := net.SplitHostPort(s)
		if err != nil {
			return hostRule{}, fmt.Errorf("invalid host %q: want name[:port], address[:port] or [IPv6]:port", s)
		}
		n, err := strconv.Atoi(p)
		if err != nil || n < 1 || n > 65535 {
			return hostRule{}, fmt.Errorf("host %q: port out of range", s)
		}
		host, port = h, n
	}
	if a, err := netip.ParseAddr(host); err == nil {
		if a.Zone() != "" {
			return hostRule{}, fmt.Errorf("host %q: zones are not allowed", s)
		}
		a = a.Unmap()
		return hostRule{prefix: netip.PrefixFrom(a, a.BitLen()), port: port}, nil
	}
	if host == "*" {
		return hostRule{any: true, port: port}, nil
	}
	if d, ok := strings.CutPrefix(host, "*."); ok {
		if checkRepoHost(d) != nil || isAddr(d) {
			return hostRule{}, fmt.Errorf("invalid wildcard %q: want *.domain", s)
		}
		return hostRule{suffix: "." + strings.ToLower(d), port: port}, nil
	}
	if err := checkRepoHost(host); err != nil {
		return hostRule{}, fmt.Errorf("invalid host %q: want *, *.domain, a host name, an IP address or a network", s)
	}
	return hostRule{name: strings.ToLower(host), port: port}, nil
}

func (p RepoPolicy) rules() ([]hostRule, error) {
	hosts := p.HostList()
	rules := make([]hostRule, 0, len(hosts))
	for _, h := range hosts {
		r, err := parseHostRule(h)
		if err != nil {
			return nil, fmt.Errorf("repo.hosts: %v", err)
		}
		rules = append(rules, r)
	}
	return rules, nil
}

// nonPublic are the ranges that are not the public internet, beyond what
// netip's predicates (loopback, private, link-local, multicast,
// unspecified) cover.
var nonPublic = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),       // "this network"
	netip.MustParsePrefix("100.64.0.0/10"),   // shared address space (carrier-grade NAT)
	netip.MustParsePrefix("192.0.0.0/24"),    // IETF protocol assignments
	netip.MustParsePrefix("192.0.2.0/24"),    // documentation
	netip.MustParsePrefix("198.18.0.0/15"),   // benchmarking
	netip.MustParsePrefix("198.51.100.0/24"), // documentation
	netip.MustParsePrefix("203.0.113.0/24"),  // documentation
	netip.MustParsePrefix("240.0.0.0/4"),     // reserved, and broadcast
	netip.MustParsePrefix("::/96"),           // IPv4-compatible (deprecated), :: and ::1 among them
	netip.MustParsePrefix("64:ff9b:1::/48"),  // local-use IPv4/IPv6 translation
	netip.MustParsePrefix("100::/64"),        // discard-only
	netip.MustParsePrefix("2001::/32"),       // Teredo (an obfuscated IPv4 address)
	netip.MustParsePrefix("2001:2::/48"),     // benchmarking
	netip.MustParsePrefix("2001:db8::/32"),   // documentation
	netip.MustParsePrefix("fec0::/10"),       // site-local (deprecated)
}

var (
	nat64  = netip.MustParsePrefix("64:ff9b::/96")
	sixTo4 = netip.MustParsePrefix("2002::/16")
)

// PublicAddr reports whether a is an address of the public internet: not
// loopback, private (10/8, 172.16/12, 192.168/16, fc00::/7), link-local
// (169.254/16, fe80::/10), shared (100.64/10), unspecified, multicast,
// documentation, benchmarking or reserved, in IPv4, IPv6 or IPv4-mapped
// IPv6 form; nor an IPv6 address embedding such an IPv4 address (NAT64,
// 6to4).
func PublicAddr(a netip.Addr) bool {
	a = a.Unmap()
	if !a.IsValid() || a.Zone() != "" || a.IsUnspecified() || a.IsLoopback() || a.IsPrivate() ||
		a.IsLinkLocalUnicast() || a.IsLinkLocalMulticast() || a.IsInterfaceLocalMulticast() || a.IsMulticast() {
		return false
	}
	for _, p := range nonPublic {
		if p.Contains(a) {
			return false
		}
	}
	b := a.As16()
	switch {
	case nat64.Contains(a):
		return PublicAddr(netip.AddrFrom4([4]byte(b[12:16])))
	case sixTo4.Contains(a):
		return PublicAddr(netip.AddrFrom4([4]byte(b[2:6])))
	}
	return true
}

// addrKind names why an address is not public, for the operator's log.
func addrKind(a netip.Addr) string {
	switch a = a.Unmap(); {
	case a.IsLoopback():
		return "loopback"
	case a.IsPrivate():
		return "private"
	case a.IsLinkLocalUnicast():
		return "link-local"
	case a.IsUnspecified():
		return "unspecified"
	case a.IsMulticast():
		return "multicast"
	case PublicAddr(a):
		return "public"
	}
	return "not public"
}

// check lints p for a manifest.
func (p RepoPolicy) check(l locator) Problems {
	var ps Problems
	seen := map[string]bool{}
	for i, s := range p.Schemes {
		path := fmt.Sprintf("repo.schemes[%d]", i)
		switch {
		case !slices.Contains(RepoSchemes, s):
			ps = append(ps, l.at(path, "unknown scheme %q (known: %s)", s, strings.Join(RepoSchemes, ", ")))
		case seen[s]:
			ps = append(ps, l.at(path, "scheme %q listed twice", s))
		}
		seen[s] = true
	}
	for i, h := range p.Hosts {
		if _, err := parseHostRule(h); err != nil {
			ps = append(ps, l.at(fmt.Sprintf("repo.hosts[%d]", i), "%v", err))
		}
	}
	for i, r := range p.LocalRoots {
		if err := checkRoot(r); err != nil {
			ps = append(ps, l.at(fmt.Sprintf("repo.local_roots[%d]", i), "%v", err))
		}
	}
	file := slices.Contains(p.SchemeList(), "file")
	switch {
	case file && len(p.LocalRoots) == 0:
		ps = append(ps, l.at("repo.schemes", "file needs repo.local_roots: the directories local repositories must be in"))
	case !file && len(p.LocalRoots) > 0:
		ps = append(ps, l.at("repo.local_roots", "file is not among repo.schemes (%s): local_roots would never apply", strings.Join(p.SchemeList(), ", ")))
	}
	return ps
}

var rootRE = regexp.MustCompile(`^(~|\{tmp\})?(/[A-Za-z0-9_.+@-]+)*/?$`)

// checkRoot checks one entry of RepoPolicy.LocalRoots.
func checkRoot(r string) error {
	if r == "" || !rootRE.MatchString(r) || r == "~/" || r == "{tmp}/" || (r != "/" && strings.HasSuffix(r, "/")) {
		return fmt.Errorf("invalid local root %q: want an absolute path, ~, ~/dir, {tmp} or {tmp}/dir", r)
	}
	for _, part := range strings.Split(r, "/") {
		if part == "." || part == ".." {
			return fmt.Errorf("local root %q must be a clean path (no . or ..)", r)
		}
	}
	if systemPath(r) {
		return fmt.Errorf("local root %q must not be under /proc, /sys or /dev", r)
	}
	return nil
}

// Resolver looks up the addresses of a host name. [net.Resolver] is one.
type Resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// RepoChecker applies a [RepoPolicy] in a backend, right before the
// clone, and returns the [RepoTarget] to clone: resolved host names, with
// every address checked, and local paths with every symlink resolved,
// checked under the policy's roots. It makes no connection but the
// resolver's. Its refusals are [*RepoError]s.
type RepoChecker struct {
	// Policy is the manifest's repo: block.
	Policy RepoPolicy
	// Resolver resolves host names. Default net.DefaultResolver.
	Resolver Resolver
	// Remote says the clone runs on another host (over SSH): a local path
	// is not looked at here, the target carries the roots and the host
	// checks it there ([workspace.Ensure] does).
	Remote bool
	// Home and TempDir expand "~" and "{tmp}" in the roots of a local
	// clone. Default os.UserHomeDir() and os.TempDir().
	Home, TempDir string
	// Exclude are directories a local path must not be in even under a
	// root, such as the backend's own workspaces (other sandboxes'
	// clones). Symlinks in them are resolved.
	Exclude []string
}

// RepoTarget is a reference a [RepoChecker] allowed, pinned to what it
// checked: what a backend hands to git, and how. A clone must run with
// [RepoTarget.GitConfig] and, for ssh, [RepoTarget.SSHCommand] as
// GIT_SSH_COMMAND, so that git reaches the checked address and nothing
// else: no redirect, no proxy, no other scheme.
type RepoTarget struct {
	// Scheme is https, http, ssh, git or file.
	Scheme string
	// URL is what git clones, after "--": the reference, with the host
	// replaced by the checked address for git://, and for a local clone
	// of a local path the path with its symlinks resolved.
	URL string
	// Host and Port are what the reference connects to ("" and 0 for
	// file).
	Host string
	Port int
	// Addr is the checked address git must connect to (invalid for file).
	Addr netip.Addr
	// LocalRoots are, for a file reference checked with Remote, the
	// policy's roots: the host the clone runs on resolves the path and
	// refuses it unless it is in one of them.
	LocalRoots []string
}

// Check checks repo against the policy, resolving its host or its local
// path, and returns what to clone. It refuses with a [*RepoError] (which
// wraps [ErrRepoNotReachable]) before anything connects.
func (c RepoChecker) Check(ctx context.Context, repo string) (RepoTarget, error) {
	ref, err := ParseRepo(repo)
	if err == nil {
		err = c.Policy.checkRef(ref)
	}
	if err != nil {
		return RepoTarget{}, refuse(repo, "%v", err)
	}
	if ref.Scheme == "file" {
		return c.checkLocal(repo, ref)
	}
	rules, err := c.Policy.rules()
	if err != nil {
		return RepoTarget{}, refuse(repo, "%v", err)
	}
	var addrs []netip.Addr
	if a, err := netip.ParseAddr(ref.Host); err == nil {
		addrs = []netip.Addr{a}
	} else {
		r := c.Resolver
		if r == nil {
			r = net.DefaultResolver
		}
		addrs, err = r.LookupNetIP(ctx, "ip", ref.Host)
		if err != nil {
			if ctx.Err() != nil {
				return RepoTarget{}, ctx.Err()
			}
			return RepoTarget{}, refuse(repo, "resolving %s: %v", ref.Host, err)
		}
		if len(addrs) == 0 {
			return RepoTarget{}, refuse(repo, "resolving %s: no address", ref.Host)
		}
	}
	for _, a := range addrs {
		if u := a.Unmap(); !hostAllowed(rules, ref.Host, ref.Port, u) {
			return RepoTarget{}, refuse(repo, "host %s port %d: address %s (%s) is not allowed by repo.hosts %v", ref.Host, ref.Port, a, addrKind(u), c.Policy.HostList())
		}
	}
	t := RepoTarget{Scheme: ref.Scheme, URL: repo, Host: ref.Host, Port: ref.Port, Addr: addrs[0].Unmap()}
	if ref.Scheme == "git" {
		// git:// has no other way to pin the address: name it.
		hp := t.Addr.String()
		if t.Addr.Is6() {
			hp = "[" + hp + "]"
		}
		if ref.ExplicitPort {
			hp += ":" + strconv.Itoa(ref.Port)
		}
		t.URL = "git://" + hp + ref.escPath
	}
	return t, nil
}

func (c RepoChecker) checkLocal(repo string, ref RepoRef) (RepoTarget, error) {
	t := RepoTarget{Scheme: "file", URL: repo}
	if c.Remote {
		t.LocalRoots = slices.Clone(c.Policy.LocalRoots)
		return t, nil
	}
	real, err := resolvePath(ref.Path)
	if err != nil {
		return RepoTarget{}, refuse(repo, "resolving local path: %v", err)
	}
	if fi, err := os.Stat(real); err != nil || !fi.IsDir() {
		return RepoTarget{}, refuse(repo, "local path %s is not a directory", real)
	}
	if fi, err := os.Lstat(filepath.Join(real, ".git")); err == nil && !fi.IsDir() {
		return RepoTarget{}, refuse(repo, "%s/.git is not a directory (a gitfile or link may lead out of the roots)", real)
	}
	for _, x := range c.Exclude {
		if rx, err := resolvePath(x); err == nil && within(real, rx) {
			return RepoTarget{}, refuse(repo, "local path %s is in %s, which is excluded", real, rx)
		}
	}
	var tried []string
	for _, r := range c.Policy.LocalRoots {
		dir, err := c.expand(r)
		if err != nil {
			tried = append(tried, fmt.Sprintf("%s (%v)", r, err))
			continue
		}
		rd, err := resolvePath(dir)
		if err != nil {
			tried = append(tried, fmt.Sprintf("%s (%v)", r, err))
			continue
		}
		if within(real, rd) {
			if ref.URL {
				t.URL = "file://" + real
			} else {
				t.URL = real
			}
			return t, nil
		}
		tried = append(tried, r+" = "+rd)
	}
	return RepoTarget{}, refuse(repo, "local path resolves to %s, in none of repo.local_roots [%s]", real, strings.Join(tried, ", "))
}

// maxLinks bounds the symlinks resolvePath follows.
const maxLinks = 255

// resolvePath resolves every symlink of absolute path p, as
// filepath.EvalSymlinks does, and refuses a path that goes through
// /proc, /sys or /dev at any step: their magic links (/proc/self/cwd,
// /proc/1/root) lead to the service's own files.
func resolvePath(p string) (string, error) {
	if !filepath.IsAbs(p) {
		return "", fmt.Errorf("%q is not an absolute path", p)
	}
	resolved := "/"
	rest := strings.Split(p, "/")
	for links := 0; len(rest) > 0; {
		part := rest[0]
		rest = rest[1:]
		switch part {
		case "", ".":
			continue
		case "..":
			resolved = filepath.Dir(resolved)
			continue
		}
		next := filepath.Join(resolved, part)
		if systemPath(next) {
			return "", fmt.Errorf("%s leads through %s, under /proc, /sys or /dev", p, next)
		}
		fi, err := os.Lstat(next)
		if err != nil {
			return "", err
		}
		if fi.Mode()&os.ModeSymlink == 0 {
			resolved = next
			continue
		}
		if links++; links > maxLinks {
			return "", fmt.Errorf("%s: too many symlinks", p)
		}
		target, err := os.Readlink(next)
		if err != nil {
			return "", err
		}
		if filepath.IsAbs(target) {
			resolved = "/"
		}
		rest = append(strings.Split(target, "/"), rest...)
	}
	return resolved, nil
}

// expand expands ~ and {tmp} at the start of root r.
func (c RepoChecker) expand(r string) (string, error) {
	var base, rest string
	switch {
	case r == "~" || strings.HasPrefix(r, "~/"):
		base, rest = c.Home, strings.TrimPrefix(r, "~")
		if base == "" {
			h, err := os.UserHomeDir()
			if err != nil {
				return "", err
			}
			base = h
		}
	case r == "{tmp}" || strings.HasPrefix(r, "{tmp}/"):
		base, rest = c.TempDir, strings.TrimPrefix(r, "{tmp}")
		if base == "" {
			base = os.TempDir()
		}
	default:
		return r, nil
	}
	if !filepath.IsAbs(base) {
		return "", fmt.Errorf("%q is not an absolute path", base)
	}
	return filepath.Join(base, rest), nil
}

// within reports whether path p is dir or inside it (both clean and
// absolute).
func within(p, dir string) bool {
	if dir == "/" {
		return true
	}
	return p == dir || strings.HasPrefix(p, dir+"/")
}

// GitConfig returns the git -c settings a clone of t runs with, in order:
// only t's scheme allowed, HTTP redirects refused, no HTTP proxy (a proxy
// would resolve the name itself), and for https and http by name the host
// pinned to the checked address (http.curloptResolve, git 2.37 or later).
func (t RepoTarget) GitConfig() []string {
	kv := []string{"protocol.allow=never", "protocol." + t.Scheme + ".allow=always", "http.followRedirects=false", "http.proxy="}
	if r := t.CurlResolve(); r != "" {
		kv = append(kv, "http.curloptResolve="+r)
	}
	return kv
}

// CurlResolve returns host:port:address pinning an https or http host
// name to the checked address, or "" (another scheme, or an address
// already).
func (t RepoTarget) CurlResolve() string {
	if t.Scheme != "https" && t.Scheme != "http" || !t.Addr.IsValid() || isAddr(t.Host) {
		return ""
	}
	a := t.Addr.String()
	if t.Addr.Is6() {
		a = "[" + a + "]"
	}
	return t.Host + ":" + strconv.Itoa(t.Port) + ":" + a
}

// SSHPin returns, for an ssh host name, the address ssh must connect to
// (HostName) and the name its host key is looked up under in known_hosts
// (HostKeyAlias: the host, or [host]:port off port 22); "" otherwise.
func (t RepoTarget) SSHPin() (hostName, hostKeyAlias string) {
	if t.Scheme != "ssh" || !t.Addr.IsValid() || isAddr(t.Host) {
		return "", ""
	}
	alias := t.Host
	if t.Port != 22 {
		alias = "[" + t.Host + "]:" + strconv.Itoa(t.Port)
	}
	return t.Addr.String(), alias
}

// SSHCommand returns the GIT_SSH_COMMAND a clone of t runs with: ssh in
// batch mode, and for an ssh host name pinned with [RepoTarget.SSHPin].
func (t RepoTarget) SSHCommand() string {
	cmd := "ssh -o BatchMode=yes"
	if h, alias := t.SSHPin(); h != "" {
		cmd += " -o 'HostName=" + h + "' -o 'HostKeyAlias=" + alias + "'"
	}
	return cmd
}

func isAddr(h string) bool {
	_, err := netip.ParseAddr(h)
	return err == nil
}

var credRE = regexp.MustCompile(`(?i)\b([a-z][a-z0-9+.-]*)://([^/?#@\s]*)@`)

// RedactRepo returns s with the credentials of every URL in it replaced
// by "***": a password in any userinfo, and the whole userinfo but for
// ssh (whose user is no secret). s may be a reference or git's output.
func RedactRepo(s string) string {
	return credRE.ReplaceAllStringFunc(s, func(m string) string {
		sm := credRE.FindStringSubmatch(m)
		scheme, info := strings.ToLower(sm[1]), sm[2]
		user, _, hasPass := strings.Cut(info, ":")
		switch {
		case strings.Contains(scheme, "ssh") && !hasPass:
			return m
		case strings.Contains(scheme, "ssh"):
			return sm[1] + "://" + user + ":***@"
		}
		return sm[1] + "://***@"
	})
}
