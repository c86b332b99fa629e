// Package frontend is the front-end side of vhost-user, the part QEMU plays:
// it shares a memfd as guest memory with a back-end, sets up split
// virtqueues in it and submits descriptor chains. hemd's tests and its
// benchmark use it to drive any vhost-user back-end directly.
package frontend

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/hemd/hemd/vhost"
	"golang.org/x/sys/unix"
)

// Client is a connection to a vhost-user back-end with its guest memory.
type Client struct {
	conn *net.UnixConn
	mu   sync.Mutex // one control message at a time

	memfd int
	// Mem is the guest memory: guest physical address a is Mem[a].
	Mem []byte
	// Features and Proto are what was negotiated.
	Features, Proto uint64
	Queues          []*Queue
	bump            uint64 // next free guest address for Alloc

	// Inflight is the inflight tracking region the back-end gave
	// (GET_INFLIGHT_FD), kept across reconnects as QEMU keeps it.
	Inflight     []byte
	inflightFd   int
	inflightSize uint64
	lastFds      []int // fds that came with the last reply
}

// Dial connects to the back-end socket at path.
func Dial(path string) (*Client, error) {
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", path, err)
	}
	return &Client{conn: c, memfd: -1, inflightFd: -1}, nil
}

// Close closes the connection and frees the guest memory.
func (c *Client) Close() error {
	err := c.conn.Close()
	for _, q := range c.Queues {
		if q.kick >= 0 {
			unix.Close(q.kick)
		}
		unix.Close(q.call)
	}
	c.Queues = nil
	if c.Mem != nil {
		unix.Munmap(c.Mem)
		c.Mem = nil
	}
	if c.memfd >= 0 {
		unix.Close(c.memfd)
		c.memfd = -1
	}
	if c.Inflight != nil {
		unix.Munmap(c.Inflight)
		c.Inflight = nil
	}
	if c.inflightFd >= 0 {
		unix.Close(c.inflightFd)
		c.inflightFd = -1
	}
	return err
}

// Flags of a message header.
const (
	FlagVersion   = 0x1
	FlagReply     = 0x4
	FlagNeedReply = 0x8
)

// Send writes one raw message: header fields, payload and fds as given, so
// that tests can send broken ones.
func (c *Client) Send(req vhost.Request, flags uint32, payload []byte, fds []int) error {
	b := make([]byte, 12+len(payload))
	binary.LittleEndian.PutUint32(b[0:], uint32(req))
	binary.LittleEndian.PutUint32(b[4:], flags)
	binary.LittleEndian.PutUint32(b[8:], uint32(len(payload)))
	copy(b[12:], payload)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	_, _, err := c.conn.WriteMsgUnix(b, oob, nil)
	return err
}

// Recv reads one reply and checks that it answers req.
func (c *Client) Recv(req vhost.Request) ([]byte, error) {
	var h [12]byte
	if err := c.conn.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		return nil, err
	}
	oob := make([]byte, unix.CmsgSpace(4*8))
	n, oobn, _, _, err := c.conn.ReadMsgUnix(h[:], oob)
	if err != nil {
		return nil, fmt.Errorf("%s reply: %w", req, err)
	}
	c.lastFds = nil
	if oobn > 0 {
		if cms, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
			for _, cm := range cms {
				if fds, err := unix.ParseUnixRights(&cm); err == nil {
					c.lastFds = append(c.lastFds, fds...)
				}
			}
		}
	}
	if _, err := readFull(c.conn, h[n:]); err != nil {
		return nil, fmt.Errorf("%s reply: %w", req, err)
	}
	got := vhost.Request(binary.LittleEndian.Uint32(h[0:]))
	flags := binary.LittleEndian.Uint32(h[4:])
	size := binary.LittleEndian.Uint32(h[8:])
	if got != req || flags&FlagReply == 0 || size > 4096 {
		return nil, fmt.Errorf("%s reply: got %s flags %#x size %d", req, got, flags, size)
	}
	p := make([]byte, size)
	if _, err := readFull(c.conn, p); err != nil {
		return nil, fmt.Errorf("%s reply: %w", req, err)
	}
	return p, nil
}

