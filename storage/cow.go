package storage

// Copy-before-write snapshots of a file that is being written: what a
// snapshot of an attached volume is made with where the filesystem has no
// reflinks (ext4).
//
// StartCOW takes the file's write gate exclusively: it waits for the writes
// in flight to finish and holds new ones back while it installs a tracker (a
// bitmap of the range's chunks), then lets them go. That instant is the
// snapshot's point in time; the writes wait for it a few microseconds. From
// then on, a write that touches a chunk not copied yet first copies the
// chunk's old contents into the snapshot, and Run copies the others in the
// background. Only bytes move: the file holds ciphertext and so does the
// snapshot; no key is needed.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultCOWChunk is the default chunk of a copy-before-write snapshot
// (QEMU's backup job copies 64 KiB clusters too): the most a guest's first
// write to a chunk copies before it goes ahead.
const DefaultCOWChunk = 64 << 10

// copyRun is the most a write or the background copier copies at a time.
const copyRun = 1 << 20

// COWOptions tune a copy-before-write snapshot.
type COWOptions struct {
	// Chunk is the unit of copying and of the bitmap of copied chunks: a
	// power of two from 4 KiB to 1 MiB (default DefaultCOWChunk).
	Chunk int64
	// DstZeroed says that dst reads as zeros wherever nothing was written to
	// it (a new sparse file): zeros are not written to it, so the source's
	// holes and zeroed ranges stay holes in the snapshot.
	DstZeroed bool
}

// COW is a copy-before-write snapshot of a range of a File in progress.
type COW struct {
	f      *File
	off, n int64       // the range of f
	dst    io.WriterAt // offset 0 is f's off
	shift  uint        // log2 of the chunk size
	chunks int64
	zeroed bool

	done []atomic.Uint64 // bitmap of chunks copied

	mu      sync.Mutex
	cond    sync.Cond
	claimed []uint64 // bitmap of chunks being copied
	left    int64    // chunks not done
	err     error    // first failure
	failed  atomic.Bool

	paused                    time.Duration
	byWrites, byCopier, holes atomic.Int64 // chunks
	written                   atomic.Int64 // bytes written to dst
	ran                       atomic.Bool
}

// COWStats describe a snapshot.
type COWStats struct {
	// Paused is how long writes were held back when the snapshot started:
	// the wait for the writes in flight, and installing the tracker.
	Paused time.Duration
	Chunk  int64 // bytes
	Chunks int64
	// CopiedByWrites are the chunks a write copied before it went ahead;
	// CopiedByCopier those the background copier copied; Holes those the
	// copier found to be holes and did not read.
	CopiedByWrites, CopiedByCopier, Holes int64
	// Written is the bytes written to the snapshot (zeros are not written
	// with DstZeroed).
	Written int64
}

// StartCOW starts a point-in-time copy of f's bytes [off, off+n) into dst
// (dst's offset 0 is f's offset off). When it returns, the copy holds, for
// every byte of the range, what the file held at the instant StartCOW took
// the write gate: every write (WriteAtv, WriteAt, Punch, ZeroRange, a
// Batch's writes) that returned before StartCOW was called is in it, none
// that started after StartCOW returned; a write in flight during the call
// either way, whole. The copy is complete when Run returns nil; Run must be
// called for every COW that StartCOW returns.
func (s *File) StartCOW(off, n int64, dst io.WriterAt, o COWOptions) (*COW, error) {
	if o.Chunk == 0 {
		o.Chunk = DefaultCOWChunk
	}
	if o.Chunk < 4096 || o.Chunk > copyRun || o.Chunk&(o.Chunk-1) != 0 {
		return nil, fmt.Errorf("snapshot of %s: chunk of %d bytes: want a power of two from 4 KiB to 1 MiB", s.path, o.Chunk)
	}
	if size := s.Size(); off < 0 || n <= 0 || off+n < off || off+n > size {
		return nil, fmt.Errorf("snapshot of %s (%d bytes): range %d+%d out of range", s.path, size, off, n)
	}
	c := &COW{
		f: s, off: off, n: n, dst: dst, zeroed: o.DstZeroed,
		shift: uint(bits.TrailingZeros64(uint64(o.Chunk))),
	}
	c.chunks = (n + o.Chunk - 1) / o.Chunk
	words := (c.chunks + 63) / 64
	c.done = make([]atomic.Uint64, words)
	c.claimed = make([]uint64, words)
	c.left = c.chunks
	c.cond.L = &c.mu

	t0 := time.Now()
	s.gate.Lock() // the writes in flight finish; new ones wait
	s.cowMu.Lock()
	var cows []*COW
	if p := s.cows.Load(); p != nil {
		cows = slices.Clone(*p)
	}
	cows = append(cows, c)
	s.cows.Store(&cows)
	s.cowMu.Unlock()
	s.gate.Unlock()
	c.paused = time.Since(t0)
	return c, nil
}

