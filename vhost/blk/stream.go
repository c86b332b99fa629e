package blk

import (
	"time"

	"github.com/hemd/hemd/vhost/virtq"
)

// StreamStore is a Store that can keep many transfers in flight and report
// each as it completes (storage.Stream: io_uring, continuously). A worker
// opens one Stream per running queue and serves its ring as a stream
// (vhost.StreamHandler): a request goes to storage as soon as the driver
// makes it available and back to the driver as soon as it is done.
type StreamStore interface {
	Store
	NewStream(depth int) (Stream, error)
}

// Stream queues positioned reads and writes, hands them to storage without
// waiting, and reports them as they complete, in any order. One goroutine
// uses a Stream at a time.
type Stream interface {
	// Read and Write queue one transfer, reported with tag. They copy
	// bufs' slice headers, not the data, which must stay put until it is
	// reported. They return false, queueing nothing, when the stream is
	// full (and Write while a snapshot of the store starts); with nothing
	// in flight they succeed.
	Read(bufs [][]byte, off int64, tag uint64) bool
	Write(bufs [][]byte, off int64, tag uint64) bool
	// Submit hands what is queued to storage.
	Submit()
	// Reap calls done for every transfer finished; Wait first waits for
	// one, unless none is in flight. A transfer is done in full (a short
	// one is completed, past the end reads as zeros).
	Reap(done func(tag uint64, err error))
	Wait(done func(tag uint64, err error))
	Room() bool
	Ready() bool
	InFlight() int
	// Sleep waits until a transfer completes or an fd of fds is readable,
	// calls done for the transfers finished, and sets ready[i] for each
	// fd found readable (it reads none).
	Sleep(fds []int, ready []bool, done func(tag uint64, err error))
	// Close waits for what is in flight and releases the stream.
	Close() error
}

// WithStreams returns st with the streams newStream makes (and st's
// batches, if it has them).
func WithStreams(st Store, newStream func(depth int) (Stream, error)) StreamStore {
	if bs, ok := st.(BatchStore); ok {
		return streamBatchStore{bs, newStream}
	}
	return streamStore{st, newStream}
}

type streamStore struct {
	Store
	newStream func(depth int) (Stream, error)
}

func (s streamStore) NewStream(depth int) (Stream, error) { return s.newStream(depth) }

type streamBatchStore struct {
	BatchStore
	newStream func(depth int) (Stream, error)
}

func (s streamBatchStore) NewStream(depth int) (Stream, error) { return s.newStream(depth) }

const (
	// streamDepth is the most requests a streaming queue keeps in flight.
	streamDepth = 128
	// streamBounce is the bounce buffer of a streaming queue: 32 writes of
	// 128 KiB in flight, as qemu-storage-daemon keeps at QD 32.
	streamBounce = 4 << 20
)

// streamState is a streaming worker's requests in flight.
type streamState struct {
	s      Stream
	tried  bool
	slots  []streamSlot
	free   []int32
	held   int32 // a started request waiting for room to be queued; -1: none
	bounce bounceRing
	// complete is the runner's: it puts a chain on the used ring.
	complete func(*virtq.Chain, uint32)
	done     func(tag uint64, err error) // w.streamDone, made once
}

// streamSlot is one request in flight.
type streamSlot struct {
	c      *virtq.Chain
	req    request
	t0     time.Time
	bounce int64     // bounce allocation of an encrypted write; -1: none
	one    [1][]byte // the write's ciphertext as a vector
}

// Streaming implements vhost.StreamHandler: the queue streams when its
// store can (StreamStore) and a stream opens.
func (w *worker) Streaming() bool {
	ss := &w.stream
	if ss.tried {
		return ss.s != nil
	}
	ss.tried = true
	st, ok := w.dev.cfg.Store.(StreamStore)
	if !ok {
		return false
	}
	s, err := st.NewStream(streamDepth)
	if err != nil {
		w.dev.log.Debug("no stream: requests served in batches", "queue", w.queue, "err", err)
		return false
	}
	ss.s, ss.held, ss.done = s, -1, w.streamDone
	ss.slots = make([]streamSlot, streamDepth)
	ss.free = make([]int32, 0, streamDepth)
	for i := streamDepth - 1; i >= 0; i-- {
		ss.slots[i].bounce = -1
		ss.free = append(ss.free, int32(i))
	}
	if w.xform != nil {
		ss.bounce.init(streamBounce, streamDepth)
	}
	w.dev.log.Debug("queue streams: requests in flight until storage completes each", "queue", w.queue, "depth", streamDepth)
	return true
}