func readFull(c net.Conn, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		k, err := c.Read(b[n:])
		n += k
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// call sends a request and reads its reply if it has one, or its ack when
// REPLY_ACK was negotiated.
func (c *Client) call(req vhost.Request, payload []byte, fds []int, hasReply bool) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	flags := uint32(FlagVersion)
	ack := !hasReply && c.Proto&vhost.ProtoReplyAck != 0
	if ack {
		flags |= FlagNeedReply
	}
	if err := c.Send(req, flags, payload, fds); err != nil {
		return nil, fmt.Errorf("%s: %w", req, err)
	}
	if !hasReply && !ack {
		return nil, nil
	}
	p, err := c.Recv(req)
	if err != nil {
		return nil, err
	}
	if ack {
		if len(p) != 8 || binary.LittleEndian.Uint64(p) != 0 {
			return nil, fmt.Errorf("%s: back-end refused it", req)
		}
		return nil, nil
	}
	return p, nil
}

func u64(v uint64) []byte { return binary.LittleEndian.AppendUint64(nil, v) }

func u32s(vs ...uint32) []byte {
	var b []byte
	for _, v := range vs {
		b = binary.LittleEndian.AppendUint32(b, v)
	}
	return b
}

func (c *Client) getU64(req vhost.Request) (uint64, error) {
	p, err := c.call(req, nil, nil, true)
	if err != nil {
		return 0, err
	}
	if len(p) != 8 {
		return 0, fmt.Errorf("%s: reply of %d bytes", req, len(p))
	}
	return binary.LittleEndian.Uint64(p), nil
}

// Options say how Setup configures the device.
type Options struct {
	MemSize   int    // guest memory bytes (default 64 MiB)
	Queues    int    // queues to set up (default 1)
	QueueSize uint16 // descriptors per queue (default 128)
	// Features to ack, of those offered (default: all offered).
	Features uint64
	// NoEventIdx and NoIndirect clear those features.
	NoEventIdx, NoIndirect bool
	// PollKick sends SET_VRING_KICK with the no-fd bit: the back-end polls.
	PollKick bool
	// Inflight negotiates INFLIGHT_SHMFD and gets a tracking region before
	// the queues start, as QEMU's vhost-user-blk does.
	Inflight bool
	// Log negotiates LOG_SHMFD (dirty logging for migration).
	Log bool
	// MemLast sends the memory table after the queues are kicked and
	// enabled, an order QEMU does not use (tests of a back-end's tolerance).
	MemLast bool
}

// Setup negotiates features, shares guest memory and starts opts.Queues
// queues, as QEMU does when a guest driver starts the device.
func (c *Client) Setup(opts Options) error {
	if opts.MemSize == 0 {
		opts.MemSize = 64 << 20
	}
	if opts.Queues == 0 {
		opts.Queues = 1
	}
	if opts.QueueSize == 0 {
		opts.QueueSize = 128
	}
	if err := c.negotiate(opts); err != nil {
		return err
	}
	if err := c.shareMemory(opts.MemSize, !opts.MemLast); err != nil {
		return err
	}
	if opts.Inflight {
		if err := c.getInflight(uint16(opts.Queues), opts.QueueSize); err != nil {
			return err
		}
		if err := c.setInflight(uint16(opts.Queues), opts.QueueSize); err != nil {
			return err
		}
	}
	for i := 0; i < opts.Queues; i++ {
		q, err := c.startQueue(i, opts.QueueSize, opts.PollKick)
		if err != nil {
			return err
		}
		c.Queues = append(c.Queues, q)
	}
	if opts.MemLast {
		return c.sendMemTable()
	}
	return nil
}

// negotiate does the feature handshake and SET_OWNER.
func (c *Client) negotiate(opts Options) error {
	offered, err := c.getU64(vhost.ReqGetFeatures)
	if err != nil {
		return err
	}
	f := offered
	if opts.Features != 0 {
		f = opts.Features & offered
	}
	if opts.NoEventIdx {
		f &^= vhost.FeatEventIdx
	}
	if opts.NoIndirect {
		f &^= vhost.FeatIndirectDesc
	}
	f &^= vhost.FeatLogAll // only while migrating: SetLogAll
	if f&vhost.FeatProtocolFeatures != 0 {
		pf, err := c.getU64(vhost.ReqGetProtocolFeatures)
		if err != nil {
			return err
		}
		mask := uint64(vhost.ProtoMQ | vhost.ProtoReplyAck | vhost.ProtoConfig | vhost.ProtoConfigureMemSlots | vhost.ProtoResetDevice)
		if opts.Inflight {
			mask |= vhost.ProtoInflightShmfd
		}
		if opts.Log {
			mask |= vhost.ProtoLogShmfd
		}
		want := pf & mask
		if _, err := c.call(vhost.ReqSetProtocolFeatures, u64(want), nil, false); err != nil {
			return err
		}
		c.Proto = want
	}
	if _, err := c.call(vhost.ReqSetOwner, nil, nil, false); err != nil {
		return err
	}
	if c.Proto&vhost.ProtoMQ != 0 {
		n, err := c.getU64(vhost.ReqGetQueueNum)
		if err != nil {
			return err
		}
		if uint64(opts.Queues) > n {
			return fmt.Errorf("back-end serves %d queues, %d asked", n, opts.Queues)
		}
	}
	if _, err := c.call(vhost.ReqSetFeatures, u64(f), nil, false); err != nil {
		return err
	}
	c.Features = f
	return nil
}

