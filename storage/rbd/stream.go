//go:build cgo && !norbd

package rbd

/*
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/uio.h>
#include <rbd/librbd.h>

// hemd_sop is one transfer of a stream, in C memory: librbd's callback
// writes its result and puts its slot on the stream's list of completed
// ones.
typedef struct hemd_stream hemd_stream;
typedef struct hemd_sop {
	int slot;
	struct iovec *iov;
	int iovcnt, iovcap;
	rbd_completion_t c;
	ssize_t ret;
	hemd_stream *s;
} hemd_sop;

// hemd_stream: the completed slots, a ring of depth written by librbd's
// callback threads under mu, read by the stream's goroutine.
struct hemd_stream {
	pthread_mutex_t mu;
	int efd;
	int depth;
	int *done;
	unsigned head, tail;
	int want; // signal efd once this many are done; 0: the reader is not asleep
	hemd_sop *ops;
};

static void hemd_stream_cb(rbd_completion_t c, void *arg) {
	hemd_sop *o = arg;
	hemd_stream *s = o->s;
	o->ret = rbd_aio_get_return_value(c);
	int wake = 0;
	pthread_mutex_lock(&s->mu);
	s->done[s->tail % s->depth] = o->slot;
	s->tail++;
	if (s->want > 0 && (int)(s->tail - s->head) >= s->want) {
		s->want = 0;
		wake = 1;
	}
	pthread_mutex_unlock(&s->mu);
	if (wake) {
		uint64_t one = 1;
		ssize_t r = write(s->efd, &one, sizeof one);
		(void)r;
	}
}

// hemd_stream_arm asks for efd to be signalled once want transfers are
// done; it returns 1, asking nothing, if they are already.
static int hemd_stream_arm(hemd_stream *s, int want) {
	pthread_mutex_lock(&s->mu);
	int ready = (int)(s->tail - s->head) >= want;
	s->want = ready ? 0 : want;
	pthread_mutex_unlock(&s->mu);
	return ready;
}

static void hemd_stream_disarm(hemd_stream *s) {
	pthread_mutex_lock(&s->mu);
	s->want = 0;
	pthread_mutex_unlock(&s->mu);
}

static hemd_stream *hemd_stream_new(int depth, int efd) {
	hemd_stream *s = calloc(1, sizeof *s);
	if (s == NULL) {
		return NULL;
	}
	s->ops = calloc(depth, sizeof *s->ops);
	s->done = calloc(depth, sizeof *s->done);
	if (s->ops == NULL || s->done == NULL || pthread_mutex_init(&s->mu, NULL) != 0) {
		free(s->ops);
		free(s->done);
		free(s);
		return NULL;
	}
	s->depth = depth;
	s->efd = efd;
	for (int i = 0; i < depth; i++) {
		s->ops[i].slot = i;
		s->ops[i].s = s;
	}
	return s;
}

// hemd_stream_iov makes room for n buffers in slot's transfer.
static struct iovec *hemd_stream_iov(hemd_stream *s, int slot, int n) {
	hemd_sop *o = &s->ops[slot];
	if (n > o->iovcap) {
		struct iovec *v = realloc(o->iov, n * sizeof *v);
		if (v == NULL) {
			return NULL;
		}
		o->iov = v;
		o->iovcap = n;
	}
	o->iovcnt = n;
	return o->iov;
}

// hemd_stream_start hands slot's transfer to librbd; a negative return is
// librbd's refusal (nothing in flight then).
static int hemd_stream_start(rbd_image_t img, hemd_stream *s, int slot, int write, uint64_t off) {
	hemd_sop *o = &s->ops[slot];
	o->ret = 0;
	int r = rbd_aio_create_completion(o, hemd_stream_cb, &o->c);
	if (r < 0) {
		return r;
	}
	if (write) {
		r = rbd_aio_writev(img, o->iov, o->iovcnt, off, o->c);
	} else {
		r = rbd_aio_readv(img, o->iov, o->iovcnt, off, o->c);
	}
	if (r < 0) {
		rbd_aio_release(o->c);
		o->c = NULL;
	}
	return r;
}

// hemd_stream_reap moves up to max completed slots into out (their
// completions released, results in ret[i]) and returns how many.
static int hemd_stream_reap(hemd_stream *s, int *out, ssize_t *ret, int max) {
	int n = 0;
	pthread_mutex_lock(&s->mu);
	while (s->head != s->tail && n < max) {
		out[n] = s->done[s->head % s->depth];
		s->head++;
		n++;
	}
	pthread_mutex_unlock(&s->mu);
	for (int i = 0; i < n; i++) {
		hemd_sop *o = &s->ops[out[i]];
		rbd_aio_release(o->c);
		o->c = NULL;
		ret[i] = o->ret;
	}
	return n;
}

static int hemd_stream_pending(hemd_stream *s) {
	pthread_mutex_lock(&s->mu);
	int n = s->tail - s->head;
	pthread_mutex_unlock(&s->mu);
	return n;
}

static void hemd_stream_free(hemd_stream *s) {
	for (int i = 0; i < s->depth; i++) {
		free(s->ops[i].iov);
	}
	pthread_mutex_destroy(&s->mu);
	free(s->ops);
	free(s->done);
	free(s);
}
*/
import "C"