// dropCOW removes c from the snapshots that writes copy for.
func (s *File) dropCOW(c *COW) {
	s.cowMu.Lock()
	defer s.cowMu.Unlock()
	p := s.cows.Load()
	if p == nil {
		return
	}
	cows := slices.DeleteFunc(slices.Clone(*p), func(x *COW) bool { return x == c })
	if len(cows) == 0 {
		s.cows.Store(nil)
		return
	}
	s.cows.Store(&cows)
}

// copyBefore copies, for every snapshot in progress, the chunks of
// [off, off+n) it has not copied yet. The caller holds the gate (shared)
// and writes the range after.
func (s *File) copyBefore(off, n int64) {
	p := s.cows.Load()
	if p == nil {
		return
	}
	for _, c := range *p {
		c.before(off, n)
	}
}

// Stats returns the snapshot's figures so far.
func (c *COW) Stats() COWStats {
	return COWStats{
		Paused: c.paused, Chunk: 1 << c.shift, Chunks: c.chunks,
		CopiedByWrites: c.byWrites.Load(), CopiedByCopier: c.byCopier.Load(), Holes: c.holes.Load(),
		Written: c.written.Load(),
	}
}

// Run copies every chunk not copied yet and returns when the copy is
// complete (nil), failed or ctx ended (the first error): from then on,
// writes copy nothing more for this snapshot. A failure never fails a
// write. dst is not synced: that is the caller's.
func (c *COW) Run(ctx context.Context) error {
	if c.ran.Swap(true) {
		return errors.New("snapshot: Run called twice")
	}
	defer c.f.dropCOW(c)
	perRun := int64(copyRun >> c.shift)
	for i := int64(0); i < c.chunks; {
		if err := ctx.Err(); err != nil {
			c.fail(err)
			break
		}
		if c.failed.Load() {
			break
		}
		if c.isDone(i) {
			i++
			continue
		}
		if c.zeroed {
			if j := c.skipHoles(i); j > i {
				i = j
				continue
			}
		}
		c.mu.Lock()
		a, b := c.claimLocked(i, c.chunks, perRun)
		c.mu.Unlock()
		if a == b {
			i = b // the rest are done or being copied by writes
			continue
		}
		err := c.copy(a, b)
		c.mu.Lock()
		c.finishLocked(a, b, err)
		c.mu.Unlock()
		c.byCopier.Add(b - a)
		i = b
	}
	// Chunks that writes are copying.
	c.mu.Lock()
	for c.left > 0 && c.err == nil {
		c.cond.Wait()
	}
	err := c.err
	c.mu.Unlock()
	if err != nil {
		return fmt.Errorf("snapshot of %s: %w", c.f.path, err)
	}
	return nil
}

// fail records err as the snapshot's failure and wakes its waiters.
func (c *COW) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		c.err = err
		c.failed.Store(true)
	}
	c.cond.Broadcast()
}

func (c *COW) isDone(i int64) bool { return c.done[i/64].Load()&(1<<(i%64)) != 0 }

func (c *COW) isClaimed(i int64) bool { return c.claimed[i/64]&(1<<(i%64)) != 0 }

// allDone reports whether chunks [a, b) are copied.
func (c *COW) allDone(a, b int64) bool {
	for i := a; i < b; i++ {
		if !c.isDone(i) {
			return false
		}
	}
	return true
}

// claimLocked claims the first run of chunks in [from, to) that are neither
// copied nor being copied, at most max of them, and returns it as [a, b);
// a == b when there is none.
func (c *COW) claimLocked(from, to, max int64) (a, b int64) {
	a = from
	for a < to && (c.isDone(a) || c.isClaimed(a)) {
		a++
	}
	b = a
	for b < to && b-a < max && !c.isDone(b) && !c.isClaimed(b) {
		c.claimed[b/64] |= 1 << (b % 64)
		b++
	}
	return a, b
}

