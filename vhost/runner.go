package vhost

import (
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"sync/atomic"
	"time"

	"github.com/hemd/hemd/hem/shield"
	"github.com/hemd/hemd/vhost/virtq"
	"golang.org/x/sys/unix"
)

// runner is the goroutine of one running queue. It owns the queue and its
// handler until stopAndWait returns.
type runner struct {
	stop     int         // eventfd: written to ask the goroutine to end
	stopping atomic.Bool // set with the write: ends a spin at once
	done     chan struct{}
}

// pollIntervalMs is how often a ring without a kick fd (polling mode) is
// looked at.
const pollIntervalMs = 1

// batchLimit bounds how many chains are completed before the used index is
// published and the driver notified, so that a full ring does not delay
// every completion until the end.
const batchLimit = 64

// DefaultPollTime is Server.PollTime's default: QEMU's iothreads poll up to
// 32 µs (poll-max-ns) too.
const DefaultPollTime = 32 * time.Microsecond

// ringIO is what a runner needs besides its queue: the notification fds,
// the dirty log and the inflight tracker.
type ringIO struct {
	idx      int
	kick     int // -1: polling
	call     int // -1: none
	dlog     *dirtyLog
	logUsed  bool   // VHOST_VRING_F_LOG: mark the used ring too
	usedGPA  uint64 // log address of the used ring
	inflight *inflightQueue
	resubmit []uint16      // heads to serve again first, oldest first
	poll     time.Duration // keep looking at the ring this long before sleeping
	cpus     *CPUShare     // shared with every queue of the process
}

func startRunner(q *virtq.Queue, h Handler, io ringIO, log *slog.Logger, fatal func(error)) (*runner, error) {
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	r := &runner{stop: efd, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		var err error
		where := fmt.Sprintf("queue %d", io.idx)
		shield.Run(func() {
			err = guarded(where, func() error { return r.loop(q, h, &io) })
			if c, ok := h.(interface{ Close() error }); ok {
				// A fault leaves the handler between requests or after
				// its I/O completed: closing it frees what it holds.
				if cerr := guarded(where, c.Close); cerr != nil && err == nil {
					err = cerr
				}
			}
		})
		var fe *FaultError
		switch {
		case errors.As(err, &fe):
			// The session names the region and logs it.
			fatal(err)
		case err != nil:
			log.Error("queue stopped: ring corrupt", "queue", io.idx, "err", err)
			fatal(fmt.Errorf("queue %d: %w", io.idx, err))
		}
	}()
	return r, nil
}

func (r *runner) stopAndWait() {
	r.stopping.Store(true)
	signal(r.stop)
	<-r.done
	unix.Close(r.stop)
}

func (r *runner) loop(q *virtq.Queue, h Handler, io *ringIO) error {
	if sh, ok := h.(StreamHandler); ok && sh.Streaming() {
		return r.loopStream(q, sh, io)
	}
	var chain virtq.Chain
	chain.Segs = make([]virtq.Seg, 0, q.Size())
	var b *batch
	if bh, ok := h.(BatchHandler); ok {
		b = newBatch(bh, min(batchLimit, int(q.Size())), int(q.Size()))
		b.early = func(n int) {
			for ; b.pushed < n; b.pushed++ {
				r.complete(q, io, &b.chains[b.pushed], b.written[b.pushed])
			}
			r.publish(q, io)
		}
	}
	kick := io.kick
	fds := []unix.PollFd{{Fd: int32(r.stop), Events: unix.POLLIN}, {Fd: int32(kick), Events: unix.POLLIN}}
	timeout := -1
	if kick < 0 {
		fds = fds[:1]
		timeout = pollIntervalMs
	}
	// Requests a previous back-end took and never completed come first, in
	// the order it took them.
	for _, head := range io.resubmit {
		if err := q.ChainAt(head, &chain); err != nil {
			return err
		}
		r.serve(q, h, io, &chain)
	}
	if len(io.resubmit) > 0 {
		r.publish(q, io)
		io.resubmit = nil
	}
	var buf [8]byte
	cpus := io.cpus
	if cpus == nil {
		cpus = NewCPUShare(0)
	}
	busy := true // counted in cpus
	cpus.start()
	defer func() {
		if busy {
			cpus.stop()
		}
	}()
	for {
		// Serve everything available, then re-enable notifications and look
		// again: a request added meanwhile may come without a kick.
		for {
			q.DisableNotify()
			n := 0
			for {
				c := &chain
				if b != nil {
					c = b.next()
				}
				ok, err := q.Next(c)
				if err != nil {
					return err
				}
				if !ok {
					break
				}
				if io.inflight != nil {
					io.inflight.take(c.Head)
				}
				if b != nil {
					if b.n++; b.n == len(b.chains) {
						r.serveBatch(q, b, io)
						r.publish(q, io)
					}
					continue
				}
				r.serve(q, h, io, c)
				if n++; n == batchLimit {
					r.publish(q, io)
					n = 0
				}
			}
			if b != nil && b.n > 0 {
				r.serveBatch(q, b, io)
			}
			r.publish(q, io)
			if cpus.crowded() {
				// More queues want the CPUs than there are: let the
				// others have them before looking again.
				runtime.Gosched()
			}
			if io.kick >= 0 && io.poll > 0 && cpus.canSpin() {
				more, err := r.spin(q, io.poll)
				if err != nil {
					return err
				}
				if more {
					continue // notifications still off
				}
			}
			more, err := q.EnableNotify()
			if err != nil {
				return err
			}
			io.markUsed(q)
			if !more {
				break
			}
		}
		cpus.stop()
		busy = false
		for {
			_, err := unix.Poll(fds, timeout)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return fmt.Errorf("poll: %w", err)
			}
			break
		}
		cpus.start()
		busy = true
		if fds[0].Revents != 0 {
			return nil
		}
		if len(fds) > 1 && fds[1].Revents != 0 {
			if fds[1].Revents&(unix.POLLERR|unix.POLLNVAL) != 0 {
				return fmt.Errorf("kick fd: poll events %#x", fds[1].Revents)
			}
			_, _ = unix.Read(kick, buf[:])
		}
	}
}

