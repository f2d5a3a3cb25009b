package memory

import (
	"context"
	"runtime"
	"runtime/metrics"
	"testing"
	"time"
)

func released() uint64 {
	s := []metrics.Sample{{Name: "/memory/classes/heap/released:bytes"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

var sink [][]byte

// TestReleasesAfterABurst: garbage left by a burst goes back to the
// operating system once the process is quiet, without waiting for the
// runtime's forced collection.
func TestReleasesAfterABurst(t *testing.T) {
	for range 64 {
		sink = append(sink, make([]byte, 1<<20))
	}
	runtime.GC() // a collection during the burst: there was work
	sink = nil   // 64 MiB of garbage, not yet collected
	before := released()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); ReleaseWhenIdle(ctx, 50*time.Millisecond) }()
	defer func() { cancel(); <-done }()
	// The runtime's background scavenger alone takes seconds for this.
	deadline := time.Now().Add(time.Second)
	for released() < before+32<<20 {
		if time.Now().After(deadline) {
			t.Fatalf("released %d bytes more after 1s, want the burst's 64 MiB back", released()-before)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestQuietProcessReleasesOnce: with no collection since the last release,
// nothing more is forced.
func TestQuietProcessReleasesOnce(t *testing.T) {
	runtime.GC()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); ReleaseWhenIdle(ctx, 20*time.Millisecond) }()
	// Wait for the first release (one forced cycle), then watch that no
	// more follow while nothing else collects.
	start := cycles()
	deadline := time.Now().Add(5 * time.Second)
	for cycles() == start {
		if time.Now().After(deadline) {
			t.Fatal("no release after a collection and a quiet interval")
		}
		time.Sleep(5 * time.Millisecond)
	}
	after := cycles()
	time.Sleep(200 * time.Millisecond) // ten intervals: the thing observed is that nothing happens
	cancel()
	<-done
	if n := cycles() - after; n != 0 {
		t.Fatalf("%d more collections in a quiet process, want 0", n)
	}
}
