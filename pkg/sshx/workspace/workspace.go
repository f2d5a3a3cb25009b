// Package workspace makes and removes per-sandbox directories on a remote
// host over SSH: <base>/<sandbox id>, published atomically with a marker,
// optionally holding a git clone and small files. It is shared by the SSH
// backends.
//
// Every remote step is a constant POSIX sh script in this file; values
// reach it only as quoted positional arguments (see [sshx.Join]), and the
// caller validates them first with [CheckBase], [CheckID] and [CheckRel].
// The remote host needs a POSIX sh, mktemp, mv -T (GNU coreutils or
// BusyBox) and, for a repository, git (2.37 or later for https and http
// by host name).
//
// A repository arrives as an [extension.RepoTarget] the worker checked
// against the manifest's repo policy, its host resolved there: the host's
// git is pinned to that address. A local path is checked on the host,
// where it lives: symlinks resolved, under the policy's local roots, never
// in the workspaces' base directory.
package workspace

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"path"
	"regexp"
	"slices"
	"strings"

	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/sshx"
)

// Runner runs one remote command, its arguments quoted, and returns its
// standard output. A [*sshx.Pool] bound to a host provides one.
type Runner func(ctx context.Context, argv ...string) ([]byte, error)

// Marker is the file that marks a finished workspace. A directory at the
// workspace path without it is not one of ours, or is partial.
const Marker = ".sandboxer-workspace"

// HeldLoop is the shell loop with which a backend lists, on the machine
// that holds them, the finished workspaces and partial attempts under the
// base directory in shell word base ("$1", "$2"): a line per entry,
// prefix then "<mtime in epoch seconds>|<name>". A base that does not
// exist lists nothing; one that cannot be entered exits 1.
func HeldLoop(base, prefix string) string {
	return `[ -d ` + base + ` ] || exit 0
cd -- ` + base + ` || exit 1
for p in * .tmp-*; do
	[ -e "$p" ] || [ -L "$p" ] || continue
	case $p in
	.tmp-*) ;;
	*) [ -f "$p/` + Marker + `" ] || continue;;
	esac
	t=$(stat -c %Y -- "$p") || continue
	printf '` + prefix + `%s|%s\n' "$t" "$p"
done`
}

