package vhost

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// conn reads front-end messages with their file descriptors and writes
// replies. It is used by the session goroutine only.
type conn struct {
	c   *net.UnixConn
	hdr [headerSize]byte
	oob []byte
	// whole bounds the time from a message's first byte to its last: a
	// front-end that sends part of one and stops would otherwise hold the
	// socket's one front-end slot for ever. Between messages a connection
	// may idle (a paused VM).
	whole time.Duration
}

// DefaultMessageTimeout is how long a started message may take to arrive
// whole.
const DefaultMessageTimeout = 10 * time.Second

// ErrMessageTimeout is a message that started but did not arrive whole in
// time.
var ErrMessageTimeout = errors.New("message not complete in time")

func newConn(c *net.UnixConn, whole time.Duration) *conn {
	if whole <= 0 {
		whole = DefaultMessageTimeout
	}
	return &conn{c: c, oob: make([]byte, unix.CmsgSpace(4*maxFds*2)), whole: whole}
}

// read returns the next message. Any fds that arrived are in m.fds and are
// the caller's to close, also when an error is returned alongside a message.
func (c *conn) read() (*message, error) {
	n, oobn, flags, _, err := c.c.ReadMsgUnix(c.hdr[:], c.oob)
	if err != nil {
		return nil, err
	}
	m := &message{}
	if oobn > 0 {
		m.fds, err = parseFds(c.oob[:oobn])
		if err != nil {
			return m, err
		}
	}
	if flags&unix.MSG_CTRUNC != 0 {
		return m, fmt.Errorf("%w: control data truncated (more than %d fds)", ErrFdCount, maxFds)
	}
	if n == 0 {
		return m, io.EOF
	}
	if n < headerSize || c.payloadSize() > 0 {
		// The rest of the message must follow within c.whole.
		if err := c.c.SetReadDeadline(time.Now().Add(c.whole)); err != nil {
			return m, fmt.Errorf("set deadline: %w", err)
		}
		defer c.c.SetReadDeadline(time.Time{})
	}
	if n < headerSize {
		if _, err := io.ReadFull(c.c, c.hdr[n:]); err != nil {
			return m, fmt.Errorf("header (%d of %d bytes): %w", n, headerSize, c.timedOut(err))
		}
	}
	m.header, err = decodeHeader(c.hdr[:])
	if err != nil {
		return m, err
	}
	if m.Size > 0 {
		m.payload = make([]byte, m.Size)
		if _, err := io.ReadFull(c.c, m.payload); err != nil {
			return m, fmt.Errorf("%s payload of %d bytes: %w", m.Request, m.Size, c.timedOut(err))
		}
	}
	return m, nil
}

// payloadSize is the size field of the header read so far, 0 if it is not
// all there yet.
func (c *conn) payloadSize() uint32 { return binary.LittleEndian.Uint32(c.hdr[8:]) }

// timedOut names a deadline error as the front-end's stall.
func (c *conn) timedOut(err error) error {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("%w: the front-end stopped sending for %v", ErrMessageTimeout, c.whole)
	}
	return err
}

func parseFds(oob []byte) ([]int, error) {
	cmsgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("control message: %w", err)
	}
	var fds []int
	for _, cm := range cmsgs {
		f, err := unix.ParseUnixRights(&cm)
		if err != nil {
			continue
		}
		fds = append(fds, f...)
	}
	if len(fds) > maxFds {
		return fds, fmt.Errorf("%w: %d", ErrFdCount, len(fds))
	}
	return fds, nil
}

// reply sends the reply to req with payload p.
func (c *conn) reply(req Request, p []byte) error { return c.replyFds(req, p, nil) }

// replyFds sends the reply to req with payload p and fds in its ancillary
// data.
func (c *conn) replyFds(req Request, p []byte, fds []int) error {
	b := make([]byte, headerSize+len(p))
	binary.LittleEndian.PutUint32(b[0:], uint32(req))
	binary.LittleEndian.PutUint32(b[4:], flagVersion|flagReply)
	binary.LittleEndian.PutUint32(b[8:], uint32(len(p)))
	copy(b[headerSize:], p)
	var err error
	if len(fds) > 0 {
		_, _, err = c.c.WriteMsgUnix(b, unix.UnixRights(fds...), nil)
	} else {
		_, err = c.c.Write(b)
	}
	if err != nil {
		return fmt.Errorf("reply to %s: %w", req, err)
	}
	return nil
}

func closeFds(fds []int) {
	for _, fd := range fds {
		if fd >= 0 {
			_ = unix.Close(fd)
		}
	}
}

var errClosed = errors.New("connection closed")
