// Package local is ext.local, the embedded default backend: a workspace
// directory per sandbox on this machine, with the repo input cloned into it
// when given. It needs nothing installed but git, and git only for repo.
package local

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
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
	git  string
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
	l.git = cfg.Git
	if l.git == "" {
		l.git = "git"
	}
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
		host = "localhost"
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
		if err := l.clone(ctx, repo, work); err != nil {
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

// clone runs git clone with the repository as a positional argument after
// "--", so it can never be read as an option. The input was validated as a
// repo (no leading '-', no transport helpers) before it got here.
func (l *Local) clone(ctx context.Context, repo, dir string) error {
	if strings.HasPrefix(repo, "-") {
		return fmt.Errorf("local: refusing repository %q", repo)
	}
	cmd := exec.CommandContext(ctx, l.git, "-c", "protocol.ext.allow=never", "clone", "--quiet", "--no-hardlinks", "--", repo, dir)
	cmd.Env = append(os.Environ(), "GIT_TERMINAL_PROMPT=0")
	out, err := cmd.CombinedOutput()
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("local: cloning %s: %w: %s", repo, err, strings.TrimSpace(string(out)))
	}
	return nil
}

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

var (
	_ extension.Extension       = (*Local)(nil)
	_ extension.Configurer      = (*Local)(nil)
	_ extension.ManifestChecker = (*Local)(nil)
)
