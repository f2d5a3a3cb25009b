// Package vmpacker is ext.vm-packer (handler "vm-packer"): a workspace per
// sandbox on a pre-built VM (a Packer image, say), reached over SSH.
//
// Provision makes <base_dir>/<sandbox id> on the VM, cloning the repo
// input into it, and, with tunnel_port, opens a port forward from this
// machine to that port on the VM that stays up while the sandbox lives (it
// is held by the backend instance). WaitReady returns once the VM answers
// and the workspace exists. Teardown closes the tunnel and removes the
// workspace.
//
// Every input is validated before any SSH connection is opened, and
// reaches a remote command only as a quoted argument. The repo input is
// checked against the manifest's repo policy: its scheme and shape with
// the other inputs, its host resolved and every address checked by this
// worker before the VM is contacted, the VM's git pinned to the checked
// address, and a local path checked on the VM ([workspace.Ensure]). The
// package must never import the bus or a service.
package vmpacker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/sshx"
	"github.com/sand-boxer/sandboxer/pkg/sshx/workspace"
)

// Handler is the manifest handler name of this backend.
const Handler = "vm-packer"

// Info registers the backend.
var Info = extension.Info{Handler: Handler, New: func() extension.Extension { return new(VMPacker) }}

// Inputs the backend reads, besides the reserved sandbox_id. Exactly one
// of vm and ssh_target is required.
const (
	// InputVM names a VM of the config's vms. Format name.
	InputVM = "vm"
	// InputSSHTarget is a VM's [user@]host[:port], allowed when the config
	// has ssh_targets. Format ssh-target.
	InputSSHTarget = "ssh_target"
	// InputRepo is cloned into the workspace. Optional; format repo.
	InputRepo = "repo"
	// InputTunnelPort is a port on the VM to forward to. Optional; type port.
	InputTunnelPort = "tunnel_port"
	// InputSSHPort overrides the port of the VM's sshd. Optional; type port.
	InputSSHPort = "ssh_port"
	// InputWorkspaceDir names the workspace directory inside the
	// sandbox's directory. Optional (default "workspace"); format path.
	InputWorkspaceDir = "workspace_dir"
)

// inputSpecs are the type and format each input must be declared with.
var inputSpecs = map[string]extension.InputSpec{
	InputVM:           {Type: extension.TypeString, Format: extension.FormatName},
	InputSSHTarget:    {Type: extension.TypeString, Format: extension.FormatSSHTarget},
	InputRepo:         {Type: extension.TypeString, Format: extension.FormatRepo},
	InputTunnelPort:   {Type: extension.TypePort},
	InputSSHPort:      {Type: extension.TypePort},
	InputWorkspaceDir: {Type: extension.TypeString, Format: extension.FormatPath},
}

// DefaultWorkspaceDir is the workspace directory without workspace_dir.
const DefaultWorkspaceDir = "workspace"

// pollInterval is how often WaitReady tries a VM that does not answer.
const pollInterval = time.Second

// VMPacker is the backend. Configure it before use and Close it after.
type VMPacker struct {
	s     settings
	log   *slog.Logger
	repo  extension.RepoChecker
	pool  sshx.Pool
	locks workspace.Locks

	mu      sync.Mutex
	tunnels map[string]*sshx.Tunnel // by sandbox id
}

// Configure decodes and checks the manifest's config block. It opens no
// connection.
func (v *VMPacker) Configure(_ context.Context, env extension.Env) error {
	var cfg Config
	if err := env.Manifest.Config.Decode(&cfg); err != nil {
		return fmt.Errorf("vm-packer: %w", err)
	}
	s, ps := cfg.check()
	if len(ps) > 0 {
		return fmt.Errorf("vm-packer: %w", extension.Problems(ps))
	}
	v.s, v.log = s, env.Logger
	if v.log == nil {
		v.log = slog.New(slog.DiscardHandler)
	}
	v.repo = extension.RepoChecker{Policy: env.Manifest.Repo, Remote: true}
	v.tunnels = map[string]*sshx.Tunnel{}
	return nil
}

