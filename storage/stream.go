package storage

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"unsafe"

	"github.com/hemd/hemd/storage/uring"
	"golang.org/x/sys/unix"
)

// Stream carries out positioned reads and writes on a File as they come,
// many in flight at once through one io_uring, and reports each as it
// completes, in any order: unlike a Batch, nothing waits for the slowest
// transfer of a group. One goroutine uses a Stream at a time.
//
// A write holds the file's gate (shared) from the moment it is queued until
// it completes, so that a snapshot starting (StartCOW) sees every write
// before its point in time done and none after it begun; while a snapshot
// waits for the gate, Write refuses new writes until those in flight are
// done.
type Stream struct {
	f    *File
	base int64
	ring *uring.Ring // nil once broken: one system call per transfer
	ops  []streamOp  // one per slot
	// watches are the fds Sleep watches: a poll of each is in the ring
	// (armed) until it fires.
	watches []watch
	free    []int32 // free slots
	done    []int32 // slots finished without the ring, reported next
	gated   int     // writes queued or in flight holding the gate
	// broken says why the ring was given up.
	broken error
}

type watch struct {
	fd           int
	armed, fired bool
}

// watchTag is the user data of watch i's poll: above every slot.
const watchTag = 1 << 62

// maxWatches bounds the fds Sleep watches (a queue's stop and kick fds).
const maxWatches = 4

type streamOp struct {
	tag   uint64
	write bool
	gated bool // holds the gate (shared)
	off   int64
	n     int
	bufs  [][]byte
	iov   []unix.Iovec
	err   error // outcome of a transfer done without the ring
}

// ErrNoStream is returned by NewStream when io_uring is not available.
var ErrNoStream = errors.New("no io_uring for a stream")

// NewStream returns a stream of up to depth transfers in flight. Without
// io_uring it fails (wrapping ErrNoStream): a Batch then does the work.
func (s *File) NewStream(depth int) (*Stream, error) { return s.newStream(depth, 0) }

// NewStream returns a stream of transfers within the section.
func (s *Section) NewStream(depth int) (*Stream, error) { return s.f.newStream(depth, s.base) }

func (s *File) newStream(depth int, base int64) (*Stream, error) {
	r, err := uring.New(uint32(depth + maxWatches))
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNoStream, err)
	}
	st := &Stream{f: s, base: base, ring: r, ops: make([]streamOp, depth), free: make([]int32, 0, depth)}
	for i := len(st.ops) - 1; i >= 0; i-- {
		st.free = append(st.free, int32(i))
	}
	return st, nil
}

// InFlight returns how many transfers are queued or in flight: not yet
// reported.
func (st *Stream) InFlight() int { return len(st.ops) - len(st.free) }

// Sleep waits until a transfer in flight completes or an fd of fds is
// readable, reports to done the transfers completed meanwhile, and sets
// ready[i] for each fd of fds found readable (it reads none of them). Each
// fd stays watched, from one call to the next, until it is found readable:
// one io_uring_enter both hands over what is queued and sleeps, where
// poll(2) would take a system call of its own. With many transfers in
// flight it waits for several (sleepWaitDiv).
func (st *Stream) Sleep(fds []int, ready []bool, done func(tag uint64, err error)) {
	if len(fds) > maxWatches {
		panic(fmt.Sprintf("storage: Sleep on %d fds, at most %d", len(fds), maxWatches))
	}
	if st.ring == nil {
		st.sleepPoll(fds, ready, done)
		return
	}
	fired := false
	for _, fd := range fds {
		w := st.watch(fd)
		if !w.armed && !w.fired {
			w.armed = st.ring.PollAdd(fd, unix.POLLIN, watchTag+uint64(st.watchIndex(w)))
		}
		fired = fired || w.fired
	}
	if !fired && len(st.done) == 0 && !st.ring.Ready() {
		st.reapN(max(1, st.InFlight()/sleepWaitDiv), done)
	} else {
		st.reap(false, done)
	}
	for i, fd := range fds {
		w := st.watch(fd)
		ready[i], w.fired = w.fired, false
	}
}

// sleepWaitDiv: Sleep waits for a quarter of the transfers in flight (or a
// watched fd) before it returns, so that a caller is woken once for several
// completions, as a batch would have it, while the rest stay in flight.
// Measured (vhost/blk/PERFORMANCE.md, O_DIRECT, against waking for each):
// 4 KiB writes at QD 32 0.80x woken for each, 0.93x of a whole batch with
// a quarter; 128 KiB transfers keep their gain.
const sleepWaitDiv = 4

