package storage

import (
	"errors"
	"fmt"
	"math"
	"os"
	"unsafe"

	"github.com/hemd/hemd/storage/uring"
	"golang.org/x/sys/unix"
)

// Batch queues positioned reads and writes on a File and carries them out
// together: with one io_uring submission where the kernel allows it,
// otherwise with one preadv or pwritev each (the same outcome, more system
// calls). One goroutine uses a Batch at a time.
type Batch struct {
	f    *File
	base int64       // added to every offset (a Section's window)
	ring *uring.Ring // nil: one system call per transfer
	ops  []batchOp
	res  []int32 // io_uring result of each op
	// ringWrites sends buffered writes through the ring too (measurement).
	ringWrites bool
	// asyncMin: buffered reads of at least this many bytes go to the
	// kernel's worker threads (IOSQE_ASYNC) and each is done as soon as it
	// completes (0: never). SetAsyncReads.
	asyncMin int
	broken   error // why there is no ring (refused, broken, not asked for)
}

// Results that are not the kernel's: an op not handed to the ring (done
// with plain system calls), one the ring has not completed, and one a broken
// ring never completed.
const (
	resSync = math.MinInt32 + iota
	resPending
	resBroken
	resDone // reported to done as it completed (SetAsyncReads)
)

type batchOp struct {
	write bool
	off   int64 // in the file
	n     int   // bytes
	bufs  [][]byte
	iov   []unix.Iovec
}

// NewBatch returns a batch of up to depth transfers. It falls back to one
// system call per transfer when io_uring is not available (or when sync is
// set): that is never an error.
func (s *File) NewBatch(depth int, sync bool) *Batch { return s.newBatch(depth, 0, sync) }

// NewBatch returns a batch of transfers within the section.
func (s *Section) NewBatch(depth int, sync bool) *Batch { return s.f.newBatch(depth, s.base, sync) }

func (s *File) newBatch(depth int, base int64, sync bool) *Batch {
	b := &Batch{f: s, base: base, ops: make([]batchOp, 0, depth), res: make([]int32, depth)}
	if sync {
		b.broken = errSyncAsked
		return b
	}
	r, err := uring.New(uint32(depth))
	if err != nil {
		b.broken = err
		return b
	}
	b.ring = r
	return b
}

var errSyncAsked = errors.New("one system call per transfer was asked for")

// SetAsyncReads makes buffered reads of at least min bytes (0: none) run on
// the kernel's io_uring worker threads, at most workers of them (0: the
// kernel's limit), instead of inline in the submitting thread; Run then
// reports each read as soon as it completes, while later ones are still
// being copied. So the copies of large reads from the page cache run on
// another core while the caller works on the reads already done (hemd
// decrypts them): measured in vhost/blk/PERFORMANCE.md. It is a no-op
// without a ring.
func (b *Batch) SetAsyncReads(min int, workers uint32) error {
	if b.ring == nil {
		return nil
	}
	b.asyncMin = min
	if min > 0 && workers > 0 {
		return b.ring.SetMaxWorkers(workers, 0)
	}
	return nil
}

// Uring reports whether the batch submits through io_uring.
func (b *Batch) Uring() bool { return b.ring != nil }

// Why says why the batch makes one system call per transfer (nil while it
// uses io_uring).
func (b *Batch) Why() error {
	if b.ring != nil {
		return nil
	}
	return b.broken
}

// Read queues a read of bufs at off; false means the batch is full. bufs'
// headers are copied; the memory they point to must stay put until Run
// returns.
func (b *Batch) Read(bufs [][]byte, off int64) bool { return b.queue(false, bufs, off) }

// Write queues a write of bufs at off, under the same rules as Read.
func (b *Batch) Write(bufs [][]byte, off int64) bool { return b.queue(true, bufs, off) }

func (b *Batch) queue(write bool, bufs [][]byte, off int64) bool {
	if len(b.ops) == cap(b.ops) {
		return false
	}
	b.ops = b.ops[:len(b.ops)+1]
	op := &b.ops[len(b.ops)-1]
	op.write, op.off, op.n = write, b.base+off, total(bufs)
	op.bufs = append(op.bufs[:0], bufs...)
	return true
}

// Run carries out the queued transfers and calls done(i, err) once for
// each: in queue order, except that with SetAsyncReads an asynchronous read
// is reported as soon as it completes. A transfer is done in full: a short
// one is finished with preadv or pwritev, past the end of the file reads as
// zeros. The batch is empty afterwards.
func (b *Batch) Run(done func(i int, err error)) {
	if len(b.ops) == 0 {
		return
	}
	defer func() {
		for i := range b.ops {
			b.ops[i].bufs = b.ops[i].bufs[:0] // no guest memory held past Run
		}
		b.ops = b.ops[:0]
	}()
	if b.writes() {
		// Writes hold the file's gate until they are done, each range
		// copied first for any snapshot that has not copied it yet
		// (cow.go).
		b.f.gate.RLock()
		defer b.f.gate.RUnlock()
		for i := range b.ops {
			if op := &b.ops[i]; op.write {
				b.f.copyBefore(op.off, int64(op.n))
			}
		}
	}
	if b.ring == nil {
		for i := range b.ops {
			done(i, b.sync(&b.ops[i], 0))
		}
		return
	}
	if err := b.submit(done); err != nil {
		// The ring broke. A transfer it did not complete fails: the kernel
		// may still carry it out, so doing it again here could race with
		// it. Later batches make one system call per transfer.
		b.ring.Close()
		b.ring = nil
		for i := range b.ops {
			if b.res[i] == resPending {
				b.res[i] = resBroken
			}
		}
		b.broken = err
	}
	for i := range b.ops {
		if b.res[i] != resDone {
			done(i, b.finish(&b.ops[i], b.res[i]))
		}
	}
}

