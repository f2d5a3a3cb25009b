// Package composessh is ext.compose-ssh (handler "compose-ssh"): a compose
// stack per sandbox on a remote Docker host, driven over SSH.
//
// Provision makes <base_dir>/<sandbox id> on the host, clones the repo
// input into its repo/ directory and runs `docker compose -p <project> up
// -d` there (or `docker-compose`, whichever the host has). WaitReady waits
// for every service to run, and to be healthy where it has a health
// check. Teardown runs `down -v --remove-orphans`, removes what is left
// with the project's label, removes the directory, and reports each thing
// removed.
//
// Every input is validated before any SSH connection is opened, and
// reaches a remote command only as a quoted argument ([sshx.Client.Run]).
// The repo input is checked against the manifest's repo policy: its
// scheme and shape with the other inputs, its host resolved and every
// address checked by this worker before the host is contacted, the host's
// git pinned to the checked address, and a local path checked on the host
// ([workspace.Ensure]). The package must never import the bus or a
// service.
package composessh

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
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
const Handler = "compose-ssh"

// Info registers the backend.
var Info = extension.Info{Handler: Handler, New: func() extension.Extension { return new(ComposeSSH) }}

// Inputs the backend reads, besides the reserved sandbox_id.
const (
	// InputRepo is the git repository holding the compose file. Required;
	// format repo.
	InputRepo = "repo"
	// InputComposeFile is the compose file, relative to the repository.
	// Optional (compose's own default); format path.
	InputComposeFile = "compose_file"
	// InputEnv is NAME=value pairs, comma-separated, written to an env
	// file compose reads for variable substitution. Optional; format env.
	InputEnv = "env"
)

// inputFormats are the inputs and the format each must have.
var inputFormats = map[string]extension.Format{
	InputRepo:        extension.FormatRepo,
	InputComposeFile: extension.FormatPath,
	InputEnv:         extension.FormatEnv,
}

// Layout of a sandbox's directory on the host.
const (
	checkoutDir = "repo"        // the clone: the reachability's remote_dir
	envFile     = "compose.env" // the env input, when given
)

// Compose labels set on everything a compose project makes.
const (
	labelProject = "com.docker.compose.project"
	labelService = "com.docker.compose.service"
	labelOneOff  = "com.docker.compose.oneoff"
)

// ComposeSSH is the backend. Configure it before use and Close it after.
type ComposeSSH struct {
	s     settings
	log   *slog.Logger
	repo  extension.RepoChecker
	pool  sshx.Pool
	locks workspace.Locks

	mu      sync.Mutex
	compose map[string][]string // host name -> compose command prefix
}

// Configure decodes and checks the manifest's config block. It opens no
// connection: hosts are dialled on first use.
func (c *ComposeSSH) Configure(_ context.Context, env extension.Env) error {
	var cfg Config
	if err := env.Manifest.Config.Decode(&cfg); err != nil {
		return fmt.Errorf("compose-ssh: %w", err)
	}
	s, ps := cfg.check()
	if len(ps) > 0 {
		return fmt.Errorf("compose-ssh: %w", extension.Problems(ps))
	}
	c.s, c.log = s, env.Logger
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	c.repo = extension.RepoChecker{Policy: env.Manifest.Repo, Remote: true}
	c.compose = map[string][]string{}
	return nil
}

// CheckManifest checks the config block, that every host of the manifest
// is configured, and that the declared inputs are the ones this backend
// reads, with their formats.
func (c *ComposeSSH) CheckManifest(m *extension.Manifest) []extension.Problem {
	var cfg Config
	if ps := m.Config.CheckDecode(&cfg, m.File); len(ps) > 0 {
		return ps
	}
	s, ps := cfg.check()
	for i, h := range m.HostList() {
		if _, ok := s.hosts[h]; !ok && len(s.hosts) > 0 {
			ps = append(ps, extension.Problem{Path: fmt.Sprintf("hosts[%d]", i), Message: fmt.Sprintf("host %q has no entry under config.hosts", h)})
		}
	}
	return append(ps, checkInputs(m)...)
}

