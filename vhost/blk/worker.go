package blk

import (
	"fmt"
	"sync"
	"time"

	"github.com/hemd/hemd/vhost/virtq"
)

// bounceSize is the buffer a queue encrypts writes into: guest memory is
// never modified by a write.
const bounceSize = 1 << 20

// remoteBounceSize is the bounce buffer of a queue on a remote store
// (Config.Remote): a batch of 32 writes of 128 KiB in flight at once, as
// qemu-storage-daemon's rbd driver has.
const remoteBounceSize = 4 << 20

// readChunk is the most bytes of encrypted reads a queue runs together
// (worker.readChunk): decrypted right after the kernel's copy, they are
// still in the core's cache (measured against 1 GiB, i.e. a whole batch:
// 128 KiB reads +5%, 4 KiB reads +8%; vhost/blk/PERFORMANCE.md).
const readChunk = 512 << 10

// worker serves one queue. Its buffers are its own: queues share no lock.
type worker struct {
	dev     *Device
	stats   *Stats
	queue   int
	xform   Transform
	failed  error // the attach failed: fail every request
	req     request
	bounce  []byte   // encrypted data on its way to storage
	scratch []byte   // one data unit that straddles two guest buffers
	one     [][]byte // single-buffer vector for the bounce buffer
	// readChunk bounds the bytes of encrypted reads run together: they are
	// decrypted while the kernel's copy is still in the cache.
	readChunk int
	// crypto of the running batch: encryptions of queued writes (run
	// before the batch), decryptions of completed reads (after it).
	encs, decs []cryptTask
	crypter    *crypter // helper goroutine, started on first use
	cryptCPUs  int      // CPUs hemd may use: below 2, no helper
	splitMin   int      // least bytes of crypto split with the helper
	// early completes the first n chains of the running batch
	// (vhost.EarlyBatchHandler); nil outside HandleBatchEarly.
	early func(n int)
	batch batchState
	// stream: the queue's requests in flight when it streams (stream.go).
	stream streamState
	// stop is closed when the ring is about to stop: a wait for tokens
	// ends (throttle.go).
	stop     chan struct{}
	stopOnce sync.Once
}

// Handle implements vhost.Handler.
func (w *worker) Handle(c *virtq.Chain) uint32 {
	t0 := time.Now()
	n := w.handle(c)
	w.observe(&w.req, time.Since(t0))
	return n
}

// observe records how long request r took.
func (w *worker) observe(r *request, d time.Duration) {
	h := &w.stats.OtherLatency
	switch r.typ {
	case TypeIn:
		h = &w.stats.ReadLatency
	case TypeOut, TypeWriteZeroes, TypeDiscard:
		h = &w.stats.WriteLatency
	}
	h.Observe(d)
}

func (w *worker) handle(c *virtq.Chain) uint32 {
	r := &w.req
	if n, done := w.begin(c, r); done {
		return n
	}
	n, err := w.do(r)
	return w.end(r, n, err)
}

// begin parses and checks c into r. done means the request is already
// complete (refused), written being what to return for it.
func (w *worker) begin(c *virtq.Chain, r *request) (written uint32, done bool) {
	err := parseRequest(c, w.dev.lim.Load(), r)
	if r.status == nil {
		// Nowhere to say what went wrong: give the chain back empty.
		w.stats.BadRequests.Add(1)
		w.dev.log.Warn("bad request", "queue", w.queue, "err", err)
		return 0, true
	}
	if err != nil {
		if unsupported(err) {
			w.stats.Unsupported.Add(1)
			r.status[0] = StatusUnsupp
		} else {
			w.stats.BadRequests.Add(1)
			r.status[0] = StatusIOErr
		}
		w.dev.log.Debug("request refused", "queue", w.queue, "type", r.typ, "sector", r.sector, "err", err)
		return 1, true
	}
	if w.failed != nil {
		w.stats.IOErrors.Add(1)
		r.status[0] = StatusIOErr
		return 1, true
	}
	w.throttle(r)
	return 0, false
}

// end sets the status of a request that was carried out and returns the
// bytes written into its chain: n data bytes and the status byte.
func (w *worker) end(r *request, n uint32, err error) uint32 {
	if err != nil {
		w.stats.IOErrors.Add(1)
		w.dev.log.Warn("I/O error", "queue", w.queue, "type", r.typ, "sector", r.sector, "err", err)
		r.status[0] = StatusIOErr
		return 1
	}
	r.status[0] = StatusOK
	return n + 1
}

