// Package blk is a virtio-blk device for the vhost package: it parses and
// checks each request in one place, passes every data unit through an
// optional per-volume transform (the volume's cipher), and does the I/O on a
// backing store.
package blk

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"runtime"
	"strings"
	"sync/atomic"
	"time"

	"github.com/hemd/hemd/vhost"
)

// Store is the backing store as the device uses it. It holds exactly what the
// transform produced: ciphertext for an encrypted volume.
type Store interface {
	ReadAtv(bufs [][]byte, off int64) (int, error)
	WriteAtv(bufs [][]byte, off int64) (int, error)
	Flush() error
	Punch(off, n int64) error
	ZeroRange(off, n int64) error
	Size() int64
}

// Transform turns data units into what is stored and back: the XTS cipher of
// an encrypted volume. Unit k of a call is data unit number unit+k. It must
// be safe for use by several queues at once.
type Transform interface {
	UnitSize() int
	Encrypt(dst, src []byte, unit uint64)
	Decrypt(dst, src []byte, unit uint64)
}

// Keys gives the device its transform while a front-end runs it (attach) and
// takes it back when the front-end stops it (detach).
type Keys interface {
	// Check tells, without unwrapping anything, whether Attach can work now
	// (the KMS is reachable, the key is enabled).
	Check(ctx context.Context) error
	Attach(ctx context.Context) (Transform, error)
	Detach()
}

// Config describes one disk.
type Config struct {
	ID        string // serial returned by GET_ID (the volume id), at most 20 bytes
	Store     Store
	BlockSize uint32 // logical block size: 512 or 4096
	ReadOnly  bool
	Discard   bool // let the guest discard (punch holes)
	Queues    int  // most queues, 1..64
	Keys      Keys // nil for a plaintext disk
	Log       *slog.Logger
	// Claim is the volume's one-writer lock; nil: none. The device lets go
	// of it at a live migration's switchover (HandOff) and takes it in
	// Start when it does not hold it: a source whose migration failed runs
	// again, or Incoming.
	Claim Claim
	// Incoming: the claim is not held yet (the destination of a live
	// migration); the first Start takes it once the source lets go.
	Incoming bool
	// ClaimWait bounds, in all, how long Starts wait for the holder of the
	// claim to let go (default 30 s); once it passed without the claim, a
	// Start tries once.
	ClaimWait time.Duration
	// Limits are the volume's provisioned IOPS and throughput (throttle.go);
	// the zero value is unlimited. SetLimits changes them while it runs.
	Limits Limits
	// Remote says the store completes I/O over the network (an RBD image):
	// a queue then keeps a whole batch in flight, reads included (no
	// 512 KiB read parts, which pay off only against the page cache), and
	// encrypts up to 4 MiB of writes a batch (remoteBounceSize) instead
	// of 1 MiB. A store that streams (StreamStore) serves its queues as
	// streams instead, batches only where a stream cannot open.
	Remote bool
	// Mapped, if set, serves a large read whose pages the page cache holds
	// straight from them: decrypted (or copied) into guest memory with no
	// system call and one pass over the data (storage.File's read-only
	// mapping; for a store read through the page cache, never O_DIRECT).
	// Its offsets are Store's.
	Mapped MappedStore
}

// MappedStore gives in-place access to the resident pages of a store.
type MappedStore interface {
	// ViewMapped calls fn with the n bytes at off if every page of them is
	// resident, and reports whether it did; fn must not keep the slice.
	ViewMapped(off int64, n int, fn func([]byte)) bool
}

// Claim is the volume's one-writer lock as the device uses it (a
// storage.Lock).
type Claim interface {
	// Acquire takes the claim, waiting for its holder to let go until ctx
	// ends; it returns at once if the claim is held already. Its error
	// names the holder.
	Acquire(ctx context.Context) error
	// Release lets go of the claim.
	Release()
}

// defaultClaimWait is how long Starts wait for a migration's source to let
// go of the volume, in all.
const defaultClaimWait = 30 * time.Second

