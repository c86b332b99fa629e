package vhost

import (
	"fmt"
	"runtime"
	"time"

	"github.com/hemd/hemd/vhost/virtq"
	"golang.org/x/sys/unix"
)

// loopStream is loop for a StreamHandler: chains are started as the driver
// makes them available and put on the used ring as the handler finishes
// them. Before it returns (the ring stops: GET_VRING_BASE, a live migration's
// switchover) every chain in flight is completed and published. After a
// fault (guest memory gone) the handler's Close waits for what is still in
// flight instead: nothing is written to the ring then.
func (r *runner) loopStream(q *virtq.Queue, h StreamHandler, io *ringIO) error {
	// One chain per descriptor of the ring: a driver cannot have more in
	// flight (a hostile one repeating heads only makes the runner wait).
	free := make([]*virtq.Chain, q.Size())
	for i := range free {
		free[i] = &virtq.Chain{Segs: make([]virtq.Seg, 0, 4)}
	}
	pushed := 0
	complete := func(c *virtq.Chain, written uint32) {
		r.complete(q, io, c, written)
		free = append(free, c)
		pushed++
	}
	publish := func() {
		if pushed > 0 {
			r.publish(q, io)
			pushed = 0
		}
	}
	// reap completes what is finished; with wait (no room to start more)
	// the driver first sees what is already complete.
	reap := func(wait bool) {
		if wait {
			publish()
		}
		h.Reap(wait, complete)
		publish()
	}
	// drain completes every chain in flight: the ring is stopping.
	drain := func() {
		h.Submit()
		for h.InFlight() > 0 {
			reap(true)
		}
		reap(false)
	}
	// waitRoom reaps until the handler can take another chain.
	waitRoom := func() {
		for !h.Room() || len(free) == 0 {
			h.Submit()
			if h.InFlight() == 0 {
				// Nothing will free room: a handler bug, not the driver's.
				panic(fmt.Sprintf("vhost: stream handler has no room and nothing in flight (%d chains free)", len(free)))
			}
			reap(true)
		}
	}
	// Requests a previous back-end took and never completed come first,
	// one by one in the order it took them, before anything new.
	for _, head := range io.resubmit {
		c := free[0]
		if err := q.ChainAt(head, c); err != nil {
			return err
		}
		r.serve(q, h, io, c)
	}
	if len(io.resubmit) > 0 {
		r.publish(q, io)
		io.resubmit = nil
	}

	kick := io.kick
	// The runner sleeps in the handler (on its io_uring), woken by a
	// request finishing, a kick or the stop fd; a ring without a kick fd
	// (polling) is looked at every pollIntervalMs while nothing is in
	// flight, else after each completion.
	fds, ready := []int{r.stop, kick}, make([]bool, 2)
	if kick < 0 {
		fds = fds[:1]
	}
	stopFds := []unix.PollFd{{Fd: int32(r.stop), Events: unix.POLLIN}}
	var buf [8]byte
	cpus := io.cpus
	if cpus == nil {
		cpus = NewCPUShare(0)
	}
	busy := true
	cpus.start()
	defer func() {
		if busy {
			cpus.stop()
		}
	}()
	for {
		for {
			q.DisableNotify()
			n := 0
			for {
				waitRoom()
				c := free[len(free)-1]
				ok, err := q.Next(c)
				if err != nil {
					drain()
					return err
				}
				if !ok {
					break
				}
				free = free[:len(free)-1]
				if io.inflight != nil {
					io.inflight.take(c.Head)
				}
				h.Start(c, complete)
				if n++; n == batchLimit {
					h.Submit()
					reap(false)
					n = 0
				}
			}
			h.Submit()
			reap(false)
			if cpus.crowded() {
				runtime.Gosched()
			}
			// Spin for the driver's next request only with nothing in
			// flight: otherwise a completion wakes the runner anyway, and
			// spinning cost 4 KiB requests 15-20 % (PERFORMANCE.md).
			if io.kick >= 0 && io.poll > 0 && cpus.canSpin() && h.InFlight() == 0 {
				more, err := r.spinStream(q, h, io)
				if err != nil {
					drain()
					return err
				}
				if more {
					reap(false)
					continue
				}
			}
			more, err := q.EnableNotify()
			if err != nil {
				drain()
				return err
			}
			io.markUsed(q)
			if !more && !h.Ready() {
				break
			}
			reap(false)
		}
		cpus.stop()
		busy = false
		clear(ready)
		if kick < 0 && h.InFlight() == 0 {
			if _, err := unix.Poll(stopFds, pollIntervalMs); err != nil && err != unix.EINTR {
				drain()
				return fmt.Errorf("poll: %w", err)
			}
			ready[0] = stopFds[0].Revents != 0
		} else {
			h.Sleep(fds, ready, complete)
		}
		cpus.start()
		busy = true
		if ready[0] {
			drain()
			return nil
		}
		if kick >= 0 && ready[1] {
			if _, err := unix.Read(kick, buf[:]); err != nil && err != unix.EAGAIN && err != unix.EINTR {
				drain()
				return fmt.Errorf("kick fd: %w", err)
			}
		}
		reap(false)
	}
}

// spinStream is spin for a stream: it looks at the ring and at the
// handler's completions for up to io.poll, notifications off, and reports
// whether either has something.
func (r *runner) spinStream(q *virtq.Queue, h StreamHandler, io *ringIO) (bool, error) {
	deadline := time.Now().Add(io.poll)
	for i := 0; ; i++ {
		n, err := q.Pending()
		if err != nil || n > 0 {
			return n > 0, err
		}
		if h.Ready() {
			return true, nil
		}
		if r.stopping.Load() || i%16 == 15 && time.Now().After(deadline) {
			return false, nil
		}
	}
}
