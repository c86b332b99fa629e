package vhost

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// The back-end channel (protocol feature BACKEND_REQ, QEMU 7.2's SLAVE_REQ):
// a socket the front-end hands over with SET_BACKEND_REQ_FD, on which the
// back-end sends requests of its own. hemd sends one: CONFIG_CHANGE_MSG,
// when a volume grew, so that QEMU reads the config space again and tells
// the guest its new capacity.

// Errors of NotifyConfigChange: why the guest could not be told.
var (
	// ErrNoFrontEnd: no front-end is connected; the next one reads the
	// config space when it sets the device up.
	ErrNoFrontEnd = errors.New("no front-end is connected")
	// ErrNoBackendChannel: the front-end did not negotiate BACKEND_REQ
	// and CONFIG, or sent no back-end channel.
	ErrNoBackendChannel = errors.New("the front-end set up no back-end channel (protocol features BACKEND_REQ and CONFIG)")
	// ErrNotStarted: the guest's driver has not started the device; QEMU
	// drops a config change then and keeps the capacity it read when the
	// device was realized.
	ErrNotStarted = errors.New("the guest's driver has not started the device")
	// ErrBackendRefused: the front-end answered the request with a
	// failure.
	ErrBackendRefused = errors.New("the front-end refused the request")
)

// backendTimeout bounds the wait for the front-end's answer on the back-end
// channel (QEMU answers after it has read the config space again).
const backendTimeout = 10 * time.Second

// backendChannel is the back-end channel of a session. The session
// goroutine sets and closes it; a notifier uses it from another goroutine.
// QEMU answers a config change only after reading the config space over
// the session's own socket, so the session goroutine never waits here.
type backendChannel struct {
	mu sync.Mutex
	fd int // -1: none
	// live is fd, read without mu: close shuts the socket down first, so
	// that a notifier waiting for an answer under mu wakes at once.
	live atomic.Int64
}

func newBackendChannel() *backendChannel {
	b := &backendChannel{fd: -1}
	b.live.Store(-1)
	return b
}

// set installs fd as the channel, closing the previous one. Only the
// session goroutine calls set and close.
func (b *backendChannel) set(fd int) {
	if old := b.live.Load(); old >= 0 {
		_ = unix.Shutdown(int(old), unix.SHUT_RDWR)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.fd >= 0 {
		unix.Close(b.fd)
	}
	b.fd = fd
	b.live.Store(int64(fd))
}

// close closes the channel.
func (b *backendChannel) close() { b.set(-1) }

// send sends req with no payload and, with ack, waits for the front-end's
// answer: a u64, zero for success.
func (b *backendChannel) send(ctx context.Context, req BackendRequest, ack bool) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.fd < 0 {
		return ErrNoBackendChannel
	}
	flags := uint32(flagVersion)
	if ack {
		flags |= flagNeedReply
	}
	var h [headerSize]byte
	binary.LittleEndian.PutUint32(h[0:], uint32(req))
	binary.LittleEndian.PutUint32(h[4:], flags)
	if err := writeAll(b.fd, h[:]); err != nil {
		return fmt.Errorf("back-end channel: %w", err)
	}
	if !ack {
		return nil
	}
	deadline := time.Now().Add(backendTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	var r [headerSize + 8]byte
	if err := readAll(ctx, b.fd, r[:], deadline); err != nil {
		return fmt.Errorf("back-end channel: answer to request %d: %w", req, err)
	}
	got := BackendRequest(binary.LittleEndian.Uint32(r[0:]))
	rflags := binary.LittleEndian.Uint32(r[4:])
	size := binary.LittleEndian.Uint32(r[8:])
	if got != req || rflags&flagReply == 0 || size != 8 {
		return fmt.Errorf("back-end channel: answer to request %d is request %d, flags %#x, %d bytes", req, got, rflags, size)
	}
	if v := binary.LittleEndian.Uint64(r[headerSize:]); v != 0 {
		return fmt.Errorf("%w: request %d answered %d", ErrBackendRefused, req, v)
	}
	return nil
}

// writeAll writes b to the stream socket fd.
func writeAll(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := unix.SendmsgN(fd, b, nil, nil, unix.MSG_NOSIGNAL)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

// readAll fills b from fd by deadline, or until ctx ends.
func readAll(ctx context.Context, fd int, b []byte, deadline time.Time) error {
	for len(b) > 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		left := time.Until(deadline)
		if left <= 0 {
			return fmt.Errorf("no answer in %v", backendTimeout)
		}
		p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		ms := int(min(left, 100*time.Millisecond) / time.Millisecond)
		if _, err := unix.Poll(p, max(ms, 1)); err != nil {
			if err == unix.EINTR {
				continue
			}
			return err
		}
		if p[0].Revents == 0 {
			continue
		}
		n, err := unix.Read(fd, b)
		if err == unix.EINTR || err == unix.EAGAIN {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return errors.New("the front-end closed the channel")
		}
		b = b[n:]
	}
	return nil
}
