package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"
)

// Fault is one injection: Inject breaks something and puts it back, and
// says what it did (which container, which leader moved where).
type Fault struct {
	Name   string
	Inject func(ctx context.Context) (string, error)
}

// Schedule runs faults one after another, each once the cluster is
// healthy again after the last, and makes a row of each.
type Schedule struct {
	Cluster *Cluster
	Load    *Load
	Start   time.Time
	// Recover bounds the wait for the cluster to be healthy after a fault.
	Recover time.Duration
	// Workers is how many live workers each pool must have to be healthy.
	Workers int
	// Quiet is the load's time between one fault's recovery and the next.
	Quiet time.Duration
	// Log gets a line per fault as it happens.
	Log func(format string, args ...any)
}

// Run injects every fault in turn and returns a row for each.
func (s *Schedule) Run(ctx context.Context, faults []Fault) []Row {
	var rows []Row
	for _, f := range faults {
		if ctx.Err() != nil {
			rows = append(rows, Row{Fault: f.Name, When: time.Since(s.Start), Outcome: "not run: " + ctx.Err().Error(), Failed: true})
			continue
		}
		if err := sleepCtx(ctx, s.Quiet); err != nil {
			continue
		}
		began := time.Now()
		s.Log("fault %s", f.Name)
		detail, err := f.Inject(ctx)
		row := Row{Fault: f.Name, When: began.Sub(s.Start)}
		if err != nil {
			row.Outcome, row.Failed = "injection failed: "+err.Error(), true
		}
		took, herr := s.Cluster.AwaitHealthy(ctx, s.Recover, s.Workers)
		switch {
		case herr != nil:
			row.Outcome, row.Failed = strings.TrimSpace(row.Outcome+" not healthy again: "+herr.Error()), true
		case err == nil:
			row.Outcome = fmt.Sprintf("healthy %.1fs after the fault ended", took.Seconds())
		}
		row.Effect = effect(detail, s.Load.Ops(), began, time.Now())
		s.Log("fault %s: %s; %s", f.Name, row.Effect, row.Outcome)
		rows = append(rows, row)
	}
	return rows
}

// effect describes the client steps that overlapped [from, to].
func effect(detail string, ops []Op, from, to time.Time) string {
	n, failed, failovers := 0, 0, 0
	var slowest time.Duration
	for _, o := range ops {
		if o.At.Before(from) || o.At.Add(-o.Took).After(to) {
			continue
		}
		n++
		if o.Failed {
			failed++
		}
		failovers += o.Failovers
		slowest = max(slowest, o.Took)
	}
	s := fmt.Sprintf("%d steps, %d failed, %d failovers, slowest %.1fs", n, failed, failovers, slowest.Seconds())
	if detail != "" {
		s = detail + "; " + s
	}
	return s
}

// killRestart is kill -9 of container, down for a while, then started.
func (c *Cluster) killRestart(ctx context.Context, container string, down time.Duration) error {
	if _, err := c.docker(ctx, "kill", "-s", "KILL", container); err != nil {
		return err
	}
	if err := sleepCtx(ctx, down); err != nil {
		return err
	}
	if _, err := c.docker(ctx, "start", container); err != nil {
		return err
	}
	return c.AwaitContainerReady(ctx, container, time.Minute)
}

// KillService is kill -9 of the first container of a compose service.
func KillService(c *Cluster, service string, down time.Duration) Fault {
	return Fault{Name: "kill -9 " + service, Inject: func(ctx context.Context) (string, error) {
		names, err := c.Containers(ctx, service)
		if err != nil {
			return "", err
		}
		return names[0], c.killRestart(ctx, names[0], down)
	}}
}

