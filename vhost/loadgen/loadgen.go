// Package loadgen drives a vhost-user-blk back-end directly, as a guest's
// driver would but without a guest: it plays QEMU's part through the
// frontend package, keeps a queue depth of requests in flight on each queue,
// and measures IOPS and latency. In verify mode every block it writes
// carries a pattern that it checks when the block is read back.
package loadgen

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hemd/hemd/vhost/frontend"
)

// Config is one workload. Flags are named as fio names them.
type Config struct {
	Socket    string
	Queues    int           // --queues
	Depth     int           // --depth: requests in flight per queue
	BS        int           // --bs: request size in bytes
	RW        string        // --rw: randread randwrite read write randrw
	RWMixRead int           // --rwmixread: percent reads for randrw
	Runtime   time.Duration // --runtime
	Verify    bool          // --verify
	Size      int64         // bytes of the disk to use (0: all of it)
	// Once ends a sequential workload after one pass over the disk instead
	// of at Runtime (fio without time_based).
	Once bool
	// Fsync sends a FLUSH after every Fsync writes of a queue (fio's
	// fsync=N), as a guest that syncs does; 0: never.
	Fsync int
	Seed  uint64
	// Progress, if set, is called about once a second with the I/Os so far.
	Progress func(ios uint64, elapsed time.Duration)
}

// Result is what a run measured.
type Result struct {
	IOs, Reads, Writes uint64
	Flushes            uint64 // not counted in IOs
	Bytes              uint64
	Elapsed            time.Duration
	IOPS, MBps         float64
	P50, P99, P999     time.Duration
	VerifyErrors       uint64
	Verified           uint64 // blocks checked against their pattern
	Capacity           int64  // bytes of the disk
}

// Errors of a run.
var (
	ErrBadConfig   = errors.New("bad workload")
	ErrIOStatus    = errors.New("request failed")
	ErrStalled     = errors.New("back-end stopped completing requests")
	ErrVerifyFails = errors.New("verify found mismatches")
)

const (
	typeIn      = 0
	typeOut     = 1
	typeFlush   = 4
	stallAfter  = 10 * time.Second
	latencyKeep = 1 << 22 // latencies kept per queue for percentiles
)

func (c *Config) check() error {
	switch {
	case c.Queues < 1 || c.Queues > 64:
		return fmt.Errorf("%w: queues %d", ErrBadConfig, c.Queues)
	case c.Fsync < 0:
		return fmt.Errorf("%w: fsync %d", ErrBadConfig, c.Fsync)
	case c.Depth < 1 || c.Depth > 1024:
		return fmt.Errorf("%w: depth %d", ErrBadConfig, c.Depth)
	case c.BS < 512 || c.BS%512 != 0 || c.BS > 4<<20:
		return fmt.Errorf("%w: bs %d (a multiple of 512 up to 4 MiB)", ErrBadConfig, c.BS)
	case c.RWMixRead < 0 || c.RWMixRead > 100:
		return fmt.Errorf("%w: rwmixread %d", ErrBadConfig, c.RWMixRead)
	case c.Runtime <= 0:
		return fmt.Errorf("%w: runtime %v", ErrBadConfig, c.Runtime)
	}
	switch c.RW {
	case "randread", "randwrite", "read", "write", "randrw":
	default:
		return fmt.Errorf("%w: rw %q (randread, randwrite, read, write, randrw)", ErrBadConfig, c.RW)
	}
	return nil
}

// slot is one request's buffers in guest memory.
type slot struct {
	hdr, data, status uint64
	head              uint16
	block             int64
	write             bool
	flush             bool
	start             time.Time
}

// Run connects to the back-end, runs the workload and returns what it
// measured. In verify mode it ends with a read-back of every block written.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	c, err := frontend.Dial(cfg.Socket)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	qsize := uint16(128)
	for int(qsize) < 3*cfg.Depth {
		qsize *= 2
	}
	mem := cfg.Queues*cfg.Depth*(cfg.BS+8192) + cfg.Queues*int(qsize)*32 + 1<<20
	if err := c.Setup(frontend.Options{MemSize: (mem + 4095) &^ 4095, Queues: cfg.Queues, QueueSize: qsize}); err != nil {
		return nil, err
	}
	capb, err := c.Config(0, 8)
	if err != nil {
		return nil, err
	}
	capacity := int64(binary.LittleEndian.Uint64(capb)) * 512
	if cfg.Size > 0 && cfg.Size < capacity {
		capacity = cfg.Size
	}
	blocks := capacity / int64(cfg.BS)
	if blocks < int64(cfg.Queues) {
		return nil, fmt.Errorf("%w: disk of %d bytes has fewer blocks of %d than queues", ErrBadConfig, capacity, cfg.BS)
	}
	r := &run{cfg: cfg, c: c, blocks: blocks}
	if cfg.Verify {
		r.gen = make([]uint32, blocks)
	}
	res, err := r.measure(ctx)
	if err != nil {
		return res, err
	}
	res.Capacity = capacity
	if cfg.Verify {
		if err := r.readBack(ctx, res); err != nil {
			return res, err
		}
		if res.VerifyErrors > 0 {
			return res, fmt.Errorf("%w: %d blocks", ErrVerifyFails, res.VerifyErrors)
		}
	}
	return res, nil
}

