// Package uring is a minimal io_uring: vectored positioned reads and writes
// queued in a batch, submitted with one system call and waited for together.
//
// It speaks the kernel ABI (include/uapi/linux/io_uring.h) directly through
// io_uring_setup, io_uring_enter and mmap. Only IORING_OP_READV and
// IORING_OP_WRITEV are used, with no SQ polling, registered files or buffers,
// so a ring may be created on one thread and driven from another.
package uring

import (
	"errors"
	"fmt"
	"math"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ErrUnavailable means the kernel refuses io_uring here: it is too old or
// built without it (ENOSYS), turned off by the kernel.io_uring_disabled
// sysctl (EPERM), or forbidden by seccomp or a security module (EPERM,
// EACCES). New wraps it, so callers can fall back to preadv/pwritev.
var ErrUnavailable = errors.New("io_uring is not available")

// From include/uapi/linux/io_uring.h.
const (
	maxEntries = 32768 // IORING_MAX_ENTRIES; the CQ may have twice as many

	setupCQSize      = 1 << 3 // IORING_SETUP_CQSIZE
	setupCoopTaskrun = 1 << 8 // IORING_SETUP_COOP_TASKRUN
	featSingleMmap   = 1 << 0 // IORING_FEAT_SINGLE_MMAP
	enterGetEvents   = 1 << 0 // IORING_ENTER_GETEVENTS

	offSQRing = 0          // IORING_OFF_SQ_RING
	offCQRing = 0x8000000  // IORING_OFF_CQ_RING
	offSQEs   = 0x10000000 // IORING_OFF_SQES

	sqeAsync = 1 << 4 // IOSQE_ASYNC

	registerIOWQMaxWorkers = 19 // IORING_REGISTER_IOWQ_MAX_WORKERS

	opReadv   = 1 // IORING_OP_READV
	opWritev  = 2 // IORING_OP_WRITEV
	opPollAdd = 6 // IORING_OP_POLL_ADD
)

// params is struct io_uring_params.
type params struct {
	sqEntries    uint32
	cqEntries    uint32
	flags        uint32
	sqThreadCPU  uint32
	sqThreadIdle uint32
	features     uint32
	wqFd         uint32
	resv         [3]uint32
	sqOff        sqringOffsets
	cqOff        cqringOffsets
}

// sqringOffsets is struct io_sqring_offsets.
type sqringOffsets struct {
	head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
	userAddr                                                        uint64
}

// cqringOffsets is struct io_cqring_offsets.
type cqringOffsets struct {
	head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
	userAddr                                                        uint64
}

// sqe is struct io_uring_sqe, as far as READV and WRITEV use it.
type sqe struct {
	opcode      uint8
	flags       uint8
	ioprio      uint16
	fd          int32
	off         uint64
	addr        uint64
	len         uint32
	rwFlags     uint32
	userData    uint64
	bufIndex    uint16
	personality uint16
	spliceFdIn  int32
	addr3       uint64
	_           uint64
}

// cqe is struct io_uring_cqe (without the IORING_SETUP_CQE32 extension).
type cqe struct {
	userData uint64
	res      int32
	flags    uint32
}

// The layouts must match the kernel's byte for byte.
var (
	_ [0]struct{} = [unsafe.Sizeof(params{}) - 120]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(sqe{}) - 64]struct{}{}
	_ [0]struct{} = [unsafe.Sizeof(cqe{}) - 16]struct{}{}
)

// Ring is an io_uring instance. It is not safe for concurrent use: exactly
// one goroutine may queue, submit and close at a time (hemd gives each
// virtqueue goroutine a ring of its own), so it takes no locks.
type Ring struct {
	fd   int
	maps [][]byte // the mmaped regions, for Close

	// Submission queue: the kernel owns sqHead, we own sqTail and the
	// entries in sqArray and sqes between the kernel's head and our tail.
	sqHead, sqTail *uint32
	sqMask         uint32
	sqArray        []uint32
	sqes           []sqe

	// Completion queue: the kernel owns cqTail, we own cqHead.
	cqHead, cqTail *uint32
	cqMask         uint32
	cqes           []cqe

	cap    uint32         // ops a batch may hold
	tail   uint32         // our SQ tail, published to the kernel by Submit
	queued uint32         // ops of the current batch not yet completed
	keep   [][]unix.Iovec // keeps each queued op's iovecs and buffers alive
	err    error          // sticky: the ring is broken or closed
}

