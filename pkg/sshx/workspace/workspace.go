// Package workspace makes and removes per-sandbox directories on a remote
// host over SSH: <base>/<sandbox id>, published atomically with a marker,
// optionally holding a git clone and small files. It is shared by the SSH
// backends.
//
// Every remote step is a constant POSIX sh script in this file; values
// reach it only as quoted positional arguments (see [sshx.Join]), and the
// caller validates them first with [CheckBase], [CheckID] and [CheckRel].
// The remote host needs a POSIX sh, mktemp, mv -T (GNU coreutils or
// BusyBox) and, for a repository, git.
package workspace

import (
	"context"
	"fmt"
	"maps"
	"path"
	"regexp"
	"slices"
	"strings"
)

// Runner runs one remote command, its arguments quoted, and returns its
// standard output. A [*sshx.Pool] bound to a host provides one.
type Runner func(ctx context.Context, argv ...string) ([]byte, error)

// Marker is the file that marks a finished workspace. A directory at the
// workspace path without it is not one of ours, or is partial.
const Marker = ".sandboxer-workspace"

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
// absolute path, "ssh" for scp-like user@host:path. Backends check it
// against their allow-list.
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
	// Repo is cloned when set. The caller validates it (a URL of an
	// allowed scheme, never an option); it is passed to git after "--".
	Repo string
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
	if strings.HasPrefix(s.Repo, "-") {
		return fmt.Errorf("repository %q would be read as an option", s.Repo)
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

// ensureScript makes the workspace in a temporary directory next to it
// and renames it into place once complete: a workspace path holds a
// finished workspace or nothing. A concurrent maker of the same workspace
// loses the rename and finds the winner's.
//
//	$1 base  $2 id  $3 checkout  $4 repo (may be empty)  then name content pairs
const ensureScript = `set -eu
base=$1 id=$2 sub=$3 repo=$4
shift 4
dir=$base/$id
if [ -f "$dir/` + Marker + `" ]; then echo exists; exit 0; fi
mkdir -p -- "$base"
tmp=$(mktemp -d "$base/.tmp-$id.XXXXXX")
trap 'rm -rf -- "$tmp"' EXIT
if [ -n "$repo" ]; then
	GIT_TERMINAL_PROMPT=0 GIT_SSH_COMMAND='ssh -o BatchMode=yes' git -c protocol.ext.allow=never clone --quiet -- "$repo" "$tmp/$sub"
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
// made it. The spec is checked before anything runs.
func Ensure(ctx context.Context, run Runner, s Spec) (created bool, err error) {
	if err := s.check(); err != nil {
		return false, fmt.Errorf("making workspace: %w", err)
	}
	argv := []string{"sh", "-c", ensureScript, "sandboxer-workspace", s.Base, s.ID, s.Checkout, s.Repo}
	for _, name := range slices.Sorted(maps.Keys(s.Files)) {
		argv = append(argv, name, s.Files[name])
	}
	out, err := run(ctx, argv...)
	if err != nil {
		return false, fmt.Errorf("making workspace %s: %w", Dir(s.Base, s.ID), err)
	}
	return strings.TrimSpace(string(out)) == "created", nil
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