import (
	"fmt"
	"io"
	"os"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Stream carries out reads and writes of an image as they come, many in
// flight at once through librbd's asynchronous I/O, and reports each as
// librbd completes it, in any order: no transfer waits for the slowest OSD
// reply of a batch. One goroutine uses a Stream at a time.
type Stream struct {
	m    *Image
	base int64
	s    *C.hemd_stream
	efd  int // librbd's callback signals it
	ops  []streamOp
	free []int32
	done []int32 // slots finished without librbd, reported next
	held int     // transfers holding the image open (m.mu shared)
	out  []C.int // reap's buffers, in C memory
	ret  []C.ssize_t
	outp *C.int
	retp *C.ssize_t
	pfds []unix.PollFd // sleep's, reused
}

type streamOp struct {
	tag   uint64
	write bool
	off   int64
	n     int
	err   error
	use   bool           // holds m.mu shared
	pin   runtime.Pinner // the Go buffers librbd holds
}

// NewStream returns a stream of up to depth transfers in flight.
func (m *Image) NewStream(depth int) (*Stream, error) { return newStream(m, 0, depth) }

// NewStream returns a stream of transfers within the section.
func (s *Section) NewStream(depth int) (*Stream, error) { return newStream(s.m, s.base, depth) }

func newStream(m *Image, base int64, depth int) (*Stream, error) {
	depth = max(depth, 1)
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("stream of %s: eventfd: %w", m.name, err)
	}
	cs := C.hemd_stream_new(C.int(depth), C.int(efd))
	if cs == nil {
		unix.Close(efd)
		return nil, fmt.Errorf("stream of %s: out of memory", m.name)
	}
	st := &Stream{m: m, base: base, s: cs, efd: efd, ops: make([]streamOp, depth), free: make([]int32, 0, depth)}
	st.outp = (*C.int)(C.calloc(C.size_t(depth), C.size_t(unsafe.Sizeof(C.int(0)))))
	st.retp = (*C.ssize_t)(C.calloc(C.size_t(depth), C.size_t(unsafe.Sizeof(C.ssize_t(0)))))
	st.out, st.ret = unsafe.Slice(st.outp, depth), unsafe.Slice(st.retp, depth)
	for i := depth - 1; i >= 0; i-- {
		st.free = append(st.free, int32(i))
	}
	return st, nil
}

// InFlight returns how many transfers are queued or in flight.
func (st *Stream) InFlight() int { return len(st.ops) - len(st.free) }

// Room reports whether a transfer can be queued now.
func (st *Stream) Room() bool { return len(st.free) > 0 }

// Ready reports whether Reap would report a transfer now.
func (st *Stream) Ready() bool { return len(st.done) > 0 || C.hemd_stream_pending(st.s) > 0 }

// Read queues a read of bufs at off and hands it to librbd, reported with
// tag; false means the stream is full, or the image is closing and
// transfers are in flight. The memory bufs point to must stay put until
// it is reported.
func (st *Stream) Read(bufs [][]byte, off int64, tag uint64) bool {
	return st.queue(false, bufs, off, tag)
}

// Write queues a write of bufs at off under the same rules as Read.
func (st *Stream) Write(bufs [][]byte, off int64, tag uint64) bool {
	return st.queue(true, bufs, off, tag)
}

func (st *Stream) queue(write bool, bufs [][]byte, off int64, tag uint64) bool {
	if len(st.free) == 0 {
		return false
	}
	m := st.m
	// The image stays open while a transfer is in flight. Close waits for
	// them; a blocking read lock taken while one is held could wait for it
	// forever, so refuse instead and let the caller reap.
	if !m.mu.TryRLock() {
		if st.held > 0 {
			return false
		}
		m.mu.RLock()
	}
	slot := st.free[len(st.free)-1]
	st.free = st.free[:len(st.free)-1]
	op := &st.ops[slot]
	op.tag, op.write, op.off, op.n, op.err, op.use = tag, write, st.base+off, total(bufs), nil, true
	st.held++
	fail := func(err error) bool {
		st.finishNow(slot, err)
		return true
	}
	switch {
	case m.closed:
		return fail(fmt.Errorf("%s: %w", m.name, os.ErrClosed))
	case write && m.opts.ReadOnly:
		return fail(fmt.Errorf("write %s: %w", m.name, os.ErrPermission))
	case len(bufs) > maxIov:
		return fail(fmt.Errorf("%s: a transfer of %d buffers (at most %d)", m.name, len(bufs), maxIov))
	}
	iov := C.hemd_stream_iov(st.s, C.int(slot), C.int(len(bufs)))
	if iov == nil {
		return fail(fmt.Errorf("%s: out of memory for a transfer's buffers", m.name))
	}
	iovs := unsafe.Slice(iov, len(bufs))
	n := 0
	for _, p := range bufs {
		if len(p) == 0 {
			continue
		}
		op.pin.Pin(&p[0]) // nothing for guest memory, which Go does not own
		iovs[n] = C.struct_iovec{iov_base: unsafe.Pointer(&p[0]), iov_len: C.size_t(len(p))}
		n++
	}
	C.hemd_stream_iov(st.s, C.int(slot), C.int(n))
	w := C.int(0)
	if write {
		w = 1
	}
	if r := C.hemd_stream_start(m.img, st.s, C.int(slot), w, C.uint64_t(op.off)); r < 0 {
		op.pin.Unpin()
		op2 := "read"
		if write {
			op2 = "write"
		}
		return fail(m.ioErr(op2, C.ssize_t(r)))
	}
	return true
}

