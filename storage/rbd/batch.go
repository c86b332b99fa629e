//go:build cgo && !norbd

package rbd

/*
#include <stdlib.h>
#include "rbd.h"
*/
import "C"

import (
	"context"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync/atomic"
	"unsafe"
)

// maxIov is the most buffers librbd takes in one transfer (IOV_MAX).
const maxIov = 1024

// Batch queues reads and writes of an image and carries them out together:
// every transfer is handed to librbd (rbd_aio_readv, rbd_aio_writev) before
// the first is waited for, so a queue's whole batch is in flight at once.
// One goroutine uses a Batch at a time.
type Batch struct {
	m     *Image
	base  int64 // added to every offset (a Section's window)
	depth int
	ops   *C.hemd_op // depth of them, in C memory
	opv   []C.hemd_op
	n     int
	// iov holds the buffers of every queued transfer, in C memory;
	// first[i] is where transfer i's begin, size[i] its length.
	iov   *C.struct_iovec
	iovv  []C.struct_iovec
	used  int
	first []int
	size  []int
	write bool           // a write is queued
	pin   runtime.Pinner // the Go buffers C holds until Run returns
}

// NewBatch returns a batch of up to depth transfers.
func (m *Image) NewBatch(depth int) *Batch { return newBatch(m, depth) }

func newBatch(m *Image, depth int) *Batch {
	depth = max(depth, 1)
	b := &Batch{m: m, depth: depth, first: make([]int, 0, depth), size: make([]int, 0, depth)}
	b.ops = (*C.hemd_op)(C.calloc(C.size_t(depth), C.size_t(unsafe.Sizeof(C.hemd_op{}))))
	b.opv = unsafe.Slice(b.ops, depth)
	b.grow(depth * 4)
	return b
}

// grow makes room for n buffers in all.
func (b *Batch) grow(n int) {
	if n <= len(b.iovv) {
		return
	}
	n = max(n, 2*len(b.iovv))
	p := (*C.struct_iovec)(C.realloc(unsafe.Pointer(b.iov), C.size_t(n)*C.size_t(unsafe.Sizeof(C.struct_iovec{}))))
	if p == nil {
		panic("rbd: out of memory for a batch's buffers")
	}
	b.iov, b.iovv = p, unsafe.Slice(p, n)
}

// Read queues a read of bufs at off; false means the batch is full. The
// memory bufs point to must stay put until Run returns.
func (b *Batch) Read(bufs [][]byte, off int64) bool { return b.queue(false, bufs, off) }

// Write queues a write of bufs at off, under the same rules as Read.
func (b *Batch) Write(bufs [][]byte, off int64) bool { return b.queue(true, bufs, off) }

func (b *Batch) queue(write bool, bufs [][]byte, off int64) bool {
	if b.n == b.depth {
		return false
	}
	b.grow(b.used + len(bufs))
	start := b.used
	length := 0
	for _, p := range bufs {
		if len(p) == 0 {
			continue
		}
		b.pin.Pin(&p[0]) // nothing for guest memory, which Go does not own
		b.iovv[b.used] = C.struct_iovec{iov_base: unsafe.Pointer(&p[0]), iov_len: C.size_t(len(p))}
		b.used++
		length += len(p)
	}
	o := &b.opv[b.n]
	o.write = 0
	if write {
		o.write = 1
	}
	o.off = C.uint64_t(b.base + off)
	o.iovcnt = C.int(b.used - start)
	o.ret = 0
	b.first = append(b.first, start)
	b.size = append(b.size, length)
	b.write = b.write || write
	b.n++
	return true
}