func checkInputs(m *extension.Manifest) []extension.Problem {
	var ps []extension.Problem
	if s, ok := m.Inputs[InputRepo]; !ok || !s.Required {
		ps = append(ps, extension.Problem{Path: "inputs." + InputRepo, Message: "compose-ssh needs a required repo input"})
	}
	for _, name := range slices.Sorted(maps.Keys(m.Inputs)) {
		want, ok := inputFormats[name]
		if !ok {
			ps = append(ps, extension.Problem{Path: "inputs." + name, Message: fmt.Sprintf("compose-ssh does not read input %q (it reads %s)", name, strings.Join(slices.Sorted(maps.Keys(inputFormats)), ", "))})
			continue
		}
		if spec := m.Inputs[name]; spec.Type != extension.TypeString || spec.Format != want {
			ps = append(ps, extension.Problem{Path: "inputs." + name, Message: fmt.Sprintf("compose-ssh needs type: string and format: %s", want)})
		}
	}
	return ps
}

// sandbox is one validated request or handle.
type sandbox struct {
	id          string
	host        host
	repo        string
	composeFile string
	env         string // env file content, "" without the env input
	withEnv     bool   // the sandbox has an env file
}

func (b sandbox) dir() string      { return workspace.Dir(b.host.base, b.id) }
func (b sandbox) checkout() string { return path.Join(b.dir(), checkoutDir) }

// Project returns the compose project name of a sandbox.
func (c *ComposeSSH) Project(sandboxID string) string {
	if strings.HasPrefix(sandboxID, c.s.prefix) {
		return sandboxID // sand-boxer's ids already carry "sbx-"
	}
	return c.s.prefix + sandboxID
}

// Dir returns the directory of a sandbox on a configured host.
func (c *ComposeSSH) Dir(hostName, sandboxID string) (string, error) {
	h, ok := c.s.hosts[hostName]
	if !ok {
		return "", fmt.Errorf("compose-ssh: unknown host %q", hostName)
	}
	return workspace.Dir(h.base, sandboxID), nil
}

// parse validates in and host without any I/O. Every problem is reported,
// as [extension.FieldErrors].
func (c *ComposeSSH) parse(in extension.Inputs, hostName string) (sandbox, error) {
	var fe extension.FieldErrors
	b := sandbox{id: in.SandboxID()}
	if err := workspace.CheckID(b.id); err != nil {
		fe = append(fe, extension.FieldError{Field: "inputs." + extension.InputSandboxID, Detail: err.Error()})
	}
	for _, k := range slices.Sorted(maps.Keys(in)) {
		if _, ok := inputFormats[k]; !ok && k != extension.InputSandboxID {
			fe = append(fe, extension.FieldError{Field: "inputs." + extension.SafeField(k), Detail: "unknown input (compose-ssh reads " + strings.Join(slices.Sorted(maps.Keys(inputFormats)), ", ") + ")"})
		}
	}
	for _, k := range slices.Sorted(maps.Keys(inputFormats)) {
		v, ok := in[k]
		if !ok {
			if k == InputRepo {
				fe = append(fe, extension.FieldError{Field: "inputs." + k, Detail: "required"})
			}
			continue
		}
		if err := extension.CheckFormat(inputFormats[k], v); err != nil {
			fe = append(fe, extension.FieldError{Field: "inputs." + k, Detail: err.Error()})
			continue
		}
		switch k {
		case InputRepo:
			if err := c.repo.Policy.Check(v); err != nil {
				fe = append(fe, extension.FieldError{Field: "inputs." + k, Detail: err.Error()})
				continue
			}
			b.repo = v
		case InputComposeFile:
			if err := workspace.CheckRel(v); err != nil {
				fe = append(fe, extension.FieldError{Field: "inputs." + k, Detail: err.Error()})
				continue
			}
			b.composeFile = v
		case InputEnv:
			b.env, b.withEnv = strings.ReplaceAll(v, ",", "\n")+"\n", true
		}
	}
	h, err := c.lookupHost(hostName)
	if err != nil {
		fe = append(fe, extension.FieldError{Field: "host", Detail: err.Error()})
	}
	b.host = h
	if len(fe) > 0 {
		return sandbox{}, fe
	}
	return b, nil
}

// lookupHost returns the configured host; "" is the only host, if there
// is one.
func (c *ComposeSSH) lookupHost(name string) (host, error) {
	if name == "" && len(c.s.hosts) == 1 {
		for _, h := range c.s.hosts {
			return h, nil
		}
	}
	h, ok := c.s.hosts[name]
	if !ok {
		return host{}, fmt.Errorf("host %q is not configured (configured: %s)", name, strings.Join(slices.Sorted(maps.Keys(c.s.hosts)), ", "))
	}
	return h, nil
}