// CheckManifest checks the config block and that the declared inputs are
// the ones this backend reads, with their types and formats: vm or
// ssh_target (or both, neither required, since a request gives exactly
// one), ssh_target only with config.ssh_targets.
func (v *VMPacker) CheckManifest(m *extension.Manifest) []extension.Problem {
	var cfg Config
	if ps := m.Config.CheckDecode(&cfg, m.File); len(ps) > 0 {
		return ps
	}
	_, ps := cfg.check()
	prob := func(path, format string, args ...any) {
		ps = append(ps, extension.Problem{Path: path, Message: fmt.Sprintf(format, args...)})
	}
	_, hasVM := m.Inputs[InputVM]
	_, hasTarget := m.Inputs[InputSSHTarget]
	if !hasVM && !hasTarget {
		prob("inputs", "vm-packer needs a vm or an ssh_target input (or both)")
	}
	if hasTarget && cfg.SSHTargets == nil {
		prob("inputs."+InputSSHTarget, "declared, but config.ssh_targets is unset")
	}
	if hasVM && len(cfg.VMs) == 0 {
		prob("inputs."+InputVM, "declared, but config.vms is empty")
	}
	for _, name := range slices.Sorted(maps.Keys(m.Inputs)) {
		want, ok := inputSpecs[name]
		got := m.Inputs[name]
		switch {
		case !ok:
			prob("inputs."+name, "vm-packer does not read input %q (it reads %s)", name, strings.Join(slices.Sorted(maps.Keys(inputSpecs)), ", "))
		case got.Type != want.Type || got.Format != want.Format:
			prob("inputs."+name, "vm-packer needs type: %s%s", want.Type, formatNote(want.Format))
		case got.Required && (name == InputVM || name == InputSSHTarget):
			prob("inputs."+name, "must not be required: a request gives exactly one of vm and ssh_target")
		}
	}
	return ps
}

func formatNote(f extension.Format) string {
	if f == "" {
		return ""
	}
	return " and format: " + string(f)
}

// sandbox is one validated request or handle.
type sandbox struct {
	id         string
	vm         vm
	repo       string
	wsDir      string
	tunnelPort int
	sshPort    int
}

func (b sandbox) dir() string       { return workspace.Dir(b.vm.base, b.id) }
func (b sandbox) workspace() string { return path.Join(b.dir(), b.wsDir) }

// parse validates a request without any I/O, reporting every problem as
// [extension.FieldErrors].
func (v *VMPacker) parse(in extension.Inputs) (sandbox, error) {
	var fe extension.FieldErrors
	field := func(k, format string, args ...any) {
		fe = append(fe, extension.FieldError{Field: "inputs." + k, Detail: fmt.Sprintf(format, args...)})
	}
	b := sandbox{id: in.SandboxID(), wsDir: DefaultWorkspaceDir}
	if err := workspace.CheckID(b.id); err != nil {
		field(extension.InputSandboxID, "%v", err)
	}
	for _, k := range slices.Sorted(maps.Keys(in)) {
		if _, ok := inputSpecs[k]; !ok && k != extension.InputSandboxID {
			field(extension.SafeField(k), "unknown input (vm-packer reads %s)", strings.Join(slices.Sorted(maps.Keys(inputSpecs)), ", "))
		}
	}
	valid := map[string]string{}
	for _, k := range slices.Sorted(maps.Keys(inputSpecs)) {
		val, ok := in[k]
		if !ok {
			continue
		}
		spec := inputSpecs[k]
		var err error
		if spec.Type == extension.TypePort {
			err = checkPort(val)
		} else {
			err = extension.CheckFormat(spec.Format, val)
		}
		if err != nil {
			field(k, "%v", err)
			continue
		}
		valid[k] = val
	}
	_, hasVM := in[InputVM]
	_, hasTarget := in[InputSSHTarget]
	switch {
	case hasVM && hasTarget:
		field(InputVM, "give exactly one of vm and ssh_target, not both")
	case !hasVM && !hasTarget:
		field(InputVM, "required: give exactly one of vm and ssh_target")
	}
	if name, ok := valid[InputVM]; ok && !hasTarget {
		m, ok := v.s.vms[name]
		if !ok {
			field(InputVM, "unknown VM %q (known: %s)", name, strings.Join(slices.Sorted(maps.Keys(v.s.vms)), ", "))
		}
		b.vm = m
	}
	if t, ok := valid[InputSSHTarget]; ok && !hasVM {
		m, err := v.s.target(t)
		if err != nil {
			field(InputSSHTarget, "%v", err)
		}
		b.vm = m
	}
	if r, ok := valid[InputRepo]; ok {
		if err := v.repo.Policy.Check(r); err != nil {
			field(InputRepo, "%v", err)
		}
		b.repo = r
	}
	if d, ok := valid[InputWorkspaceDir]; ok {
		if err := workspace.CheckRel(d); err != nil {
			field(InputWorkspaceDir, "%v", err)
		}
		b.wsDir = d
	}
	b.tunnelPort, _ = strconv.Atoi(valid[InputTunnelPort])
	b.sshPort, _ = strconv.Atoi(valid[InputSSHPort])
	if len(fe) > 0 {
		return sandbox{}, fe
	}
	if b.sshPort != 0 {
		b.vm.ssh.Target.Port = b.sshPort
		if _, isVM := v.s.vms[b.vm.name]; !isVM {
			b.vm.name = b.vm.ssh.Target.String()
		}
	}
	return b, nil
}

