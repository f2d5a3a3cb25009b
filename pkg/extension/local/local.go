// Package local is ext.local, the embedded default backend: a workspace
// directory per sandbox on this machine, with the repo input cloned into it
// when given. It needs nothing installed but git, and git only for repo
// (2.37 or later for https and http by host name).
//
// The repo input is checked against the manifest's repo policy right
// before the clone ([extension.RepoChecker]): host names resolved and
// every address checked, local paths resolved and checked under the
// policy's local_roots, and never inside this backend's own data. git
// then runs pinned to what was checked ([extension.RepoTarget]).
package local

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/sand-boxer/sandboxer/pkg/event"
	"github.com/sand-boxer/sandboxer/pkg/extension"
)

// Handler is the manifest handler name of this backend.
const Handler = "local"

// Info registers the backend.
var Info = extension.Info{Handler: Handler, New: func() extension.Extension { return new(Local) }}

// Config is the manifest's config block.
type Config struct {
	// BaseDir holds one workspace per sandbox. Relative paths are under the
	// data directory. Default "workspaces".
	BaseDir string `yaml:"base_dir,omitempty" json:"base_dir,omitempty"`
	// Git is the git binary used to clone the repo input. Default "git".
	Git string `yaml:"git,omitempty" json:"git,omitempty"`
}

// Local is the backend. Configure it before use.
type Local struct {
	base string
	host string // the worker's placement host: every workspace's
	git  string
	log  *slog.Logger
	repo extension.RepoChecker
}

// markerFile marks a workspace that Provision finished. A directory without
// it is partial and is remade.
const markerFile = ".sandboxer-workspace"

// Configure reads the config block and creates the base directory.
func (l *Local) Configure(_ context.Context, env extension.Env) error {
	var cfg Config
	if err := env.Manifest.Config.Decode(&cfg); err != nil {
		return err
	}
	base := cfg.BaseDir
	if base == "" {
		base = "workspaces"
	}
	if !filepath.IsAbs(base) {
		if env.DataDir == "" {
			return errors.New("local: relative base_dir needs a data directory")
		}
		base = filepath.Join(env.DataDir, base)
	}
	if err := os.MkdirAll(base, 0o755); err != nil {
		return fmt.Errorf("local: creating base dir: %w", err)
	}
	l.base = base
	l.host = env.Host
	if l.host == "" {
		l.host = "localhost"
	}
	l.git = cfg.Git
	if l.git == "" {
		l.git = "git"
	}
	l.log = env.Logger
	if l.log == nil {
		l.log = slog.New(slog.DiscardHandler)
	}
	// Other sandboxes' workspaces are clones too: never a source.
	exclude := []string{base}
	if env.DataDir != "" {
		exclude = append(exclude, env.DataDir)
	}
	l.repo = extension.RepoChecker{Policy: env.Manifest.Repo, Exclude: exclude}
	return nil
}

// CheckManifest requires the repo input, if declared, to be a repo.
func (l *Local) CheckManifest(m *extension.Manifest) []extension.Problem {
	if s, ok := m.Inputs["repo"]; ok && s.Format != extension.FormatRepo {
		return []extension.Problem{{File: m.File, Path: "inputs.repo", Message: "ext.local needs format: repo for the repo input"}}
	}
	var cfg Config
	return m.Config.CheckDecode(&cfg, m.File)
}

// Dir returns the workspace directory of a sandbox.
func (l *Local) Dir(sandboxID string) string { return filepath.Join(l.base, sandboxID) }