// New sets up a ring with room for at least entries queued ops (1..32768;
// the kernel rounds up to a power of two, which Cap reports). The completion
// queue has twice as many entries, so a full batch in flight never overflows
// it. Errors wrap ErrUnavailable when the kernel refuses io_uring (ENOSYS,
// EPERM, EACCES).
func New(entries uint32) (*Ring, error) {
	if entries == 0 || entries > maxEntries {
		return nil, fmt.Errorf("uring: %d entries, want 1 to %d", entries, maxEntries)
	}
	// Completions of ops the kernel's workers carry out reach this ring's
	// thread as task work: with COOP_TASKRUN (Linux 5.19) it runs at the
	// thread's next entry into the kernel, instead of interrupting it
	// with an IPI wherever it is (measured: the IPIs took a fifth of a
	// queue's samples while it decrypted). Older kernels refuse the flag.
	p := params{flags: setupCQSize | setupCoopTaskrun, cqEntries: 2 * entries}
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0)
	if errno == unix.EINVAL {
		p = params{flags: setupCQSize, cqEntries: 2 * entries}
		fd, _, errno = unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0)
	}
	if errno != 0 {
		if errno == unix.ENOSYS || errno == unix.EPERM || errno == unix.EACCES {
			return nil, fmt.Errorf("io_uring_setup: %w: %w", ErrUnavailable, errno)
		}
		return nil, fmt.Errorf("io_uring_setup: %w", errno)
	}
	r := &Ring{fd: int(fd)}
	if err := r.mapRings(&p, entries); err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}