// Room implements vhost.StreamHandler.
func (w *worker) Room() bool {
	ss := &w.stream
	return ss.held < 0 && len(ss.free) > 0 && ss.s.Room()
}

// InFlight implements vhost.StreamHandler: the transfers in flight and the
// request waiting for room.
func (w *worker) InFlight() int {
	n := w.stream.s.InFlight()
	if w.stream.held >= 0 {
		n++
	}
	return n
}

// Ready implements vhost.StreamHandler.
func (w *worker) Ready() bool { return w.stream.s.Ready() }

// Sleep implements vhost.StreamHandler.
func (w *worker) Sleep(fds []int, ready []bool, complete func(*virtq.Chain, uint32)) {
	ss := &w.stream
	ss.complete = complete
	ss.s.Sleep(fds, ready, ss.done)
	w.dispatchHeld()
}

// Submit implements vhost.StreamHandler.
func (w *worker) Submit() { w.stream.s.Submit() }

// Start implements vhost.StreamHandler: c is parsed and checked, and its
// transfer queued (a write encrypted first); a request that is not a read
// or write runs once every request before it is done.
func (w *worker) Start(c *virtq.Chain, complete func(*virtq.Chain, uint32)) {
	ss := &w.stream
	ss.complete = complete
	slot := ss.free[len(ss.free)-1]
	ss.free = ss.free[:len(ss.free)-1]
	sl := &ss.slots[slot]
	sl.c, sl.t0 = c, time.Now()
	if n, done := w.begin(c, &sl.req); done {
		w.observe(&sl.req, time.Since(sl.t0))
		w.release(slot, n)
		return
	}
	if !w.dispatch(slot) {
		ss.held = slot
	}
}

// Reap implements vhost.StreamHandler.
func (w *worker) Reap(wait bool, complete func(*virtq.Chain, uint32)) {
	ss := &w.stream
	ss.complete = complete
	if wait {
		ss.s.Wait(ss.done)
	} else {
		ss.s.Reap(ss.done)
	}
	w.dispatchHeld()
}

// dispatchHeld queues the request that waited for room, if there is room.
func (w *worker) dispatchHeld() {
	if ss := &w.stream; ss.held >= 0 && w.dispatch(ss.held) {
		ss.held = -1
		ss.s.Submit()
	}
}

// dispatch queues the transfer of the request in slot, or carries out a
// request that is not a transfer; false means it must wait for requests in
// flight to complete.
func (w *worker) dispatch(slot int32) bool {
	ss := &w.stream
	sl := &ss.slots[slot]
	r := &sl.req
	off := int64(r.sector * sectorSize)
	switch {
	case r.typ == TypeIn:
		return ss.s.Read(r.data, off, uint64(slot))
	case r.typ == TypeOut && w.xform == nil:
		return ss.s.Write(r.data, off, uint64(slot))
	case r.typ == TypeOut:
		n := int(r.length)
		buf, id, ok := ss.bounce.alloc(n)
		if !ok {
			if ss.s.InFlight() > 0 {
				return false
			}
			// Larger than the whole bounce buffer: written in parts.
			w.runNow(slot)
			return true
		}
		w.encryptTo(buf, r.data, n, uint64(off)/uint64(w.xform.UnitSize()))
		sl.one[0] = buf
		if !ss.s.Write(sl.one[:], off, uint64(slot)) {
			ss.bounce.free(id)
			return false
		}
		sl.bounce = id
		return true
	}
	if ss.s.InFlight() > 0 {
		return false
	}
	w.runNow(slot)
	return true
}