type run struct {
	cfg    Config
	c      *frontend.Client
	blocks int64
	// gen[b] is the generation of the pattern block b holds (0: not
	// written in this run). Block b belongs to queue b % queues only, so
	// each entry has a single writer.
	gen          []uint32
	verifyErrors atomic.Uint64
	verified     atomic.Uint64
}

// queueRun is one queue's goroutine state.
type queueRun struct {
	q        *frontend.Queue
	slots    []slot
	byHead   map[uint16]int
	rng      *rand.Rand
	next     int64 // next block for sequential work
	lat      []time.Duration
	passDone bool // a sequential pass with Once has covered the queue's blocks
	ios      atomic.Uint64
	reads    uint64
	writes   uint64
	flushes  uint64
	unsynced int // writes submitted since the last flush (Fsync)
	inflight map[int64]bool
}

func (r *run) newQueueRun(i int) (*queueRun, error) {
	qr := &queueRun{q: r.c.Queues[i], byHead: map[uint16]int{}, inflight: map[int64]bool{},
		rng: rand.New(rand.NewPCG(r.cfg.Seed, uint64(i)+1)), next: int64(i),
		lat: make([]time.Duration, 0, 1<<16)}
	for range r.cfg.Depth {
		var s slot
		var err error
		if s.hdr, err = r.c.Alloc(16, 16); err != nil {
			return nil, err
		}
		if s.data, err = r.c.Alloc(uint64(r.cfg.BS), 4096); err != nil {
			return nil, err
		}
		if s.status, err = r.c.Alloc(1, 1); err != nil {
			return nil, err
		}
		qr.slots = append(qr.slots, s)
	}
	return qr, nil
}

// pick chooses the next block and direction for queue qi.
func (r *run) pick(qr *queueRun, qi int) (int64, bool) {
	nq := int64(r.cfg.Queues)
	per := (r.blocks - int64(qi) + nq - 1) / nq // blocks owned by this queue
	for tries := 0; ; tries++ {
		var b int64
		switch r.cfg.RW {
		case "read", "write":
			b = qr.next
			qr.next += nq
			if qr.next >= r.blocks {
				qr.next = int64(qi)
				qr.passDone = r.cfg.Once
			}
		default:
			b = qr.rng.Int64N(per)*nq + int64(qi)
		}
		if !qr.inflight[b] || tries > 64 {
			write := false
			switch r.cfg.RW {
			case "randwrite", "write":
				write = true
			case "randrw":
				write = qr.rng.IntN(100) >= r.cfg.RWMixRead
			}
			return b, write
		}
	}
}

// fill writes block b's pattern of generation g into buf.
func fill(buf []byte, b int64, g uint32) {
	for i := 0; i+8 <= len(buf); i += 8 {
		binary.LittleEndian.PutUint64(buf[i:], uint64(b)<<32^uint64(g)<<16^uint64(i)^0x9e3779b97f4a7c15)
	}
}

func (r *run) check(buf []byte, b int64) {
	g := r.gen[b]
	if g == 0 {
		return
	}
	r.verified.Add(1)
	for i := 0; i+8 <= len(buf); i += 8 {
		if binary.LittleEndian.Uint64(buf[i:]) != uint64(b)<<32^uint64(g)<<16^uint64(i)^0x9e3779b97f4a7c15 {
			r.verifyErrors.Add(1)
			return
		}
	}
}

// next submits the queue's next request in slot si: a flush when Fsync
// writes went since the last, else a read or write picked by pick.
func (r *run) next(qr *queueRun, si, qi int) error {
	if r.cfg.Fsync > 0 && qr.unsynced >= r.cfg.Fsync {
		qr.unsynced = 0
		return r.submitFlush(qr, si)
	}
	b, w := r.pick(qr, qi)
	if w {
		qr.unsynced++
	}
	return r.submit(qr, si, b, w)
}

