package main

import (
	"strings"
	"testing"
	"time"

	"github.com/sand-boxer/sandboxer/pkg/api"
)

// TestPrintWorkers: the pools' table, the placement hosts of a host-bound
// pool (a host with commands and no worker says it waits), and the live
// workers.
func TestPrintWorkers(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	l := &api.WorkerList{Pools: []api.WorkerPool{
		{Extension: "local", Capacity: 1000, MaxInFlight: 64, Pending: 3, InFlight: 1,
			LiveWorkers: []api.Worker{{Worker: "w-1", Host: "host-b", PID: 7, Concurrency: 8, InFlight: 1, StartedAt: now, SeenAt: now.Add(-2 * time.Second)}},
			Hosts: []api.WorkerHost{
				{Host: "host-a", Pending: 2},
				{Host: "host-b", LiveWorkers: 1, Pending: 1, InFlight: 1},
			}},
		{Extension: "saas-stub", MaxInFlight: 256, QueueError: "no durable consumer provisioner-saas-stub"},
	}}
	var b strings.Builder
	if err := printWorkers(&b, l, now); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	want := [][]string{
		{"EXTENSION", "WORKERS", "IN FLIGHT", "MAX IN FLIGHT", "PENDING", "CAPACITY"},
		{"local", "1", "1", "64", "3", "1000"},
		{"saas-stub", "0", "?", "256", "? (no durable consumer provisioner-saas-stub)", "unbounded"},
		nil,
		{"EXTENSION", "HOST", "WORKERS", "IN FLIGHT", "PENDING"},
		{"local", "host-a", "0", "0", "2 (waiting for a worker on this host)"},
		{"local", "host-b", "1", "1", "1"},
		nil,
		{"EXTENSION", "WORKER", "HOST", "PID", "CONCURRENCY", "IN FLIGHT", "STARTED", "SEEN"},
		{"local", "w-1", "host-b", "7", "8", "1"},
	}
	if len(lines) != len(want) {
		t.Fatalf("%d lines, want %d:\n%s", len(lines), len(want), b.String())
	}
	for i, cells := range want {
		pos := 0
		for _, c := range cells {
			j := strings.Index(lines[i][pos:], c)
			if j < 0 {
				t.Errorf("line %d %q lacks %q after column %d", i, lines[i], c, pos)
				break
			}
			pos += j + len(c)
		}
		if cells == nil && strings.TrimSpace(lines[i]) != "" {
			t.Errorf("line %d = %q, want a blank line between tables", i, lines[i])
		}
	}
	if !strings.HasSuffix(lines[len(lines)-1], "2s ago") {
		t.Errorf("worker line %q, want seen 2s ago", lines[len(lines)-1])
	}
}