// Virtio-blk feature bits.
const (
	FeatSizeMax     = 1 << 1
	FeatSegMax      = 1 << 2
	FeatRO          = 1 << 5
	FeatBlkSize     = 1 << 6
	FeatFlush       = 1 << 9
	FeatTopology    = 1 << 10
	FeatMQ          = 1 << 12
	FeatDiscard     = 1 << 13
	FeatWriteZeroes = 1 << 14
)

// Limits advertised in the config space.
const (
	sizeMax        = 1 << 20 // bytes in one segment
	segMax         = 126     // segments in one request (QEMU's queue-size 128 less 2)
	maxSpanSectors = 1 << 16 // sectors in one discard / write-zeroes segment (32 MiB)
	configSize     = 60      // up to write_zeroes_may_unmap and its padding
	MaxQueues      = 64
)

// Stats count one queue's requests. Read them with the atomic loads.
type Stats struct {
	Reads, Writes, Flushes, Discards, WriteZeroes, GetIDs atomic.Uint64
	BytesRead, BytesWritten                               atomic.Uint64
	BadRequests, Unsupported, IOErrors                    atomic.Uint64
	// MappedReads counts the reads served from Config.Mapped.
	MappedReads atomic.Uint64
	// Latency of reads, of writes (OUT, WRITE_ZEROES, DISCARD) and of the
	// rest (FLUSH, GET_ID, refused requests).
	ReadLatency, WriteLatency, OtherLatency Histogram
}

// Device is a virtio-blk device.
type Device struct {
	cfg Config
	// lim is swapped whole when the volume grows (Resize): a request is
	// checked against one capacity.
	lim   atomic.Pointer[limits]
	log   *slog.Logger
	stats []Stats
	// xform is set by Start and cleared by Stop, both on the session
	// goroutine while no queue runs; handlers copy it when they start.
	xform  Transform
	failed error // why the last attach failed: every request gets IOERR
	serial string
	// claimed: the device holds its Claim. claimBy ends the current wait
	// for it (zero: no wait begun). Both are touched by Start and HandOff
	// only, on the session goroutine.
	claimed bool
	claimBy time.Time
	// throttle enforces Limits across all queues.
	throttle *Throttle
	// workers[i] is queue i's handler while it runs (Handler, Interrupt:
	// both on the session goroutine).
	workers []*worker
	// asyncReadMin: on an encrypted volume, reads of at least this many
	// bytes go to the kernel's worker threads when the store's batch can
	// (AsyncReader); 0: never. asyncReadMinDefault, lowered by tests.
	asyncReadMin int
	// mapReadMin: reads of at least this many bytes are served from
	// Config.Mapped when their pages are resident; 0: never.
	// mapReadMinDefault, lowered by tests.
	mapReadMin int
}