// finishLocked marks claimed chunks [a, b) copied (or the snapshot failed)
// and wakes the writes waiting for them.
func (c *COW) finishLocked(a, b int64, err error) {
	for i := a; i < b; i++ {
		c.claimed[i/64] &^= 1 << (i % 64)
		c.done[i/64].Or(1 << (i % 64))
	}
	c.left -= b - a
	if err != nil && c.err == nil {
		c.err = err
		c.failed.Store(true)
	}
	c.cond.Broadcast()
}

// before copies the chunks of [off, off+n) (offsets in the file) not copied
// yet, or waits for whoever copies them, so that a write to the range may
// go ahead.
func (c *COW) before(off, n int64) {
	lo, hi := max(off, c.off), min(off+n, c.off+c.n)
	if lo >= hi || c.failed.Load() {
		return
	}
	a, b := (lo-c.off)>>c.shift, (hi-1-c.off)>>c.shift+1
	if c.allDone(a, b) {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for c.err == nil {
		if ra, rb := c.claimLocked(a, b, copyRun>>c.shift); ra < rb {
			c.mu.Unlock()
			err := c.copy(ra, rb)
			c.byWrites.Add(rb - ra)
			c.mu.Lock()
			c.finishLocked(ra, rb, err)
			continue
		}
		if c.allDone(a, b) {
			return
		}
		c.cond.Wait() // another write, or the copier, is copying some
	}
}

// skipHoles marks the chunks from i on that lie wholly in a hole of the
// file copied (dst reads as zeros there) and returns the first chunk after
// them (i if there is none). A chunk neither copied nor being copied has not
// been written since the snapshot started, so the hole seen is what the
// snapshot holds.
func (c *COW) skipHoles(i int64) int64 {
	start := c.off + i<<c.shift
	data, err := unix.Seek(c.f.fd, start, unix.SEEK_DATA)
	switch {
	case errors.Is(err, unix.ENXIO):
		data = c.off + c.n // a hole to the end of the file
	case err != nil:
		return i // cannot tell: copy
	}
	j := min((data-c.off)>>c.shift, c.chunks)
	if j <= i {
		return i
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	var n int64
	for k := i; k < j; k++ {
		if !c.isDone(k) && !c.isClaimed(k) {
			c.done[k/64].Or(1 << (k % 64))
			n++
		}
	}
	c.left -= n
	c.holes.Add(n)
	c.cond.Broadcast()
	return j
}

var copyBufs = sync.Pool{New: func() any { b := make([]byte, copyRun); return &b }}

// copy copies chunks [a, b) (claimed, at most copyRun bytes) from the file
// into dst.
func (c *COW) copy(a, b int64) error {
	lo, hi := a<<c.shift, min(b<<c.shift, c.n)
	bp := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(bp)
	buf := (*bp)[:hi-lo]
	if _, err := c.f.ReadAtv([][]byte{buf}, c.off+lo); err != nil {
		return fmt.Errorf("read %s at %d: %w", c.f.path, c.off+lo, err)
	}
	if !c.zeroed {
		return c.write(buf, lo)
	}
	// Only the 4 KiB pages that are not all zeros.
	const page = 4096
	for p := 0; p < len(buf); {
		for p < len(buf) && zero(buf[p:min(p+page, len(buf))]) {
			p += page
		}
		q := p
		for q < len(buf) && !zero(buf[q:min(q+page, len(buf))]) {
			q += page
		}
		q = min(q, len(buf))
		if p < q {
			if err := c.write(buf[p:q], lo+int64(p)); err != nil {
				return err
			}
		}
		p = q
	}
	return nil
}

func (c *COW) write(p []byte, off int64) error {
	if _, err := c.dst.WriteAt(p, off); err != nil {
		return fmt.Errorf("write snapshot at %d: %w", off, err)
	}
	c.written.Add(int64(len(p)))
	return nil
}

// zeroPage is compared against: bytes.Equal is vectorized.
var zeroPage [4096]byte

// zero reports whether p (at most a page) is all zeros.
func zero(p []byte) bool { return bytes.Equal(p, zeroPage[:len(p)]) }
