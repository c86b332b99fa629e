package vhost

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Inflight I/O tracking (protocol feature INFLIGHT_SHMFD). The back-end
// allocates a shared region (GET_INFLIGHT_FD); the front-end keeps it and
// hands it to the next back-end process (SET_INFLIGHT_FD), which resubmits
// every request the dead one had taken but not completed. The layout of a
// split queue's region is the one docs/interop/vhost-user.rst gives:
//
//	queue region: u64 features, u16 version, u16 desc_num,
//	              u16 last_batch_head, u16 used_idx, desc[desc_num]
//	desc state:   u8 inflight, u8 pad[5], u16 next, u64 counter
const (
	inflightVersion   = 1
	inflightHdrSize   = 16
	inflightDescSize  = 16
	inflightAlign     = 64
	inflightMsgSize   = 24 // VhostUserInflight, padded as QEMU sends it
	inflightMinMsg    = 20
	inflightMaxQueues = 1024
)

// ErrInflight is a malformed inflight region or description.
var ErrInflight = errors.New("bad inflight region")

// inflightMsg is the payload of GET_INFLIGHT_FD and SET_INFLIGHT_FD.
type inflightMsg struct {
	MmapSize, MmapOffset uint64
	NumQueues, QueueSize uint16
}

func (m *message) inflight() inflightMsg {
	p := m.payload
	return inflightMsg{
		MmapSize:   binary.LittleEndian.Uint64(p[0:]),
		MmapOffset: binary.LittleEndian.Uint64(p[8:]),
		NumQueues:  binary.LittleEndian.Uint16(p[16:]),
		QueueSize:  binary.LittleEndian.Uint16(p[18:]),
	}
}

func (i inflightMsg) encode() []byte {
	b := make([]byte, inflightMsgSize)
	binary.LittleEndian.PutUint64(b[0:], i.MmapSize)
	binary.LittleEndian.PutUint64(b[8:], i.MmapOffset)
	binary.LittleEndian.PutUint16(b[16:], i.NumQueues)
	binary.LittleEndian.PutUint16(b[18:], i.QueueSize)
	return b
}

// inflightQueueBytes is the size of one queue's region, 64-byte aligned.
func inflightQueueBytes(queueSize uint16) int {
	n := inflightHdrSize + inflightDescSize*int(queueSize)
	return (n + inflightAlign - 1) &^ (inflightAlign - 1)
}

// inflightArea is the mapped region of every queue.
type inflightArea struct {
	mapping   []byte
	mem       []byte // mapping[offset:]
	numQueues int
	queueSize uint16
	// origin says who made the region, for a fault's log line.
	origin string
}

// contains reports whether addr lies in the region's mapping.
func (a *inflightArea) contains(addr uintptr) bool {
	return a != nil && inMapping(a.mapping, addr)
}

// newInflightArea creates a zeroed region for numQueues queues of
// queueSize descriptors in a new memfd, and returns it with the fd.
func newInflightArea(numQueues, queueSize uint16) (*inflightArea, int, error) {
	if numQueues == 0 || numQueues > inflightMaxQueues || queueSize == 0 || queueSize&(queueSize-1) != 0 {
		return nil, -1, fmt.Errorf("%w: %d queues of %d", ErrInflight, numQueues, queueSize)
	}
	size := int(numQueues) * inflightQueueBytes(queueSize)
	fd, err := unix.MemfdCreate("hemd-inflight", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, -1, fmt.Errorf("inflight memfd: %w", err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return nil, -1, fmt.Errorf("inflight memfd: %w", err)
	}
	// The front-end gets this fd: sealed, it can neither shrink the file
	// under hemd's mapping (SIGBUS) nor unseal it.
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL); err != nil {
		unix.Close(fd)
		return nil, -1, fmt.Errorf("inflight memfd: seal: %w", err)
	}
	a, err := mapInflight(fd, uint64(size), 0, numQueues, queueSize)
	if err != nil {
		unix.Close(fd)
		return nil, -1, err
	}
	a.origin = "made by hemd, GET_INFLIGHT_FD"
	for i := 0; i < a.numQueues; i++ {
		h := a.queue(i).hdr
		h.version, h.descNum = inflightVersion, queueSize
	}
	return a, fd, nil
}

// mapInflight maps a region the front-end gave back.
func mapInflight(fd int, size, offset uint64, numQueues, queueSize uint16) (*inflightArea, error) {
	if numQueues == 0 || numQueues > inflightMaxQueues || queueSize == 0 || queueSize&(queueSize-1) != 0 {
		return nil, fmt.Errorf("%w: %d queues of %d", ErrInflight, numQueues, queueSize)
	}
	need := uint64(numQueues) * uint64(inflightQueueBytes(queueSize))
	if size < need || size > 1<<30 || offset > 1<<30 {
		return nil, fmt.Errorf("%w: %d bytes at %d for %d queues of %d (want %d)", ErrInflight, size, offset, numQueues, queueSize, need)
	}
	if err := fitsFile(fd, size+offset); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInflight, err)
	}
	m, err := unix.Mmap(fd, 0, int(size+offset), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mmap inflight region: %w", err)
	}
	if offset%8 != 0 {
		unix.Munmap(m)
		return nil, fmt.Errorf("%w: offset %d not 8-byte aligned", ErrInflight, offset)
	}
	return &inflightArea{mapping: m, mem: m[offset:], numQueues: int(numQueues), queueSize: queueSize,
		origin: "sent by the front-end, SET_INFLIGHT_FD"}, nil
}

