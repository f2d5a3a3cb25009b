package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"os/exec"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sand-boxer/sandboxer/pkg/api"
)

// Cluster is the compose cluster as the suite drives it: the Docker CLI
// for its containers, the gateways, the nodes' monitoring ports and the
// bus as the admin.
type Cluster struct {
	// Project is the compose project (COMPOSE_PROJECT_NAME).
	Project string
	// Network is the compose network the nodes are on.
	Network string
	// Monitors are the nodes' monitoring URLs by server name.
	Monitors map[string]string
	// Gateways are the gateways' base URLs.
	Gateways []string
	// Admin is a client of the first gateway with the admin key.
	Admin *api.Client
	// JS is JetStream as the admin.
	JS jetstream.JetStream
	// Docker is the docker command. Default "docker".
	Docker string
	// Busybox is an image with /bin/busybox, for what needs a shell tool
	// in a container's namespace or volumes.
	Busybox string
	hc      *http.Client
}

// docker runs the docker CLI with args and returns its trimmed stdout.
func (c *Cluster) docker(ctx context.Context, args ...string) (string, error) {
	bin := c.Docker
	if bin == "" {
		bin = "docker"
	}
	var out, errb bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("docker %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return strings.TrimSpace(out.String()), nil
}

// Containers returns the names of service's containers (the compose
// service, e.g. gateway-1 or provisioner-local), sorted, running or not.
func (c *Cluster) Containers(ctx context.Context, service string) ([]string, error) {
	out, err := c.docker(ctx, "ps", "-a", "--format", "{{.Names}}",
		"--filter", "label=com.docker.compose.project="+c.Project,
		"--filter", "label=com.docker.compose.service="+service)
	if err != nil {
		return nil, err
	}
	names := strings.Fields(out)
	if len(names) == 0 {
		return nil, fmt.Errorf("no container of service %s in project %s", service, c.Project)
	}
	slices.Sort(names)
	return names, nil
}

// NodeContainer is the container of NATS node name (n1, n2, n3).
func (c *Cluster) NodeContainer(ctx context.Context, name string) (string, error) {
	names, err := c.Containers(ctx, name)
	if err != nil {
		return "", err
	}
	return names[0], nil
}

// Running reports whether container is running and not paused.
func (c *Cluster) Running(ctx context.Context, container string) bool {
	out, err := c.docker(ctx, "inspect", "-f", "{{.State.Running}} {{.State.Paused}}", container)
	return err == nil && out == "true false"
}

// get answers whether GET url returned 200.
func (c *Cluster) get(ctx context.Context, url string, hdr http.Header, out any) error {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	if out == nil {
		return nil
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// Healthy returns nil when the whole cluster serves: every node healthy
// and in contact with a meta leader, every gateway ready, the local and
// saas-stub pools with every worker live, and every service container
// running. Otherwise it says what is not.
func (c *Cluster) Healthy(ctx context.Context, workers int) error {
	for _, n := range slices.Sorted(maps.Keys(c.Monitors)) {
		if err := c.get(ctx, c.Monitors[n]+"/healthz?js-enabled-only=true", nil, nil); err != nil {
			return fmt.Errorf("node %s: %w", n, err)
		}
		if _, err := c.MetaLeader(ctx, n); err != nil {
			return fmt.Errorf("node %s: %w", n, err)
		}
	}
	for _, g := range c.Gateways {
		if err := c.get(ctx, g+"/readyz", nil, nil); err != nil {
			return fmt.Errorf("gateway %s: %w", g, err)
		}
	}
	wctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	wl, err := c.Admin.Workers(wctx)
	if err != nil {
		return fmt.Errorf("listing workers: %w", err)
	}
	for _, ext := range []string{"local", "saas-stub"} {
		live := -1
		for _, p := range wl.Pools {
			if p.Extension == ext || strings.HasSuffix(p.Extension, "."+ext) {
				live = len(p.LiveWorkers)
			}
		}
		if live < workers {
			return fmt.Errorf("pool %s: %d live workers, want %d", ext, live, workers)
		}
	}
	out, err := c.docker(ctx, "ps", "-a", "--format", "{{.Names}} {{.State}}", "--filter", "label=com.docker.compose.project="+c.Project)
	if err != nil {
		return err
	}
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) == 2 && !strings.HasSuffix(f[0], "setup_1") && f[1] != "running" {
			return fmt.Errorf("container %s is %s", f[0], f[1])
		}
	}
	return nil
}

// ContainerReady returns nil once the sandboxer process in container
// answers its /readyz (started, NATS connected): the gateway's on :8080,
// every other service's --metrics on :9090. It asks from a throwaway
// container on the compose network, by the container's name (the image
// has no shell; busybox's wget does, though Debian's static one crashes
// with -T: the context bounds it), so it sees this process, not a
// heartbeat a restarted one left behind.
func (c *Cluster) ContainerReady(ctx context.Context, container, busybox string) error {
	port := "9090"
	if strings.Contains(container, "gateway") {
		port = "8080"
	}
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	_, err := c.docker(ctx, "run", "--rm", "--network", c.Network, "--entrypoint", "/bin/busybox", busybox,
		"wget", "-q", "-O", "/dev/null", "http://"+container+":"+port+"/readyz")
	return err
}

// AwaitContainerReady polls ContainerReady within d.
func (c *Cluster) AwaitContainerReady(ctx context.Context, container string, d time.Duration) error {
	return poll(ctx, d, time.Second, func() error { return c.ContainerReady(ctx, container, c.Busybox) })
}

// jsz is the part of a node's /jsz the suite reads.
type jsz struct {
	Meta *struct {
		Leader string `json:"leader"`
	} `json:"meta_cluster"`
}

// MetaLeader is the meta leader as node sees it (its /jsz), an error when
// it sees none.
func (c *Cluster) MetaLeader(ctx context.Context, node string) (string, error) {
	var j jsz
	if err := c.get(ctx, c.Monitors[node]+"/jsz", nil, &j); err != nil {
		return "", fmt.Errorf("reading /jsz: %w", err)
	}
	if j.Meta == nil || j.Meta.Leader == "" {
		return "", errors.New("no meta leader")
	}
	return j.Meta.Leader, nil
}

// AnyMetaLeader is the meta leader as the first node that answers sees it.
func (c *Cluster) AnyMetaLeader(ctx context.Context) (string, error) {
	var last error
	for _, n := range slices.Sorted(maps.Keys(c.Monitors)) {
		l, err := c.MetaLeader(ctx, n)
		if err == nil {
			return l, nil
		}
		last = err
	}
	return "", last
}

// StreamLeader is the leader of stream's raft group, from its stream info
// ($JS.API.STREAM.INFO) as the admin.
func (c *Cluster) StreamLeader(ctx context.Context, stream string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	s, err := c.JS.Stream(ctx, stream)
	if err != nil {
		return "", fmt.Errorf("stream info %s: %w", stream, err)
	}
	info := s.CachedInfo()
	if info.Cluster == nil || info.Cluster.Leader == "" {
		return "", fmt.Errorf("stream %s has no leader", stream)
	}
	return info.Cluster.Leader, nil
}

// AwaitHealthy polls Healthy until it passes or d has passed, and returns
// how long it took, or the last reason it was not healthy.
func (c *Cluster) AwaitHealthy(ctx context.Context, d time.Duration, workers int) (time.Duration, error) {
	start := time.Now()
	err := poll(ctx, d, 500*time.Millisecond, func() error { return c.Healthy(ctx, workers) })
	return time.Since(start), err
}

// poll calls cond every interval until it returns nil, d passes or ctx
// ends; it returns cond's last error then.
func poll(ctx context.Context, d, interval time.Duration, cond func() error) error {
	deadline := time.Now().Add(d)
	for {
		err := cond()
		if err == nil {
			return nil
		}
		if !time.Now().Add(interval).Before(deadline) {
			return fmt.Errorf("not after %s: %w", d, err)
		}
		t := time.NewTimer(interval)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("%w (last: %v)", ctx.Err(), err)
		case <-t.C:
		}
	}
}