// sleepPoll is Sleep without a ring: every transfer is done already.
func (st *Stream) sleepPoll(fds []int, ready []bool, done func(tag uint64, err error)) {
	if len(st.done) > 0 {
		st.reap(false, done)
		return
	}
	pfds := make([]unix.PollFd, len(fds))
	for i, fd := range fds {
		pfds[i] = unix.PollFd{Fd: int32(fd), Events: unix.POLLIN}
	}
	for {
		if _, err := unix.Poll(pfds, -1); err != unix.EINTR {
			break
		}
	}
	for i := range pfds {
		ready[i] = pfds[i].Revents != 0
	}
}

// watch returns the watch of fd, adding it.
func (st *Stream) watch(fd int) *watch {
	for i := range st.watches {
		if st.watches[i].fd == fd {
			return &st.watches[i]
		}
	}
	st.watches = append(st.watches, watch{fd: fd})
	return &st.watches[len(st.watches)-1]
}

func (st *Stream) watchIndex(w *watch) int {
	for i := range st.watches {
		if &st.watches[i] == w {
			return i
		}
	}
	return -1
}

// Room reports whether a transfer can be queued now (Read and Write may
// still refuse a write while a snapshot starts).
func (st *Stream) Room() bool { return len(st.free) > 0 }

// Ready reports whether Reap would report a transfer now (or Sleep find a
// watched fd readable).
func (st *Stream) Ready() bool { return len(st.done) > 0 || st.ring != nil && st.ring.Ready() }

// Read queues a read of bufs at off, reported with tag; false means the
// stream is full. bufs' headers are copied; the memory they point to must
// stay put until the read is reported.
func (st *Stream) Read(bufs [][]byte, off int64, tag uint64) bool {
	return st.queue(false, bufs, off, tag)
}

// Write queues a write of bufs at off under the same rules as Read. It
// also refuses (false) while a snapshot waits for the file's writes in
// flight to end; with nothing in flight it waits for the snapshot instead.
func (st *Stream) Write(bufs [][]byte, off int64, tag uint64) bool {
	return st.queue(true, bufs, off, tag)
}

func (st *Stream) queue(write bool, bufs [][]byte, off int64, tag uint64) bool {
	if len(st.free) == 0 {
		return false
	}
	f := st.f
	gated := false
	if write && !f.opts.ReadOnly {
		if !f.gate.TryRLock() {
			if st.gated > 0 {
				return false // a snapshot starts: let the writes in flight end
			}
			f.gate.RLock()
		}
		gated = true
	}
	slot := st.free[len(st.free)-1]
	st.free = st.free[:len(st.free)-1]
	op := &st.ops[slot]
	op.tag, op.write, op.gated, op.err = tag, write, gated, nil
	op.off, op.n = st.base+off, total(bufs)
	op.bufs = append(op.bufs[:0], bufs...)
	if gated {
		st.gated++
		f.copyBefore(op.off, int64(op.n))
	}
	fd := f.pick(op.bufs, op.off)
	switch {
	case write && f.opts.ReadOnly:
		st.finishNow(slot, fmt.Errorf("write %s: %w", f.path, os.ErrPermission))
		return true
	case st.ring == nil, len(op.bufs) > maxIov, write && fd == f.fd:
		// No ring, more buffers than one readv takes, or a buffered
		// write (it blocks on ext4 anyway: Batch says why): done now.
		st.finishNow(slot, st.sync(op, 0))
		return true
	}
	op.iov = op.iov[:0]
	for _, p := range op.bufs {
		if len(p) > 0 {
			op.iov = append(op.iov, unix.Iovec{Base: (*byte)(unsafe.Pointer(&p[0])), Len: uint64(len(p))})
		}
	}
	var ok bool
	if write {
		ok = st.ring.Writev(fd, op.iov, op.off, uint64(slot))
	} else {
		ok = st.ring.Readv(fd, op.iov, op.off, uint64(slot))
	}
	if !ok {
		// The ring holds as many ops as there are slots: it is broken.
		st.finishNow(slot, st.sync(op, 0))
	}
	return true
}

// finishNow records the outcome of a transfer done without the ring.
func (st *Stream) finishNow(slot int32, err error) {
	st.ops[slot].err = err
	st.done = append(st.done, slot)
}

// Submit hands the queued transfers to the kernel without waiting.
func (st *Stream) Submit() {
	if st.ring != nil {
		if err := st.ring.Flush(); err != nil {
			st.giveUp(err)
		}
	}
}

