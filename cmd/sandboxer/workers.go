package main

import (
	"context"
	"fmt"
	"io"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/sand-boxer/sandboxer/pkg/api"
)

func newWorkersCmd(g *globals) *cobra.Command {
	return readCmd(g, &cobra.Command{
		Use:   "workers",
		Short: "Show the worker pools: per backend its live workers, commands in flight and pending, capacities",
		Args:  cobra.NoArgs,
	},
		func(ctx context.Context, c *api.Client, _ []string) (*api.WorkerList, error) { return c.Workers(ctx) },
		func(w io.Writer, l *api.WorkerList) error { return printWorkers(w, l, time.Now()) })
}

// printWorkers writes one table of pools, one of the placement hosts of
// host-bound pools, and one of their live workers.
func printWorkers(w io.Writer, l *api.WorkerList, now time.Time) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "EXTENSION\tWORKERS\tIN FLIGHT\tMAX IN FLIGHT\tPENDING\tCAPACITY")
	live := 0
	for _, p := range l.Pools {
		capacity := "unbounded"
		if p.Capacity > 0 {
			capacity = strconv.Itoa(p.Capacity)
		}
		inFlight, pending := strconv.Itoa(p.InFlight), strconv.FormatUint(p.Pending, 10)
		if p.QueueError != "" {
			inFlight, pending = "?", "? ("+p.QueueError+")"
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%d\t%s\t%s\n", p.Extension, len(p.LiveWorkers), inFlight, p.MaxInFlight, pending, capacity)
		live += len(p.LiveWorkers)
	}
	hosts := false
	for _, p := range l.Pools {
		hosts = hosts || len(p.Hosts) > 0
	}
	if hosts {
		fmt.Fprintln(tw)
		fmt.Fprintln(tw, "EXTENSION\tHOST\tWORKERS\tIN FLIGHT\tPENDING")
		for _, p := range l.Pools {
			for _, h := range p.Hosts {
				inFlight, pending := strconv.Itoa(h.InFlight), strconv.FormatUint(h.Pending, 10)
				switch {
				case h.QueueError != "":
					inFlight, pending = "?", "? ("+h.QueueError+")"
				case h.LiveWorkers == 0 && h.Pending > 0:
					pending += " (waiting for a worker on this host)"
				}
				fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", p.Extension, h.Host, h.LiveWorkers, inFlight, pending)
			}
		}
	}
	if live > 0 {
		fmt.Fprintln(tw)
		fmt.Fprintln(tw, "EXTENSION\tWORKER\tHOST\tPID\tCONCURRENCY\tIN FLIGHT\tSTARTED\tSEEN")
		for _, p := range l.Pools {
			for _, wk := range p.LiveWorkers {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%d\t%s\t%s ago\n", p.Extension, wk.Worker, wk.Host, wk.PID,
					wk.Concurrency, wk.InFlight, wk.StartedAt.Local().Format(time.DateTime), now.Sub(wk.SeenAt).Round(time.Second))
			}
		}
	}
	return tw.Flush()
}
