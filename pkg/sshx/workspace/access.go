package workspace

import (
	"path/filepath"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/sshx"
)

// Access says how to reach a remote machine over SSH and where the
// workspaces of its sandboxes live: the part of their config both SSH
// backends share. It is inlined into their host entries.
type Access struct {
	// KnownHosts is an OpenSSH known_hosts file holding the machine's key.
	// Required: an unknown or changed key is refused.
	KnownHosts string `yaml:"known_hosts" json:"known_hosts"`
	// Identity is an unencrypted private key file.
	Identity string `yaml:"identity,omitempty" json:"identity,omitempty"`
	// Agent authenticates with the ssh-agent at $SSH_AUTH_SOCK. Identity
	// or Agent is required.
	Agent bool `yaml:"agent,omitempty" json:"agent,omitempty"`
	// BaseDir is the absolute directory on the machine holding one
	// directory per sandbox. Required.
	BaseDir string `yaml:"base_dir" json:"base_dir"`
}

// Check reports every problem of a through bad, under path.
func (a Access) Check(path string, bad func(path, format string, args ...any)) {
	if a.KnownHosts == "" || !filepath.IsAbs(a.KnownHosts) {
		bad(path+".known_hosts", "required: the absolute path of a known_hosts file holding the machine's key")
	}
	if a.Identity != "" && !filepath.IsAbs(a.Identity) {
		bad(path+".identity", "want an absolute path")
	}
	if a.Identity == "" && !a.Agent {
		bad(path, "set identity (a private key file) or agent: true")
	}
	if err := CheckBase(a.BaseDir); err != nil {
		bad(path+".base_dir", "%v", err)
	}
}

// Config returns the SSH config that reaches t with a's credentials.
func (a Access) Config(t sshx.Target, connectTimeout time.Duration) sshx.Config {
	return sshx.Config{
		Target:         t,
		KnownHostsFile: a.KnownHosts,
		IdentityFile:   a.Identity,
		Agent:          a.Agent,
		ConnectTimeout: connectTimeout,
	}
}
