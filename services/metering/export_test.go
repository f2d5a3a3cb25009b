package metering

import "sync/atomic"

// KillBeforeCommit arms m so that the next account commit it makes sends
// every message of its batch but the commit, then closes m's connection,
// as a kill -9 of the process there would. disarm disarms it and reports
// whether it fired.
func KillBeforeCommit(m *Metering) (disarm func() bool) {
	var done atomic.Bool
	nc := m.store.js.Conn()
	kill := func() {
		if done.CompareAndSwap(false, true) {
			_ = nc.Flush() // the batch so far reached the server
			nc.Close()
		}
	}
	m.store.beforeCommit.Store(&kill)
	return func() bool {
		m.store.beforeCommit.Store(nil)
		return !done.CompareAndSwap(false, true)
	}
}

// FailCommits makes every account commit of m fail until stop is called.
func FailCommits(m *Metering) (stop func()) {
	m.store.failCommit.Store(true)
	return func() { m.store.failCommit.Store(false) }
}
