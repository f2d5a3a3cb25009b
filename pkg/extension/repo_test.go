package extension_test

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/sshx/workspace/workspacetest"
)

// resolver is the policy checker's resolver hook: fixed answers for the
// names of the tests (under .test, which nothing else resolves), the
// system's resolver for the rest (localhost).
type resolver map[string][]string

func (r resolver) LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error) {
	as, ok := r[strings.ToLower(host)]
	if !ok {
		if strings.HasSuffix(host, ".test") {
			return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
		}
		return net.DefaultResolver.LookupNetIP(ctx, network, host)
	}
	out := make([]netip.Addr, len(as))
	for i, a := range as {
		out[i] = netip.MustParseAddr(a)
	}
	return out, nil
}

var names = resolver{
	"pub.test":              {"93.184.216.34"},
	"pub6.test":             {"2606:4700::1"},
	"internal.test":         {"10.1.2.3"},
	"vcs.internal.test":     {"10.20.0.5"},
	"meta.test":             {"169.254.169.254"},
	"mapped.test":           {"::ffff:127.0.0.1"},
	"mapped-private.test":   {"::ffff:10.0.0.1"},
	"mapped-linklocal.test": {"::ffff:169.254.169.254"},
	"ula.test":              {"fd00::1"},
	"linklocal6.test":       {"fe80::1"},
	"loopback6.test":        {"::1"},
	"nat64.test":            {"64:ff9b::7f00:1"},
	"sixtofour.test":        {"2002:a00:1::1"},
	"cgnat.test":            {"100.64.0.1"},
	"zero.test":             {"0.0.0.0"},
	"multicast.test":        {"224.0.0.1"},
	"mixed.test":            {"93.184.216.34", "127.0.0.1"},
	"git.corp.test":         {"10.9.9.9"},
	"pub.corp.test":         {"93.184.216.35"},
}