// submitFlush submits a FLUSH in slot si.
func (r *run) submitFlush(qr *queueRun, si int) error {
	s := &qr.slots[si]
	m := r.c.Mem
	s.block, s.write, s.flush = -1, false, true
	binary.LittleEndian.PutUint32(m[s.hdr:], typeFlush)
	binary.LittleEndian.PutUint32(m[s.hdr+4:], 0)
	binary.LittleEndian.PutUint64(m[s.hdr+8:], 0)
	m[s.status] = 0xff
	head, err := qr.q.Add([]frontend.Buf{{Addr: s.hdr, Len: 16}, {Addr: s.status, Len: 1, Write: true}})
	if err != nil {
		return err
	}
	s.head = head
	qr.byHead[head] = si
	s.start = time.Now()
	return nil
}

func (r *run) submit(qr *queueRun, si int, b int64, write bool) error {
	s := &qr.slots[si]
	m := r.c.Mem
	s.block, s.write, s.flush = b, write, false
	typ := uint32(typeIn)
	if write {
		typ = typeOut
		if r.gen != nil {
			g := r.gen[b] + 1
			if g == 0 {
				g = 1
			}
			fill(m[s.data:s.data+uint64(r.cfg.BS)], b, g)
		}
	}
	binary.LittleEndian.PutUint32(m[s.hdr:], typ)
	binary.LittleEndian.PutUint32(m[s.hdr+4:], 0)
	binary.LittleEndian.PutUint64(m[s.hdr+8:], uint64(b)*uint64(r.cfg.BS)/512)
	m[s.status] = 0xff
	head, err := qr.q.Add([]frontend.Buf{
		{Addr: s.hdr, Len: 16},
		{Addr: s.data, Len: uint32(r.cfg.BS), Write: !write},
		{Addr: s.status, Len: 1, Write: true},
	})
	if err != nil {
		return err
	}
	s.head = head
	qr.byHead[head] = si
	qr.inflight[b] = true
	s.start = time.Now()
	return nil
}

// complete handles one used entry and returns the slot it freed.
func (r *run) complete(qr *queueRun, u frontend.Used, now time.Time) (int, error) {
	si, ok := qr.byHead[u.Head]
	if !ok {
		return 0, fmt.Errorf("back-end completed unknown head %d", u.Head)
	}
	delete(qr.byHead, u.Head)
	s := &qr.slots[si]
	if s.flush {
		if st := r.c.Mem[s.status]; st != 0 {
			return si, fmt.Errorf("%w: flush status %d", ErrIOStatus, st)
		}
		qr.flushes++
		return si, nil
	}
	delete(qr.inflight, s.block)
	if st := r.c.Mem[s.status]; st != 0 {
		return si, fmt.Errorf("%w: block %d write=%v status %d (head %d slot %d len %d st@%#x)", ErrIOStatus, s.block, s.write, st, u.Head, si, u.Len, s.status)
	}
	if len(qr.lat) < latencyKeep {
		qr.lat = append(qr.lat, now.Sub(s.start))
	}
	if s.write {
		qr.writes++
		if r.gen != nil {
			g := r.gen[s.block] + 1
			if g == 0 {
				g = 1
			}
			r.gen[s.block] = g
		}
	} else {
		qr.reads++
		if r.gen != nil {
			r.check(r.c.Mem[s.data:s.data+uint64(r.cfg.BS)], s.block)
		}
	}
	qr.ios.Add(1)
	return si, nil
}