// fromHandle rebuilds a sandbox from a handle, full or partial (sandbox
// id and host only), validating what it holds as Provision validates
// inputs.
func (c *ComposeSSH) fromHandle(hd extension.Handle) (sandbox, error) {
	var fe extension.FieldErrors
	b := sandbox{id: hd.SandboxID}
	if err := workspace.CheckID(b.id); err != nil {
		fe = append(fe, extension.FieldError{Field: "handle.sandbox_id", Detail: err.Error()})
	}
	h, err := c.lookupHost(hd.Host)
	if err != nil {
		fe = append(fe, extension.FieldError{Field: "handle.host", Detail: err.Error()})
	}
	b.host = h
	if f := hd.Data["compose_file"]; f != "" {
		if err := extension.CheckFormat(extension.FormatPath, f); err != nil {
			fe = append(fe, extension.FieldError{Field: "handle.data.compose_file", Detail: err.Error()})
		} else if err := workspace.CheckRel(f); err != nil {
			fe = append(fe, extension.FieldError{Field: "handle.data.compose_file", Detail: err.Error()})
		}
		b.composeFile = f
	}
	b.withEnv = hd.Data["env_file"] != ""
	if len(fe) > 0 {
		return sandbox{}, fe
	}
	return b, nil
}

func (c *ComposeSSH) handle(b sandbox) extension.Handle {
	d := map[string]string{
		"dir":             b.dir(),
		"remote_dir":      b.checkout(),
		"compose_project": c.Project(b.id),
		"ssh":             b.host.ssh.Target.String(),
	}
	if b.composeFile != "" {
		d["compose_file"] = b.composeFile
	}
	if b.withEnv {
		d["env_file"] = path.Join(b.dir(), envFile)
	}
	return extension.Handle{SandboxID: b.id, Host: b.host.name, Data: d}
}

func (c *ComposeSSH) runner(h host) workspace.Runner {
	return func(ctx context.Context, argv ...string) ([]byte, error) { return c.pool.Run(ctx, h.ssh, argv...) }
}

// Provision makes the sandbox's directory, clones the repo and brings the
// stack up. A second call for one sandbox finds the directory and runs
// `up -d` again, which changes nothing on a running stack.
func (c *ComposeSSH) Provision(ctx context.Context, _ extension.Profile, in extension.Inputs, hostName string) (extension.Handle, error) {
	b, err := c.parse(in, hostName)
	if err != nil {
		return extension.Handle{}, fmt.Errorf("compose-ssh: %w", err)
	}
	h := c.handle(b)
	if err := ctx.Err(); err != nil {
		return h, err
	}
	// Resolved and checked here, before the host is contacted.
	target, err := c.repo.Check(ctx, b.repo)
	if err != nil {
		return h, c.repoFailed(ctx, b, err)
	}
	unlock, err := c.locks.Lock(ctx, b.id)
	if err != nil {
		return h, err
	}
	defer unlock()
	run := c.runner(b.host)
	spec := workspace.Spec{Base: b.host.base, ID: b.id, Checkout: checkoutDir, Repo: &target}
	if b.withEnv {
		spec.Files = map[string]string{envFile: b.env}
	}
	created, err := workspace.Ensure(ctx, run, spec)
	if err != nil {
		if errors.Is(err, extension.ErrRepoNotReachable) {
			return h, c.repoFailed(ctx, b, err)
		}
		return h, fmt.Errorf("compose-ssh: on %s: %w", b.host.name, err)
	}
	argv, err := c.composeArgv(ctx, b, "up", "--detach", "--remove-orphans")
	if err != nil {
		return h, err
	}
	if _, err := run(ctx, argv...); err != nil {
		return h, fmt.Errorf("compose-ssh: starting stack %s on %s: %w", c.Project(b.id), b.host.name, err)
	}
	c.log.InfoContext(ctx, "compose stack up", "sandbox", b.id, "host", b.host.name, "project", c.Project(b.id), "new_workspace", created)
	return h, nil
}