// New checks cfg and returns the device.
func New(cfg Config) (*Device, error) {
	if cfg.Store == nil {
		return nil, errors.New("blk: no backing store")
	}
	if cfg.BlockSize == 0 {
		cfg.BlockSize = sectorSize
	}
	if cfg.BlockSize != 512 && cfg.BlockSize != 4096 {
		return nil, fmt.Errorf("blk: block size %d is not 512 or 4096", cfg.BlockSize)
	}
	if cfg.Queues == 0 {
		cfg.Queues = 1
	}
	if cfg.Queues < 1 || cfg.Queues > MaxQueues {
		return nil, fmt.Errorf("blk: %d queues, want 1..%d", cfg.Queues, MaxQueues)
	}
	serial := Serial(cfg.ID)
	if len(serial) > idLen {
		return nil, fmt.Errorf("blk: id %q longer than %d bytes", cfg.ID, idLen)
	}
	size := cfg.Store.Size()
	if size < int64(cfg.BlockSize) || size%int64(cfg.BlockSize) != 0 {
		return nil, fmt.Errorf("blk: store size %d is not a positive multiple of the block size %d", size, cfg.BlockSize)
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.ClaimWait <= 0 {
		cfg.ClaimWait = defaultClaimWait
	}
	th, err := NewThrottle(cfg.Limits)
	if err != nil {
		return nil, fmt.Errorf("blk: %w", err)
	}
	d := &Device{
		cfg:          cfg,
		claimed:      cfg.Claim != nil && !cfg.Incoming,
		log:          cfg.Log,
		stats:        make([]Stats, cfg.Queues),
		serial:       serial,
		throttle:     th,
		asyncReadMin: asyncReadMinDefault,
		mapReadMin:   mapReadMinDefault,
		workers:      make([]*worker, cfg.Queues),
	}
	d.lim.Store(&limits{
		capacity:    uint64(size) / sectorSize,
		blockSize:   cfg.BlockSize,
		readOnly:    cfg.ReadOnly,
		discard:     cfg.Discard,
		maxSegSects: maxSpanSectors,
	})
	return d, nil
}

// ErrShrink is a resize to less than the device's capacity.
var ErrShrink = errors.New("a disk cannot shrink under a running guest")

// Resize makes the guest's disk size bytes long from the next request on.
// The store must already hold that many bytes; the front-end is told
// separately (vhost.Server.NotifyConfigChange). size must be a multiple of
// the block size, and not less than the current capacity.
func (d *Device) Resize(size uint64) error {
	old := d.lim.Load()
	switch {
	case size%uint64(d.cfg.BlockSize) != 0 || size == 0:
		return fmt.Errorf("volume %s: size %d is not a positive multiple of the block size %d", d.cfg.ID, size, d.cfg.BlockSize)
	case size < old.capacity*sectorSize:
		return fmt.Errorf("volume %s: %w: %d bytes now, %d asked", d.cfg.ID, ErrShrink, old.capacity*sectorSize, size)
	case int64(size) > d.cfg.Store.Size():
		return fmt.Errorf("volume %s: size %d is past the end of its store (%d bytes)", d.cfg.ID, size, d.cfg.Store.Size())
	}
	nl := *old
	nl.capacity = size / sectorSize
	d.lim.Store(&nl)
	if size != old.capacity*sectorSize {
		d.log.Info("event=resize", "old_bytes", old.capacity*sectorSize, "new_bytes", size)
	}
	return nil
}

// Unwrap returns the store WithBatches was given: the one to grow.
func (b batchStore) Unwrap() Store { return b.Store }

// Limits returns the volume's performance limits now in force.
func (d *Device) Limits() Limits { return d.throttle.Limits() }

// SetLimits changes the volume's performance limits at once, for all its
// queues.
func (d *Device) SetLimits(l Limits) error {
	if err := d.throttle.Set(l); err != nil {
		return fmt.Errorf("volume %s: %w", d.cfg.ID, err)
	}
	d.log.Info("event=limits", "iops", l.IOPS, "throughput_bytes", l.BPS, "iops_burst", d.throttle.Limits().IOPSBurst,
		"throughput_burst_bytes", d.throttle.Limits().BPSBurst)
	return nil
}

// Throttled returns the time the volume's requests waited for their
// tokens, in all, and how many requests waited.
func (d *Device) Throttled() (time.Duration, uint64) { return d.throttle.Waited() }

// Interrupt implements vhost.Interrupter: queue i's handler stops waiting
// for tokens, so that the ring stops at once.
func (d *Device) Interrupt(i int) {
	if i >= 0 && i < len(d.workers) && d.workers[i] != nil {
		d.workers[i].interrupt()
	}
}

// Serial is the 20-byte serial the guest reads for a volume id. An EBS-style
// id (vol- and 17 hex digits) is 21 bytes; like EBS's NVMe serial, the dash
// is dropped: vol-0123456789abcdef0 reads as vol0123456789abcdef0.
func Serial(id string) string {
	if len(id) > idLen && strings.HasPrefix(id, "vol-") {
		return "vol" + id[4:]
	}
	return id
}

// Capacity returns the size the guest sees, in bytes.
func (d *Device) Capacity() uint64 { return d.lim.Load().capacity * sectorSize }

// Stats returns queue i's counters.
func (d *Device) Stats(i int) *Stats { return &d.stats[i] }

// Features implements vhost.Device.
func (d *Device) Features() uint64 {
	f := uint64(vhost.FeatVersion1 | vhost.FeatIndirectDesc | vhost.FeatEventIdx |
		FeatSizeMax | FeatSegMax | FeatBlkSize | FeatTopology | FeatFlush | FeatMQ | FeatWriteZeroes)
	if d.cfg.Discard {
		f |= FeatDiscard
	}
	if d.cfg.ReadOnly {
		f |= FeatRO
	}
	return f
}

// Config implements vhost.Device: struct virtio_blk_config.
func (d *Device) Config() []byte {
	b := make([]byte, configSize)
	le := binary.LittleEndian
	le.PutUint64(b[0:], d.lim.Load().capacity)
	le.PutUint32(b[8:], sizeMax)
	le.PutUint32(b[12:], segMax)
	le.PutUint32(b[20:], d.cfg.BlockSize)
	// Topology: report a 4 KiB physical block, the unit hemd encrypts best.
	exp := 0
	for bs := d.cfg.BlockSize; bs < 4096; bs <<= 1 {
		exp++
	}
	b[24] = byte(exp)
	le.PutUint16(b[26:], uint16(1<<exp)) // min_io_size, in logical blocks
	b[32] = 1                            // writeback cache: FLUSH is honoured
	le.PutUint16(b[34:], uint16(d.cfg.Queues))
	le.PutUint32(b[36:], maxSpanSectors)
	le.PutUint32(b[40:], maxSegments)
	le.PutUint32(b[44:], d.cfg.BlockSize/sectorSize)
	le.PutUint32(b[48:], maxSpanSectors)
	le.PutUint32(b[52:], maxSegments)
	if d.cfg.Discard && d.cfg.Keys == nil {
		b[56] = 1 // write_zeroes_may_unmap
	}
	return b
}

// SetConfig implements vhost.Device. Only the writeback byte may be written,
// and hemd's cache mode is fixed: writing the value it has is accepted.
func (d *Device) SetConfig(offset uint32, data []byte) error {
	if offset == 32 && len(data) == 1 && data[0] == 1 {
		return nil
	}
	return fmt.Errorf("blk: config write at %d (%d bytes) not supported", offset, len(data))
}

// MaxQueues implements vhost.Device.
func (d *Device) MaxQueues() int { return d.cfg.Queues }

// Reachabler is a Store that can tell, before a front-end sees the disk,
// whether it can serve I/O now (an RBD image whose cluster is up); its
// I/O would otherwise wait as long as the storage is gone.
type Reachabler interface {
	Reachable(ctx context.Context) error
}

// Check implements vhost.Checker: a volume whose storage cannot serve it, or
// whose keys cannot be attached, is refused before the guest sees it.
func (d *Device) Check(ctx context.Context) error {
	if r, ok := d.cfg.Store.(Reachabler); ok {
		if err := r.Reachable(ctx); err != nil {
			d.log.Error("volume refused: storage unreachable", "err", err)
			return fmt.Errorf("volume %s: %w", d.cfg.ID, err)
		}
	}
	if d.cfg.Keys == nil {
		return nil
	}
	if err := d.cfg.Keys.Check(ctx); err != nil {
		d.log.Error("volume refused: key unusable", "err", err)
		return fmt.Errorf("volume %s: %w", d.cfg.ID, err)
	}
	return nil
}

// Start implements vhost.Device: it takes the volume's claim if it does not
// hold it (or fails, and the rings stay stopped), then attaches the volume's
// keys. If the attach fails the device fails closed: the rings run, but every
// request completes with IOERR and nothing is read or written.
func (d *Device) Start(ctx context.Context, features uint64) error {
	d.failed = nil
	if err := d.claim(ctx); err != nil {
		return err
	}
	if d.cfg.Keys == nil {
		return nil
	}
	x, err := d.cfg.Keys.Attach(ctx)
	if err == nil {
		if us := x.UnitSize(); us < sectorSize || us > int(d.cfg.BlockSize) || us&(us-1) != 0 {
			d.cfg.Keys.Detach()
			err = fmt.Errorf("data unit %d does not fit block size %d", us, d.cfg.BlockSize)
		}
	}
	if err != nil {
		d.failed = fmt.Errorf("attach %s: %w", d.cfg.ID, err)
		d.log.Error("attach failed: every request fails with IOERR", "err", err)
		return nil
	}
	d.xform = x
	return nil
}

// claim takes the volume's claim if the device does not hold it, waiting
// for the holder (a migration's source at its switchover) to let go, up to
// ClaimWait in all.
func (d *Device) claim(ctx context.Context) error {
	if d.cfg.Claim == nil || d.claimed {
		return nil
	}
	began := time.Now()
	if d.claimBy.IsZero() {
		d.claimBy = began.Add(d.cfg.ClaimWait)
	}
	wctx, cancel := context.WithDeadline(ctx, d.claimBy)
	defer cancel()
	if err := d.cfg.Claim.Acquire(wctx); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("volume %s: %w", d.cfg.ID, ctx.Err())
		}
		return fmt.Errorf("volume %s: not handed over within %v: %w", d.cfg.ID, d.cfg.ClaimWait, err)
	}
	d.claimed, d.claimBy = true, time.Time{}
	d.log.Info("event=take-over", "waited", time.Since(began).Round(time.Millisecond))
	return nil
}