func checkPort(s string) error {
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > 65535 || strconv.Itoa(n) != s {
		return fmt.Errorf("want a port 1-65535, got %q", s)
	}
	return nil
}

// fromHandle rebuilds a sandbox from a full or partial handle: Host is a
// VM name, or a target when ssh_target made it.
func (v *VMPacker) fromHandle(h extension.Handle) (sandbox, error) {
	in := extension.Inputs{extension.InputSandboxID: h.SandboxID}
	if _, ok := v.s.vms[h.Host]; ok {
		in[InputVM] = h.Host
	} else {
		in[InputSSHTarget] = h.Host
	}
	for k, input := range map[string]string{"workspace_dir": InputWorkspaceDir, "tunnel_port": InputTunnelPort, "ssh_port": InputSSHPort} {
		if val := h.Data[k]; val != "" {
			in[input] = val
		}
	}
	b, err := v.parse(in)
	if err != nil {
		var fe extension.FieldErrors
		if errors.As(err, &fe) {
			for i := range fe {
				fe[i].Field = strings.Replace(fe[i].Field, "inputs.", "handle.", 1)
			}
			return sandbox{}, fe
		}
		return sandbox{}, err
	}
	return b, nil
}

func (v *VMPacker) handle(b sandbox) extension.Handle {
	d := map[string]string{"dir": b.dir(), "workspace": b.workspace(), "ssh": b.vm.ssh.Target.String()}
	if b.wsDir != DefaultWorkspaceDir {
		d["workspace_dir"] = b.wsDir
	}
	if b.tunnelPort != 0 {
		d["tunnel_port"] = strconv.Itoa(b.tunnelPort)
	}
	if b.sshPort != 0 {
		d["ssh_port"] = strconv.Itoa(b.sshPort)
	}
	return extension.Handle{SandboxID: b.id, Host: b.vm.name, Data: d}
}

func (v *VMPacker) runner(m vm) workspace.Runner {
	return func(ctx context.Context, argv ...string) ([]byte, error) { return v.pool.Run(ctx, m.ssh, argv...) }
}

// Provision makes the workspace on the VM and, with tunnel_port, opens
// the tunnel. A second call for one sandbox finds both.
func (v *VMPacker) Provision(ctx context.Context, _ extension.Profile, in extension.Inputs, _ string) (extension.Handle, error) {
	b, err := v.parse(in)
	if err != nil {
		return extension.Handle{}, fmt.Errorf("vm-packer: %w", err)
	}
	h := v.handle(b)
	if err := ctx.Err(); err != nil {
		return h, err
	}
	spec := workspace.Spec{Base: b.vm.base, ID: b.id, Checkout: b.wsDir}
	if b.repo != "" {
		// Resolved and checked here, before the VM is contacted.
		target, err := v.repo.Check(ctx, b.repo)
		if err != nil {
			return h, v.repoFailed(ctx, b, err)
		}
		spec.Repo = &target
	}
	unlock, err := v.locks.Lock(ctx, b.id)
	if err != nil {
		return h, err
	}
	defer unlock()
	created, err := workspace.Ensure(ctx, v.runner(b.vm), spec)
	if err != nil {
		if errors.Is(err, extension.ErrRepoNotReachable) {
			return h, v.repoFailed(ctx, b, err)
		}
		return h, fmt.Errorf("vm-packer: on %s: %w", b.vm.name, err)
	}
	if b.tunnelPort != 0 {
		addr, err := v.ensureTunnel(ctx, b)
		if err != nil {
			return h, err
		}
		h.Data["tunnel"] = addr
	}
	v.log.InfoContext(ctx, "vm workspace attached", "sandbox", b.id, "vm", b.vm.name, "new_workspace", created)
	return h, nil
}

