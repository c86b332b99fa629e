package blk

import (
	"math"
	"time"

	"github.com/hemd/hemd/vhost/virtq"
)

// BatchStore is a Store that can carry out many reads and writes with one
// system call (io_uring). A worker opens one Batch per running queue.
type BatchStore interface {
	Store
	NewBatch(depth int) (Batch, error)
}

// Batch queues positioned reads and writes and carries them out together.
// One goroutine uses a Batch at a time.
type Batch interface {
	// Read and Write queue one transfer. They copy bufs' slice headers, not
	// the data, which must stay put until Run returns. They return false,
	// queueing nothing, when the batch is full.
	Read(bufs [][]byte, off int64) bool
	Write(bufs [][]byte, off int64) bool
	// Run carries out every queued transfer in full (a short one is
	// completed, past the end of a file reads as zeros) and calls done with
	// the position of each in queue order and its outcome. The batch is
	// empty afterwards.
	Run(done func(i int, err error))
	Close() error
}

// AsyncReader is a Batch that can hand large reads to the kernel's worker
// threads and report each as soon as it completes (storage.Batch: buffered
// reads with IOSQE_ASYNC). min is the least size of such a read, workers the
// most kernel threads doing them.
type AsyncReader interface {
	SetAsyncReads(min int, workers uint32) error
}

// asyncReadMinDefault and asyncReadWorkers: an encrypted volume's reads of
// 64 KiB and more are copied from the page cache by at most 2 kernel
// threads while the queue decrypts those already done. Measured against
// reading inline, both with COOP_TASKRUN rings (vhost/blk/PERFORMANCE.md):
// 128 KiB reads 1.25x with one queue, 1.55x with two. A plain volume keeps
// reading inline: its copy is all the work there is, and handing it off
// lost (0.55x and 0.74x).
const (
	asyncReadMinDefault = 64 << 10
	asyncReadWorkers    = 2
)

// WithBatches returns st with the batches newBatch makes: the caller wires
// in its storage's io_uring batches.
func WithBatches(st Store, newBatch func(depth int) Batch) BatchStore {
	return batchStore{st, newBatch}
}

type batchStore struct {
	Store
	newBatch func(depth int) Batch
}

func (b batchStore) NewBatch(depth int) (Batch, error) { return b.newBatch(depth), nil }

// batchDepth is the most transfers a worker queues before it runs them: the
// runner's batch of chains.
const batchDepth = 64

// batchState is a worker's batch: the transfers queued, and for each the
// chain it serves.
type batchState struct {
	b     Batch
	tried bool                   // NewBatch was called: nil b means not available
	reqs  []request              // one per chain of the runner's batch
	ops   []int                  // chain index of each queued transfer
	fill  int                    // bytes of the bounce buffer taken by queued writes
	rfill int                    // bytes of encrypted reads queued
	t0    time.Time              // when the runner's batch started
	out   []uint32               // written, per chain
	done  func(k int, err error) // w.completeOp, made once
}

// HandleBatchEarly implements vhost.EarlyBatchHandler: HandleBatch, telling
// done after each run of queued transfers that the chains before the next
// one are complete.
func (w *worker) HandleBatchEarly(cs []*virtq.Chain, written []uint32, done func(n int)) {
	w.early = done
	defer func() { w.early = nil }()
	w.HandleBatch(cs, written)
}

// HandleBatch implements vhost.BatchHandler: reads and writes of the batch
// go to storage together; other requests run in order between them, after
// every transfer queued before them is done.
func (w *worker) HandleBatch(cs []*virtq.Chain, written []uint32) {
	bs := &w.batch
	if !bs.tried {
		bs.tried = true
		if st, ok := w.dev.cfg.Store.(BatchStore); ok {
			b, err := st.NewBatch(batchDepth)
			if err != nil {
				w.dev.log.Debug("batched I/O not available: one system call per request", "queue", w.queue, "err", err)
			} else {
				bs.b, bs.done = b, w.completeOp
				w.asyncReads(b)
			}
		}
	}
	if bs.b == nil {
		for i, c := range cs {
			written[i] = w.Handle(c)
		}
		return
	}
	if len(bs.reqs) < len(cs) {
		bs.reqs = make([]request, len(cs))
	}
	bs.t0, bs.out = time.Now(), written
	for i, c := range cs {
		r := &bs.reqs[i]
		n, done := w.begin(c, r)
		if done {
			written[i] = n
			w.observe(r, time.Since(bs.t0))
			continue
		}
		if r.typ == TypeIn && w.readMapped(r) {
			written[i] = w.end(r, uint32(r.length), nil)
			w.observe(r, time.Since(bs.t0))
			continue
		}
		if r.typ == TypeIn || r.typ == TypeOut {
			if w.enqueue(i, r) {
				continue
			}
			w.runBatchEarly(i)
			if w.enqueue(i, r) {
				continue
			}
		} else {
			w.runBatchEarly(i)
		}
		t0 := time.Now()
		n32, err := w.do(r)
		written[i] = w.end(r, n32, err)
		w.observe(r, time.Since(t0))
	}
	w.runBatch()
}

// asyncReads sets up an encrypted queue's batch to copy large reads on
// kernel threads and report each as it completes: a batch's reads then all
// go in flight together (no read chunks), each decrypted as soon as it is
// in guest memory (completeOp) while the kernel copies the next ones.
func (w *worker) asyncReads(b Batch) {
	ar, ok := b.(AsyncReader)
	min := w.dev.asyncReadMin
	if !ok || w.xform == nil || w.dev.cfg.Remote || min <= 0 || w.cryptCPUs >= splitCPUs {
		return
	}
	if err := ar.SetAsyncReads(min, asyncReadWorkers); err != nil {
		w.dev.log.Debug("large reads stay inline", "queue", w.queue, "err", err)
		_ = ar.SetAsyncReads(0, 0)
		return
	}
	w.readChunk = math.MaxInt
	w.dev.log.Debug("large reads copied by kernel threads, decrypted as each completes", "queue", w.queue, "min_bytes", min)
}

