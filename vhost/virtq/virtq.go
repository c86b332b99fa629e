// Package virtq is the device side of a virtio split virtqueue in shared guest
// memory: it takes descriptor chains from the available ring, walks and
// bounds-checks them, and returns them on the used ring with the notification
// rules of VIRTIO_F_EVENT_IDX.
package virtq

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"

	"github.com/hemd/hemd/vhost/guestmem"
)

// Descriptor flags (virtio 1.2, 2.7.5).
const (
	DescFNext     = 1
	DescFWrite    = 2
	DescFIndirect = 4
)

// Ring flags.
const (
	availFNoInterrupt = 1
	usedFNoNotify     = 1
)

// MaxSize is the largest queue size a split ring may have.
const MaxSize = 32768

const descSize = 16

// Errors about a queue's layout or its rings. A ring error means the driver
// corrupted the queue itself: the device cannot go on with it.
var (
	ErrBadSize      = errors.New("queue size is not a power of 2 in 1..32768")
	ErrBadAlignment = errors.New("ring address misaligned")
	ErrAvailIndex   = errors.New("corrupt available index")
	ErrHeadIndex    = errors.New("descriptor head index out of range")
)

// Errors about one descriptor chain. A chain error fails one request; the
// queue goes on.
var (
	ErrChainTooLong      = errors.New("descriptor chain longer than the queue size")
	ErrNextOutOfRange    = errors.New("descriptor next index out of range")
	ErrNestedIndirect    = errors.New("indirect descriptor inside an indirect table")
	ErrIndirectWithNext  = errors.New("indirect descriptor has the NEXT flag")
	ErrIndirectLen       = errors.New("indirect table length is zero or not a multiple of 16")
	ErrIndirectNotNeg    = errors.New("indirect descriptor but VIRTIO_F_INDIRECT_DESC was not negotiated")
	ErrReadAfterWrite    = errors.New("device-readable descriptor after a device-writable one")
	ErrOutsideMemory     = errors.New("descriptor points outside guest memory")
	ErrIndirectOutsideMe = errors.New("indirect table outside guest memory")
)

// Addrs are the ring addresses in the frontend's virtual address space, as
// VHOST_USER_SET_VRING_ADDR carries them.
type Addrs struct {
	Desc, Avail, Used uint64
}

// Seg is one descriptor of a chain, translated into guest memory.
type Seg struct {
	Addr  uint64 // guest physical address
	Len   uint32
	Write bool   // device-writable
	Buf   []byte // the guest memory; nil if the range is not mapped
}

// Chain is one request: the descriptors reachable from an available-ring head,
// indirect tables flattened. A Chain is reused between requests and never
// allocates once its segment slice has grown to the queue size.
type Chain struct {
	Head uint16
	Segs []Seg
	// Err is the first structural or address error met while walking, nil for
	// a well-formed chain. Segments found before a structural error are kept,
	// so that a device can still write an error status into the last one.
	Err error
}

// Queue is one split virtqueue. It is owned by one goroutine at a time.
type Queue struct {
	num      uint16
	desc     []byte
	avail    []byte
	used     []byte
	mem      *guestmem.Table
	eventIdx bool
	indirect bool

	lastAvail uint16 // next available-ring entry to take
	usedIdx   uint16 // shadow of used->idx
	lastSig   uint16 // used index at the last notification decision
	usedFlags uint16
}

// New sets up a queue of num descriptors with its rings at addrs (frontend
// virtual addresses) in mem. base is the first available index to take
// (VHOST_USER_SET_VRING_BASE); the used index starts there too.
func New(mem *guestmem.Table, num uint16, addrs Addrs, base uint16, eventIdx, indirect bool) (*Queue, error) {
	if num == 0 || num&(num-1) != 0 || int(num) > MaxSize {
		return nil, fmt.Errorf("%w: %d", ErrBadSize, num)
	}
	if addrs.Desc%16 != 0 || addrs.Avail%2 != 0 || addrs.Used%4 != 0 {
		return nil, fmt.Errorf("%w: desc %#x avail %#x used %#x", ErrBadAlignment, addrs.Desc, addrs.Avail, addrs.Used)
	}
	n := uint64(num)
	q := &Queue{num: num, mem: mem, eventIdx: eventIdx, indirect: indirect, lastAvail: base, usedIdx: base, lastSig: base}
	var err error
	if q.desc, err = mem.UserSlice(addrs.Desc, descSize*n); err != nil {
		return nil, fmt.Errorf("descriptor table: %w", err)
	}
	if q.avail, err = mem.UserSlice(addrs.Avail, 6+2*n); err != nil {
		return nil, fmt.Errorf("available ring: %w", err)
	}
	if q.used, err = mem.UserSlice(addrs.Used, 6+8*n); err != nil {
		return nil, fmt.Errorf("used ring: %w", err)
	}
	return q, nil
}