// repoFailed logs why the repository of b was refused or failed to
// clone and returns the error to fail with: it says only "repository not
// reachable" (the detail is the operator's, git's output above all).
func (v *VMPacker) repoFailed(ctx context.Context, b sandbox, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	v.log.WarnContext(ctx, "repository not reachable", "sandbox", b.id, "vm", b.vm.name, "err", err)
	return fmt.Errorf("vm-packer: %w", err)
}

// ensureTunnel opens the sandbox's tunnel unless it is open, and returns
// its local address.
func (v *VMPacker) ensureTunnel(ctx context.Context, b sandbox) (string, error) {
	remote := net.JoinHostPort(v.s.tunnelHost, strconv.Itoa(b.tunnelPort))
	v.mu.Lock()
	t := v.tunnels[b.id]
	v.mu.Unlock()
	if t != nil {
		select {
		case <-t.Done():
		default:
			if t.Remote() == remote {
				return t.Addr().String(), nil
			}
		}
		_ = t.Close()
	}
	t, err := v.pool.Forward(ctx, b.vm.ssh, net.JoinHostPort(v.s.tunnelBind, "0"), remote)
	if err != nil {
		return "", fmt.Errorf("vm-packer: opening tunnel to %s on %s: %w", remote, b.vm.name, err)
	}
	v.mu.Lock()
	v.tunnels[b.id] = t
	v.mu.Unlock()
	return t.Addr().String(), nil
}

// WaitReady returns once the VM answers and the workspace exists,
// reopening the tunnel if this instance does not hold it (after a
// restart). A VM that does not answer yet (booting) is retried until ctx
// ends; a refused host key fails at once.
func (v *VMPacker) WaitReady(ctx context.Context, h extension.Handle) (extension.Reachability, error) {
	if err := ctx.Err(); err != nil {
		return extension.Reachability{}, err
	}
	b, err := v.fromHandle(h)
	if err != nil {
		return extension.Reachability{}, fmt.Errorf("vm-packer: %w", err)
	}
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return extension.Reachability{}, fmt.Errorf("vm-packer: VM %s not ready: %w", b.vm.name, ctx.Err())
		case <-t.C:
		}
		ok, err := workspace.Exists(ctx, v.runner(b.vm), b.vm.base, b.id)
		var ce *sshx.ConnError
		var hke *sshx.HostKeyError
		switch {
		case err == nil && !ok:
			return extension.Reachability{}, fmt.Errorf("vm-packer: workspace %s is not on %s", b.dir(), b.vm.name)
		case err == nil:
			r := extension.Reachability{SSH: b.vm.ssh.Target.String(), RemoteDir: b.workspace(), Host: b.vm.name}
			if b.tunnelPort != 0 {
				addr, err := v.ensureTunnel(ctx, b)
				if err != nil {
					return extension.Reachability{}, err
				}
				r.Ports = map[string]string{"tunnel": addr}
			}
			return r, nil
		case errors.As(err, &hke) || !errors.As(err, &ce) || ctx.Err() != nil:
			return extension.Reachability{}, fmt.Errorf("vm-packer: %w", err)
		default:
			v.log.DebugContext(ctx, "VM does not answer yet", "vm", b.vm.name, "err", err)
		}
		t.Reset(pollInterval)
	}
}