// Provision makes the workspace of in's sandbox, cloning repo into it.
// A finished workspace is found and returned as is; a partial one is
// removed and made again. The workspace appears at its final path only
// once complete.
func (l *Local) Provision(ctx context.Context, _ extension.Profile, in extension.Inputs, host string) (extension.Handle, error) {
	id := in.SandboxID()
	if err := event.CheckName("sandbox id", id); err != nil {
		return extension.Handle{}, fmt.Errorf("local: %w", err)
	}
	if host == "" {
		host = l.host
	}
	h := extension.Handle{SandboxID: id, Host: host, Data: map[string]string{"dir": l.Dir(id)}}
	if err := ctx.Err(); err != nil {
		return h, err
	}
	dir := l.Dir(id)
	if _, err := os.Stat(filepath.Join(dir, markerFile)); err == nil {
		return h, nil
	}
	if err := os.RemoveAll(dir); err != nil {
		return h, fmt.Errorf("local: removing partial workspace: %w", err)
	}
	tmp, err := os.MkdirTemp(l.base, ".tmp-"+id+".")
	if err != nil {
		return h, fmt.Errorf("local: creating workspace: %w", err)
	}
	defer os.RemoveAll(tmp) // gone after the rename; cleans up on failure
	work := filepath.Join(tmp, "ws")
	if repo := in["repo"]; repo != "" {
		if err := l.clone(ctx, id, repo, work); err != nil {
			return h, err
		}
	} else if err := os.Mkdir(work, 0o755); err != nil {
		return h, fmt.Errorf("local: creating workspace: %w", err)
	}
	if err := os.WriteFile(filepath.Join(work, markerFile), []byte(id+"\n"), 0o644); err != nil {
		return h, fmt.Errorf("local: marking workspace: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return h, err
	}
	if err := os.Rename(work, dir); err != nil {
		if _, serr := os.Stat(filepath.Join(dir, markerFile)); serr == nil {
			return h, nil // a concurrent Provision of the same sandbox won
		}
		return h, fmt.Errorf("local: publishing workspace: %w", err)
	}
	return h, nil
}

// clone checks repo against the manifest's repo policy and clones what
// was checked into dir, git pinned to it: the checked address, no
// redirect, no proxy, no other protocol. The repository is a positional
// argument after "--", so it can never be read as an option. A refusal or
// a failed clone is a [*extension.RepoError]: the caller sees only
// "repository not reachable"; the detail, git's output included, goes to
// the log.
func (l *Local) clone(ctx context.Context, id, repo, dir string) error {
	t, err := l.repo.Check(ctx, repo)
	if err == nil && t.CurlResolve() != "" {
		err = l.gitPins(ctx, repo)
	}
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		l.log.WarnContext(ctx, "repository refused", "sandbox", id, "err", err)
		return fmt.Errorf("local: %w", err)
	}
	if strings.HasPrefix(t.URL, "-") {
		return fmt.Errorf("local: %w", &extension.RepoError{Repo: extension.RedactRepo(repo), Reason: "would be read as an option"})
	}
	var args []string
	for _, kv := range t.GitConfig() {
		args = append(args, "-c", kv)
	}
	args = append(args, "clone", "--quiet", "--no-hardlinks", "--", t.URL, dir)
	cmd := exec.CommandContext(ctx, l.git, args...)
	cmd.Env = gitEnv(os.Environ(), t)
	stderr := &tail{max: 4096}
	cmd.Stdout, cmd.Stderr = stderr, stderr
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		re := &extension.RepoError{Repo: extension.RedactRepo(repo), Reason: fmt.Sprintf("git clone of %s (address %v) failed: %v", extension.RedactRepo(t.URL), t.Addr, err), Output: extension.RedactRepo(stderr.String())}
		l.log.WarnContext(ctx, "cloning repository failed", "sandbox", id, "err", re)
		return fmt.Errorf("local: %w", re)
	}
	return nil
}

// gitPins checks that git is recent enough to honour
// http.curloptResolve (2.37): an older one ignores it and resolves the
// name again, after the check.
func (l *Local) gitPins(ctx context.Context, repo string) error {
	out, err := exec.CommandContext(ctx, l.git, "version").Output()
	if err != nil {
		return &extension.RepoError{Repo: extension.RedactRepo(repo), Reason: fmt.Sprintf("running %s version: %v", l.git, err)}
	}
	if !GitPinsHTTP(string(out)) {
		return &extension.RepoError{Repo: extension.RedactRepo(repo), Reason: fmt.Sprintf("%s is older than 2.37, which cannot pin an https or http host to its checked address (http.curloptResolve)", strings.TrimSpace(string(out)))}
	}
	return nil
}

var gitVersionRE = regexp.MustCompile(`^git version ([0-9]+)\.([0-9]+)`)

// GitPinsHTTP reports whether the output of `git version` is of git 2.37
// or later, which honours http.curloptResolve.
func GitPinsHTTP(version string) bool {
	m := gitVersionRE.FindStringSubmatch(strings.TrimSpace(version))
	if m == nil {
		return false
	}
	major, _ := strconv.Atoi(m[1])
	minor, _ := strconv.Atoi(m[2])
	return major > 2 || major == 2 && minor >= 37
}

// gitEnv is env without what could send git elsewhere than the checked
// target (proxies, ssh and protocol overrides, configuration passed in
// the environment), plus the target's own settings.
func gitEnv(env []string, t extension.RepoTarget) []string {
	out := make([]string, 0, len(env)+3)
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		switch strings.ToUpper(k) {
		case "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "GIT_PROXY_COMMAND", "GIT_SSH", "GIT_SSH_COMMAND",
			"GIT_SSH_VARIANT", "GIT_ALLOW_PROTOCOL", "GIT_CONFIG_PARAMETERS", "GIT_CONFIG_COUNT", "GIT_TERMINAL_PROMPT", "GIT_ASKPASS", "SSH_ASKPASS":
			continue
		}
		if strings.HasPrefix(k, "GIT_CONFIG_KEY_") || strings.HasPrefix(k, "GIT_CONFIG_VALUE_") {
			continue
		}
		out = append(out, kv)
	}
	return append(out, "GIT_TERMINAL_PROMPT=0", "GIT_ALLOW_PROTOCOL="+t.Scheme, "GIT_SSH_COMMAND="+t.SSHCommand())
}

