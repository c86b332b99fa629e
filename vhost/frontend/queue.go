package frontend

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/hemd/hemd/vhost"
	"golang.org/x/sys/unix"
)

// Queue is the driver side of one split virtqueue. It is used by one
// goroutine at a time.
type Queue struct {
	c        *Client
	Index    int
	Size     uint16
	desc     uint64 // guest addresses of the rings
	avail    uint64
	used     uint64
	kick     int
	call     int
	availIdx uint16
	hold     bool // Hold: the avail index is not stored yet
	lastUsed uint16
	free     []uint16
	eventIdx bool
}

func uintptrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[0])) }

func (c *Client) startQueue(i int, size uint16, pollKick bool) (*Queue, error) {
	n := uint64(size)
	q := &Queue{c: c, Index: i, Size: size, eventIdx: c.Features&vhost.FeatEventIdx != 0}
	var err error
	if q.desc, err = c.Alloc(16*n, 4096); err != nil {
		return nil, err
	}
	if q.avail, err = c.Alloc(6+2*n, 4); err != nil {
		return nil, err
	}
	if q.used, err = c.Alloc(6+8*n, 4096); err != nil {
		return nil, err
	}
	for d := int(size) - 1; d >= 0; d-- {
		q.free = append(q.free, uint16(d))
	}
	if err := q.configure(0, pollKick); err != nil {
		return nil, err
	}
	return q, nil
}

// configure sends the ring's description to the back-end and starts it,
// with base as the next available index, and new kick and call eventfds.
func (q *Queue) configure(base uint16, pollKick bool) error {
	c, i, size := q.c, q.Index, q.Size
	var err error
	if q.kick, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		return err
	}
	if q.call, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		return err
	}
	steps := []struct {
		req vhost.Request
		p   []byte
		fds []int
	}{
		{vhost.ReqSetVringNum, u32s(uint32(i), uint32(size)), nil},
		{vhost.ReqSetVringBase, u32s(uint32(i), uint32(base)), nil},
		{vhost.ReqSetVringAddr, binary.LittleEndian.AppendUint64(binary.LittleEndian.AppendUint64(
			binary.LittleEndian.AppendUint64(binary.LittleEndian.AppendUint64(u32s(uint32(i), 0),
				c.UserAddr(q.desc)), c.UserAddr(q.used)), c.UserAddr(q.avail)), 0), nil},
		{vhost.ReqSetVringCall, u64(uint64(i)), []int{q.call}},
		{vhost.ReqSetVringKick, u64(uint64(i)), []int{q.kick}},
	}
	if c.Features&vhost.FeatProtocolFeatures != 0 {
		steps = append(steps, struct {
			req vhost.Request
			p   []byte
			fds []int
		}{vhost.ReqSetVringEnable, u32s(uint32(i), 1), nil})
	}
	if pollKick {
		unix.Close(q.kick)
		q.kick = -1
		steps[4].p, steps[4].fds = u64(uint64(i)|1<<8), nil
	}
	for _, s := range steps {
		if _, err := c.call(s.req, s.p, s.fds, false); err != nil {
			return fmt.Errorf("queue %d: %w", i, err)
		}
	}
	return nil
}

// Buf is one descriptor of a chain.
type Buf struct {
	Addr  uint64 // guest address
	Len   uint32
	Write bool // device-writable
}

// Desc flags.
const (
	descNext     = 1
	descWrite    = 2
	descIndirect = 4
)

// ErrQueueFull means no descriptor is free.
var ErrQueueFull = errors.New("queue full")

// Free returns how many descriptors are free.
func (q *Queue) Free() int { return len(q.free) }

func (q *Queue) putDesc(d uint16, b Buf, next uint16, hasNext bool) {
	m := q.c.Mem[q.desc+16*uint64(d):]
	binary.LittleEndian.PutUint64(m[0:], b.Addr)
	binary.LittleEndian.PutUint32(m[8:], b.Len)
	var fl uint16
	if b.Write {
		fl |= descWrite
	}
	if hasNext {
		fl |= descNext
	}
	binary.LittleEndian.PutUint16(m[12:], fl)
	binary.LittleEndian.PutUint16(m[14:], next)
}