var (
	baseRE = regexp.MustCompile(`^/[A-Za-z0-9_./-]*$`)
	idRE   = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,62}$`)
	relRE  = regexp.MustCompile(`^[A-Za-z0-9_.][A-Za-z0-9_./-]*$`)
)

// CheckBase checks a base directory: absolute, clean, of [A-Za-z0-9_./-],
// and not "/".
func CheckBase(base string) error {
	if !baseRE.MatchString(base) || path.Clean(base) != base {
		return fmt.Errorf("base directory %q: want a clean absolute path of [A-Za-z0-9_./-]", base)
	}
	if base == "/" {
		return fmt.Errorf("base directory must not be /")
	}
	return nil
}

// CheckID checks a sandbox id: a sand-boxer name ([a-z0-9][a-z0-9_-]{0,62},
// as event.ValidName), so it is one path element, no glob, and holds no
// '.'.
func CheckID(id string) error {
	if !idRE.MatchString(id) {
		return fmt.Errorf("sandbox id %q: want 1-63 of [a-z0-9_-] starting with a letter or digit", id)
	}
	return nil
}

// CheckRel checks a path relative to a workspace: clean, of
// [A-Za-z0-9_./-], no "..", no leading '-' or '/'.
func CheckRel(p string) error {
	if !relRE.MatchString(p) || path.Clean(p) != p || path.IsAbs(p) {
		return fmt.Errorf("path %q: want a clean relative path of [A-Za-z0-9_./-]", p)
	}
	for _, part := range strings.Split(p, "/") {
		if part == ".." {
			return fmt.Errorf("path %q must not leave its directory ('..')", p)
		}
	}
	return nil
}

// RepoScheme returns the kind of a repository reference that passed
// extension.CheckFormat(FormatRepo): its URL scheme, "file" for an
// absolute path, "ssh" for scp-like user@host:path.
//
// Deprecated: the manifest's repo policy checks schemes
// ([extension.RepoPolicy]); [extension.ParseRepo] splits a reference.
func RepoScheme(repo string) string {
	if strings.HasPrefix(repo, "/") {
		return "file"
	}
	if i := strings.Index(repo, "://"); i > 0 {
		return repo[:i]
	}
	return "ssh"
}

// Dir returns the workspace directory of a sandbox: base/id.
func Dir(base, id string) string { return path.Join(base, id) }

// Spec is one workspace to make.
type Spec struct {
	// Base is the directory holding every workspace. It is created if
	// missing. Checked with CheckBase.
	Base string
	// ID is the sandbox id: the workspace is Base/ID. Checked with CheckID.
	ID string
	// Checkout is the directory, relative to the workspace, the repository
	// is cloned into (or that is made empty without one). Checked with
	// CheckRel.
	Checkout string
	// Repo is cloned when set: what an [extension.RepoChecker] with
	// Remote set returned, so its host is resolved and checked, and git
	// on the host is pinned to the checked address. A local path is
	// checked on the host under Repo.LocalRoots. The URL is passed to git
	// after "--".
	Repo *extension.RepoTarget
	// Files are written into the workspace: relative name to content.
	// Names are checked with CheckRel; their directories must exist
	// (Checkout's do).
	Files map[string]string
}

func (s Spec) check() error {
	if err := CheckBase(s.Base); err != nil {
		return err
	}
	if err := CheckID(s.ID); err != nil {
		return err
	}
	if err := CheckRel(s.Checkout); err != nil {
		return fmt.Errorf("checkout: %w", err)
	}
	if err := checkTarget(s.Repo); err != nil {
		return err
	}
	for name := range s.Files {
		if err := CheckRel(name); err != nil {
			return fmt.Errorf("file: %w", err)
		}
		if name == Marker {
			return fmt.Errorf("file %q is reserved", name)
		}
	}
	return nil
}

var (
	pinRE  = regexp.MustCompile(`^[A-Za-z0-9.:\[\]-]*$`)
	rootRE = regexp.MustCompile(`^(~|\{tmp\}|/)[A-Za-z0-9_./+@-]*$`)
)

// checkTarget checks what the script receives of a repository target.
func checkTarget(t *extension.RepoTarget) error {
	if t == nil {
		return nil
	}
	if t.URL == "" || strings.HasPrefix(t.URL, "-") {
		return fmt.Errorf("repository %q would be read as an option", extension.RedactRepo(t.URL))
	}
	if !slices.Contains(extension.RepoSchemes, t.Scheme) {
		return fmt.Errorf("repository scheme %q unknown", t.Scheme)
	}
	if _, err := extension.ParseRepo(t.URL); err != nil && t.Scheme != "git" {
		return fmt.Errorf("repository: %w", err)
	}
	if t.Scheme == "file" {
		if len(t.LocalRoots) == 0 {
			return fmt.Errorf("local repository without local roots")
		}
		for _, r := range t.LocalRoots {
			if !rootRE.MatchString(r) || strings.Contains("/"+r+"/", "/../") {
				return fmt.Errorf("local root %q: want an absolute path, ~ or {tmp}", r)
			}
		}
		return nil
	}
	if !t.Addr.IsValid() {
		return fmt.Errorf("repository %s has no checked address", extension.RedactRepo(t.URL))
	}
	h, alias := t.SSHPin()
	for _, v := range []string{t.CurlResolve(), h, alias} {
		if !pinRE.MatchString(v) {
			return fmt.Errorf("pinned address %q: unexpected characters", v)
		}
	}
	return nil
}

// Exit statuses of ensureScript for a repository (written as numbers in
// the script): refused on the host (a local path outside the roots, git
// too old to pin), and git failed. git's standard error reaches the
// caller only with the second.
const (
	statusRefused     = 90
	statusCloneFailed = 91
)

// ensureScript makes the workspace in a temporary directory next to it
// and renames it into place once complete: a workspace path holds a
// finished workspace or nothing. A concurrent maker of the same workspace
// loses the rename and finds the winner's.
//
// A repository is cloned with only its scheme allowed, no HTTP redirect,
// no proxy, and pinned to the checked address: http.curloptResolve for
// https and http, ssh's HostName (its known_hosts entry looked up under
// HostKeyAlias, the host's name) for ssh; a git:// URL already names the
// address. A local path must resolve, symlinks followed, to a directory
// in one of the roots ("~" is $HOME, "{tmp}" $TMPDIR or /tmp) and outside
// the base directory; it is cloned by its resolved path. git's standard
// error goes to a file and is printed only when git fails.
//
//	$1 base  $2 id  $3 checkout  $4 repo (may be empty)  $5 scheme
//	$6 curl resolve  $7 ssh address  $8 ssh host key alias
//	$9 local roots, one a line  then name content pairs
const ensureScript = `set -euf
base=$1 id=$2 sub=$3 repo=$4 scheme=$5 resolve=$6 sshaddr=$7 sshalias=$8 roots=$9
shift 9
dir=$base/$id
if [ -f "$dir/` + Marker + `" ]; then echo exists; exit 0; fi
refuse() { printf 'refused: %s\n' "$1" >&2; exit 90; }
under() { [ "$2" = / ] || [ "$1" = "$2" ] || case $1 in "$2"/*) true;; *) false;; esac; }
mkdir -p -- "$base"
if [ -n "$repo" ]; then
	case $scheme in https|http|ssh|git|file) ;; *) refuse "unknown scheme $scheme";; esac
	case $resolve$sshaddr$sshalias in *[!]A-Za-z0-9.:[-]*) refuse "unexpected characters in the pinned address";; esac
	if [ "$scheme" = file ]; then
		p=${repo#file://}
		case $p in localhost/*) p=${p#localhost};; esac
		case $p in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) refuse "$p is under /proc, /sys or /dev";; esac
		real=$(cd -P -- "$p" 2>/dev/null && pwd -P) || refuse "$p is not a directory"
		case $real in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) refuse "$p resolves to $real, under /proc, /sys or /dev";; esac
		if [ -L "$real/.git" ] || { [ -e "$real/.git" ] && [ ! -d "$real/.git" ]; }; then
			refuse "$real/.git is not a directory (a gitfile or link may lead out of the roots)"
		fi
		rbase=$(cd -P -- "$base" && pwd -P)
		if under "$real" "$rbase"; then refuse "$real is in the workspaces directory $rbase"; fi
		ok= seen=
		IFS='
'
		for r in $roots; do
			case $r in
			'~'|'~/'*) [ -n "${HOME-}" ] || continue; r=$HOME${r#'~'};;
			'{tmp}'|'{tmp}/'*) r=${TMPDIR:-/tmp}${r#'{tmp}'};;
			esac
			case $r in /*) ;; *) continue;; esac
			rr=$(cd -P -- "$r" 2>/dev/null && pwd -P) || continue
			seen="$seen $rr"
			if under "$real" "$rr"; then ok=1; fi
		done
		unset IFS
		[ -n "$ok" ] || refuse "$p resolves to $real, in none of the local roots:$seen"
		case $repo in file://*) repo=file://$real;; *) repo=$real;; esac
	fi
	if [ -n "$resolve" ]; then
		v=$(git version 2>/dev/null) || v=
		case $v in
		"git version 2."[4-9][0-9]*|"git version 2.3"[7-9]*|"git version 2."[1-9][0-9][0-9]*|"git version "[3-9]*) ;;
		*) refuse "git on this host cannot pin an https or http host (http.curloptResolve needs git 2.37 or later; found: ${v:-no git})";;
		esac
	fi
fi
tmp=$(mktemp -d "$base/.tmp-$id.XXXXXX")
errf=$tmp.stderr
trap 'rm -rf -- "$tmp" "$errf"' EXIT
if [ -n "$repo" ]; then
	unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY no_proxy NO_PROXY GIT_PROXY_COMMAND GIT_SSH GIT_SSH_VARIANT GIT_CONFIG_PARAMETERS GIT_CONFIG_COUNT
	ssh='ssh -o BatchMode=yes'
	if [ -n "$sshaddr" ]; then ssh="$ssh -o 'HostName=$sshaddr' -o 'HostKeyAlias=$sshalias'"; fi
	if ! GIT_TERMINAL_PROMPT=0 GIT_ALLOW_PROTOCOL=$scheme GIT_SSH_COMMAND=$ssh git -c protocol.allow=never -c "protocol.$scheme.allow=always" \
		-c http.followRedirects=false -c http.proxy= ${resolve:+-c "http.curloptResolve=$resolve"} \
		clone --quiet -- "$repo" "$tmp/$sub" 2>"$errf"; then
		tail -c 4000 -- "$errf" >&2 || true
		exit 91
	fi
	rm -f -- "$errf"
else
	mkdir -p -- "$tmp/$sub"
fi
while [ $# -ge 2 ]; do
	printf '%s' "$2" > "$tmp/$1"
	shift 2
done
printf '%s\n' "$id" > "$tmp/` + Marker + `"
if [ -e "$dir" ] && [ ! -f "$dir/` + Marker + `" ]; then
	rm -rf -- "$dir"
fi
if mv -T -- "$tmp" "$dir" 2>/dev/null; then
	trap - EXIT
	echo created
	exit 0
fi
if [ -f "$dir/` + Marker + `" ]; then echo exists; exit 0; fi
echo "cannot move the workspace into $dir" >&2
exit 1`

// Ensure makes the workspace of s unless it exists, and reports whether it
// made it. The spec is checked before anything runs. A repository refused
// on the host, or a clone that failed, is a [*extension.RepoError]
// (wrapping [extension.ErrRepoNotReachable]), returned as is: its text
// says only "repository not reachable"; its detail holds git's standard
// error, credentials redacted, for the operator's log. The runner's error
// is expected to be an [*sshx.ExitError] when the command ran.
func Ensure(ctx context.Context, run Runner, s Spec) (created bool, err error) {
	if err := s.check(); err != nil {
		return false, fmt.Errorf("making workspace: %w", err)
	}
	argv := []string{"sh", "-c", ensureScript, "sandboxer-workspace", s.Base, s.ID, s.Checkout}
	argv = append(argv, repoArgs(s.Repo)...)
	for _, name := range slices.Sorted(maps.Keys(s.Files)) {
		argv = append(argv, name, s.Files[name])
	}
	out, err := run(ctx, argv...)
	if err != nil {
		var ee *sshx.ExitError
		if s.Repo != nil && errors.As(err, &ee) {
			switch {
			case ee.Status == statusRefused:
				return false, &extension.RepoError{Repo: extension.RedactRepo(s.Repo.URL), Reason: "refused on the host: " + strings.TrimSpace(ee.Stderr)}
			case ee.Status == statusCloneFailed:
				return false, &extension.RepoError{Repo: extension.RedactRepo(s.Repo.URL),
					Reason: fmt.Sprintf("git clone on the host failed (address %v)", s.Repo.Addr), Output: extension.RedactRepo(ee.Stderr)}
			case ee.Status < 0 || ee.Signal != "":
				// Killed, perhaps while printing git's stderr: keep it out.
				quiet := *ee
				quiet.Stderr = ""
				return false, fmt.Errorf("making workspace %s: %w", Dir(s.Base, s.ID), &quiet)
			}
		}
		return false, fmt.Errorf("making workspace %s: %w", Dir(s.Base, s.ID), err)
	}
	return strings.TrimSpace(string(out)) == "created", nil
}

// repoArgs are the script's $4 to $9 for t.
func repoArgs(t *extension.RepoTarget) []string {
	if t == nil {
		return []string{"", "", "", "", "", ""}
	}
	h, alias := t.SSHPin()
	return []string{t.URL, t.Scheme, t.CurlResolve(), h, alias, strings.Join(t.LocalRoots, "\n")}
}

// Exists reports whether the finished workspace of id is on the host.
func Exists(ctx context.Context, run Runner, base, id string) (bool, error) {
	if err := CheckBase(base); err != nil {
		return false, err
	}
	if err := CheckID(id); err != nil {
		return false, err
	}
	out, err := run(ctx, "sh", "-c", `if [ -f "$1/$2/`+Marker+`" ]; then echo yes; else echo no; fi`, "sandboxer-exists", base, id)
	if err != nil {
		return false, fmt.Errorf("looking for workspace %s: %w", Dir(base, id), err)
	}
	return strings.TrimSpace(string(out)) == "yes", nil
}

// removeScript removes the workspace and any partial attempt at it and
// prints each path it removed. Sandbox ids hold no '.', so the pattern
// .tmp-<id>.* matches no other sandbox's attempts.
//
//	$1 base  $2 id
const removeScript = `set -u
base=$1 id=$2
st=0
for p in "$base/$id" "$base"/.tmp-"$id".*; do
	if [ -e "$p" ] || [ -L "$p" ]; then
		if rm -rf -- "$p"; then printf '%s\n' "$p"; else st=1; fi
	fi
done
exit $st`

// Remove removes the workspace of id and partial attempts at it, and
// returns the paths removed: none when it was already gone.
func Remove(ctx context.Context, run Runner, base, id string) ([]string, error) {
	if err := CheckBase(base); err != nil {
		return nil, err
	}
	if err := CheckID(id); err != nil {
		return nil, err
	}
	out, err := run(ctx, "sh", "-c", removeScript, "sandboxer-rm", base, id)
	removed := lines(out)
	if err != nil {
		return removed, fmt.Errorf("removing workspace %s: %w", Dir(base, id), err)
	}
	return removed, nil
}

func lines(b []byte) []string {
	var out []string
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if l != "" {
			out = append(out, l)
		}
	}
	return out
}