// shareMemory creates the memfd guest memory and, if send, sends
// SET_MEM_TABLE.
func (c *Client) shareMemory(size int, send bool) error {
	fd, err := unix.MemfdCreate("hemd-guest", unix.MFD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("memfd: %w", err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return fmt.Errorf("memfd: %w", err)
	}
	mem, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		return fmt.Errorf("mmap guest memory: %w", err)
	}
	c.memfd, c.Mem, c.bump = fd, mem, 4096
	if !send {
		return nil
	}
	return c.sendMemTable()
}

// sendMemTable sends SET_MEM_TABLE for the guest memory.
func (c *Client) sendMemTable() error {
	size := len(c.Mem)
	fd := c.memfd
	p := u32s(1, 0)
	p = binary.LittleEndian.AppendUint64(p, 0)
	p = binary.LittleEndian.AppendUint64(p, uint64(size))
	p = binary.LittleEndian.AppendUint64(p, c.UserAddr(0))
	p = binary.LittleEndian.AppendUint64(p, 0)
	_, err := c.call(vhost.ReqSetMemTable, p, []int{fd}, false)
	return err
}

// UserAddr is the front-end virtual address of guest address gpa.
func (c *Client) UserAddr(gpa uint64) uint64 {
	return uint64(uintptrOf(c.Mem)) + gpa
}

// Alloc reserves n bytes of guest memory aligned to align and returns their
// guest address.
func (c *Client) Alloc(n, align uint64) (uint64, error) {
	a := (c.bump + align - 1) &^ (align - 1)
	if a+n > uint64(len(c.Mem)) || a+n < a {
		return 0, errors.New("guest memory exhausted")
	}
	c.bump = a + n
	return a, nil
}

// Config reads size bytes of the device config space at offset.
func (c *Client) Config(offset, size uint32) ([]byte, error) {
	p := append(u32s(offset, size, 0), make([]byte, size)...)
	r, err := c.call(vhost.ReqGetConfig, p, nil, true)
	if err != nil {
		return nil, err
	}
	if len(r) != 12+int(size) {
		return nil, fmt.Errorf("GET_CONFIG: reply of %d bytes", len(r))
	}
	return r[12:], nil
}

// StopQueue sends GET_VRING_BASE for queue i and returns the ring's base.
func (c *Client) StopQueue(i int) (uint32, error) {
	r, err := c.call(vhost.ReqGetVringBase, u32s(uint32(i), 0), nil, true)
	if err != nil {
		return 0, err
	}
	if len(r) != 8 {
		return 0, fmt.Errorf("GET_VRING_BASE: reply of %d bytes", len(r))
	}
	return binary.LittleEndian.Uint32(r[4:]), nil
}

// AddRegion creates a new memfd region of size bytes at guest address gpa,
// sends ADD_MEM_REG and returns the region's memory.
func (c *Client) AddRegion(gpa uint64, size int) ([]byte, error) {
	fd, err := unix.MemfdCreate("hemd-guest-extra", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		return nil, err
	}
	mem, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, err
	}
	if _, err := c.call(vhost.ReqAddMemReg, regionPayload(gpa, uint64(size), uint64(uintptrOf(mem))), []int{fd}, false); err != nil {
		unix.Munmap(mem)
		return nil, err
	}
	return mem, nil
}

// RemoveRegion sends REM_MEM_REG for a region added with AddRegion.
func (c *Client) RemoveRegion(gpa uint64, mem []byte) error {
	_, err := c.call(vhost.ReqRemMemReg, regionPayload(gpa, uint64(len(mem)), uint64(uintptrOf(mem))), nil, false)
	return err
}

func regionPayload(gpa, size, uva uint64) []byte {
	p := u64(0)
	p = binary.LittleEndian.AppendUint64(p, gpa)
	p = binary.LittleEndian.AppendUint64(p, size)
	p = binary.LittleEndian.AppendUint64(p, uva)
	return binary.LittleEndian.AppendUint64(p, 0)
}

// Request sends any request with a payload and returns its reply (or ack).
func (c *Client) Request(req vhost.Request, payload []byte, fds []int, hasReply bool) ([]byte, error) {
	return c.call(req, payload, fds, hasReply)
}