// repoFailed logs why the repository of b was refused or failed to
// clone and returns the error to fail with: it says only "repository not
// reachable" (the detail is the operator's, git's output above all).
func (c *ComposeSSH) repoFailed(ctx context.Context, b sandbox, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	c.log.WarnContext(ctx, "repository not reachable", "sandbox", b.id, "host", b.host.name, "err", err)
	return fmt.Errorf("compose-ssh: %w", err)
}

// composeArgv returns the compose command for b, run in its checkout.
func (c *ComposeSSH) composeArgv(ctx context.Context, b sandbox, args ...string) ([]string, error) {
	prefix, err := c.composeCommand(ctx, b.host)
	if err != nil {
		return nil, err
	}
	argv := append(slices.Clip(prefix), "--project-name", c.Project(b.id))
	if b.composeFile != "" {
		argv = append(argv, "--file", b.composeFile)
	}
	if b.withEnv {
		argv = append(argv, "--env-file", path.Join(b.dir(), envFile))
	}
	return sshx.InDir(b.checkout(), append(argv, args...)...), nil
}

// composeCommand finds the host's compose command once and remembers it.
func (c *ComposeSSH) composeCommand(ctx context.Context, h host) ([]string, error) {
	c.mu.Lock()
	cmd, ok := c.compose[h.name]
	c.mu.Unlock()
	if ok {
		return cmd, nil
	}
	plugin := []string{c.s.docker, "compose"}
	standalone := []string{c.s.dockerCompose}
	var candidates [][]string
	switch c.s.compose {
	case ComposePlugin:
		candidates = [][]string{plugin}
	case ComposeStandalone:
		candidates = [][]string{standalone}
	default:
		candidates = [][]string{plugin, standalone}
	}
	var tried []string
	for _, cand := range candidates {
		_, err := c.pool.Run(ctx, h.ssh, append(slices.Clip(cand), "version")...)
		var ee *sshx.ExitError
		switch {
		case err == nil:
			c.mu.Lock()
			c.compose[h.name] = cand
			c.mu.Unlock()
			return cand, nil
		case errors.As(err, &ee):
			tried = append(tried, strings.Join(cand, " "))
		default:
			return nil, fmt.Errorf("compose-ssh: finding compose on %s: %w", h.name, err)
		}
	}
	return nil, fmt.Errorf("compose-ssh: host %s has no compose command (tried %s)", h.name, strings.Join(tried, ", "))
}

// WaitReady waits until every service of the stack has its containers
// running, and healthy where the service has a health check.
func (c *ComposeSSH) WaitReady(ctx context.Context, hd extension.Handle) (extension.Reachability, error) {
	if err := ctx.Err(); err != nil {
		return extension.Reachability{}, err
	}
	b, err := c.fromHandle(hd)
	if err != nil {
		return extension.Reachability{}, fmt.Errorf("compose-ssh: %w", err)
	}
	project := c.Project(b.id)
	run := c.runner(b.host)
	argv, err := c.composeArgv(ctx, b, "config", "--services")
	if err != nil {
		return extension.Reachability{}, err
	}
	out, err := run(ctx, argv...)
	if err != nil {
		return extension.Reachability{}, fmt.Errorf("compose-ssh: listing services of %s: %w", project, err)
	}
	services := lines(out)
	if len(services) == 0 {
		return extension.Reachability{}, fmt.Errorf("compose-ssh: stack %s defines no service", project)
	}
	t := time.NewTimer(0)
	defer t.Stop()
	var waiting []string // what the last look found not ready
	var lastErr error    // why the last look failed, if it did
	for {
		select {
		case <-ctx.Done():
			return extension.Reachability{}, notReadyError(project, waiting, lastErr, ctx.Err())
		case <-t.C:
		}
		states, err := c.containers(ctx, b.host, project)
		var hke *sshx.HostKeyError
		switch {
		case errors.As(err, &hke):
			return extension.Reachability{}, fmt.Errorf("compose-ssh: %w", err)
		case err != nil && ctx.Err() != nil:
			return extension.Reachability{}, notReadyError(project, waiting, lastErr, ctx.Err())
		case err != nil:
			lastErr = err
		default:
			lastErr = nil
			waiting = notReady(services, states)
			if len(waiting) == 0 {
				return extension.Reachability{
					SSH:            b.host.ssh.Target.String(),
					RemoteDir:      b.checkout(),
					Host:           b.host.name,
					ComposeProject: project,
				}, nil
			}
		}
		t.Reset(c.s.poll)
	}
}