// TestRepoCheckerRefuses: every refusal happens in the checker, before
// anything connects: the listener the references point at never sees a
// connection, and the error says only "repository not reachable".
func TestRepoCheckerRefuses(t *testing.T) {
	t.Parallel()
	ln := workspacetest.Listen(t, "SSH-2.0-not-git\r\n")
	port := strconv.Itoa(ln.Port())
	root := t.TempDir()
	outside := workspacetest.GitRepo(t, "")
	inRoot := workspacetest.GitRepo(t, root)
	excluded := filepath.Join(root, "data")
	if err := os.Mkdir(excluded, 0o755); err != nil {
		t.Fatal(err)
	}
	inExcluded := workspacetest.GitRepo(t, excluded)
	for name, target := range map[string]string{"escape": outside, "slash": "/", "cwd": "/proc/self/cwd"} {
		if err := os.Symlink(target, filepath.Join(root, name)); err != nil {
			t.Fatal(err)
		}
	}
	gitfile := filepath.Join(root, "gitfile")
	if err := os.Mkdir(gitfile, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(gitfile, ".git"), []byte("gitdir: "+outside+"/.git\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	all := extension.RepoPolicy{Schemes: []string{"https", "http", "ssh", "git", "file"}, LocalRoots: []string{root}}
	cases := []struct {
		name   string
		policy extension.RepoPolicy
		repo   string
		reason string // in the RepoError's reason
	}{
		{"loopback literal", all, "https://127.0.0.1:" + port + "/r", "address 127.0.0.1 not allowed"},
		{"ssh port scan", all, "ssh://git@127.0.0.1:" + port + "/r", "address 127.0.0.1 not allowed"},
		{"git banner grab", all, "git://127.0.0.1:" + port + "/r", "address 127.0.0.1 not allowed"},
		{"private literal 10/8", all, "https://10.0.0.1/r", "not allowed"},
		{"private literal 172.16/12", all, "https://172.16.0.1/r", "not allowed"},
		{"private literal 192.168/16", all, "git@192.168.1.1:r.git", "not allowed"},
		{"shared literal 100.64/10", all, "https://100.64.0.1/r", "not allowed"},
		{"link-local literal", all, "http://169.254.169.254/latest/meta-data", "not allowed"},
		{"unspecified literal", all, "https://0.0.0.0:" + port + "/r", "not allowed"},
		{"localhost by name", all, "https://localhost:" + port + "/r", "(loopback)"},
		{"scp-like localhost", all, "git@localhost:r.git", "(loopback)"},
		{"name resolving to 10.x", all, "https://internal.test/r", "10.1.2.3 (private)"},
		{"name resolving to 169.254.x", all, "https://meta.test/r", "169.254.169.254 (link-local)"},
		{"IPv4-mapped loopback", all, "https://mapped.test/r", "(loopback)"},
		{"IPv4-mapped private", all, "https://mapped-private.test/r", "(private)"},
		{"IPv4-mapped link-local", all, "https://mapped-linklocal.test/r", "(link-local)"},
		{"IPv6 unique local", all, "https://ula.test/r", "(private)"},
		{"IPv6 link-local", all, "https://linklocal6.test/r", "(link-local)"},
		{"IPv6 loopback", all, "https://loopback6.test/r", "(loopback)"},
		{"NAT64 of loopback", all, "https://nat64.test/r", "not public"},
		{"6to4 of 10/8", all, "https://sixtofour.test/r", "not public"},
		{"carrier-grade NAT by name", all, "https://cgnat.test/r", "not public"},
		{"unspecified by name", all, "https://zero.test/r", "(unspecified)"},
		{"multicast by name", all, "https://multicast.test/r", "(multicast)"},
		{"one private address among public", all, "https://mixed.test/r", "127.0.0.1 (loopback)"},
		{"name that does not resolve", all, "https://nx.test/r", "resolving nx.test"},
		{"non-canonical IPv4 (decimal)", all, "https://2130706433/r", "not a canonical IP address"},
		{"non-canonical IPv4 (short)", all, "https://127.1/r", "not a canonical IP address"},
		{"non-canonical IPv4 (hex)", all, "https://0x7f.0.0.1/r", "not a canonical IP address"},
		{"password", all, "https://user:secret@pub.test/r", "password"},
		{"user on https", all, "https://token@pub.test/r", "user name"},
		{"scheme not allowed", extension.RepoPolicy{}, "git://pub.test/r", "scheme git not allowed"},
		{"local path by default", extension.RepoPolicy{}, "/srv/r", "scheme file (a local path) not allowed"},
		{"host not listed", extension.RepoPolicy{Hosts: []string{"git.corp.test"}}, "https://pub.test/r", `host "pub.test" not allowed`},
		{"listed host on another port", extension.RepoPolicy{Hosts: []string{"git.corp.test:443"}}, "https://git.corp.test:8443/r", "not allowed"},
		{"listed address on another port", extension.RepoPolicy{Hosts: []string{"127.0.0.1:1"}}, "https://127.0.0.1:" + port + "/r", "not allowed"},
		{"wildcard does not allow private", extension.RepoPolicy{Hosts: []string{"*.corp.test"}}, "https://git.corp.test/r", "10.9.9.9 (private)"},
		{"network does not allow outside it", extension.RepoPolicy{Hosts: []string{"10.20.0.0/16"}}, "https://internal.test/r", "10.1.2.3"},
		{"outside every root", all, outside, "in none of repo.local_roots"},
		{"file URL outside every root", all, "file://" + outside, "in none of repo.local_roots"},
		{"symlink escaping a root", all, filepath.Join(root, "escape"), "in none of repo.local_roots"},
		{"through a symlink to /", all, filepath.Join(root, "slash") + outside, "in none of repo.local_roots"},
		{"symlink to /proc/self/cwd", all, filepath.Join(root, "cwd"), "leads through /proc,"},
		{"proc self cwd", extension.RepoPolicy{Schemes: []string{"file"}, LocalRoots: []string{"/"}}, "file:///proc/self/cwd", "/proc"},
		{"gitfile", all, gitfile, "not a directory"},
		{"excluded directory", all, inExcluded, "excluded"},
		{"missing path", all, filepath.Join(root, "missing"), "resolving local path"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c := extension.RepoChecker{Policy: tc.policy, Resolver: names, Exclude: []string{excluded}}
			_, err := c.Check(context.Background(), tc.repo)
			var re *extension.RepoError
			if !errors.As(err, &re) || !errors.Is(err, extension.ErrRepoNotReachable) {
				t.Fatalf("Check(%q) = %v, want a RepoError", tc.repo, err)
			}
			if err.Error() != "repository not reachable" {
				t.Fatalf("the error says %q, want only %q", err.Error(), "repository not reachable")
			}
			if !strings.Contains(re.Reason, tc.reason) {
				t.Errorf("reason %q, want %q", re.Reason, tc.reason)
			}
			if strings.Contains(re.Detail(), "secret") {
				t.Errorf("the detail holds the password: %s", re.Detail())
			}
		})
	}
	t.Run("control: a path in the root is allowed", func(t *testing.T) {
		t.Parallel()
		if _, err := (extension.RepoChecker{Policy: all}).Check(context.Background(), inRoot); err != nil {
			t.Fatal(err)
		}
	})
	t.Cleanup(func() {
		if n := ln.Accepts(t); n != 0 {
			t.Errorf("the references' address accepted %d connections, want 0", n)
		}
	})
}

// TestRepoCheckerAllows checks the targets of allowed references: the
// address pinned, git and ssh told to use it.
func TestRepoCheckerAllows(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	repo := workspacetest.GitRepo(t, root)
	if err := os.Symlink(repo, filepath.Join(root, "alias")); err != nil {
		t.Fatal(err)
	}
	home := t.TempDir()
	if err := os.Mkdir(filepath.Join(home, "src"), 0o755); err != nil {
		t.Fatal(err)
	}
	inHome := workspacetest.GitRepo(t, filepath.Join(home, "src"))
	cases := []struct {
		name    string
		checker extension.RepoChecker
		repo    string
		want    extension.RepoTarget
		resolve string   // CurlResolve
		ssh     []string // SSHPin
	}{
		{"public https by name", extension.RepoChecker{}, "https://pub.test/r.git",
			extension.RepoTarget{Scheme: "https", URL: "https://pub.test/r.git", Host: "pub.test", Port: 443, Addr: netip.MustParseAddr("93.184.216.34")},
			"pub.test:443:93.184.216.34", []string{"", ""}},
		{"public IPv6", extension.RepoChecker{}, "https://pub6.test:8443/r.git",
			extension.RepoTarget{Scheme: "https", URL: "https://pub6.test:8443/r.git", Host: "pub6.test", Port: 8443, Addr: netip.MustParseAddr("2606:4700::1")},
			"pub6.test:8443:[2606:4700::1]", []string{"", ""}},
		{"private host listed by name", extension.RepoChecker{Policy: extension.RepoPolicy{Hosts: []string{"internal.test"}}}, "https://internal.test/r",
			extension.RepoTarget{Scheme: "https", URL: "https://internal.test/r", Host: "internal.test", Port: 443, Addr: netip.MustParseAddr("10.1.2.3")},
			"internal.test:443:10.1.2.3", []string{"", ""}},
		{"ssh into a listed network", extension.RepoChecker{Policy: extension.RepoPolicy{Hosts: []string{"10.20.0.0/16"}}}, "ssh://git@vcs.internal.test:2222/r.git",
			extension.RepoTarget{Scheme: "ssh", URL: "ssh://git@vcs.internal.test:2222/r.git", Host: "vcs.internal.test", Port: 2222, Addr: netip.MustParseAddr("10.20.0.5")},
			"", []string{"10.20.0.5", "[vcs.internal.test]:2222"}},
		{"scp-like public", extension.RepoChecker{}, "git@pub.test:org/r.git",
			extension.RepoTarget{Scheme: "ssh", URL: "git@pub.test:org/r.git", Host: "pub.test", Port: 22, Addr: netip.MustParseAddr("93.184.216.34")},
			"", []string{"93.184.216.34", "pub.test"}},
		{"git path escapes kept", extension.RepoChecker{Policy: extension.RepoPolicy{Schemes: []string{"git"}, Hosts: []string{"git.corp.test"}}}, "git://git.corp.test:9419/a%2Db.git",
			extension.RepoTarget{Scheme: "git", URL: "git://10.9.9.9:9419/a%2Db.git", Host: "git.corp.test", Port: 9419, Addr: netip.MustParseAddr("10.9.9.9")},
			"", []string{"", ""}},
		{"git by name, rewritten to the address", extension.RepoChecker{Policy: extension.RepoPolicy{Schemes: []string{"git"}, Hosts: []string{"git.corp.test:9418"}}}, "git://git.corp.test/r",
			extension.RepoTarget{Scheme: "git", URL: "git://10.9.9.9/r", Host: "git.corp.test", Port: 9418, Addr: netip.MustParseAddr("10.9.9.9")},
			"", []string{"", ""}},
		{"listed loopback address and port", extension.RepoChecker{Policy: extension.RepoPolicy{Schemes: []string{"http"}, Hosts: []string{"127.0.0.1:8080"}}}, "http://127.0.0.1:8080/r",
			extension.RepoTarget{Scheme: "http", URL: "http://127.0.0.1:8080/r", Host: "127.0.0.1", Port: 8080, Addr: netip.MustParseAddr("127.0.0.1")},
			"", []string{"", ""}},
		{"wildcard with a public address", extension.RepoChecker{Policy: extension.RepoPolicy{Hosts: []string{"*.corp.test"}}}, "https://PUB.corp.test/r",
			extension.RepoTarget{Scheme: "https", URL: "https://PUB.corp.test/r", Host: "PUB.corp.test", Port: 443, Addr: netip.MustParseAddr("93.184.216.35")},
			"PUB.corp.test:443:93.184.216.35", []string{"", ""}},
		{"local path through a symlink in the root", extension.RepoChecker{Policy: extension.RepoPolicy{Schemes: []string{"file"}, LocalRoots: []string{root}}}, filepath.Join(root, "alias"),
			extension.RepoTarget{Scheme: "file", URL: realPath(t, repo)}, "", []string{"", ""}},
		{"file URL under {tmp}", extension.RepoChecker{Policy: extension.RepoPolicy{Schemes: []string{"file"}, LocalRoots: []string{"{tmp}"}}, TempDir: root}, "file://" + repo,
			extension.RepoTarget{Scheme: "file", URL: "file://" + realPath(t, repo)}, "", []string{"", ""}},
		{"local path under ~", extension.RepoChecker{Policy: extension.RepoPolicy{Schemes: []string{"file"}, LocalRoots: []string{"~/src"}}, Home: home}, inHome,
			extension.RepoTarget{Scheme: "file", URL: realPath(t, inHome)}, "", []string{"", ""}},
		{"local path left to the remote host", extension.RepoChecker{Policy: extension.RepoPolicy{Schemes: []string{"file"}, LocalRoots: []string{"/srv"}}, Remote: true}, "/srv/link/r",
			extension.RepoTarget{Scheme: "file", URL: "/srv/link/r", LocalRoots: []string{"/srv"}}, "", []string{"", ""}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c := tc.checker
			c.Resolver = names
			got, err := c.Check(context.Background(), tc.repo)
			if err != nil {
				var re *extension.RepoError
				if errors.As(err, &re) {
					t.Fatalf("Check(%q): %s", tc.repo, re.Detail())
				}
				t.Fatal(err)
			}
			if got.Scheme != tc.want.Scheme || got.URL != tc.want.URL || got.Host != tc.want.Host || got.Port != tc.want.Port ||
				got.Addr != tc.want.Addr || !slices.Equal(got.LocalRoots, tc.want.LocalRoots) {
				t.Fatalf("Check(%q) = %+v, want %+v", tc.repo, got, tc.want)
			}
			if r := got.CurlResolve(); r != tc.resolve {
				t.Errorf("CurlResolve = %q, want %q", r, tc.resolve)
			}
			if h, a := got.SSHPin(); h != tc.ssh[0] || a != tc.ssh[1] {
				t.Errorf("SSHPin = %q, %q, want %q", h, a, tc.ssh)
			}
			cfg := got.GitConfig()
			for _, want := range []string{"protocol.allow=never", "protocol." + got.Scheme + ".allow=always", "http.followRedirects=false", "http.proxy="} {
				if !slices.Contains(cfg, want) {
					t.Errorf("GitConfig %v lacks %s", cfg, want)
				}
			}
			if tc.resolve != "" && !slices.Contains(cfg, "http.curloptResolve="+tc.resolve) {
				t.Errorf("GitConfig %v does not pin the host", cfg)
			}
			if tc.ssh[0] != "" && got.SSHCommand() != "ssh -o BatchMode=yes -o 'HostName="+tc.ssh[0]+"' -o 'HostKeyAlias="+tc.ssh[1]+"'" {
				t.Errorf("SSHCommand = %q", got.SSHCommand())
			}
		})
	}
}