// writes reports whether the batch holds a write the file may take.
func (b *Batch) writes() bool {
	if b.f.opts.ReadOnly {
		return false
	}
	for i := range b.ops {
		if b.ops[i].write {
			return true
		}
	}
	return false
}

// submit hands every op to the ring and waits for all of them; an
// asynchronous read done in full goes to done as it completes.
func (b *Batch) submit(done func(i int, err error)) error {
	full, async := false, false
	for i := range b.ops {
		op := &b.ops[i]
		fd := b.f.pick(op.bufs, op.off)
		switch {
		case op.write && b.f.opts.ReadOnly:
			b.res[i] = -int32(unix.EBADF)
			continue
		case full, len(op.bufs) > maxIov: // one readv takes at most IOV_MAX buffers
			b.res[i] = resSync
			continue
		case op.write && fd == b.f.fd && !b.ringWrites:
			// A buffered write cannot complete without blocking on ext4:
			// io_uring hands it to a kernel worker thread, which costs more
			// than the write itself (measured, vhost/blk/PERFORMANCE.md).
			b.res[i] = resSync
			continue
		}
		op.iov = op.iov[:0]
		for _, p := range op.bufs {
			if len(p) > 0 {
				op.iov = append(op.iov, unix.Iovec{Base: (*byte)(unsafe.Pointer(&p[0])), Len: uint64(len(p))})
			}
		}
		b.res[i] = resPending
		var ok bool
		if op.write {
			ok = b.ring.Writev(fd, op.iov, op.off, uint64(i))
		} else if b.asyncMin > 0 && op.n >= b.asyncMin && fd == b.f.fd {
			ok = b.ring.ReadvAsync(fd, op.iov, op.off, uint64(i))
			async = async || ok
		} else {
			ok = b.ring.Readv(fd, op.iov, op.off, uint64(i))
		}
		if !ok {
			// More ops than the ring holds (not with NewBatch's depth): the
			// rest go the plain way.
			b.res[i], full = resSync, true
		}
	}
	if !async {
		return b.ring.Submit(func(user uint64, res int32) {
			if user < uint64(len(b.ops)) {
				b.res[user] = res
			}
		})
	}
	return b.ring.SubmitEach(func(user uint64, res int32) {
		if user >= uint64(len(b.ops)) {
			return
		}
		if op := &b.ops[user]; !op.write && int(res) == op.n {
			b.res[user] = resDone
			done(int(user), nil)
			return
		}
		b.res[user] = res
	})
}

// finish turns an io_uring result into the transfer's outcome, completing
// a short transfer or one the ring could not do with plain system calls.
func (b *Batch) finish(op *batchOp, res int32) error {
	switch {
	case res == resSync:
		return b.sync(op, 0)
	case res == resBroken:
		return fmt.Errorf("io_uring: %w", b.broken)
	case res < 0:
		errno := unix.Errno(-res)
		if op.write && b.f.opts.ReadOnly {
			return fmt.Errorf("write %s: %w", b.f.path, os.ErrPermission)
		}
		if errno == unix.EAGAIN || errno == unix.EINTR || errno == unix.ECANCELED {
			return b.sync(op, 0)
		}
		return errno
	case int(res) < op.n:
		return b.sync(op, int(res))
	}
	return nil
}

// sync does op from byte done on with preadv or pwritev.
func (b *Batch) sync(op *batchOp, done int) error {
	bufs := op.bufs
	for done > 0 && len(bufs) > 0 {
		if done >= len(bufs[0]) {
			done -= len(bufs[0])
			bufs = bufs[1:]
			continue
		}
		bufs = append([][]byte{bufs[0][done:]}, bufs[1:]...)
		done = 0
	}
	if len(bufs) == 0 {
		return nil
	}
	off := op.off + int64(op.n-total(bufs))
	var err error
	if op.write {
		if b.f.opts.ReadOnly {
			return fmt.Errorf("write %s: %w", b.f.path, os.ErrPermission)
		}
		_, err = b.f.writeAtv(bufs, off) // the gate is held by Run
	} else {
		_, err = b.f.ReadAtv(bufs, off)
	}
	return err
}

// Close releases the ring.
func (b *Batch) Close() error {
	if b.ring == nil {
		return nil
	}
	err := b.ring.Close()
	b.ring = nil
	return err
}
