package blk

import (
	"context"
	"encoding/binary"
	"errors"
	"testing"
	"time"

	"github.com/hemd/hemd/vhost"
	"golang.org/x/sys/unix"
)

// backendChannel negotiates BACKEND_REQ on the rig's front-end and hands
// the back-end its channel; it returns the front-end's end.
func backendChannel(t *testing.T, r *rig) int {
	t.Helper()
	proto := r.c.Proto | vhost.ProtoBackendReq
	if _, err := r.c.Request(vhost.ReqSetProtocolFeatures, binary.LittleEndian.AppendUint64(nil, proto), nil, false); err != nil {
		t.Fatal(err)
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fds[0]) })
	if _, err := r.c.Request(vhost.ReqSetBackendReqFd, nil, []int{fds[1]}, false); err != nil {
		t.Fatal(err)
	}
	unix.Close(fds[1])
	return fds[0]
}

// readBackend reads one back-end request header from fd.
func readBackend(t *testing.T, fd int) (req, flags, size uint32) {
	t.Helper()
	var h [12]byte
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 10}); err != nil {
		t.Fatal(err)
	}
	// A socket with a receive timeout is not restarted after a signal (the
	// runtime's preemption signal among them): read again on EINTR.
	n, err := unix.Read(fd, h[:])
	for err == unix.EINTR {
		n, err = unix.Read(fd, h[:])
	}
	if err != nil || n != 12 {
		t.Fatalf("back-end channel: read %d bytes, %v", n, err)
	}
	return binary.LittleEndian.Uint32(h[0:]), binary.LittleEndian.Uint32(h[4:]), binary.LittleEndian.Uint32(h[8:])
}

// answerBackend answers a back-end request with v.
func answerBackend(t *testing.T, fd int, req uint32, v uint64) {
	t.Helper()
	b := binary.LittleEndian.AppendUint32(nil, req)
	b = binary.LittleEndian.AppendUint32(b, 0x1|0x4) // version, reply
	b = binary.LittleEndian.AppendUint32(b, 8)
	b = binary.LittleEndian.AppendUint64(b, v)
	if _, err := unix.Write(fd, b); err != nil {
		t.Fatal(err)
	}
}

// A volume grows under a running front-end: the device takes requests up
// to the new end at once, the config space says the new capacity, and the
// front-end is told on the back-end channel, reading the config space
// before it answers (as QEMU does).
func TestResizeOnline(t *testing.T) {
	r := newRig(t, rigOpts{size: 8 << 20})
	fd := backendChannel(t, r)
	const newSize = 12 << 20
	beyond := blkIO{typ: TypeOut, sector: (8 << 20) / 512, data: pattern(4096, 5)}
	if st, _, _ := r.do(0, beyond); st != StatusIOErr {
		t.Fatalf("write past the old end: status %d", st)
	}
	if err := r.dev.Resize(4 << 20); !errors.Is(err, ErrShrink) {
		t.Fatalf("shrink: %v", err)
	}
	if err := r.dev.Resize(newSize); err == nil {
		t.Fatal("resize past the end of the store accepted")
	}
	if err := r.store.Grow(newSize); err != nil {
		t.Fatal(err)
	}
	if err := r.dev.Resize(newSize); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- r.srv.NotifyConfigChange(context.Background()) }()
	req, flags, size := readBackend(t, fd)
	if vhost.BackendRequest(req) != vhost.BackendConfigChange || flags != 0x1|0x8 || size != 0 {
		t.Fatalf("back-end request %d flags %#x size %d, want CONFIG_CHANGE_MSG with NEED_REPLY", req, flags, size)
	}
	// The front-end reads the config space while the back-end waits for
	// its answer: the session is not blocked by the notifier.
	cfg, err := r.c.Config(0, 8)
	if err != nil {
		t.Fatal(err)
	}
	if c := binary.LittleEndian.Uint64(cfg); c != newSize/512 {
		t.Fatalf("config capacity %d sectors, want %d", c, newSize/512)
	}
	answerBackend(t, fd, req, 0)
	if err := <-done; err != nil {
		t.Fatalf("NotifyConfigChange: %v", err)
	}
	if st, _, _ := r.do(0, beyond); st != StatusOK {
		t.Fatalf("write past the old end after the resize: status %d", st)
	}
	if st, _, _ := r.do(0, blkIO{typ: TypeIn, sector: newSize / 512, data: make([]byte, 512), write: true}); st != StatusIOErr {
		t.Fatalf("read past the new end: status %d", st)
	}
	if r.dev.Capacity() != newSize {
		t.Fatalf("capacity %d", r.dev.Capacity())
	}

	// A front-end that refuses the request.
	go func() { done <- r.srv.NotifyConfigChange(context.Background()) }()
	req, _, _ = readBackend(t, fd)
	answerBackend(t, fd, req, 1)
	if err := <-done; !errors.Is(err, vhost.ErrBackendRefused) {
		t.Fatalf("refused: %v", err)
	}
	// The guest's driver stopped the device: QEMU would drop the change.
	if _, err := r.c.StopQueue(0); err != nil {
		t.Fatal(err)
	}
	go func() { done <- r.srv.NotifyConfigChange(context.Background()) }()
	req, _, _ = readBackend(t, fd)
	answerBackend(t, fd, req, 0)
	if err := <-done; !errors.Is(err, vhost.ErrNotStarted) {
		t.Fatalf("device stopped: %v", err)
	}
	// The front-end gone: nobody to tell.
	r.c.Close()
	r.c = nil
	deadline := time.Now().Add(10 * time.Second)
	for r.srv.Connected() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if err := r.srv.NotifyConfigChange(context.Background()); !errors.Is(err, vhost.ErrNoFrontEnd) {
		t.Fatalf("no front-end: %v", err)
	}
}

// A front-end that did not negotiate the back-end channel cannot be told.
func TestResizeNoBackendChannel(t *testing.T) {
	r := newRig(t, rigOpts{size: 8 << 20})
	if err := r.srv.NotifyConfigChange(context.Background()); !errors.Is(err, vhost.ErrNoBackendChannel) {
		t.Fatalf("%v, want ErrNoBackendChannel", err)
	}
	// SET_BACKEND_REQ_FD without the protocol feature is refused.
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fds[0])
	defer unix.Close(fds[1])
	if _, err := r.c.Request(vhost.ReqSetBackendReqFd, nil, []int{fds[1]}, false); err == nil {
		t.Fatal("SET_BACKEND_REQ_FD accepted without BACKEND_REQ")
	}
}