// do carries out a checked request and returns the bytes written into the
// guest's data buffers.
func (w *worker) do(r *request) (uint32, error) {
	st := w.dev.cfg.Store
	off := int64(r.sector * sectorSize)
	switch r.typ {
	case TypeIn:
		w.stats.Reads.Add(1)
		if _, err := st.ReadAtv(r.data, off); err != nil {
			return 0, wrapf("read", err)
		}
		if w.xform != nil {
			w.decrypt(r.data, r.length, off)
		}
		w.stats.BytesRead.Add(r.length)
		return uint32(r.length), nil
	case TypeOut:
		w.stats.Writes.Add(1)
		var err error
		if w.xform != nil {
			err = w.encryptWrite(r.data, r.length, off)
		} else {
			_, err = st.WriteAtv(r.data, off)
		}
		if err != nil {
			return 0, wrapf("write", err)
		}
		w.stats.BytesWritten.Add(r.length)
		return 0, nil
	case TypeFlush:
		w.stats.Flushes.Add(1)
		return 0, st.Flush()
	case TypeGetID:
		w.stats.GetIDs.Add(1)
		var id [idLen]byte
		copy(id[:], w.dev.serial)
		n := 0
		for _, b := range r.data {
			if n == idLen {
				break
			}
			n += copy(b, id[n:])
		}
		return uint32(n), nil
	case TypeDiscard:
		w.stats.Discards.Add(1)
		for _, s := range r.spans {
			if err := st.Punch(int64(s.sector*sectorSize), int64(s.sectors)*sectorSize); err != nil {
				return 0, err
			}
		}
		return 0, nil
	case TypeWriteZeroes:
		w.stats.WriteZeroes.Add(1)
		for _, s := range r.spans {
			if err := w.writeZeroes(s); err != nil {
				return 0, err
			}
		}
		return 0, nil
	}
	return 0, fmt.Errorf("%w: %d", ErrUnsupported, r.typ)
}

// writeZeroes makes a span read back as zeros. On an encrypted volume that
// means writing encrypted zeros; a plain one lets the filesystem do it.
func (w *worker) writeZeroes(s span) error {
	st := w.dev.cfg.Store
	off, n := int64(s.sector*sectorSize), int64(s.sectors)*sectorSize
	if w.xform == nil {
		if s.unmap && w.dev.cfg.Discard {
			if err := st.Punch(off, n); err == nil {
				return nil
			}
		}
		return st.ZeroRange(off, n)
	}
	us := int64(w.xform.UnitSize())
	for n > 0 {
		k := min(n, int64(len(w.bounce)))
		buf := w.bounce[:k]
		clear(buf)
		w.xform.Encrypt(buf, buf, uint64(off/us))
		w.one[0] = buf
		if _, err := st.WriteAtv(w.one, off); err != nil {
			return fmt.Errorf("write zeroes: %w", err)
		}
		off += k
		n -= k
	}
	return nil
}

// decrypt decrypts, in place in guest memory, data read from storage offset
// off.
func (w *worker) decrypt(data [][]byte, n uint64, off int64) {
	us := w.xform.UnitSize()
	unit0 := uint64(off) / uint64(us)
	walkUnits(data, int(n), us, w.scratch, true, func(b []byte, rel int) {
		w.xform.Decrypt(b, b, unit0+uint64(rel/us))
	})
}

// encryptTo encrypts the first n bytes of data, which start at data unit
// unit0, into dst.
func (w *worker) encryptTo(dst []byte, data [][]byte, n int, unit0 uint64) {
	us := w.xform.UnitSize()
	walkUnits(data, n, us, w.scratch, false, func(src []byte, rel int) {
		w.xform.Encrypt(dst[rel:rel+len(src)], src, unit0+uint64(rel/us))
	})
}

// wrapf says which transfer failed.
func wrapf(what string, err error) error { return fmt.Errorf("%s: %w", what, err) }

// encryptWrite encrypts data into the bounce buffer, a buffer at a time, and
// writes it at storage offset off.
func (w *worker) encryptWrite(data [][]byte, n uint64, off int64) error {
	us := w.xform.UnitSize()
	unit0 := uint64(off) / uint64(us)
	fill, at := 0, off
	var err error
	flush := func() {
		if fill == 0 || err != nil {
			return
		}
		w.one[0] = w.bounce[:fill]
		_, err = w.dev.cfg.Store.WriteAtv(w.one, at)
		at += int64(fill)
		fill = 0
	}
	walkUnits(data, int(n), us, w.scratch, false, func(src []byte, rel int) {
		unit := unit0 + uint64(rel/us)
		for len(src) > 0 && err == nil {
			k := min(len(src), len(w.bounce)-fill)
			w.xform.Encrypt(w.bounce[fill:fill+k], src[:k], unit)
			unit += uint64(k / us)
			fill += k
			src = src[k:]
			if fill == len(w.bounce) {
				flush()
			}
		}
	})
	flush()
	return err
}

// walkUnits calls fn on the first n bytes of data in runs of whole data units
// of size us, rel being the run's offset in the request. A run is contiguous
// in one guest buffer; a unit that straddles two buffers is gathered into
// scratch, and with scatter copied back after fn.
func walkUnits(data [][]byte, n, us int, scratch []byte, scatter bool, fn func(b []byte, rel int)) {
	bi, bo, rel := 0, 0, 0
	for rel < n {
		for bo == len(data[bi]) {
			bi, bo = bi+1, 0
		}
		if b := data[bi][bo:]; len(b) >= us {
			k := min(len(b)-len(b)%us, n-rel)
			fn(b[:k], rel)
			rel, bo = rel+k, bo+k
			continue
		}
		sbi, sbo := bi, bo
		for g := 0; g < us; {
			for bo == len(data[bi]) {
				bi, bo = bi+1, 0
			}
			c := copy(scratch[g:us], data[bi][bo:])
			g, bo = g+c, bo+c
		}
		fn(scratch[:us], rel)
		if scatter {
			bi, bo = sbi, sbo
			for g := 0; g < us; {
				for bo == len(data[bi]) {
					bi, bo = bi+1, 0
				}
				c := copy(data[bi][bo:], scratch[g:us])
				g, bo = g+c, bo+c
			}
		}
		rel += us
	}
}
