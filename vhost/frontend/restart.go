package frontend

import (
	"encoding/binary"
	"fmt"

	"github.com/hemd/hemd/vhost"
	"golang.org/x/sys/unix"
)

// inflightMsg is the VhostUserInflight payload: mmap size, mmap offset,
// queue count and queue size, padded to 24 bytes.
func inflightMsg(size, offset uint64, numQueues, queueSize uint16) []byte {
	p := binary.LittleEndian.AppendUint64(nil, size)
	p = binary.LittleEndian.AppendUint64(p, offset)
	p = binary.LittleEndian.AppendUint16(p, numQueues)
	p = binary.LittleEndian.AppendUint16(p, queueSize)
	return append(p, 0, 0, 0, 0)
}

// getInflight asks the back-end for an inflight tracking region
// (GET_INFLIGHT_FD) and maps it.
func (c *Client) getInflight(numQueues, queueSize uint16) error {
	r, err := c.call(vhost.ReqGetInflightFd, inflightMsg(0, 0, numQueues, queueSize), nil, true)
	if err != nil {
		return err
	}
	fds := c.lastFds
	c.lastFds = nil
	if len(r) < 20 || len(fds) != 1 {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return fmt.Errorf("GET_INFLIGHT_FD: reply of %d bytes with %d fds", len(r), len(fds))
	}
	size, off := binary.LittleEndian.Uint64(r[0:]), binary.LittleEndian.Uint64(r[8:])
	m, err := unix.Mmap(fds[0], int64(off), int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fds[0])
		return fmt.Errorf("mmap inflight region: %w", err)
	}
	c.Inflight, c.inflightFd, c.inflightSize = m, fds[0], size
	return nil
}

// setInflight hands the kept inflight region to the back-end
// (SET_INFLIGHT_FD).
func (c *Client) setInflight(numQueues, queueSize uint16) error {
	_, err := c.call(vhost.ReqSetInflightFd, inflightMsg(c.inflightSize, 0, numQueues, queueSize), []int{c.inflightFd}, false)
	return err
}

// SetLogBase shares a dirty log of size bytes (SET_LOG_BASE with
// LOG_SHMFD) and returns it mapped.
func (c *Client) SetLogBase(size int) ([]byte, error) {
	fd, err := unix.MemfdCreate("hemd-dirty-log", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		return nil, err
	}
	m, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, err
	}
	p := binary.LittleEndian.AppendUint64(nil, uint64(size))
	p = binary.LittleEndian.AppendUint64(p, 0)
	r, err := c.call(vhost.ReqSetLogBase, p, []int{fd}, true)
	if err != nil {
		unix.Munmap(m)
		return nil, err
	}
	if len(r) != 8 || binary.LittleEndian.Uint64(r) != 0 {
		unix.Munmap(m)
		return nil, fmt.Errorf("SET_LOG_BASE: back-end refused")
	}
	return m, nil
}

// SetLogAll turns dirty logging on or off (VHOST_F_LOG_ALL in
// SET_FEATURES), and the used-ring logging of every queue with it.
func (c *Client) SetLogAll(on bool) error {
	f := c.Features &^ vhost.FeatLogAll
	if on {
		f |= vhost.FeatLogAll
	}
	if _, err := c.call(vhost.ReqSetFeatures, u64(f), nil, false); err != nil {
		return err
	}
	c.Features = f
	for _, q := range c.Queues {
		var flags uint32
		if on {
			flags = 1 // VHOST_VRING_F_LOG
		}
		p := binary.LittleEndian.AppendUint64(binary.LittleEndian.AppendUint64(
			binary.LittleEndian.AppendUint64(binary.LittleEndian.AppendUint64(u32s(uint32(q.Index), flags),
				c.UserAddr(q.desc)), c.UserAddr(q.used)), c.UserAddr(q.avail)), q.used)
		if _, err := c.call(vhost.ReqSetVringAddr, p, nil, false); err != nil {
			return err
		}
	}
	return nil
}

// UsedGPA returns the guest address of the queue's used ring.
func (q *Queue) UsedGPA() uint64 { return q.used }

// Reattach connects to the back-end at path again after the old one went
// away (it was killed, or restarted), as QEMU does with reconnect=1: the
// same guest memory, the kept inflight region, and each queue restarted
// with its used index as base.
func (c *Client) Reattach(path string, opts Options) error {
	c.conn.Close()
	for _, q := range c.Queues {
		if q.kick >= 0 {
			unix.Close(q.kick)
		}
		unix.Close(q.call)
	}
	nc, err := Dial(path)
	if err != nil {
		return err
	}
	c.conn, c.Proto = nc.conn, 0
	opts.Queues = len(c.Queues)
	if c.inflightFd >= 0 {
		opts.Inflight = true
	}
	if err := c.negotiate(opts); err != nil {
		return err
	}
	if err := c.sendMemTable(); err != nil {
		return err
	}
	if c.inflightFd >= 0 && len(c.Queues) > 0 {
		if err := c.setInflight(uint16(len(c.Queues)), c.Queues[0].Size); err != nil {
			return err
		}
	}
	for _, q := range c.Queues {
		if err := q.configure(q.load16(q.used+2), opts.PollKick); err != nil {
			return err
		}
	}
	return nil
}

// MemFd returns the memfd behind the guest memory (tests that misbehave as a
// front-end, e.g. shrink it, use it).
func (c *Client) MemFd() int { return c.memfd }

// InflightFd returns the fd of the inflight region the back-end gave, -1 if
// none.
func (c *Client) InflightFd() int { return c.inflightFd }

// Restart starts a queue stopped with StopQueue again, with base as its next
// available index and new kick and call eventfds.
func (q *Queue) Restart(base uint16) error {
	if q.kick >= 0 {
		unix.Close(q.kick)
	}
	unix.Close(q.call)
	return q.configure(base, false)
}