// Size returns the queue size.
func (q *Queue) Size() uint16 { return q.num }

// LastAvail returns the index of the next available entry to take; it is the
// ring's base for VHOST_USER_GET_VRING_BASE.
func (q *Queue) LastAvail() uint16 { return q.lastAvail }

// UsedIdx returns the device's used index.
func (q *Queue) UsedIdx() uint16 { return q.usedIdx }

// SyncUsed makes the device's shadow used index the one in guest memory.
// After a backend restart the ring's base is the last available index the
// frontend saw, but entries between the used index and it may already have
// been completed.
func (q *Queue) SyncUsed() { q.usedIdx = load16(q.used[2:]); q.lastSig = q.usedIdx }

// load16 reads a little-endian uint16 in guest memory atomically, through the
// aligned 32-bit word that contains it. The word lies in the same page as the
// field, so it is mapped whenever the field is.
func load16(b []byte) uint16 {
	ptr := unsafe.Pointer(&b[0])
	p := uintptr(ptr)
	w := atomic.LoadUint32((*uint32)(unsafe.Add(ptr, -int(p&3))))
	return uint16(w >> ((p & 3) * 8))
}

// store16 writes a uint16 into guest memory with a locked instruction, which
// also orders it before every later load (the StoreLoad fence EVENT_IDX needs).
func store16(b []byte, v uint16) {
	ptr := unsafe.Pointer(&b[0])
	p := uintptr(ptr)
	w := (*uint32)(unsafe.Add(ptr, -int(p&3)))
	shift := (p & 3) * 8
	for {
		old := atomic.LoadUint32(w)
		nw := old&^(0xffff<<shift) | uint32(v)<<shift
		if atomic.CompareAndSwapUint32(w, old, nw) {
			return
		}
	}
}

// availIdx is the driver's available index.
func (q *Queue) availIdx() uint16 { return load16(q.avail[2:]) }

// Pending returns how many chains the driver has made available and the device
// has not taken yet. A count above the queue size means the ring is corrupt.
func (q *Queue) Pending() (int, error) {
	n := q.availIdx() - q.lastAvail
	if n > q.num {
		return 0, fmt.Errorf("%w: avail idx %d, last seen %d, queue size %d",
			ErrAvailIndex, q.lastAvail+n, q.lastAvail, q.num)
	}
	return int(n), nil
}

// Next takes the next available chain into c. It reports false when the ring
// is empty. A non-nil error is a ring error; c.Err holds a chain error.
func (q *Queue) Next(c *Chain) (bool, error) {
	n, err := q.Pending()
	if err != nil || n == 0 {
		return false, err
	}
	slot := int(q.lastAvail % q.num)
	head := load16(q.avail[4+2*slot:])
	if head >= q.num {
		return false, fmt.Errorf("%w: head %d, queue size %d", ErrHeadIndex, head, q.num)
	}
	q.lastAvail++
	q.walk(head, c)
	return true, nil
}

// ChainAt walks the chain whose head descriptor is head into c without
// touching the available ring: it serves a request again that a previous
// back-end process took but never completed (inflight tracking).
func (q *Queue) ChainAt(head uint16, c *Chain) error {
	if head >= q.num {
		return fmt.Errorf("%w: head %d, queue size %d", ErrHeadIndex, head, q.num)
	}
	q.walk(head, c)
	return nil
}

// SetLastAvail sets the next available entry to take: after a restart it is
// the used index plus the requests still in flight.
func (q *Queue) SetLastAvail(v uint16) { q.lastAvail = v }

// UsedBytes is the size of the used ring in guest memory, avail_event
// included: what a back-end marks dirty when it updates the ring.
func (q *Queue) UsedBytes() uint64 { return 6 + 8*uint64(q.num) }