// notReadyError says why a stack is not ready when the wait ends: what
// the last look found, and the last error looking.
func notReadyError(project string, waiting []string, lastErr, cause error) error {
	var why []string
	if len(waiting) > 0 {
		why = append(why, strings.Join(waiting, "; "))
	}
	if lastErr != nil {
		why = append(why, "last error: "+lastErr.Error())
	}
	if len(why) == 0 {
		why = append(why, "not looked at yet")
	}
	return fmt.Errorf("compose-ssh: stack %s not ready (%s): %w", project, strings.Join(why, "; "), cause)
}

// container is what WaitReady needs of one container.
type container struct {
	service, status, health string
	exitCode                int
}

// inspectScript prints "service status health exit-code" for every
// non-one-off container of project $2, using docker CLI $1.
const inspectScript = `ids=$("$1" ps -aq --filter "label=` + labelProject + `=$2" --filter "label=` + labelOneOff + `=False")
[ -n "$ids" ] || exit 0
exec "$1" inspect --format '{{index .Config.Labels "` + labelService + `"}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}} {{.State.ExitCode}}' $ids`

func (c *ComposeSSH) containers(ctx context.Context, h host, project string) ([]container, error) {
	out, err := c.pool.Run(ctx, h.ssh, "sh", "-c", inspectScript, "sandboxer-inspect", c.s.docker, project)
	if err != nil {
		return nil, fmt.Errorf("inspecting stack %s: %w", project, err)
	}
	var cs []container
	for _, l := range lines(out) {
		f := strings.Fields(l)
		if len(f) != 4 {
			return nil, fmt.Errorf("inspecting stack %s: unexpected line %q", project, l)
		}
		code, _ := strconv.Atoi(f[3])
		cs = append(cs, container{service: f[0], status: f[1], health: f[2], exitCode: code})
	}
	return cs, nil
}

// notReady describes each service that is not ready yet.
func notReady(services []string, cs []container) []string {
	var out []string
	for _, svc := range services {
		n := 0
		for _, ct := range cs {
			if ct.service != svc {
				continue
			}
			n++
			switch {
			case ct.status == "exited":
				out = append(out, fmt.Sprintf("%s exited with code %d", svc, ct.exitCode))
			case ct.status != "running":
				out = append(out, fmt.Sprintf("%s is %s", svc, ct.status))
			case ct.health != "none" && ct.health != "healthy":
				out = append(out, fmt.Sprintf("%s is %s", svc, ct.health))
			}
		}
		if n == 0 {
			out = append(out, svc+" has no container")
		}
	}
	return out
}

// Teardown takes the stack down with its volumes and orphans, removes
// whatever still carries the project's label, removes the sandbox's
// directory, and reports each container, network, volume and directory
// removed. It works from a partial handle (sandbox id and host) and
// succeeds on a sandbox already gone.
func (c *ComposeSSH) Teardown(ctx context.Context, hd extension.Handle) (extension.CleanupReport, error) {
	var rep extension.CleanupReport
	if err := ctx.Err(); err != nil {
		return rep, err
	}
	b, err := c.fromHandle(hd)
	if err != nil {
		return rep, fmt.Errorf("compose-ssh: %w", err)
	}
	unlock, err := c.locks.Lock(ctx, b.id)
	if err != nil {
		return rep, err
	}
	defer unlock()
	project := c.Project(b.id)
	run := c.runner(b.host)
	before, err := c.resources(ctx, b.host, project)
	if err != nil {
		return rep, fmt.Errorf("compose-ssh: %w", err)
	}
	exists, err := workspace.Exists(ctx, run, b.host.base, b.id)
	if err != nil {
		return rep, fmt.Errorf("compose-ssh: %w", err)
	}
	if exists && len(before) > 0 {
		argv, err := c.composeArgv(ctx, b, "down", "--volumes", "--remove-orphans", "--timeout", strconv.Itoa(int(c.s.stopTimeout.Seconds())))
		if err == nil {
			_, err = run(ctx, argv...)
		}
		if err != nil {
			if ctx.Err() != nil {
				return rep, fmt.Errorf("compose-ssh: taking stack %s down: %w", project, err)
			}
			// The sweep below removes what down left.
			c.log.WarnContext(ctx, "compose down failed; removing the project's resources by label", "sandbox", b.id, "project", project, "err", err)
		}
	}
	if len(before) > 0 {
		left, err := c.sweep(ctx, b.host, project)
		if err != nil {
			return rep, fmt.Errorf("compose-ssh: %w", err)
		}
		if len(left) > 0 {
			return rep, fmt.Errorf("compose-ssh: stack %s: could not remove %s", project, strings.Join(left, ", "))
		}
	}
	dirs, err := workspace.Remove(ctx, run, b.host.base, b.id)
	rep.Removed = append(rep.Removed, before...)
	for _, d := range dirs {
		rep.Removed = append(rep.Removed, "dir:"+d)
	}
	if err != nil {
		return rep, fmt.Errorf("compose-ssh: %w", err)
	}
	rep.AlreadyGone = len(rep.Removed) == 0
	c.log.InfoContext(ctx, "compose sandbox removed", "sandbox", b.id, "host", b.host.name, "removed", rep.Removed)
	return rep, nil
}