// measure runs the timed part of the workload.
func (r *run) measure(ctx context.Context) (*Result, error) {
	qrs := make([]*queueRun, r.cfg.Queues)
	for i := range qrs {
		qr, err := r.newQueueRun(i)
		if err != nil {
			return nil, err
		}
		qrs[i] = qr
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	start := time.Now()
	deadline := start.Add(r.cfg.Runtime)
	errs := make([]error, len(qrs))
	var wg sync.WaitGroup
	for i, qr := range qrs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := r.loop(ctx, qr, i, deadline); err != nil {
				errs[i] = fmt.Errorf("queue %d: %w", i, err)
				cancel()
			}
		}()
	}
	if r.cfg.Progress != nil {
		go func() {
			t := time.NewTicker(time.Second)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case now := <-t.C:
					var n uint64
					for _, qr := range qrs {
						n += qr.ios.Load()
					}
					r.cfg.Progress(n, now.Sub(start))
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	res := &Result{Elapsed: elapsed}
	var lat []time.Duration
	for _, qr := range qrs {
		res.Reads += qr.reads
		res.Writes += qr.writes
		res.Flushes += qr.flushes
		lat = append(lat, qr.lat...)
	}
	res.IOs = res.Reads + res.Writes
	res.Bytes = res.IOs * uint64(r.cfg.BS)
	res.IOPS = float64(res.IOs) / elapsed.Seconds()
	res.MBps = float64(res.Bytes) / elapsed.Seconds() / 1e6
	slices.Sort(lat)
	pct := func(p float64) time.Duration {
		if len(lat) == 0 {
			return 0
		}
		return lat[min(len(lat)-1, int(p*float64(len(lat))))]
	}
	res.P50, res.P99, res.P999 = pct(0.50), pct(0.99), pct(0.999)
	res.VerifyErrors, res.Verified = r.verifyErrors.Load(), r.verified.Load()
	return res, errors.Join(errs...)
}

// loop keeps Depth requests in flight on one queue until the deadline, then
// waits for the last ones.
func (r *run) loop(ctx context.Context, qr *queueRun, qi int, deadline time.Time) error {
	inflight := 0
	for si := range qr.slots {
		if qr.passDone {
			break
		}
		if err := r.next(qr, si, qi); err != nil {
			return err
		}
		inflight++
	}
	if err := qr.q.Kick(); err != nil {
		return err
	}
	var used []frontend.Used
	var freed []int
	last := time.Now()
	for inflight > 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		used = qr.q.Poll(used[:0])
		now := time.Now()
		if len(used) == 0 {
			if now.Sub(last) > stallAfter {
				return fmt.Errorf("%w: %d requests in flight for %v", ErrStalled, inflight, stallAfter)
			}
			wctx, wcancel := context.WithTimeout(ctx, 50*time.Millisecond)
			used, _ = qr.q.Wait(wctx, used[:0])
			wcancel()
			if len(used) == 0 {
				continue
			}
			now = time.Now()
		}
		last = now
		more := now.Before(deadline) && !qr.passDone
		// Poll already freed the descriptors of every completion: map them
		// all to their slots before any new request reuses a head.
		freed = freed[:0]
		for _, u := range used {
			si, err := r.complete(qr, u, now)
			if err != nil {
				return err
			}
			inflight--
			freed = append(freed, si)
		}
		if more {
			for _, si := range freed {
				if err := r.next(qr, si, qi); err != nil {
					return err
				}
				inflight++
			}
		}
		if more {
			if err := qr.q.Kick(); err != nil {
				return err
			}
		}
	}
	return nil
}

// readBack reads every block written in the run and checks its pattern.
func (r *run) readBack(ctx context.Context, res *Result) error {
	var wg sync.WaitGroup
	errs := make([]error, r.cfg.Queues)
	for qi := range r.cfg.Queues {
		// Alloc is not safe for concurrent use: buffers first, then the
		// goroutines.
		qr := &queueRun{q: r.c.Queues[qi], byHead: map[uint16]int{}, inflight: map[int64]bool{}}
		var err error
		qr.slots = make([]slot, 1)
		if qr.slots[0].hdr, err = r.c.Alloc(16, 16); err == nil {
			if qr.slots[0].data, err = r.c.Alloc(uint64(r.cfg.BS), 4096); err == nil {
				qr.slots[0].status, err = r.c.Alloc(1, 1)
			}
		}
		if err != nil {
			return err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for b := int64(qi); b < r.blocks; b += int64(r.cfg.Queues) {
				if r.gen[b] == 0 {
					continue
				}
				if err := r.submit(qr, 0, b, false); err != nil {
					errs[qi] = err
					return
				}
				qr.q.Kick()
				wctx, cancel := context.WithTimeout(ctx, stallAfter)
				used, err := qr.q.Wait(wctx, nil)
				cancel()
				if err != nil {
					errs[qi] = fmt.Errorf("%w: read-back of block %d: %v", ErrStalled, b, err)
					return
				}
				if _, err := r.complete(qr, used[0], time.Now()); err != nil {
					errs[qi] = err
					return
				}
			}
		}()
	}
	wg.Wait()
	res.VerifyErrors, res.Verified = r.verifyErrors.Load(), r.verified.Load()
	return errors.Join(errs...)
}