// Run carries out the queued transfers and calls done(i, err) for each, in
// queue order. The batch is empty afterwards.
func (b *Batch) Run(done func(i int, err error)) {
	if b.n == 0 {
		return
	}
	defer b.reset()
	failed := b.run()
	for i := 0; i < b.n; i++ {
		err := failed
		if err == nil {
			o := &b.opv[i]
			switch {
			case o.ret < 0:
				op := "read"
				if o.write != 0 {
					op = "write"
				}
				err = b.m.ioErr(op, o.ret)
			case o.write != 0 && o.ret == 0: // librbd's writes complete with 0
			case int(o.ret) != b.size[i]:
				err = fmt.Errorf("%s: %d of %d bytes at %d: %w", b.m.name, o.ret, b.size[i], o.off, io.ErrUnexpectedEOF)
			}
		}
		done(i, err)
	}
}

// run hands the batch to librbd and waits for it; an error is every
// transfer's.
func (b *Batch) run() error {
	if b.write && b.m.opts.ReadOnly {
		return fmt.Errorf("write %s: %w", b.m.name, os.ErrPermission)
	}
	for i := 0; i < b.n; i++ {
		o := &b.opv[i]
		if o.iovcnt > maxIov {
			return fmt.Errorf("%s: a transfer of %d buffers (at most %d)", b.m.name, o.iovcnt, maxIov)
		}
		o.iov = &b.iovv[b.first[i]] // iov may have moved as it grew
	}
	img, err := b.m.use()
	if err != nil {
		return err
	}
	defer b.m.done()
	C.hemd_run(img, b.ops, C.int(b.n))
	return nil
}

func (b *Batch) reset() {
	b.pin.Unpin()
	b.n, b.used, b.write = 0, 0, false
	b.first, b.size = b.first[:0], b.size[:0]
}

// Close frees the batch.
func (b *Batch) Close() error {
	if b.ops == nil {
		return nil
	}
	b.reset()
	C.free(unsafe.Pointer(b.ops))
	C.free(unsafe.Pointer(b.iov))
	b.ops, b.opv, b.iov, b.iovv = nil, nil, nil, nil
	return nil
}

// Section is a window of an Image: offset 0 of the section is offset base
// of the image. An encrypted volume's data area is a section past its
// header.
type Section struct {
	m    *Image
	base int64
	size atomic.Int64 // grows with Grow
}

// NewSection returns the window [base, base+size) of m.
func NewSection(m *Image, base, size int64) (*Section, error) {
	if base < 0 || size <= 0 || base+size < base || base+size > m.Size() {
		return nil, fmt.Errorf("section %d+%d of %s (%d bytes): out of range", base, size, m.name, m.Size())
	}
	s := &Section{m: m, base: base}
	s.size.Store(size)
	return s, nil
}

// Size returns the section's size.
func (s *Section) Size() int64 { return s.size.Load() }

// Grow makes the section size bytes long, growing its image as needed.
func (s *Section) Grow(size int64) error {
	if size < s.Size() {
		return fmt.Errorf("grow section of %s to %d bytes: it has %d", s.m.name, size, s.Size())
	}
	if err := s.m.Grow(s.base + size); err != nil {
		return err
	}
	s.size.Store(size)
	return nil
}

// Reachable tells whether the cluster can serve the section's image now
// (Image.Reachable).
func (s *Section) Reachable(ctx context.Context) error { return s.m.Reachable(ctx) }

// ReadAtv reads bufs at off within the section.
func (s *Section) ReadAtv(bufs [][]byte, off int64) (int, error) {
	return s.m.ReadAtv(bufs, s.base+off)
}

// WriteAtv writes bufs at off within the section.
func (s *Section) WriteAtv(bufs [][]byte, off int64) (int, error) {
	return s.m.WriteAtv(bufs, s.base+off)
}

// Flush flushes the image.
func (s *Section) Flush() error { return s.m.Flush() }

// Punch frees a range of the section.
func (s *Section) Punch(off, n int64) error { return s.m.Punch(s.base+off, n) }

// ZeroRange zeroes a range of the section.
func (s *Section) ZeroRange(off, n int64) error { return s.m.ZeroRange(s.base+off, n) }

// NewBatch returns a batch of transfers within the section.
func (s *Section) NewBatch(depth int) *Batch {
	b := newBatch(s.m, depth)
	b.base = s.base
	return b
}