// listScript prints "kind name" for every container, network and volume
// carrying the project label $2, using docker CLI $1.
const listScript = `set -e
f="label=` + labelProject + `=$2"
"$1" ps -a --filter "$f" --format 'container:{{.Names}}'
"$1" network ls --filter "$f" --format 'network:{{.Name}}'
"$1" volume ls --filter "$f" --format 'volume:{{.Name}}'`

// sweepScript removes every container, network and volume carrying the
// project label $2, then lists what is left, as listScript does.
const sweepScript = `f="label=` + labelProject + `=$2"
ids=$("$1" ps -aq --filter "$f")
[ -z "$ids" ] || "$1" rm --force --volumes $ids >/dev/null
ids=$("$1" network ls -q --filter "$f")
[ -z "$ids" ] || "$1" network rm $ids >/dev/null
ids=$("$1" volume ls -q --filter "$f")
[ -z "$ids" ] || "$1" volume rm --force $ids >/dev/null
` + listScript

// resources lists what exists of a project, as "container:name",
// "network:name" and "volume:name".
func (c *ComposeSSH) resources(ctx context.Context, h host, project string) ([]string, error) {
	out, err := c.pool.Run(ctx, h.ssh, "sh", "-c", listScript, "sandboxer-list", c.s.docker, project)
	if err != nil {
		return nil, fmt.Errorf("listing resources of %s: %w", project, err)
	}
	return lines(out), nil
}

func (c *ComposeSSH) sweep(ctx context.Context, h host, project string) ([]string, error) {
	out, err := c.pool.Run(ctx, h.ssh, "sh", "-c", sweepScript, "sandboxer-sweep", c.s.docker, project)
	if err != nil {
		return nil, fmt.Errorf("removing resources of %s: %w", project, err)
	}
	return lines(out), nil
}

// heldScript prints, one a line and fields separated by '|', every
// container and network ("kind|project|name|created") and volume
// ("volume|project|name") carrying the compose project label, using
// docker CLI $1, then every finished workspace and partial attempt under
// base directory $2 ("dir|mtime in epoch seconds|name").
var heldScript = `set -u
"$1" ps -a --filter "label=` + labelProject + `" --format 'container|{{.Label "` + labelProject + `"}}|{{.Names}}|{{.CreatedAt}}' || exit 1
"$1" network ls --filter "label=` + labelProject + `" --format 'network|{{.Label "` + labelProject + `"}}|{{.Name}}|{{.CreatedAt}}' || exit 1
"$1" volume ls --filter "label=` + labelProject + `" --format 'volume|{{.Label "` + labelProject + `"}}|{{.Name}}' || exit 1
` + workspace.HeldLoop(`"$2"`, "dir|")

// dockerTime is how docker ps and docker network ls print CreatedAt.
const dockerTime = "2006-01-02 15:04:05.999999999 -0700 MST"