// finishNow records the outcome of a transfer that librbd never took.
func (st *Stream) finishNow(slot int32, err error) {
	st.ops[slot].err = err
	st.done = append(st.done, slot)
}

// Submit does nothing: Read and Write hand each transfer to librbd at once.
func (st *Stream) Submit() {}

// Reap calls done(tag, err) for every transfer finished so far.
func (st *Stream) Reap(done func(tag uint64, err error)) { st.reap(done) }

// Wait is Reap, but it first waits until a transfer is finished, unless none
// is in flight.
func (st *Stream) Wait(done func(tag uint64, err error)) {
	if st.InFlight() > 0 {
		st.sleep(nil, nil)
	}
	st.reap(done)
}

// Sleep waits until a transfer completes or an fd of fds is readable,
// reports the transfers finished, and sets ready[i] for each fd found
// readable (it reads none of them).
func (st *Stream) Sleep(fds []int, ready []bool, done func(tag uint64, err error)) {
	st.sleep(fds, ready)
	st.reap(done)
}

func (st *Stream) sleep(fds []int, ready []bool) {
	var b [8]byte
	_, _ = unix.Read(st.efd, b[:]) // a stale signal would end the poll at once
	if len(st.done) > 0 {
		return
	}
	// Woken once a quarter of what is in flight is done (as storage.Stream):
	// one wake-up for several completions.
	want := 0
	if st.InFlight() > 0 {
		want = max(1, st.InFlight()/sleepWaitDiv)
		if C.hemd_stream_arm(st.s, C.int(want)) != 0 {
			return
		}
	}
	pfds := append(st.pfds[:0], unix.PollFd{Fd: int32(st.efd), Events: unix.POLLIN})
	for _, fd := range fds {
		pfds = append(pfds, unix.PollFd{Fd: int32(fd), Events: unix.POLLIN})
	}
	for {
		if _, err := unix.Poll(pfds, -1); err != unix.EINTR {
			break
		}
	}
	if want > 0 {
		C.hemd_stream_disarm(st.s)
	}
	for i := range fds {
		ready[i] = pfds[i+1].Revents != 0
	}
	st.pfds = pfds // kept: no allocation per sleep
}

// sleepWaitDiv: Sleep and Wait return once a quarter of the transfers in
// flight are done, or at once if that many are.
const sleepWaitDiv = 4

func (st *Stream) reap(done func(tag uint64, err error)) {
	for len(st.done) > 0 {
		slot := st.done[0]
		st.done = st.done[1:]
		st.report(slot, st.ops[slot].err, done)
	}
	st.done = st.done[:0]
	n := int(C.hemd_stream_reap(st.s, st.outp, st.retp, C.int(len(st.out))))
	for i := range n {
		slot := int32(st.out[i])
		op := &st.ops[slot]
		op.pin.Unpin()
		var err error
		switch r := st.ret[i]; {
		case r < 0:
			what := "read"
			if op.write {
				what = "write"
			}
			err = st.m.ioErr(what, r)
		case op.write && r == 0: // librbd's writes complete with 0
		case int(r) != op.n:
			err = fmt.Errorf("%s: %d of %d bytes at %d: %w", st.m.name, r, op.n, op.off, io.ErrUnexpectedEOF)
		}
		st.report(slot, err, done)
	}
}

// report frees slot and tells done its outcome.
func (st *Stream) report(slot int32, err error, done func(tag uint64, err error)) {
	op := &st.ops[slot]
	if op.use {
		op.use = false
		st.held--
		st.m.mu.RUnlock()
	}
	st.free = append(st.free, slot)
	done(op.tag, err)
}

// Close waits for the transfers in flight and frees the stream. Their
// outcomes are dropped.
func (st *Stream) Close() error {
	if st.s == nil {
		return nil
	}
	for st.InFlight() > 0 {
		st.Wait(func(uint64, error) {})
	}
	C.hemd_stream_free(st.s)
	C.free(unsafe.Pointer(st.outp))
	C.free(unsafe.Pointer(st.retp))
	st.s, st.outp, st.retp, st.out, st.ret = nil, nil, nil, nil, nil
	unix.Close(st.efd)
	return nil
}