// HandOff implements vhost.HandOffer: at a live migration's switchover
// (every ring stopped, the keys detached) the device makes what it wrote
// durable and lets go of the volume's claim, so that the destination can
// take it. A later Start takes it back, or fails if the destination has it.
func (d *Device) HandOff() {
	if d.cfg.Claim == nil || !d.claimed {
		return
	}
	if !d.cfg.ReadOnly {
		if err := d.cfg.Store.Flush(); err != nil {
			// The destination on this host still sees the writes (the page
			// cache); one on another host may not.
			d.log.Error("flush before hand-off failed", "err", err)
		}
	}
	d.cfg.Claim.Release()
	d.claimed, d.claimBy = false, time.Time{}
	d.log.Info("event=hand-off")
}

// Stop implements vhost.Device: it detaches (zeroizes) the keys.
func (d *Device) Stop() {
	for i := range d.stats {
		st := &d.stats[i]
		if n := st.Reads.Load() + st.Writes.Load() + st.Flushes.Load(); n > 0 {
			d.log.Info("queue stats", "queue", i, "reads", st.Reads.Load(), "writes", st.Writes.Load(),
				"flushes", st.Flushes.Load(), "bad_requests", st.BadRequests.Load(), "io_errors", st.IOErrors.Load())
		}
	}
	d.failed = nil
	if d.xform != nil {
		d.xform = nil
		d.cfg.Keys.Detach()
	}
}

// Handler implements vhost.Device.
func (d *Device) Handler(i int) vhost.Handler {
	w := &worker{dev: d, stats: &d.stats[i], queue: i, xform: d.xform, failed: d.failed, stop: make(chan struct{})}
	if i < len(d.workers) {
		d.workers[i] = w
	}
	if w.xform != nil {
		w.bounce = make([]byte, bounceSize)
		if d.cfg.Remote {
			w.bounce = make([]byte, remoteBounceSize)
		}
		w.scratch = make([]byte, w.xform.UnitSize())
		w.one = make([][]byte, 1)
		w.readChunk = readChunk
		if d.cfg.Remote {
			w.readChunk = math.MaxInt
		}
		w.cryptCPUs, w.splitMin = runtime.GOMAXPROCS(0), splitMin
	}
	return w
}