// Add puts a chain of buffers on the available ring (not yet kicked) and
// returns its head descriptor.
func (q *Queue) Add(bufs []Buf) (uint16, error) {
	if len(bufs) == 0 || len(bufs) > len(q.free) {
		return 0, ErrQueueFull
	}
	ids := q.free[len(q.free)-len(bufs):]
	q.free = q.free[:len(q.free)-len(bufs)]
	for i, b := range bufs {
		next := uint16(0)
		if i+1 < len(bufs) {
			next = ids[i+1]
		}
		q.putDesc(ids[i], b, next, i+1 < len(bufs))
	}
	q.publish(ids[0])
	return ids[0], nil
}

// AddIndirect puts a chain as one indirect descriptor whose table is at
// guest address table (room for len(bufs) descriptors).
func (q *Queue) AddIndirect(table uint64, bufs []Buf) (uint16, error) {
	if len(q.free) == 0 {
		return 0, ErrQueueFull
	}
	d := q.free[len(q.free)-1]
	q.free = q.free[:len(q.free)-1]
	for i, b := range bufs {
		m := q.c.Mem[table+16*uint64(i):]
		binary.LittleEndian.PutUint64(m[0:], b.Addr)
		binary.LittleEndian.PutUint32(m[8:], b.Len)
		var fl uint16
		if b.Write {
			fl |= descWrite
		}
		if i+1 < len(bufs) {
			fl |= descNext
		}
		binary.LittleEndian.PutUint16(m[12:], fl)
		binary.LittleEndian.PutUint16(m[14:], uint16(i+1))
	}
	m := q.c.Mem[q.desc+16*uint64(d):]
	binary.LittleEndian.PutUint64(m[0:], table)
	binary.LittleEndian.PutUint32(m[8:], uint32(16*len(bufs)))
	binary.LittleEndian.PutUint16(m[12:], descIndirect)
	binary.LittleEndian.PutUint16(m[14:], 0)
	q.publish(d)
	return d, nil
}

// RawDesc writes descriptor d as given, for tests that break chains.
func (q *Queue) RawDesc(d uint16, addr uint64, length uint32, flags, next uint16) {
	m := q.c.Mem[q.desc+16*uint64(d):]
	binary.LittleEndian.PutUint64(m[0:], addr)
	binary.LittleEndian.PutUint32(m[8:], length)
	binary.LittleEndian.PutUint16(m[12:], flags)
	binary.LittleEndian.PutUint16(m[14:], next)
}

// PublishRaw puts head on the available ring as it is.
func (q *Queue) PublishRaw(head uint16) { q.publish(head) }

// SetAvailIdx stores a raw available index, for tests that corrupt it.
func (q *Queue) SetAvailIdx(v uint16) {
	q.availIdx = v
	q.store16(q.avail+2, v)
}

func (q *Queue) publish(head uint16) {
	n := uint64(q.Size)
	binary.LittleEndian.PutUint16(q.c.Mem[q.avail+4+2*(uint64(q.availIdx)%n):], head)
	q.availIdx++
	if !q.hold {
		q.store16(q.avail+2, q.availIdx)
	}
}

// Hold makes the chains added from now on wait: the back-end sees none of
// them until Release makes them all available at once.
func (q *Queue) Hold() { q.hold = true }

// Release makes the chains added since Hold available together.
func (q *Queue) Release() {
	q.hold = false
	q.store16(q.avail+2, q.availIdx)
}

func (q *Queue) store16(gpa uint64, v uint16) {
	p := (*uint32)(unsafe.Pointer(&q.c.Mem[gpa&^3]))
	shift := (gpa & 3) * 8
	for {
		old := atomic.LoadUint32(p)
		nw := old&^(0xffff<<shift) | uint32(v)<<shift
		if atomic.CompareAndSwapUint32(p, old, nw) {
			return
		}
	}
}