// List returns, host by host, every sandbox of which a compose project
// named with the project prefix, or a workspace directory, exists: its
// containers, networks and volumes (by the compose project label) and its
// directories, with a partial handle Teardown accepts and the creation
// time of the oldest of them. A project is the sandbox's whose workspace
// it is; without a workspace, the sandbox whose id is the project name
// (sand-boxer's ids carry the default prefix, "sbx-"). A host that cannot
// be listed is named in the error, the others' sandboxes returned.
func (c *ComposeSSH) List(ctx context.Context) ([]extension.Held, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var (
		out  []extension.Held
		errs []error
	)
	for _, name := range slices.Sorted(maps.Keys(c.s.hosts)) {
		h := c.s.hosts[name]
		held, err := c.listHost(ctx, h)
		if err != nil {
			if ctx.Err() != nil {
				return out, ctx.Err()
			}
			errs = append(errs, fmt.Errorf("compose-ssh: listing what %s holds: %w", name, err))
			continue
		}
		out = append(out, held...)
	}
	return out, errors.Join(errs...)
}

// heldItem is one thing List found: its resource name and when it was
// made (zero: unknown).
type heldItem struct {
	resource string
	at       time.Time
}

func (c *ComposeSSH) listHost(ctx context.Context, h host) ([]extension.Held, error) {
	out, err := c.pool.Run(ctx, h.ssh, "sh", "-c", heldScript, "sandboxer-held", c.s.docker, h.base)
	if err != nil {
		return nil, err
	}
	dirs := map[string][]heldItem{}     // sandbox id -> its directories
	projects := map[string][]heldItem{} // project -> its containers, networks, volumes
	for _, l := range lines(out) {
		f := strings.Split(l, "|")
		switch {
		case f[0] == "dir" && len(f) == 3:
			id, _, _ := strings.Cut(strings.TrimPrefix(f[2], ".tmp-"), ".")
			if workspace.CheckID(id) != nil {
				continue
			}
			var at time.Time
			if sec, err := strconv.ParseInt(f[1], 10, 64); err == nil {
				at = time.Unix(sec, 0)
			}
			dirs[id] = append(dirs[id], heldItem{"dir:" + path.Join(h.base, f[2]), at})
		case (f[0] == "container" || f[0] == "network") && len(f) == 4, f[0] == "volume" && len(f) == 3:
			if !strings.HasPrefix(f[1], c.s.prefix) {
				continue // not one of ours
			}
			var at time.Time
			if len(f) == 4 {
				at, _ = time.Parse(dockerTime, f[3])
			}
			projects[f[1]] = append(projects[f[1]], heldItem{f[0] + ":" + f[2], at})
		}
	}
	byID := map[string][]heldItem{}
	for id, its := range dirs {
		byID[id] = its
	}
	for p, its := range projects {
		id, ok := c.sandboxOf(p, dirs)
		if !ok {
			continue
		}
		byID[id] = append(its, byID[id]...)
	}
	held := make([]extension.Held, 0, len(byID))
	for _, id := range slices.Sorted(maps.Keys(byID)) {
		hd := extension.Held{Handle: c.handle(sandbox{id: id, host: h})}
		for _, it := range byID[id] {
			hd.Resources = append(hd.Resources, it.resource)
			if !it.at.IsZero() && (hd.Since.IsZero() || it.at.Before(hd.Since)) {
				hd.Since = it.at
			}
		}
		held = append(held, hd)
	}
	return held, nil
}

// sandboxOf returns the sandbox whose compose project is project: the
// one of the ids Project maps to it that has a workspace, else the
// project name itself.
func (c *ComposeSSH) sandboxOf(project string, workspaces map[string][]heldItem) (string, bool) {
	var cands []string
	if workspace.CheckID(project) == nil {
		cands = append(cands, project) // Project(project) == project: it has the prefix
	}
	if rest := strings.TrimPrefix(project, c.s.prefix); !strings.HasPrefix(rest, c.s.prefix) && workspace.CheckID(rest) == nil {
		cands = append(cands, rest)
	}
	for _, id := range cands {
		if _, ok := workspaces[id]; ok {
			return id, true
		}
	}
	if len(cands) == 0 {
		return "", false
	}
	return cands[0], true
}

// Close closes the backend's SSH connections.
func (c *ComposeSSH) Close() error { return c.pool.Close() }

func lines(b []byte) []string {
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			out = append(out, l)
		}
	}
	return out
}

var (
	_ extension.Extension       = (*ComposeSSH)(nil)
	_ extension.Configurer      = (*ComposeSSH)(nil)
	_ extension.ManifestChecker = (*ComposeSSH)(nil)
	_ extension.Closer          = (*ComposeSSH)(nil)
	_ extension.Lister          = (*ComposeSSH)(nil)
)
