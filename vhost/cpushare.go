package vhost

import (
	"runtime"
	"sync/atomic"
)

// CPUShare is what the queues of every Server of a process share: the CPUs
// the Go scheduler runs them on. A queue's goroutine runs on a thread of its
// own with the asynchronous signals blocked (shield), so the runtime cannot
// preempt it by signal: a queue that always finds work would keep its CPU
// for the scheduler's 10 ms slice while other volumes' queues wait. Queues
// count themselves busy here; while more are busy than there are CPUs, each
// yields after every batch, and a queue polls its ring (Server.PollTime)
// only while a CPU is left for the others.
type CPUShare struct {
	cpus int32
	busy atomic.Int32
}

// NewCPUShare returns a share of cpus CPUs (GOMAXPROCS if cpus < 1).
func NewCPUShare(cpus int) *CPUShare {
	if cpus < 1 {
		cpus = runtime.GOMAXPROCS(0)
	}
	return &CPUShare{cpus: int32(cpus)}
}

// start and stop count a queue busy from the moment it wakes until it
// sleeps again.
func (s *CPUShare) start() { s.busy.Add(1) }
func (s *CPUShare) stop()  { s.busy.Add(-1) }

// crowded reports whether more queues are busy than there are CPUs.
func (s *CPUShare) crowded() bool { return s.busy.Load() > s.cpus }

// canSpin reports whether a busy queue may poll its ring: a CPU is left for
// the others.
func (s *CPUShare) canSpin() bool { return s.busy.Load() < s.cpus }