// mapRings maps the SQ ring, CQ ring and SQE array that io_uring_setup
// described in p, checking every offset against the mapping sizes.
func (r *Ring) mapRings(p *params, entries uint32) error {
	if p.sqEntries < entries || p.cqEntries < p.sqEntries ||
		p.sqEntries&(p.sqEntries-1) != 0 || p.cqEntries&(p.cqEntries-1) != 0 {
		return fmt.Errorf("io_uring_setup: unexpected sizes: %d SQ, %d CQ entries for %d", p.sqEntries, p.cqEntries, entries)
	}
	sqSize := int(p.sqOff.array) + 4*int(p.sqEntries)
	cqSize := int(p.cqOff.cqes) + int(unsafe.Sizeof(cqe{}))*int(p.cqEntries)
	single := p.features&featSingleMmap != 0
	if single {
		sqSize = max(sqSize, cqSize)
	}
	mmap := func(off int64, size int) ([]byte, error) {
		m, err := unix.Mmap(r.fd, off, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
		if err != nil {
			return nil, fmt.Errorf("io_uring mmap at %#x: %w", off, err)
		}
		r.maps = append(r.maps, m)
		return m, nil
	}
	sq, err := mmap(offSQRing, sqSize)
	if err != nil {
		return err
	}
	cq := sq
	if !single {
		if cq, err = mmap(offCQRing, cqSize); err != nil {
			return err
		}
	}
	sqes, err := mmap(offSQEs, int(unsafe.Sizeof(sqe{}))*int(p.sqEntries))
	if err != nil {
		return err
	}

	var bad bool
	at := func(m []byte, off uint32, size int) unsafe.Pointer {
		if int(off)+size > len(m) || off%4 != 0 {
			bad = true
			return nil
		}
		return unsafe.Pointer(&m[off])
	}
	r.sqHead = (*uint32)(at(sq, p.sqOff.head, 4))
	r.sqTail = (*uint32)(at(sq, p.sqOff.tail, 4))
	sqMask := (*uint32)(at(sq, p.sqOff.ringMask, 4))
	sqArray := (*uint32)(at(sq, p.sqOff.array, 4*int(p.sqEntries)))
	r.cqHead = (*uint32)(at(cq, p.cqOff.head, 4))
	r.cqTail = (*uint32)(at(cq, p.cqOff.tail, 4))
	cqMask := (*uint32)(at(cq, p.cqOff.ringMask, 4))
	cqes := (*cqe)(at(cq, p.cqOff.cqes, int(unsafe.Sizeof(cqe{}))*int(p.cqEntries)))
	if bad || p.cqOff.cqes%8 != 0 {
		return errors.New("io_uring_setup: ring offsets outside the mapped rings")
	}
	r.sqMask, r.cqMask = *sqMask, *cqMask
	if r.sqMask != p.sqEntries-1 || r.cqMask != p.cqEntries-1 {
		return fmt.Errorf("io_uring_setup: ring masks %#x, %#x for %d, %d entries", r.sqMask, r.cqMask, p.sqEntries, p.cqEntries)
	}
	r.sqArray = unsafe.Slice(sqArray, p.sqEntries)
	r.sqes = unsafe.Slice((*sqe)(unsafe.Pointer(&sqes[0])), p.sqEntries)
	r.cqes = unsafe.Slice(cqes, p.cqEntries)
	r.cap = p.sqEntries
	r.tail = atomic.LoadUint32(r.sqTail)
	r.keep = make([][]unix.Iovec, p.sqEntries)
	return nil
}

// Cap returns how many ops can be queued before Submit.
func (r *Ring) Cap() int { return int(r.cap) }

// Readv queues one IORING_OP_READV: read into iov from fd at file offset off
// (-1 means the file position, as with io_uring itself), completing with
// user. iov and the memory it points to must stay valid and unmoved until
// Submit returns; the ring holds a reference to iov until then, so neither
// is freed meanwhile. Readv returns false and queues nothing when Cap ops
// are already queued or the ring is broken or closed.
func (r *Ring) Readv(fd int, iov []unix.Iovec, off int64, user uint64) bool {
	return r.queue(opReadv, 0, fd, iov, off, user)
}

// ReadvAsync is Readv with IOSQE_ASYNC: the kernel does not try the read
// inline in io_uring_enter but hands it to one of its worker threads at
// once, so that several reads served from the page cache copy in parallel on
// other cores.
func (r *Ring) ReadvAsync(fd int, iov []unix.Iovec, off int64, user uint64) bool {
	return r.queue(opReadv, sqeAsync, fd, iov, off, user)
}

// Writev queues one IORING_OP_WRITEV: write iov to fd at file offset off,
// completing with user. Otherwise it is like Readv.
func (r *Ring) Writev(fd int, iov []unix.Iovec, off int64, user uint64) bool {
	return r.queue(opWritev, 0, fd, iov, off, user)
}

func (r *Ring) queue(op, flags uint8, fd int, iov []unix.Iovec, off int64, user uint64) bool {
	if r.err != nil || r.queued >= r.cap {
		return false
	}
	var addr uintptr
	if len(iov) > 0 {
		addr = uintptr(unsafe.Pointer(&iov[0]))
	}
	fd32 := int32(fd)
	if int(fd32) != fd {
		fd32 = -1 // the kernel answers -EBADF
	}
	i := r.tail & r.sqMask
	r.sqes[i] = sqe{
		opcode:   op,
		flags:    flags,
		fd:       fd32,
		off:      uint64(off),
		addr:     uint64(addr),
		len:      uint32(min(len(iov), math.MaxUint32)), // the kernel refuses > IOV_MAX
		userData: user,
	}
	r.sqArray[i] = i
	r.keep[i] = iov
	r.tail++
	r.queued++
	return true
}

// Submit submits every queued op and waits until all of them have completed,
// calling fn(user, res) once per op, in completion order; res is the
// kernel's result: bytes transferred, or -errno. fn may be nil.
//
// Submit retries on EINTR, EAGAIN and EBUSY and resubmits what the kernel
// did not consume. It returns an error only when the ring itself is broken
// (or closed); ops may then still be in flight and the Ring must be closed.
// Submit with nothing queued returns nil at once.
func (r *Ring) Submit(fn func(user uint64, res int32)) error { return r.submit(fn, false) }

// SubmitEach is Submit, but it waits for one completion at a time, so that
// fn sees each op as soon as the kernel completes it, while later ones are
// still in flight (with ops the kernel's workers carry out, ReadvAsync).
func (r *Ring) SubmitEach(fn func(user uint64, res int32)) error { return r.submit(fn, true) }

// SetMaxWorkers bounds the kernel worker threads of the ring's io-wq
// (IORING_REGISTER_IOWQ_MAX_WORKERS): bounded for regular file I/O,
// unbounded for the rest; 0 keeps a limit as it is.
func (r *Ring) SetMaxWorkers(bounded, unbounded uint32) error {
	if r.err != nil {
		return r.err
	}
	v := [2]uint32{bounded, unbounded}
	_, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(r.fd), registerIOWQMaxWorkers, uintptr(unsafe.Pointer(&v[0])), 2, 0, 0)
	if errno != 0 {
		return fmt.Errorf("io_uring_register IOWQ_MAX_WORKERS: %w", errno)
	}
	return nil
}