// runNow carries out the request in slot and completes it.
func (w *worker) runNow(slot int32) {
	r := &w.stream.slots[slot].req
	t0 := time.Now()
	n, err := w.do(r)
	written := w.end(r, n, err)
	w.observe(r, time.Since(t0))
	w.release(slot, written)
}

// streamDone completes the request of a transfer the stream reports.
func (w *worker) streamDone(tag uint64, err error) {
	ss := &w.stream
	slot := int32(tag)
	sl := &ss.slots[slot]
	r := &sl.req
	var n uint32
	if r.typ == TypeIn {
		w.stats.Reads.Add(1)
		if err == nil {
			if w.xform != nil {
				w.decrypt(r.data, r.length, int64(r.sector*sectorSize))
			}
			w.stats.BytesRead.Add(r.length)
			n = uint32(r.length)
		} else {
			err = wrapf("read", err)
		}
	} else {
		w.stats.Writes.Add(1)
		if sl.bounce >= 0 {
			ss.bounce.free(sl.bounce)
			sl.bounce, sl.one[0] = -1, nil
		}
		if err == nil {
			w.stats.BytesWritten.Add(r.length)
		} else {
			err = wrapf("write", err)
		}
	}
	written := w.end(r, n, err)
	w.observe(r, time.Since(sl.t0))
	w.release(slot, written)
}

// release frees slot and completes its chain.
func (w *worker) release(slot int32, written uint32) {
	ss := &w.stream
	sl := &ss.slots[slot]
	c := sl.c
	sl.c = nil
	ss.free = append(ss.free, slot)
	ss.complete(c, written)
}

// closeStream releases the stream (the runner completed every request).
func (w *worker) closeStream() error {
	ss := &w.stream
	if ss.s == nil {
		return nil
	}
	err := ss.s.Close()
	ss.s = nil
	ss.bounce.buf = nil
	return err
}

// bounceRing hands out the ciphertext buffers of writes in flight from one
// buffer, in order, like a ring: writes complete about in the order they
// were queued, so freeing one lets the oldest space go as soon as every
// write before it is done. Allocations are 4 KiB aligned (O_DIRECT).
type bounceRing struct {
	buf  []byte
	q    []bounceAlloc // live allocations, a circle: oldest at q[head]
	head int
	n    int   // live allocations
	id0  int64 // id of the oldest live allocation
}

type bounceAlloc struct {
	off, end int
	freed    bool
}

const bounceAlign = 4096

// init sets up size bytes for at most n allocations at once.
func (b *bounceRing) init(size, n int) {
	b.buf = make([]byte, size) // a large allocation is page aligned
	b.q = make([]bounceAlloc, n)
}

func (b *bounceRing) at(k int) *bounceAlloc { return &b.q[(b.head+k)%len(b.q)] }

// alloc returns n bytes and their id; false when they do not fit now.
func (b *bounceRing) alloc(n int) ([]byte, int64, bool) {
	size := (n + bounceAlign - 1) &^ (bounceAlign - 1)
	off := -1
	switch {
	case b.n == len(b.q):
	case b.n == 0:
		if size <= len(b.buf) {
			off = 0
		}
	default:
		oldest, newest := b.at(0).off, b.at(b.n-1)
		if newest.off >= oldest {
			// Free: after the newest, and before the oldest.
			if newest.end+size <= len(b.buf) {
				off = newest.end
			} else if size <= oldest {
				off = 0
			}
		} else if newest.end+size <= oldest {
			off = newest.end
		}
	}
	if off < 0 {
		return nil, 0, false
	}
	*b.at(b.n) = bounceAlloc{off: off, end: off + size}
	b.n++
	return b.buf[off : off+n : off+n], b.id0 + int64(b.n-1), true
}

// free gives back allocation id.
func (b *bounceRing) free(id int64) {
	b.at(int(id - b.id0)).freed = true
	for b.n > 0 && b.at(0).freed {
		b.head = (b.head + 1) % len(b.q)
		b.n--
		b.id0++
	}
}