func (q *Queue) load16(gpa uint64) uint16 {
	w := atomic.LoadUint32((*uint32)(unsafe.Pointer(&q.c.Mem[gpa&^3])))
	return uint16(w >> ((gpa & 3) * 8))
}

// Kick notifies the back-end unless it asked not to be.
func (q *Queue) Kick() error {
	if q.eventIdx {
		// Always kick: the back-end re-checks the ring before it sleeps, so
		// an extra kick only costs a wake-up.
	} else if q.load16(q.used)&1 != 0 {
		return nil
	}
	if q.kick < 0 {
		return nil // the back-end polls
	}
	var one [8]byte
	one[0] = 1
	_, err := unix.Write(q.kick, one[:])
	return err
}

// Used is one completed chain.
type Used struct {
	Head uint16
	Len  uint32
}

// Poll returns the chains completed since the last call, freeing their
// descriptors.
func (q *Queue) Poll(out []Used) []Used {
	n := uint64(q.Size)
	idx := q.load16(q.used + 2)
	for q.lastUsed != idx {
		e := q.c.Mem[q.used+4+8*(uint64(q.lastUsed)%n):]
		u := Used{Head: uint16(binary.LittleEndian.Uint32(e[0:])), Len: binary.LittleEndian.Uint32(e[4:])}
		out = append(out, u)
		q.lastUsed++
		q.freeChain(u.Head)
	}
	if q.eventIdx {
		q.store16(q.avail+4+2*n, q.lastUsed)
	}
	return out
}

func (q *Queue) freeChain(head uint16) {
	d := head
	for i := 0; i < int(q.Size); i++ {
		m := q.c.Mem[q.desc+16*uint64(d):]
		q.free = append(q.free, d)
		fl := binary.LittleEndian.Uint16(m[12:])
		if fl&descNext == 0 {
			return
		}
		d = binary.LittleEndian.Uint16(m[14:])
	}
}

// Wait blocks until at least one chain completes or ctx ends, and returns
// the completed ones.
func (q *Queue) Wait(ctx context.Context, out []Used) ([]Used, error) {
	for {
		if out = q.Poll(out); len(out) > 0 {
			return out, nil
		}
		fds := []unix.PollFd{{Fd: int32(q.call), Events: unix.POLLIN}}
		if _, err := unix.Poll(fds, 10); err != nil && err != unix.EINTR {
			return out, err
		}
		if fds[0].Revents != 0 {
			var b [8]byte
			unix.Read(q.call, b[:])
		}
		if err := ctx.Err(); err != nil {
			return out, err
		}
	}
}

// NewCall gives the running queue a new call eventfd (SET_VRING_CALL), as
// QEMU does when it unmasks the queue's interrupt.
func (q *Queue) NewCall() error {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return err
	}
	if err := q.SetCall(fd); err != nil {
		unix.Close(fd)
		return err
	}
	return nil
}

// SetCall sends fd as the running queue's call fd (SET_VRING_CALL); the
// queue owns it from then on.
func (q *Queue) SetCall(fd int) error {
	if _, err := q.c.call(vhost.ReqSetVringCall, u64(uint64(q.Index)), []int{fd}, false); err != nil {
		return fmt.Errorf("queue %d: %w", q.Index, err)
	}
	unix.Close(q.call)
	q.call = fd
	return nil
}

// Signalled waits up to d for an interrupt on the queue's call eventfd and
// consumes it.
func (q *Queue) Signalled(d time.Duration) bool {
	fds := []unix.PollFd{{Fd: int32(q.call), Events: unix.POLLIN}}
	for end := time.Now().Add(d); ; {
		if n, err := unix.Poll(fds, int(max(time.Until(end), 0)/time.Millisecond)); err == nil && n > 0 {
			var b [8]byte
			_, _ = unix.Read(q.call, b[:])
			return true
		} else if err != unix.EINTR || time.Now().After(end) {
			return false
		}
	}
}