func (a *inflightArea) unmap() {
	if a != nil && a.mapping != nil {
		_ = unix.Munmap(a.mapping)
		a.mapping, a.mem = nil, nil
	}
}

type inflightHdr struct {
	features      uint64
	version       uint16
	descNum       uint16
	lastBatchHead uint16
	usedIdx       uint16
}

type descState struct {
	inflight uint8
	_        [5]uint8
	next     uint16
	counter  uint64
}

// queue returns the tracker of queue i.
func (a *inflightArea) queue(i int) *inflightQueue {
	off := i * inflightQueueBytes(a.queueSize)
	b := a.mem[off : off+inflightQueueBytes(a.queueSize)]
	hdr := (*inflightHdr)(unsafe.Pointer(&b[0]))
	desc := unsafe.Slice((*descState)(unsafe.Pointer(&b[inflightHdrSize])), a.queueSize)
	return &inflightQueue{hdr: hdr, desc: desc}
}

// inflightQueue tracks one queue's requests in its region. Only the queue's
// goroutine touches it while the queue runs.
type inflightQueue struct {
	hdr     *inflightHdr
	desc    []descState
	counter uint64
	batch   []uint16 // heads pushed since the last publish
}

// check validates a region handed back by the front-end against the ring.
func (q *inflightQueue) check(ringSize uint16) error {
	if q.hdr.version != inflightVersion {
		return fmt.Errorf("%w: version %d", ErrInflight, q.hdr.version)
	}
	if int(q.hdr.descNum) != len(q.desc) || ringSize > q.hdr.descNum {
		return fmt.Errorf("%w: %d descriptors tracked, ring of %d", ErrInflight, q.hdr.descNum, ringSize)
	}
	return nil
}

// take records that the chain at head was taken from the available ring.
func (q *inflightQueue) take(head uint16) {
	d := &q.desc[head]
	d.counter = q.counter
	q.counter++
	d.inflight = 1
}

// pushed records that head was put on the used ring (not yet published).
func (q *inflightQueue) pushed(head uint16) {
	q.desc[head].next = q.hdr.lastBatchHead
	q.hdr.lastBatchHead = head
	q.batch = append(q.batch, head)
}

// published records that the used index usedIdx is visible to the driver:
// the batch is no longer in flight.
func (q *inflightQueue) published(usedIdx uint16) {
	for _, h := range q.batch {
		q.desc[h].inflight = 0
	}
	q.batch = q.batch[:0]
	q.hdr.usedIdx = usedIdx
}

// recover is run when the queue starts, with the used index in guest
// memory. It settles a batch the previous process published but had not
// yet cleared, and returns the heads still in flight, oldest first: they
// must be served again before anything new. The counter goes on after the
// newest.
func (q *inflightQueue) recover(usedIdx, ringSize uint16) ([]uint16, error) {
	busy := false
	for i := range q.desc {
		busy = busy || q.desc[i].inflight != 0
	}
	if !busy {
		// A new region (the front-end asked for one at this start, e.g.
		// on a migration's destination), or one left with nothing in
		// flight: it follows the ring from here.
		q.hdr.usedIdx = usedIdx
	}
	if n := usedIdx - q.hdr.usedIdx; n != 0 {
		if n > ringSize {
			return nil, fmt.Errorf("%w: used index %d, region says %d", ErrInflight, usedIdx, q.hdr.usedIdx)
		}
		h := q.hdr.lastBatchHead
		for i := uint16(0); i < n; i++ {
			if h >= ringSize {
				return nil, fmt.Errorf("%w: batch list head %d, ring of %d", ErrInflight, h, ringSize)
			}
			q.desc[h].inflight = 0
			h = q.desc[h].next
		}
		q.hdr.usedIdx = usedIdx
	}
	var heads []uint16
	var top uint64
	for i := range q.desc {
		d := &q.desc[i]
		if d.inflight == 0 {
			continue
		}
		if i >= int(ringSize) {
			return nil, fmt.Errorf("%w: descriptor %d in flight, ring of %d", ErrInflight, i, ringSize)
		}
		if d.inflight != 1 {
			return nil, fmt.Errorf("%w: descriptor %d inflight=%d", ErrInflight, i, d.inflight)
		}
		heads = append(heads, uint16(i))
		top = max(top, d.counter+1)
	}
	slices.SortFunc(heads, func(a, b uint16) int {
		ca, cb := q.desc[a].counter, q.desc[b].counter
		switch {
		case ca < cb:
			return -1
		case ca > cb:
			return 1
		}
		return int(a) - int(b)
	})
	q.counter = max(q.counter, top)
	return heads, nil
}