func execGit(args ...string) *exec.Cmd {
	cmd := exec.Command("git", args...)
	cmd.Env = append(os.Environ(), "GIT_TERMINAL_PROMPT=0")
	return cmd
}

func realPath(t *testing.T, p string) string {
	t.Helper()
	r, err := filepath.EvalSymlinks(p)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// TestRepoCheckerPinsRealGit clones with the target's git settings for
// real: by a name only the checker resolves (so git must use the pinned
// address), and from an allowed host that redirects to a loopback port
// the policy does not list (so git must refuse the redirect, and the
// other port must see no connection).
func TestRepoCheckerPinsRealGit(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	repo := workspacetest.GitRepo(t, root)
	srv := workspacetest.ServeGit(t, root)
	elsewhere := workspacetest.Listen(t, "")
	redir := workspacetest.Redirect(t, "http://"+elsewhere.HostPort())
	c := extension.RepoChecker{
		Policy:   extension.RepoPolicy{Schemes: []string{"http"}, Hosts: []string{"repo.test", workspacetest.HostPort(redir.Port())}},
		Resolver: resolver{"repo.test": {"127.0.0.1"}},
	}
	clone := func(t *testing.T, ref string) error {
		t.Helper()
		target, err := c.Check(context.Background(), ref)
		if err != nil {
			t.Fatalf("Check(%q) = %v", ref, err)
		}
		var args []string
		for _, kv := range target.GitConfig() {
			args = append(args, "-c", kv)
		}
		args = append(args, "clone", "--quiet", "--", target.URL, filepath.Join(t.TempDir(), "clone"))
		cmd := execGit(args...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Logf("git: %s", out)
		}
		return err
	}
	t.Run("pinned name", func(t *testing.T) {
		if err := clone(t, "http://repo.test:"+strconv.Itoa(srv.Port())+"/"+filepath.Base(repo)); err != nil {
			t.Fatalf("clone by the pinned name: %v", err)
		}
	})
	t.Run("redirect refused", func(t *testing.T) {
		if err := clone(t, redir.URL+"/"+filepath.Base(repo)); err == nil {
			t.Fatal("the clone followed the redirect")
		}
		if redir.Requests() == 0 {
			t.Fatal("the allowed host was never asked")
		}
		if n := elsewhere.Accepts(t); n != 0 {
			t.Fatalf("the redirect's target accepted %d connections, want 0", n)
		}
	})
}

func TestRepoErrorLogsDetail(t *testing.T) {
	t.Parallel()
	_, err := extension.RepoChecker{Resolver: names}.Check(context.Background(), "https://internal.test/r")
	var b strings.Builder
	slog.New(slog.NewTextHandler(&b, nil)).Warn("refused", "err", err)
	if !strings.Contains(b.String(), "10.1.2.3") || !strings.Contains(b.String(), "internal.test") {
		t.Fatalf("the log lacks the detail: %s", b.String())
	}
	if err.Error() != "repository not reachable" {
		t.Fatalf("Error() = %q", err.Error())
	}
}

func TestPublicAddr(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		addr   string
		public bool
	}{
		{"93.184.216.34", true}, {"8.8.8.8", true}, {"2606:4700::1", true}, {"2a00:1450::1", true},
		{"127.0.0.1", false}, {"127.255.255.254", false}, {"::1", false}, {"10.0.0.1", false}, {"172.16.0.1", false},
		{"172.31.255.255", false}, {"172.32.0.1", true}, {"192.168.0.1", false}, {"100.64.0.1", false}, {"100.127.255.255", false},
		{"100.128.0.1", true}, {"169.254.169.254", false}, {"fe80::1", false}, {"fc00::1", false}, {"fd12::1", false},
		{"0.0.0.0", false}, {"0.1.2.3", false}, {"::", false}, {"224.0.0.1", false}, {"239.1.1.1", false}, {"ff02::1", false},
		{"255.255.255.255", false}, {"240.0.0.1", false}, {"192.0.2.1", false}, {"198.18.0.1", false}, {"2001:db8::1", false},
		{"::ffff:127.0.0.1", false}, {"::ffff:10.0.0.1", false}, {"::ffff:169.254.1.1", false}, {"::ffff:0.0.0.0", false},
		{"::ffff:100.64.0.1", false}, {"::ffff:93.184.216.34", true}, {"::127.0.0.1", false},
		{"64:ff9b::7f00:1", false}, {"64:ff9b::5db8:d822", true}, {"2002:7f00:1::1", false}, {"2002:5db8:d822::1", true},
		{"2001::1", false}, {"fec0::1", false},
	} {
		if got := extension.PublicAddr(netip.MustParseAddr(tc.addr)); got != tc.public {
			t.Errorf("PublicAddr(%s) = %v, want %v", tc.addr, got, tc.public)
		}
	}
}

func TestRedactRepo(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ in, want string }{
		{"https://user:secret@host/r", "https://***@host/r"},
		{"https://ghp_token@github.com/o/r", "https://***@github.com/o/r"},
		{"fatal: unable to access 'http://u:p@h:8080/r/': 401", "fatal: unable to access 'http://***@h:8080/r/': 401"},
		{"ssh://git@host/r", "ssh://git@host/r"},
		{"ssh://git:secret@host/r", "ssh://git:***@host/r"},
		{"git@github.com:o/r.git", "git@github.com:o/r.git"},
		{"https://host/r", "https://host/r"},
		{"two: https://a:b@x/ and git://c@y/", "two: https://***@x/ and git://***@y/"},
	} {
		if got := extension.RedactRepo(tc.in); got != tc.want {
			t.Errorf("RedactRepo(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}
