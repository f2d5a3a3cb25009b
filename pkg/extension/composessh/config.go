package composessh

import (
	"fmt"
	"regexp"
	"slices"
	"sort"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/extension"
	"github.com/sand-boxer/sandboxer/pkg/sshx"
	"github.com/sand-boxer/sandboxer/pkg/sshx/workspace"
)

// Config is the manifest's config block.
type Config struct {
	// Hosts maps every name of the manifest's hosts list to how to reach
	// it. Required.
	Hosts map[string]HostConfig `yaml:"hosts" json:"hosts"`
	// Compose picks the compose command: "auto" (the default: `docker
	// compose` when the host has the plugin, else `docker-compose`),
	// "plugin" or "standalone".
	Compose string `yaml:"compose,omitempty" json:"compose,omitempty"`
	// Docker is the docker CLI on the hosts. Default "docker".
	Docker string `yaml:"docker,omitempty" json:"docker,omitempty"`
	// DockerCompose is the standalone compose CLI. Default "docker-compose".
	DockerCompose string `yaml:"docker_compose,omitempty" json:"docker_compose,omitempty"`
	// ProjectPrefix is put before the sandbox id to name its compose
	// project. Default "sbx-".
	ProjectPrefix string `yaml:"project_prefix,omitempty" json:"project_prefix,omitempty"`
	// RepoSchemes is refused: the schemes the repo input may use are the
	// manifest's repo.schemes, beside the hosts and local roots it may
	// reach ([extension.RepoPolicy]). It is decoded only to say so.
	RepoSchemes []string `yaml:"repo_schemes,omitempty" json:"repo_schemes,omitempty"`
	// StopTimeout is how long compose down lets containers stop. Default 10s.
	StopTimeout extension.Duration `yaml:"stop_timeout,omitempty" json:"stop_timeout,omitempty"`
	// PollInterval is how often WaitReady looks at the stack. Default 1s.
	PollInterval extension.Duration `yaml:"poll_interval,omitempty" json:"poll_interval,omitempty"`
	// ConnectTimeout bounds each SSH connection attempt. Default 15s.
	ConnectTimeout extension.Duration `yaml:"connect_timeout,omitempty" json:"connect_timeout,omitempty"`
}

// HostConfig says how to reach one compose host.
type HostConfig struct {
	// SSH is the target, user@host[:port]. Required.
	SSH              string `yaml:"ssh" json:"ssh"`
	workspace.Access `yaml:",inline"`
}

// Compose command choices.
const (
	ComposeAuto       = "auto"
	ComposePlugin     = "plugin"
	ComposeStandalone = "standalone"
)

var (
	prefixRE  = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,31}$`)
	programRE = regexp.MustCompile(`^[A-Za-z0-9_./-]+$`)
)

// host is one resolved host.
type host struct {
	name string
	ssh  sshx.Config
	base string
}

// settings is a checked config with defaults applied.
type settings struct {
	hosts         map[string]host
	compose       string
	docker        string
	dockerCompose string
	prefix        string
	stopTimeout   time.Duration
	poll          time.Duration
}

// check validates cfg and returns it resolved, or every problem.
func (cfg Config) check() (settings, []extension.Problem) {
	var ps []extension.Problem
	bad := func(path, format string, args ...any) {
		ps = append(ps, extension.Problem{Path: "config." + path, Message: fmt.Sprintf(format, args...)})
	}
	s := settings{
		hosts:         map[string]host{},
		compose:       orDefault(cfg.Compose, ComposeAuto),
		docker:        orDefault(cfg.Docker, "docker"),
		dockerCompose: orDefault(cfg.DockerCompose, "docker-compose"),
		prefix:        orDefault(cfg.ProjectPrefix, "sbx-"),
		stopTimeout:   cfg.StopTimeout.D(),
		poll:          cfg.PollInterval.D(),
	}
	if s.stopTimeout <= 0 {
		s.stopTimeout = 10 * time.Second
	}
	if s.poll <= 0 {
		s.poll = time.Second
	}
	if !slices.Contains([]string{ComposeAuto, ComposePlugin, ComposeStandalone}, s.compose) {
		bad("compose", "want auto, plugin or standalone, got %q", s.compose)
	}
	if !programRE.MatchString(s.docker) || s.docker[0] == '-' {
		bad("docker", "want a program name or path, got %q", s.docker)
	}
	if !programRE.MatchString(s.dockerCompose) || s.dockerCompose[0] == '-' {
		bad("docker_compose", "want a program name or path, got %q", s.dockerCompose)
	}
	if !prefixRE.MatchString(s.prefix) {
		bad("project_prefix", "want 1-32 of [a-z0-9_-] starting with a letter or digit, got %q", s.prefix)
	}
	if len(cfg.RepoSchemes) > 0 {
		bad("repo_schemes", "moved: list the schemes under the manifest's repo.schemes, with the hosts and local roots the repo input may reach (docs/extension-sdk.md, \"Repository policy\")")
	}
	if len(cfg.Hosts) == 0 {
		bad("hosts", "required: one entry per host of the manifest")
	}
	names := make([]string, 0, len(cfg.Hosts))
	for n := range cfg.Hosts {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, name := range names {
		hc := cfg.Hosts[name]
		path := "hosts." + name
		t, err := sshx.ParseTarget(hc.SSH, "")
		if err != nil {
			bad(path+".ssh", "%v", err)
		}
		hc.Access.Check(path, bad)
		s.hosts[name] = host{name: name, base: hc.BaseDir, ssh: hc.Access.Config(t, cfg.ConnectTimeout.D())}
	}
	return s, ps
}

func orDefault(v, def string) string {
	if v == "" {
		return def
	}
	return v
}