func (r *Ring) submit(fn func(user uint64, res int32), each bool) error {
	if r.err != nil {
		return r.err
	}
	if r.queued == 0 {
		return nil
	}
	atomic.StoreUint32(r.sqTail, r.tail) // release: the SQEs are written
	waitOnly := false
	for {
		if err := r.reap(fn); err != nil {
			return err
		}
		if r.queued == 0 {
			break
		}
		head := atomic.LoadUint32(r.sqHead)
		unconsumed := r.tail - head
		if unconsumed > r.queued {
			return r.fail(fmt.Errorf("uring: SQ head %d is past tail %d", head, r.tail))
		}
		// Ask the kernel to wait for everything outstanding; if it consumes
		// fewer SQEs than offered it returns without waiting.
		submit, wait := unconsumed, r.queued
		if each {
			wait = 1
		}
		if waitOnly && r.queued > unconsumed {
			submit, wait = 0, 1
		}
		waitOnly = false
		busy, err := r.sysEnter(submit, wait, head)
		if err != nil {
			return err
		}
		if busy {
			// Out of resources for now: let ops in flight complete first.
			waitOnly = true
			runtime.Gosched()
		}
	}
	clear(r.keep)
	return nil
}

// reap consumes every completion the kernel has posted.
func (r *Ring) reap(fn func(user uint64, res int32)) error {
	head := atomic.LoadUint32(r.cqHead)
	tail := atomic.LoadUint32(r.cqTail) // acquire: the CQEs are written
	if tail-head > uint32(len(r.cqes)) {
		return r.fail(fmt.Errorf("uring: CQ tail %d is %d past head %d", tail, tail-head, head))
	}
	for ; head != tail; head++ {
		c := r.cqes[head&r.cqMask]
		atomic.StoreUint32(r.cqHead, head+1) // release: the CQE is read
		if r.queued == 0 {
			return r.fail(fmt.Errorf("uring: completion for user %d, which was not queued", c.userData))
		}
		r.queued--
		if fn != nil {
			fn(c.userData, c.res)
		}
	}
	return nil
}

// fail marks the ring broken with err and returns it.
func (r *Ring) fail(err error) error {
	r.err = fmt.Errorf("%w (ring broken, close it)", err)
	return r.err
}

// inflight holds the iovecs of ops that may still be in flight when their
// ring is closed after breaking: the kernel may write to their buffers until
// it has cancelled them, so they are never freed.
var inflight struct {
	sync.Mutex
	iovs [][]unix.Iovec
}

// Close unmaps the rings and closes the ring fd. Safe to call twice.
func (r *Ring) Close() error {
	if r.fd < 0 {
		return nil
	}
	if r.queued > 0 {
		inflight.Lock()
		for _, iov := range r.keep {
			if iov != nil {
				inflight.iovs = append(inflight.iovs, iov)
			}
		}
		inflight.Unlock()
	}
	var errs []error
	for _, m := range r.maps {
		if err := unix.Munmap(m); err != nil {
			errs = append(errs, fmt.Errorf("io_uring munmap: %w", err))
		}
	}
	if err := unix.Close(r.fd); err != nil {
		errs = append(errs, fmt.Errorf("io_uring close: %w", err))
	}
	*r = Ring{fd: -1, err: fmt.Errorf("uring: %w", os.ErrClosed)}
	return errors.Join(errs...)
}

// Continuous use: ops handed to the kernel as they come (Flush) and reaped as
// they complete (Reap, Wait), many batches' worth in flight at once, instead
// of Submit's one batch at a time. Cap still bounds the ops queued and in
// flight together, so the completion queue never overflows.

// PollAdd queues one IORING_OP_POLL_ADD: it completes with user once fd
// has one of events (POLLIN...), res being the events found (one shot).
// Otherwise it is like Readv; it holds no memory of the caller's.
func (r *Ring) PollAdd(fd int, events uint32, user uint64) bool {
	if !r.queue(opPollAdd, 0, fd, nil, 0, user) {
		return false
	}
	r.sqes[(r.tail-1)&r.sqMask].rwFlags = events // poll32_events
	return true
}

// registerEventfd is IORING_REGISTER_EVENTFD.
const registerEventfd = 4