// mapReadMinDefault: reads of 64 KiB and more whose pages are resident are
// served from the store's mapping (Config.Mapped), where the copy the
// system call would make is the larger cost; smaller ones stay batched, one
// system call for many (the residency check is one per read).
const mapReadMinDefault = 64 << 10

// readMapped serves read r from the store's mapping if its pages are
// resident: decrypted from the page cache straight into guest memory.
func (w *worker) readMapped(r *request) bool {
	m, min := w.dev.cfg.Mapped, w.dev.mapReadMin
	if m == nil || min <= 0 || int(r.length) < min {
		return false
	}
	off, n := int64(r.sector*sectorSize), int(r.length)
	ok := m.ViewMapped(off, n, func(src []byte) {
		if w.xform == nil {
			for _, d := range r.data {
				src = src[copy(d, src):]
			}
			return
		}
		us := w.xform.UnitSize()
		unit0 := uint64(off) / uint64(us)
		walkUnits(r.data, n, us, w.scratch, true, func(b []byte, rel int) {
			w.xform.Decrypt(b, src[rel:rel+len(b)], unit0+uint64(rel/us))
		})
	})
	if ok {
		w.stats.Reads.Add(1)
		w.stats.BytesRead.Add(r.length)
		w.stats.MappedReads.Add(1)
	}
	return ok
}

// enqueue queues the transfer of a read or write request; false means it
// does not fit (the batch or the bounce buffer is full).
func (w *worker) enqueue(i int, r *request) bool {
	bs := &w.batch
	if len(bs.ops) == batchDepth {
		return false
	}
	off := int64(r.sector * sectorSize)
	switch {
	case r.typ == TypeIn:
		if w.xform != nil && bs.rfill > 0 && bs.rfill+int(r.length) > w.readChunk {
			return false
		}
		if !bs.b.Read(r.data, off) {
			return false
		}
		bs.rfill += int(r.length)
	case w.xform == nil:
		if !bs.b.Write(r.data, off) {
			return false
		}
	default:
		n := int(r.length)
		if n > len(w.bounce)-bs.fill {
			return false
		}
		buf := w.bounce[bs.fill : bs.fill+n]
		w.one[0] = buf
		if !bs.b.Write(w.one, off) {
			return false
		}
		// Encrypted in runBatch, before the batch runs.
		w.encs = append(w.encs, cryptTask{dst: buf, data: r.data, n: n, unit0: uint64(off) / uint64(w.xform.UnitSize())})
		bs.fill += n
	}
	bs.ops = append(bs.ops, i)
	return true
}

// runBatchEarly is runBatch in the middle of a batch, before chain i: the
// chains before i are complete then, and go to the driver at once.
func (w *worker) runBatchEarly(i int) {
	if len(w.batch.ops) == 0 {
		return
	}
	w.runBatch()
	if w.early != nil {
		w.early(i)
	}
}

// runBatch carries out the queued transfers and completes their requests.
func (w *worker) runBatch() {
	bs := &w.batch
	if len(bs.ops) == 0 {
		return
	}
	if len(w.encs) > 0 {
		w.cryptAll(w.encs)
		clear(w.encs) // no references to guest memory kept
		w.encs = w.encs[:0]
	}
	bs.b.Run(bs.done)
	if len(w.decs) > 0 {
		w.cryptAll(w.decs)
		clear(w.decs)
		w.decs = w.decs[:0]
	}
	bs.ops, bs.fill, bs.rfill = bs.ops[:0], 0, 0
}

// completeOp completes the request of the k-th queued transfer.
func (w *worker) completeOp(k int, err error) {
	bs := &w.batch
	i := bs.ops[k]
	r := &bs.reqs[i]
	var n uint32
	if r.typ == TypeIn {
		w.stats.Reads.Add(1)
		if err == nil {
			if w.xform != nil {
				t := cryptTask{data: r.data, n: int(r.length), decrypt: true,
					unit0: r.sector * sectorSize / uint64(w.xform.UnitSize())}
				if w.cryptCPUs < splitCPUs {
					// Decrypted now, while the batch's later reads may
					// still be copied by the kernel (asyncReads); the
					// chain is published only after HandleBatch returns.
					w.runTasks([]cryptTask{t}, w.scratch)
				} else {
					// Decrypted in runBatch once the batch is done,
					// shared with the helper.
					w.decs = append(w.decs, t)
				}
			}
			w.stats.BytesRead.Add(r.length)
			n = uint32(r.length)
		}
	} else {
		w.stats.Writes.Add(1)
		if err == nil {
			w.stats.BytesWritten.Add(r.length)
		}
	}
	if err != nil {
		if r.typ == TypeIn {
			err = wrapf("read", err)
		} else {
			err = wrapf("write", err)
		}
	}
	bs.out[i] = w.end(r, n, err)
	w.observe(r, time.Since(bs.t0))
}

// Close implements io.Closer: the runner calls it when the ring stops.
func (w *worker) Close() error {
	w.stopCrypter()
	if err := w.closeStream(); err != nil {
		return err
	}
	if w.batch.b == nil {
		return nil
	}
	err := w.batch.b.Close()
	w.batch.b = nil
	return err
}