// Reap calls done(tag, err) for every transfer finished so far. A short
// transfer is completed first with preadv or pwritev (past the end of the
// file reads as zeros).
func (st *Stream) Reap(done func(tag uint64, err error)) { st.reap(false, done) }

// Wait is Reap, but it first waits until a transfer is finished, unless none
// is in flight.
func (st *Stream) Wait(done func(tag uint64, err error)) { st.reap(st.InFlight() > 0, done) }

func (st *Stream) reap(wait bool, done func(tag uint64, err error)) {
	n := 0
	if wait {
		n = 1
	}
	st.reapN(n, done)
}

// reapN reports what is finished, first waiting for n transfers (or watched
// fds) when n > 0.
func (st *Stream) reapN(n int, done func(tag uint64, err error)) {
	wait := n > 0
	for len(st.done) > 0 {
		slot := st.done[0]
		st.done = st.done[1:]
		st.report(slot, st.ops[slot].err, done)
		wait = false
	}
	if st.done = st.done[:0]; st.ring == nil {
		return
	}
	fn := func(user uint64, res int32) {
		if user >= watchTag {
			if i := user - watchTag; i < uint64(len(st.watches)) {
				st.watches[i].armed, st.watches[i].fired = false, true
			}
			return
		}
		if user >= uint64(len(st.ops)) {
			return // not ours: the ring checks its count
		}
		op := &st.ops[user]
		st.report(int32(user), st.finish(op, res), done)
	}
	var err error
	if wait {
		err = st.ring.WaitN(n, fn)
	} else {
		err = st.ring.Reap(fn)
	}
	if err != nil {
		st.giveUp(err)
		for len(st.done) > 0 {
			slot := st.done[0]
			st.done = st.done[1:]
			st.report(slot, st.ops[slot].err, done)
		}
		st.done = st.done[:0]
	}
}

// report frees slot and tells done its outcome.
func (st *Stream) report(slot int32, err error, done func(tag uint64, err error)) {
	op := &st.ops[slot]
	if op.gated {
		op.gated = false
		st.gated--
		st.f.gate.RUnlock()
	}
	clear(op.bufs)
	op.bufs = op.bufs[:0] // no guest memory held
	tag := op.tag
	st.free = append(st.free, slot)
	done(tag, err)
}

// finish turns an io_uring result into the transfer's outcome.
func (st *Stream) finish(op *streamOp, res int32) error {
	switch {
	case res < 0:
		errno := unix.Errno(-res)
		if errno == unix.EAGAIN || errno == unix.EINTR || errno == unix.ECANCELED {
			return st.sync(op, 0)
		}
		return errno
	case int(res) < op.n:
		return st.sync(op, int(res))
	}
	return nil
}

// sync does op from byte done on with preadv or pwritev.
func (st *Stream) sync(op *streamOp, done int) error {
	b := Batch{f: st.f}
	return b.sync(&batchOp{write: op.write, off: op.off, n: op.n, bufs: op.bufs}, done)
}

// giveUp drops a broken ring: a transfer it did not complete fails (the
// kernel may still carry it out, so doing it again could race with it);
// later ones make one system call each.
func (st *Stream) giveUp(err error) {
	st.broken = err
	inFlight := make(map[int32]bool, len(st.ops))
	for i := range st.ops {
		inFlight[int32(i)] = true
	}
	for _, s := range st.free {
		delete(inFlight, s)
	}
	for _, s := range st.done {
		delete(inFlight, s)
	}
	var keep [][]byte
	for s := range inFlight {
		keep = append(keep, st.ops[s].bufs...)
		st.finishNow(s, fmt.Errorf("io_uring: %w", err))
	}
	abandon(st.ring, keep)
	st.ring = nil
	for i := range st.watches {
		st.watches[i].armed = false
	}
}

// abandoned keeps the buffers the kernel may still write into after their
// ring broke: they are never freed.
var abandoned struct {
	sync.Mutex
	bufs [][]byte
}

func abandon(r *uring.Ring, bufs [][]byte) {
	abandoned.Lock()
	abandoned.bufs = append(abandoned.bufs, bufs...)
	abandoned.Unlock()
	r.Close()
}

// Close waits for the transfers in flight and releases the ring. Their
// outcomes are dropped: the caller reaps first what it wants to know.
func (st *Stream) Close() error {
	for st.InFlight() > 0 && st.ring != nil {
		st.Wait(func(uint64, error) {})
	}
	for st.InFlight() > 0 {
		st.Reap(func(uint64, error) {})
	}
	var err error
	if st.ring != nil {
		err = st.ring.Close() // polls of watched fds end with it
		st.ring = nil
	}
	return err
}