// InFlight returns how many ops are queued or in flight: not yet reaped.
func (r *Ring) InFlight() int { return int(r.queued) }

// Ready reports whether the kernel has posted completions not yet reaped.
func (r *Ring) Ready() bool {
	return r.err == nil && atomic.LoadUint32(r.cqTail) != atomic.LoadUint32(r.cqHead)
}

// Flush hands every queued op to the kernel and returns without waiting for
// any to complete. Ops the kernel could not take yet (EAGAIN, EBUSY) stay
// queued: the next Flush or Wait hands them over. Like Submit, it returns an
// error only when the ring is broken.
func (r *Ring) Flush() error { return r.enter(0) }

// Reap calls fn(user, res) for every op completed so far, without waiting.
func (r *Ring) Reap(fn func(user uint64, res int32)) error {
	if r.err != nil {
		return r.err
	}
	return r.reap(fn)
}

// Wait hands over what is queued, waits until at least one op completes
// (not at all when none is in flight) and reaps every completion posted.
func (r *Ring) Wait(fn func(user uint64, res int32)) error { return r.WaitN(1, fn) }

// WaitN is Wait for at least n completions (at most as many as are in
// flight): it sleeps until the kernel has posted that many.
func (r *Ring) WaitN(n int, fn func(user uint64, res int32)) error {
	if r.err != nil {
		return r.err
	}
	want := uint32(max(min(n, int(r.queued)), 1))
	got := uint32(0)
	for r.queued > 0 {
		q := r.queued
		if err := r.reap(fn); err != nil {
			return err
		}
		if got += q - r.queued; got >= want {
			return nil
		}
		if err := r.enter(want - got); err != nil {
			return err
		}
	}
	return nil
}

// RegisterEventfd makes the kernel signal the eventfd fd at every completion
// it posts (IORING_REGISTER_EVENTFD), so that a caller can poll it together
// with other fds.
func (r *Ring) RegisterEventfd(fd int) error {
	if r.err != nil {
		return r.err
	}
	v := int32(fd)
	_, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(r.fd), registerEventfd, uintptr(unsafe.Pointer(&v)), 1, 0, 0)
	if errno != 0 {
		return fmt.Errorf("io_uring_register EVENTFD: %w", errno)
	}
	return nil
}

// enter publishes the SQ tail and calls io_uring_enter once: it submits
// every SQE the kernel has not consumed yet and waits for wait completions.
// EINTR, EAGAIN and EBUSY are not errors: the caller looks again.
func (r *Ring) enter(wait uint32) error {
	if r.err != nil {
		return r.err
	}
	atomic.StoreUint32(r.sqTail, r.tail) // release: the SQEs are written
	head := atomic.LoadUint32(r.sqHead)
	submit := r.tail - head
	if submit > r.queued {
		return r.fail(fmt.Errorf("uring: SQ head %d is past tail %d", head, r.tail))
	}
	if submit == 0 && wait == 0 {
		return nil
	}
	busy, err := r.sysEnter(submit, wait, head)
	if err != nil {
		return err
	}
	if busy {
		if inKernel := r.queued - (r.tail - atomic.LoadUint32(r.sqHead)); wait > 0 && inKernel > 0 {
			// Out of resources for now: wait for ops in flight only.
			if _, err := r.sysEnter(0, min(wait, inKernel), head); err != nil {
				return err
			}
		}
		runtime.Gosched()
	}
	return nil
}

// sysEnter is one io_uring_enter: submit SQEs (the SQ head was head before
// it), waiting for wait completions. busy means the kernel was out of
// resources (EAGAIN, EBUSY); EINTR is neither busy nor an error; any other
// error breaks the ring.
func (r *Ring) sysEnter(submit, wait, head uint32) (busy bool, err error) {
	flags := uintptr(0)
	if wait > 0 {
		flags = enterGetEvents
	}
	_, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(submit), uintptr(wait), flags, 0, 0)
	switch errno {
	case 0:
		if submit > 0 && atomic.LoadUint32(r.sqHead) == head {
			return false, r.fail(fmt.Errorf("io_uring_enter: the kernel consumed none of %d SQEs", submit))
		}
	case unix.EINTR:
	case unix.EAGAIN, unix.EBUSY:
		return true, nil
	default:
		return false, r.fail(fmt.Errorf("io_uring_enter: %w", errno))
	}
	return false, nil
}