// walk collects the chain starting at head into c.
func (q *Queue) walk(head uint16, c *Chain) {
	c.Head, c.Segs, c.Err = head, c.Segs[:0], nil
	table, tableLen := q.desc, uint32(q.num)
	idx := uint32(head)
	seen := 0
	inIndirect := false
	sawWrite := false
	for {
		if seen >= int(q.num) {
			c.Err = fmt.Errorf("%w (%d)", ErrChainTooLong, q.num)
			return
		}
		seen++
		d := table[idx*descSize : idx*descSize+descSize]
		addr := binary.LittleEndian.Uint64(d[0:])
		length := binary.LittleEndian.Uint32(d[8:])
		flags := binary.LittleEndian.Uint16(d[12:])
		next := binary.LittleEndian.Uint16(d[14:])
		if flags&DescFIndirect != 0 {
			switch {
			case !q.indirect:
				c.Err = ErrIndirectNotNeg
			case inIndirect:
				c.Err = ErrNestedIndirect
			case flags&DescFNext != 0:
				c.Err = ErrIndirectWithNext
			case length == 0 || length%descSize != 0:
				c.Err = fmt.Errorf("%w: %d", ErrIndirectLen, length)
			case length/descSize > uint32(q.num):
				c.Err = fmt.Errorf("%w: indirect table of %d descriptors", ErrChainTooLong, length/descSize)
			}
			if c.Err != nil {
				return
			}
			t, err := q.mem.Slice(addr, uint64(length))
			if err != nil {
				c.Err = fmt.Errorf("%w: %v", ErrIndirectOutsideMe, err)
				return
			}
			// The table replaces the chain: its own length is what is bounded.
			table, tableLen, idx, inIndirect, seen = t, length/descSize, 0, true, 0
			continue
		}
		w := flags&DescFWrite != 0
		if !w && sawWrite {
			c.Err = ErrReadAfterWrite
			return
		}
		sawWrite = sawWrite || w
		buf, err := q.mem.Slice(addr, uint64(length))
		if err != nil && c.Err == nil {
			c.Err = fmt.Errorf("%w: descriptor %d at %#x+%d", ErrOutsideMemory, len(c.Segs), addr, length)
		}
		c.Segs = append(c.Segs, Seg{Addr: addr, Len: length, Write: w, Buf: buf})
		if flags&DescFNext == 0 {
			return
		}
		if uint32(next) >= tableLen {
			c.Err = fmt.Errorf("%w: next %d, table of %d", ErrNextOutOfRange, next, tableLen)
			return
		}
		idx = uint32(next)
	}
}

// Push puts a completed chain on the used ring; written is the number of bytes
// the device wrote into the chain. The driver sees it after Publish.
func (q *Queue) Push(head uint16, written uint32) {
	slot := int(q.usedIdx % q.num)
	e := q.used[4+8*slot : 12+8*slot]
	binary.LittleEndian.PutUint32(e[0:], uint32(head))
	binary.LittleEndian.PutUint32(e[4:], written)
	q.usedIdx++
}

// Publish makes every pushed entry visible to the driver by storing the used
// index (a release store: the entries are visible first).
func (q *Queue) Publish() {
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&q.used[0])), uint32(q.usedFlags)|uint32(q.usedIdx)<<16)
}

// NeedNotify reports whether the driver asked to be interrupted for what was
// published since the last call.
func (q *Queue) NeedNotify() bool {
	old, nw := q.lastSig, q.usedIdx
	q.lastSig = nw
	if old == nw {
		return false
	}
	if q.eventIdx {
		ev := load16(q.avail[4+2*int(q.num):])
		return nw-ev-1 < nw-old
	}
	return load16(q.avail[0:])&availFNoInterrupt == 0
}

// EnableNotify asks the driver to kick when it adds buffers and reports
// whether more are already pending, in which case the device must keep
// processing (the driver may not kick for those).
func (q *Queue) EnableNotify() (bool, error) {
	if q.eventIdx {
		store16(q.used[4+8*int(q.num):], q.lastAvail)
	} else {
		q.usedFlags &^= usedFNoNotify
		q.Publish()
	}
	n, err := q.Pending()
	return n > 0, err
}

// DisableNotify tells the driver that the device is busy and needs no kick.
// With EVENT_IDX this is implicit: the avail event stays behind.
func (q *Queue) DisableNotify() {
	if !q.eventIdx && q.usedFlags&usedFNoNotify == 0 {
		q.usedFlags |= usedFNoNotify
		q.Publish()
	}
}

// Rebind points the queue's rings into a new memory table (after the
// frontend changed the memory map) without losing its indices.
func (q *Queue) Rebind(mem *guestmem.Table, addrs Addrs) error {
	nq, err := New(mem, q.num, addrs, q.lastAvail, q.eventIdx, q.indirect)
	if err != nil {
		return err
	}
	nq.usedIdx, nq.lastSig, nq.usedFlags = q.usedIdx, q.lastSig, q.usedFlags
	*q = *nq
	return nil
}
