package blk

import (
	"bytes"
	"encoding/binary"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// heldStream is a Stream whose completions the caller sees only once the
// test releases them: requests stay in flight as long as the test wants.
type heldStream struct {
	Stream
	released atomic.Bool
	queued   atomic.Int32 // transfers taken
	efd      int          // readable once released: ends a Sleep
}

func (h *heldStream) Read(bufs [][]byte, off int64, tag uint64) bool {
	ok := h.Stream.Read(bufs, off, tag)
	if ok {
		h.queued.Add(1)
	}
	return ok
}

func (h *heldStream) Write(bufs [][]byte, off int64, tag uint64) bool {
	ok := h.Stream.Write(bufs, off, tag)
	if ok {
		h.queued.Add(1)
	}
	return ok
}

func newHeldStream(t *testing.T, s Stream) *heldStream {
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(efd) })
	return &heldStream{Stream: s, efd: efd}
}

func (h *heldStream) release() {
	h.released.Store(true)
	var one [8]byte
	one[0] = 1
	unix.Write(h.efd, one[:])
}

func (h *heldStream) Ready() bool { return h.released.Load() && h.Stream.Ready() }

// Sleep sleeps on fds and the release while held, then in the stream.
func (h *heldStream) Sleep(fds []int, ready []bool, done func(uint64, error)) {
	if h.released.Load() {
		h.Stream.Sleep(fds, ready, done)
		return
	}
	pfds := []unix.PollFd{{Fd: int32(h.efd), Events: unix.POLLIN}}
	for _, fd := range fds {
		pfds = append(pfds, unix.PollFd{Fd: int32(fd), Events: unix.POLLIN})
	}
	unix.Poll(pfds, -1)
	for i := range fds {
		ready[i] = pfds[i+1].Revents != 0
	}
}

func (h *heldStream) Reap(done func(uint64, error)) {
	if h.released.Load() {
		h.Stream.Reap(done)
	}
}

func (h *heldStream) Wait(done func(uint64, error)) {
	for !h.released.Load() {
		time.Sleep(time.Millisecond)
	}
	h.Stream.Wait(done)
}

// A streaming queue keeps every request in flight until storage completes
// it, and a ring that stops (GET_VRING_BASE: the VM stops or migrates)
// answers only once every request in flight is complete and on the used
// ring, its data in the file: nothing taken is lost or left for later.
func TestStreamDrainsAtStop(t *testing.T) {
	for _, enc := range []bool{false, true} {
		var heldP atomic.Pointer[heldStream]
		cfg := Config{}
		if enc {
			cfg.Keys = &testKeys{unit: 512}
		}
		r := newRig(t, rigOpts{cfg: cfg, stream: true, wrapStream: func(s Stream) Stream {
			h := newHeldStream(t, s)
			heldP.Store(h)
			return h
		}})
		const n = 8
		var reqs []req
		for i := range n {
			reqs = append(reqs, r.prepare(TypeOut, uint64(64*i), pattern(4096, byte(i+1)), 4096))
		}
		if err := r.c.Queues[0].Kick(); err != nil {
			t.Fatal(err)
		}
		// Every write is taken and in flight; none is complete.
		deadline := time.Now().Add(10 * time.Second)
		held := heldP.Load()
		for held == nil || held.queued.Load() < n {
			if time.Now().After(deadline) {
				t.Fatalf("enc=%v: the queue never had %d writes in flight", enc, n)
			}
			time.Sleep(time.Millisecond)
			held = heldP.Load()
		}
		stopped := make(chan uint32, 1)
		go func() {
			base, err := r.c.StopQueue(0)
			if err != nil {
				t.Error(err)
			}
			stopped <- base
		}()
		select {
		case <-stopped:
			t.Fatalf("enc=%v: GET_VRING_BASE answered with %d requests in flight", enc, n)
		case <-time.After(100 * time.Millisecond):
		}
		if got := binary.LittleEndian.Uint16(r.c.Mem[r.c.Queues[0].UsedGPA()+2:]); got != 0 {
			t.Fatalf("enc=%v: used index %d before storage completed anything", enc, got)
		}
		held.release()
		var base uint32
		select {
		case base = <-stopped:
		case <-time.After(10 * time.Second):
			t.Fatalf("enc=%v: GET_VRING_BASE not answered once storage completed", enc)
		}
		if base != n {
			t.Fatalf("enc=%v: ring stopped at %d, want %d", enc, base, n)
		}
		if got := binary.LittleEndian.Uint16(r.c.Mem[r.c.Queues[0].UsedGPA()+2:]); got != n {
			t.Fatalf("enc=%v: used index %d at stop, want %d", enc, got, n)
		}
		for i, q := range reqs {
			if st := r.c.Mem[q.status]; st != StatusOK {
				t.Fatalf("enc=%v: write %d: status %d", enc, i, st)
			}
			got := make([]byte, 4096)
			if _, err := r.store.ReadAt(got, int64(64*i*512)); err != nil {
				t.Fatal(err)
			}
			if !enc && !bytes.Equal(got, pattern(4096, byte(i+1))) {
				t.Fatalf("write %d: not in the file", i)
			}
			if enc && bytes.Equal(got, make([]byte, 4096)) {
				t.Fatalf("write %d: nothing in the file", i)
			}
		}
		r.stop()
	}
}

// The bounce ring hands out aligned, disjoint buffers while earlier ones
// are in use, reuses space once the oldest are freed, in any order, and
// refuses what does not fit.
func TestBounceRing(t *testing.T) {
	var b bounceRing
	b.init(64<<10, 8)
	type live struct {
		buf []byte
		id  int64
	}
	var ls []live
	take := func(n int) bool {
		buf, id, ok := b.alloc(n)
		if !ok {
			return false
		}
		if len(buf) != n || unsafePointer(buf)%bounceAlign != 0 {
			t.Fatalf("alloc(%d): %d bytes, misaligned", n, len(buf))
		}
		for _, l := range ls {
			if overlapsBuf(l.buf, buf) {
				t.Fatalf("alloc(%d) overlaps a live buffer", n)
			}
		}
		ls = append(ls, live{buf, id})
		return true
	}
	for range 4 {
		if !take(16 << 10) {
			t.Fatal("16 KiB refused in a 64 KiB ring")
		}
	}
	if take(1) {
		t.Fatal("alloc in a full ring")
	}
	// Freeing a younger one gives nothing back; freeing the oldest does.
	b.free(ls[2].id)
	if take(4096) {
		t.Fatal("space of a buffer freed before older ones reused")
	}
	b.free(ls[0].id)
	ls = []live{ls[1], ls[3]}
	if !take(16<<10) || take(1) {
		t.Fatal("space of the oldest, freed, not reused exactly")
	}
	for _, l := range ls {
		b.free(l.id)
	}
	ls = nil
	if b.n != 0 || !take(64<<10) {
		t.Fatalf("%d live after freeing all; whole ring refused", b.n)
	}
	b.free(ls[0].id)
	ls = nil
	// More allocations than slots: refused, whatever the room.
	for i := range 9 {
		if ok := take(512); ok != (i < 8) {
			t.Fatalf("alloc %d of 512 bytes: %v", i, ok)
		}
	}
	if take(128 << 10) {
		t.Fatal("larger than the ring")
	}
}

func unsafePointer(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[0])) }

func overlapsBuf(a, b []byte) bool {
	pa, pb := unsafePointer(a), unsafePointer(b)
	return pa < pb+uintptr(len(b)) && pb < pa+uintptr(len(a))
}