// KillNode is kill -9 of the NATS node that leader finds, after which it
// waits (within down) for another node to lead before starting it again.
func KillNode(c *Cluster, name string, leader func(context.Context) (string, error), down time.Duration) Fault {
	return Fault{Name: name, Inject: func(ctx context.Context) (string, error) {
		old, err := leader(ctx)
		if err != nil {
			return "", err
		}
		container, err := c.NodeContainer(ctx, old)
		if err != nil {
			return "", err
		}
		if _, err := c.docker(ctx, "kill", "-s", "KILL", container); err != nil {
			return "", err
		}
		t := time.Now()
		var now string
		perr := poll(ctx, down, 250*time.Millisecond, func() error {
			l, err := leader(ctx)
			if err != nil {
				return err
			}
			if l == old {
				return fmt.Errorf("still led by %s", old)
			}
			now = l
			return nil
		})
		detail := fmt.Sprintf("%s was leader; %s led %.1fs later", old, now, time.Since(t).Seconds())
		if perr != nil {
			detail = fmt.Sprintf("%s was leader; no other leader: %v", old, perr)
		}
		_, err = c.docker(ctx, "start", container)
		if perr != nil && err == nil {
			err = perr
		}
		return detail, err
	}}
}

// Partition takes the node that pick names off the compose network for
// d, then connects it again under the same aliases.
func Partition(c *Cluster, pick func(context.Context) (string, error), d time.Duration) Fault {
	return Fault{Name: fmt.Sprintf("partition a NATS node %s", d), Inject: func(ctx context.Context) (string, error) {
		node, err := pick(ctx)
		if err != nil {
			return "", err
		}
		container, err := c.NodeContainer(ctx, node)
		if err != nil {
			return "", err
		}
		out, err := c.docker(ctx, "inspect", "-f", "{{.Id}} {{json .NetworkSettings.Networks}}", container)
		if err != nil {
			return "", err
		}
		id, js, _ := strings.Cut(out, " ")
		var nets map[string]struct{ Aliases []string }
		if err := json.Unmarshal([]byte(js), &nets); err != nil {
			return "", fmt.Errorf("reading networks of %s: %w", container, err)
		}
		if _, err := c.docker(ctx, "network", "disconnect", c.Network, container); err != nil {
			return "", err
		}
		werr := sleepCtx(ctx, d)
		// Back under the same names (the service's, which the routes
		// dial), but for the container id's, which Docker adds itself.
		args := []string{"network", "connect"}
		for _, a := range nets[c.Network].Aliases {
			if !strings.HasPrefix(id, a) {
				args = append(args, "--alias", a)
			}
		}
		args = append(args, c.Network, container)
		_, err = c.docker(context.WithoutCancel(ctx), args...)
		if err == nil {
			err = werr
		}
		return fmt.Sprintf("%s off %s for %s", node, c.Network, d), err
	}}
}

// Pause freezes the first container of service for d (docker pause),
// then thaws it.
func Pause(c *Cluster, service string, d time.Duration) Fault {
	return Fault{Name: fmt.Sprintf("docker pause %s %s", service, d), Inject: func(ctx context.Context) (string, error) {
		names, err := c.Containers(ctx, service)
		if err != nil {
			return "", err
		}
		if _, err := c.docker(ctx, "pause", names[0]); err != nil {
			return "", err
		}
		werr := sleepCtx(ctx, d)
		_, err = c.docker(context.WithoutCancel(ctx), "unpause", names[0])
		if err == nil {
			err = werr
		}
		if err == nil {
			err = c.AwaitContainerReady(ctx, names[0], time.Minute)
		}
		return names[0], err
	}}
}

// RollingRestart restarts every container of services in turn (docker
// restart: SIGTERM, drain, start), each once the cluster is healthy again.
func RollingRestart(c *Cluster, services []string, recover time.Duration, workers int) Fault {
	return Fault{Name: "rolling restart", Inject: func(ctx context.Context) (string, error) {
		n := 0
		for _, svc := range services {
			names, err := c.Containers(ctx, svc)
			if err != nil {
				return "", err
			}
			for _, name := range names {
				if _, err := c.docker(ctx, "restart", "-t", "40", name); err != nil {
					return "", err
				}
				if err := c.AwaitContainerReady(ctx, name, time.Minute); err != nil {
					return fmt.Sprintf("%d containers restarted", n), fmt.Errorf("%s not ready after its restart: %w", name, err)
				}
				if _, err := c.AwaitHealthy(ctx, recover, workers); err != nil {
					return fmt.Sprintf("%d containers restarted", n), fmt.Errorf("after restarting %s: %w", name, err)
				}
				n++
			}
		}
		return fmt.Sprintf("%d containers, one at a time", n), nil
	}}
}