// tail keeps the last max bytes written to it.
type tail struct {
	max int
	b   bytes.Buffer
}

func (t *tail) Write(p []byte) (int, error) {
	n := len(p)
	t.b.Write(p)
	if over := t.b.Len() - t.max; over > 0 {
		t.b.Next(over)
	}
	return n, nil
}

func (t *tail) String() string { return t.b.String() }

// WaitReady returns the workspace's reachability once it exists.
func (l *Local) WaitReady(ctx context.Context, h extension.Handle) (extension.Reachability, error) {
	if err := ctx.Err(); err != nil {
		return extension.Reachability{}, err
	}
	if err := event.CheckName("sandbox id", h.SandboxID); err != nil {
		return extension.Reachability{}, fmt.Errorf("local: %w", err)
	}
	dir := l.Dir(h.SandboxID)
	if _, err := os.Stat(filepath.Join(dir, markerFile)); err != nil {
		return extension.Reachability{}, fmt.Errorf("local: workspace %s not ready: %w", dir, err)
	}
	return extension.Reachability{Host: h.Host, RemoteDir: dir}, nil
}

// Teardown removes the workspace and any partial attempt at it.
func (l *Local) Teardown(ctx context.Context, h extension.Handle) (extension.CleanupReport, error) {
	var rep extension.CleanupReport
	if err := ctx.Err(); err != nil {
		return rep, err
	}
	if err := event.CheckName("sandbox id", h.SandboxID); err != nil {
		return rep, fmt.Errorf("local: %w", err)
	}
	paths, _ := filepath.Glob(filepath.Join(l.base, ".tmp-"+h.SandboxID+".*"))
	paths = append(paths, l.Dir(h.SandboxID))
	for _, p := range paths {
		if _, err := os.Lstat(p); errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err := os.RemoveAll(p); err != nil {
			return rep, fmt.Errorf("local: removing %s: %w", p, err)
		}
		rep.Removed = append(rep.Removed, "dir:"+p)
	}
	rep.AlreadyGone = len(rep.Removed) == 0
	return rep, nil
}

// Instances counts what exists of a sandbox on disk: its workspace and
// partial attempts. The conformance suite uses it.
func (l *Local) Instances(sandboxID string) int {
	n := 0
	if _, err := os.Stat(l.Dir(sandboxID)); err == nil {
		n++
	}
	tmps, _ := filepath.Glob(filepath.Join(l.base, ".tmp-"+sandboxID+".*"))
	return n + len(tmps)
}

// List returns every sandbox with a finished workspace or a partial
// attempt at one under the base directory, each with a partial handle
// Teardown accepts. Since is the modification time of the oldest
// directory. Entries that are not a sandbox's (another name, a file) are
// left out.
func (l *Local) List(ctx context.Context) ([]extension.Held, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	entries, err := os.ReadDir(l.base)
	if err != nil {
		return nil, fmt.Errorf("local: listing workspaces: %w", err)
	}
	byID := map[string]*extension.Held{}
	var ids []string
	for _, e := range entries {
		name := e.Name()
		id, partial := name, false
		if rest, ok := strings.CutPrefix(name, ".tmp-"); ok {
			id, _, partial = strings.Cut(rest, ".")
		}
		if !event.ValidName(id) {
			continue
		}
		p := filepath.Join(l.base, name)
		if !partial {
			if _, err := os.Stat(filepath.Join(p, markerFile)); err != nil {
				continue // not a workspace: Provision remakes it, Teardown removes it
			}
		}
		info, err := os.Lstat(p)
		if err != nil {
			continue // removed meanwhile
		}
		h := byID[id]
		if h == nil {
			h = &extension.Held{Handle: extension.Handle{SandboxID: id, Host: l.host, Data: map[string]string{"dir": l.Dir(id)}}}
			byID[id] = h
			ids = append(ids, id)
		}
		h.Resources = append(h.Resources, "dir:"+p)
		if h.Since.IsZero() || info.ModTime().Before(h.Since) {
			h.Since = info.ModTime()
		}
	}
	slices.Sort(ids)
	out := make([]extension.Held, 0, len(ids))
	for _, id := range ids {
		out = append(out, *byID[id])
	}
	return out, nil
}

var (
	_ extension.Extension       = (*Local)(nil)
	_ extension.Configurer      = (*Local)(nil)
	_ extension.ManifestChecker = (*Local)(nil)
	_ extension.Lister          = (*Local)(nil)
)
