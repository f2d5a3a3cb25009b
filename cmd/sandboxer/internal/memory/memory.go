// Package memory gives a quiet process's freed memory back to the
// operating system.
//
// The Go runtime collects garbage when the heap grows, and returns freed
// pages to the operating system slowly. A control plane sees bursts (ten
// thousand creates, then hours of holding them): after a burst, the
// garbage it left is not even collected until the next collection, which
// in a quiet process comes only from the runtime's two-minute forced
// cycle, and its pages go back over minutes more. Its resident set stays
// at the burst's peak meanwhile.
package memory

import (
	"context"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

const gcCycles = "/gc/cycles/total:gc-cycles"

// ReleaseWhenIdle runs until ctx ends. Every interval it reads how many
// garbage collections have run. When none ran during the last interval
// (the process is quiet) but some ran since it last released (there was
// work), it collects and returns every free page to the operating system
// (debug.FreeOSMemory), once. Under load the collector runs more often
// than every interval, and this does nothing; a quiet process pays one
// collection per quiet spell.
func ReleaseWhenIdle(ctx context.Context, interval time.Duration) {
	if interval <= 0 {
		return
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	last := cycles()
	var released uint64 // a collection before the start counts as work
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := cycles()
		if now == last && now != released {
			debug.FreeOSMemory()
			now = cycles()
			released = now
		}
		last = now
	}
}

func cycles() uint64 {
	s := []metrics.Sample{{Name: gcCycles}}
	metrics.Read(s)
	if s[0].Value.Kind() != metrics.KindUint64 {
		return 0
	}
	return s[0].Value.Uint64()
}