// Teardown closes the sandbox's tunnel and removes its workspace and any
// partial attempt at it. It works from a partial handle and succeeds on a
// sandbox already gone.
func (v *VMPacker) Teardown(ctx context.Context, h extension.Handle) (extension.CleanupReport, error) {
	var rep extension.CleanupReport
	if err := ctx.Err(); err != nil {
		return rep, err
	}
	b, err := v.fromHandle(h)
	if err != nil {
		return rep, fmt.Errorf("vm-packer: %w", err)
	}
	unlock, err := v.locks.Lock(ctx, b.id)
	if err != nil {
		return rep, err
	}
	defer unlock()
	v.mu.Lock()
	t := v.tunnels[b.id]
	delete(v.tunnels, b.id)
	v.mu.Unlock()
	if t != nil {
		_ = t.Close()
		rep.Removed = append(rep.Removed, "tunnel:"+t.Addr().String())
	}
	dirs, err := workspace.Remove(ctx, v.runner(b.vm), b.vm.base, b.id)
	for _, d := range dirs {
		rep.Removed = append(rep.Removed, "dir:"+d)
	}
	if err != nil {
		return rep, fmt.Errorf("vm-packer: on %s: %w", b.vm.name, err)
	}
	rep.AlreadyGone = len(rep.Removed) == 0
	v.log.InfoContext(ctx, "vm workspace removed", "sandbox", b.id, "vm", b.vm.name, "removed", rep.Removed)
	return rep, nil
}

// workspacesScript prints every finished workspace and partial attempt
// under base directory $1, "mtime in epoch seconds|name" a line.
var workspacesScript = "set -u\n" + workspace.HeldLoop(`"$1"`, "")

// List returns, VM by VM of the config's vms, every sandbox with a
// workspace or a partial attempt at one, with a partial handle Teardown
// accepts and the modification time of its oldest directory. Sandboxes
// on VMs named by the ssh_target input are not listed: the backend cannot
// enumerate those VMs. A VM that cannot be listed is named in the error,
// the others' sandboxes returned.
func (v *VMPacker) List(ctx context.Context) ([]extension.Held, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var (
		out  []extension.Held
		errs []error
	)
	for _, name := range slices.Sorted(maps.Keys(v.s.vms)) {
		m := v.s.vms[name]
		b, err := v.runner(m)(ctx, "sh", "-c", workspacesScript, "sandboxer-held", m.base)
		if err != nil {
			if ctx.Err() != nil {
				return out, ctx.Err()
			}
			errs = append(errs, fmt.Errorf("vm-packer: listing the workspaces of %s: %w", name, err))
			continue
		}
		byID := map[string]*extension.Held{}
		for _, l := range strings.Split(string(b), "\n") {
			mtime, entry, ok := strings.Cut(strings.TrimSpace(l), "|")
			if !ok {
				continue
			}
			id, _, _ := strings.Cut(strings.TrimPrefix(entry, ".tmp-"), ".")
			if workspace.CheckID(id) != nil {
				continue
			}
			h := byID[id]
			if h == nil {
				h = &extension.Held{Handle: extension.Handle{SandboxID: id, Host: name, Data: map[string]string{"dir": workspace.Dir(m.base, id)}}}
				byID[id] = h
			}
			h.Resources = append(h.Resources, "dir:"+path.Join(m.base, entry))
			if sec, err := strconv.ParseInt(mtime, 10, 64); err == nil {
				if at := time.Unix(sec, 0); h.Since.IsZero() || at.Before(h.Since) {
					h.Since = at
				}
			}
		}
		for _, id := range slices.Sorted(maps.Keys(byID)) {
			out = append(out, *byID[id])
		}
	}
	return out, errors.Join(errs...)
}

// Tunnel returns the local address of a sandbox's tunnel, if this
// instance holds one.
func (v *VMPacker) Tunnel(sandboxID string) (string, bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if t := v.tunnels[sandboxID]; t != nil {
		return t.Addr().String(), true
	}
	return "", false
}

// Close closes every tunnel and SSH connection.
func (v *VMPacker) Close() error {
	v.mu.Lock()
	ts := v.tunnels
	v.tunnels = map[string]*sshx.Tunnel{}
	v.mu.Unlock()
	var errs []error
	for _, t := range ts {
		errs = append(errs, t.Close())
	}
	errs = append(errs, v.pool.Close())
	return errors.Join(errs...)
}

var (
	_ extension.Extension       = (*VMPacker)(nil)
	_ extension.Configurer      = (*VMPacker)(nil)
	_ extension.ManifestChecker = (*VMPacker)(nil)
	_ extension.Closer          = (*VMPacker)(nil)
	_ extension.Lister          = (*VMPacker)(nil)
)
