package vmpacker

import (
	"fmt"
	"net"
	"regexp"
	"sort"

	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/sshx"
	"github.com/sand-boxer/sandboxer/pkg/sshx/workspace"
)

// Config is the manifest's config block.
type Config struct {
	// VMs maps the names the vm input may take to how to reach each VM.
	VMs map[string]VMConfig `yaml:"vms,omitempty" json:"vms,omitempty"`
	// SSHTargets, when set, lets the ssh_target input name a VM directly.
	// Only hosts whose key is in its known_hosts file can be reached, so
	// that file is the allow-list.
	SSHTargets *TargetsConfig `yaml:"ssh_targets,omitempty" json:"ssh_targets,omitempty"`
	// TunnelBind is the local address tunnels listen on, port chosen by
	// the system. Default "127.0.0.1": only this machine reaches them.
	TunnelBind string `yaml:"tunnel_bind,omitempty" json:"tunnel_bind,omitempty"`
	// TunnelHost is where tunnels lead, as the VM sees it. Default
	// "127.0.0.1": a service listening on the VM's loopback.
	TunnelHost string `yaml:"tunnel_host,omitempty" json:"tunnel_host,omitempty"`
	// RepoSchemes is refused: the schemes the repo input may use are the
	// manifest's repo.schemes, beside the hosts and local roots it may
	// reach ([extension.RepoPolicy]). It is decoded only to say so.
	RepoSchemes []string `yaml:"repo_schemes,omitempty" json:"repo_schemes,omitempty"`
	// ConnectTimeout bounds each SSH connection attempt. Default 15s.
	ConnectTimeout extension.Duration `yaml:"connect_timeout,omitempty" json:"connect_timeout,omitempty"`
}

// VMConfig says how to reach one VM.
type VMConfig struct {
	// SSH is the target, user@host[:port]. Required.
	SSH              string `yaml:"ssh" json:"ssh"`
	workspace.Access `yaml:",inline"`
}

// TargetsConfig is how to reach VMs named by the ssh_target input.
type TargetsConfig struct {
	// User is the user when the target names none. Required.
	User             string `yaml:"user" json:"user"`
	workspace.Access `yaml:",inline"`
}

var userRE = regexp.MustCompile(`^[a-z_][a-z0-9_.-]{0,31}$`)

// vm is one resolved VM (configured, or from the ssh_target input).
type vm struct {
	name string // the vm input, or the target for ssh_target
	ssh  sshx.Config
	base string
}

type settings struct {
	vms        map[string]vm
	targets    *TargetsConfig
	tunnelBind string
	tunnelHost string
	connect    extension.Duration
}

func (cfg Config) check() (settings, []extension.Problem) {
	var ps []extension.Problem
	bad := func(path, format string, args ...any) {
		ps = append(ps, extension.Problem{Path: "config." + path, Message: fmt.Sprintf(format, args...)})
	}
	s := settings{
		vms:        map[string]vm{},
		targets:    cfg.SSHTargets,
		tunnelBind: cfg.TunnelBind,
		tunnelHost: cfg.TunnelHost,
		connect:    cfg.ConnectTimeout,
	}
	if s.tunnelBind == "" {
		s.tunnelBind = "127.0.0.1"
	}
	if s.tunnelHost == "" {
		s.tunnelHost = "127.0.0.1"
	}
	if net.ParseIP(s.tunnelBind) == nil {
		bad("tunnel_bind", "want an IP address, got %q", s.tunnelBind)
	}
	if err := extension.CheckFormat(extension.FormatHost, s.tunnelHost); err != nil {
		bad("tunnel_host", "%v", err)
	}
	if len(cfg.RepoSchemes) > 0 {
		bad("repo_schemes", "moved: list the schemes under the manifest's repo.schemes, with the hosts and local roots the repo input may reach (docs/extension-sdk.md, \"Repository policy\")")
	}
	if len(cfg.VMs) == 0 && cfg.SSHTargets == nil {
		bad("vms", "required: configure vms, ssh_targets or both")
	}
	names := make([]string, 0, len(cfg.VMs))
	for n := range cfg.VMs {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, name := range names {
		vc := cfg.VMs[name]
		path := "vms." + name
		if err := extension.CheckFormat(extension.FormatName, name); err != nil {
			bad(path, "VM name: %v", err)
		}
		t, err := sshx.ParseTarget(vc.SSH, "")
		if err != nil {
			bad(path+".ssh", "%v", err)
		}
		vc.Access.Check(path, bad)
		s.vms[name] = vm{name: name, base: vc.BaseDir, ssh: vc.Access.Config(t, cfg.ConnectTimeout.D())}
	}
	if tc := cfg.SSHTargets; tc != nil {
		if !userRE.MatchString(tc.User) {
			bad("ssh_targets.user", "required: the user for targets that name none")
		}
		tc.Access.Check("ssh_targets", bad)
	}
	return s, ps
}

// target resolves the ssh_target input (already format-checked).
func (s settings) target(v string) (vm, error) {
	if s.targets == nil {
		return vm{}, fmt.Errorf("ssh_target is not enabled here (config.ssh_targets is unset)")
	}
	t, err := sshx.ParseTarget(v, s.targets.User)
	if err != nil {
		return vm{}, err
	}
	return vm{name: t.String(), base: s.targets.BaseDir, ssh: s.targets.Access.Config(t, s.connect.D())}, nil
}