// spin looks at the ring for up to d, notifications off, and reports
// whether the driver made a request available meanwhile.
func (r *runner) spin(q *virtq.Queue, d time.Duration) (bool, error) {
	deadline := time.Now().Add(d)
	for i := 0; ; i++ {
		n, err := q.Pending()
		if err != nil || n > 0 {
			return n > 0, err
		}
		if r.stopping.Load() || i%16 == 15 && time.Now().After(deadline) {
			return false, nil
		}
	}
}

// batch is the chains of one avail batch, served together by a
// BatchHandler.
type batch struct {
	h       BatchHandler
	chains  []virtq.Chain
	ptrs    []*virtq.Chain
	written []uint32
	n       int // chains taken so far
	pushed  int // chains of the batch already on the used ring
	// early is the done callback of an EarlyBatchHandler: it completes the
	// chains up to n and publishes them.
	early func(n int)
}

func newBatch(h BatchHandler, n, segs int) *batch {
	b := &batch{h: h, chains: make([]virtq.Chain, n), ptrs: make([]*virtq.Chain, n), written: make([]uint32, n)}
	for i := range b.chains {
		b.chains[i].Segs = make([]virtq.Seg, 0, segs)
		b.ptrs[i] = &b.chains[i]
	}
	return b
}

// next is the chain the next one taken goes into.
func (b *batch) next() *virtq.Chain { return &b.chains[b.n] }

// serveBatch hands the taken chains to the handler and puts them on the used
// ring in the order they were taken.
func (r *runner) serveBatch(q *virtq.Queue, b *batch, io *ringIO) {
	clear(b.written[:b.n])
	b.pushed = 0
	if eh, ok := b.h.(EarlyBatchHandler); ok {
		eh.HandleBatchEarly(b.ptrs[:b.n], b.written[:b.n], b.early)
	} else {
		b.h.HandleBatch(b.ptrs[:b.n], b.written[:b.n])
	}
	for i := b.pushed; i < b.n; i++ {
		r.complete(q, io, &b.chains[i], b.written[i])
	}
	b.n, b.pushed = 0, 0
}

// serve handles one chain and puts it on the used ring (unpublished). While
// migration logs dirty pages, every device-writable buffer of the chain is
// marked after the handler wrote it.
func (r *runner) serve(q *virtq.Queue, h Handler, io *ringIO, c *virtq.Chain) {
	r.complete(q, io, c, h.Handle(c))
}

// complete puts a served chain on the used ring (unpublished), after marking
// its device-writable buffers dirty while migration logs.
func (r *runner) complete(q *virtq.Queue, io *ringIO, c *virtq.Chain, written uint32) {
	if io.dlog != nil && io.dlog.on.Load() {
		for i := range c.Segs {
			if s := &c.Segs[i]; s.Write {
				io.dlog.mark(s.Addr, uint64(s.Len))
			}
		}
	}
	q.Push(c.Head, written)
	if io.inflight != nil {
		io.inflight.pushed(c.Head)
	}
}

// publish makes the pushed chains visible, records that they are no longer
// in flight, and notifies the driver if it asked.
func (r *runner) publish(q *virtq.Queue, io *ringIO) {
	q.Publish()
	io.markUsed(q)
	if io.inflight != nil {
		io.inflight.published(q.UsedIdx())
	}
	if q.NeedNotify() && io.call >= 0 {
		signal(io.call)
	}
}

// markUsed marks the used ring dirty while migration logs it.
func (io *ringIO) markUsed(q *virtq.Queue) {
	if io.logUsed && io.dlog != nil && io.dlog.on.Load() {
		io.dlog.mark(io.usedGPA, q.UsedBytes())
	}
}

// signal adds one to eventfd fd (an interrupt, a wake-up). The fds the
// front-end sends are non-blocking (setVringFd): a counter it filled makes
// the write fail, never wait.
func signal(fd int) {
	var one = [8]byte{1}
	_, _ = unix.Write(fd, one[:])
}
