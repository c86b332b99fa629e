package vhost

import (
	"context"
	"encoding/binary"
	"errors"
	"log/slog"
	"net"
	"os"
	"testing"

	"github.com/hemd/hemd/vhost/guestmem"
	"github.com/hemd/hemd/vhost/virtq"
	"golang.org/x/sys/unix"
)

// fakeDevice is a Device with two queues that serves nothing.
type fakeDevice struct{ started, stopped int }

func (d *fakeDevice) Features() uint64                    { return FeatVersion1 | FeatEventIdx | FeatIndirectDesc | 1<<9 }
func (d *fakeDevice) Config() []byte                      { return []byte{1, 2, 3, 4, 5, 6, 7, 8} }
func (d *fakeDevice) SetConfig(uint32, []byte) error      { return errors.New("read-only config") }
func (d *fakeDevice) MaxQueues() int                      { return 2 }
func (d *fakeDevice) Start(context.Context, uint64) error { d.started++; return nil }
func (d *fakeDevice) Stop()                               { d.stopped++ }
func (d *fakeDevice) Handler(int) Handler                 { return nopHandler{} }

type nopHandler struct{}

func (nopHandler) Handle(*virtq.Chain) uint32 { return 0 }

// testSession returns a session on one end of a socketpair and the other end.
func testSession(t testing.TB) (*session, *net.UnixConn) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "sock")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		return c.(*net.UnixConn)
	}
	a, b := conn(fds[0]), conn(fds[1])
	s := newSession(&fakeDevice{}, a, slog.New(slog.DiscardHandler), 0)
	s.ctx = context.Background()
	t.Cleanup(func() { s.teardown(); b.Close() })
	return s, b
}

func memfd(t testing.TB, size int64) int {
	fd, err := unix.MemfdCreate("guest", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Ftruncate(fd, size); err != nil {
		t.Fatal(err)
	}
	return fd
}

func eventfd(t testing.TB) int {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	return fd
}

// pipeFd is the write end of a pipe whose read end is closed.
func pipeFd(t testing.TB) int {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	unix.Close(p[0])
	return p[1]
}

func le64(vs ...uint64) []byte {
	var b []byte
	for _, v := range vs {
		b = binary.LittleEndian.AppendUint64(b, v)
	}
	return b
}

func le32(vs ...uint32) []byte {
	var b []byte
	for _, v := range vs {
		b = binary.LittleEndian.AppendUint32(b, v)
	}
	return b
}

func memTable(n uint32, regions ...[4]uint64) []byte {
	b := le32(n, 0)
	for _, r := range regions {
		b = append(b, le64(r[0], r[1], r[2], r[3])...)
	}
	return b
}

func msg(req Request, p []byte, fds ...int) *message {
	return &message{header: header{Request: req, Flags: flagVersion, Size: uint32(len(p))}, payload: p, fds: fds}
}

// TestMessageErrors breaks one field at a time of otherwise good messages and
// expects exactly one error.
func TestMessageErrors(t *testing.T) {
	const mb = 1 << 20
	good := [4]uint64{0, mb, 0x7f0000000000, 0}
	type step struct {
		m    func(t *testing.T) *message
		want error // nil: must succeed
	}
	ok := func(req Request, p []byte) step {
		return step{m: func(*testing.T) *message { return msg(req, p) }}
	}
	owner := ok(ReqSetOwner, nil)
	mem := step{m: func(t *testing.T) *message { return msg(ReqSetMemTable, memTable(1, good), memfd(t, mb)) }}
	cases := []struct {
		name  string
		steps []step
	}{
		{"unknown request", []step{{m: func(*testing.T) *message { return msg(99, nil) }, want: ErrUnknownRequest}}},
		{"log base no fd", []step{owner, {m: func(*testing.T) *message { return msg(ReqSetLogBase, le64(4096, 0)) }, want: ErrFdCount}}},
		{"log base not negotiated", []step{owner, {m: func(t *testing.T) *message { return msg(ReqSetLogBase, le64(4096, 0), memfd(t, mb)) }, want: ErrUnknownRequest}}},
		{"log base zero size", []step{owner, ok(ReqSetProtocolFeatures, le64(ProtoLogShmfd)),
			{m: func(t *testing.T) *message { return msg(ReqSetLogBase, le64(0, 0), memfd(t, mb)) }, want: ErrPayloadSize}}},
		{"inflight not negotiated", []step{owner, {m: func(*testing.T) *message { return msg(ReqGetInflightFd, make([]byte, 24)) }, want: ErrUnknownRequest}}},
		{"inflight short", []step{owner, ok(ReqSetProtocolFeatures, le64(ProtoInflightShmfd)),
			{m: func(*testing.T) *message { return msg(ReqGetInflightFd, make([]byte, 16)) }, want: ErrPayloadSize}}},
		{"inflight too many queues", []step{owner, ok(ReqSetProtocolFeatures, le64(ProtoInflightShmfd)),
			{m: func(*testing.T) *message { return msg(ReqGetInflightFd, append(le64(0, 0), le32(9<<16|128)...)) }, want: ErrInflight}}},
		{"inflight queue size not power of 2", []step{owner, ok(ReqSetProtocolFeatures, le64(ProtoInflightShmfd)),
			{m: func(*testing.T) *message { return msg(ReqGetInflightFd, append(le64(0, 0), le32(100<<16|1)...)) }, want: ErrInflight}}},
		{"set inflight region too small", []step{owner, ok(ReqSetProtocolFeatures, le64(ProtoInflightShmfd)),
			{m: func(t *testing.T) *message {
				return msg(ReqSetInflightFd, append(le64(1024, 0), le32(128<<16|1)...), memfd(t, mb))
			}, want: ErrInflight}}},
		{"set inflight region beyond its file", []step{owner, ok(ReqSetProtocolFeatures, le64(ProtoInflightShmfd)),
			{m: func(t *testing.T) *message {
				return msg(ReqSetInflightFd, append(le64(4*mb, 0), le32(128<<16|1)...), memfd(t, mb))
			}, want: ErrInflight}}},
		{"log base beyond its file", []step{owner, ok(ReqSetProtocolFeatures, le64(ProtoLogShmfd)),
			{m: func(t *testing.T) *message { return msg(ReqSetLogBase, le64(2*mb, 0), memfd(t, mb)) }, want: ErrPayloadSize}}},
		{"set inflight no fd", []step{owner, ok(ReqSetProtocolFeatures, le64(ProtoInflightShmfd)),
			{m: func(*testing.T) *message { return msg(ReqSetInflightFd, append(le64(mb, 0), le32(128<<16|1)...)) }, want: ErrFdCount}}},
		{"set features short", []step{{m: func(*testing.T) *message { return msg(ReqSetFeatures, le32(1)) }, want: ErrPayloadSize}}},
		{"set features not offered", []step{{m: func(*testing.T) *message { return msg(ReqSetFeatures, le64(1<<40)) }, want: ErrFeatures}}},
		{"protocol features not offered", []step{{m: func(*testing.T) *message { return msg(ReqSetProtocolFeatures, le64(1<<16)) }, want: ErrFeatures}}},
		{"mem table before owner", []step{{m: mem.m, want: ErrNotOwner}}},
		{"mem table no fd", []step{owner, {m: func(*testing.T) *message { return msg(ReqSetMemTable, memTable(1, good)) }, want: ErrFdCount}}},
		{"mem table zero regions", []step{owner, {m: func(t *testing.T) *message { return msg(ReqSetMemTable, memTable(0), memfd(t, mb)) }, want: ErrRegionCount}}},
		{"mem table nine regions", []step{owner, {m: func(t *testing.T) *message { return msg(ReqSetMemTable, memTable(9, good), memfd(t, mb)) }, want: ErrRegionCount}}},
		{"mem table count vs payload", []step{owner, {m: func(t *testing.T) *message { return msg(ReqSetMemTable, memTable(2, good), memfd(t, mb), memfd(t, mb)) }, want: ErrPayloadSize}}},
		{"mem table count vs fds", []step{owner, {m: func(t *testing.T) *message {
			return msg(ReqSetMemTable, memTable(2, good, [4]uint64{2 * mb, mb, 0, 0}), memfd(t, mb))
		}, want: ErrFdCount}}},
		{"region size zero", []step{owner, {m: func(t *testing.T) *message {
			return msg(ReqSetMemTable, memTable(1, [4]uint64{0, 0, 0, 0}), memfd(t, mb))
		}, want: guestmem.ErrBadRegion}}},
		{"region wraps", []step{owner, {m: func(t *testing.T) *message {
			return msg(ReqSetMemTable, memTable(1, [4]uint64{1<<64 - 4096, mb, 0, 0}), memfd(t, mb))
		}, want: guestmem.ErrBadRegion}}},
		{"region beyond its file", []step{owner, {m: func(t *testing.T) *message {
			return msg(ReqSetMemTable, memTable(1, [4]uint64{0, 2 * mb, 0, 0}), memfd(t, mb))
		}, want: guestmem.ErrBadRegion}}},
		{"region mmap offset beyond file", []step{owner, {m: func(t *testing.T) *message {
			return msg(ReqSetMemTable, memTable(1, [4]uint64{0, mb, 0, mb}), memfd(t, mb))
		}, want: guestmem.ErrBadRegion}}},
		{"regions overlap", []step{owner, {m: func(t *testing.T) *message {
			return msg(ReqSetMemTable, memTable(2, good, [4]uint64{mb / 2, mb, 1 << 40, 0}), memfd(t, mb), memfd(t, mb))
		}, want: guestmem.ErrOverlap}}},
		{"vring num index", []step{owner, {m: func(*testing.T) *message { return msg(ReqSetVringNum, le32(2, 128)) }, want: ErrQueueIndex}}},
		{"vring num not power of 2", []step{owner, {m: func(*testing.T) *message { return msg(ReqSetVringNum, le32(0, 100)) }, want: virtq.ErrBadSize}}},
		{"vring num zero", []step{owner, {m: func(*testing.T) *message { return msg(ReqSetVringNum, le32(0, 0)) }, want: virtq.ErrBadSize}}},
		{"vring num too big", []step{owner, {m: func(*testing.T) *message { return msg(ReqSetVringNum, le32(0, 65536)) }, want: virtq.ErrBadSize}}},
		{"vring base too big", []step{owner, {m: func(*testing.T) *message { return msg(ReqSetVringBase, le32(0, 70000)) }, want: ErrPayloadSize}}},
		{"vring addr short", []step{owner, {m: func(*testing.T) *message { return msg(ReqSetVringAddr, le32(0, 0)) }, want: ErrPayloadSize}}},
		{"vring kick stray bits", []step{owner, {m: func(t *testing.T) *message { return msg(ReqSetVringKick, le64(1<<9), eventfd(t)) }, want: ErrPayloadSize}}},
		{"vring kick index", []step{owner, {m: func(t *testing.T) *message { return msg(ReqSetVringKick, le64(5), eventfd(t)) }, want: ErrQueueIndex}}},
		{"vring kick no fd", []step{owner, {m: func(*testing.T) *message { return msg(ReqSetVringKick, le64(0)) }, want: ErrFdCount}}},
		{"vring kick fd with no-fd bit", []step{owner, {m: func(t *testing.T) *message { return msg(ReqSetVringKick, le64(vringNoFd), eventfd(t)) }, want: ErrFdCount}}},
		{"vring call a pipe", []step{owner, {m: func(t *testing.T) *message { return msg(ReqSetVringCall, le64(0), pipeFd(t)) }, want: ErrFdKind}}},
		{"vring kick a memfd", []step{owner, {m: func(t *testing.T) *message { return msg(ReqSetVringKick, le64(0), memfd(t, 4096)) }, want: ErrFdKind}}},
		{"vring call two fds", []step{owner, {m: func(t *testing.T) *message { return msg(ReqSetVringCall, le64(0), eventfd(t), eventfd(t)) }, want: ErrFdCount}}},
		{"vring enable 2", []step{owner, {m: func(*testing.T) *message { return msg(ReqSetVringEnable, le32(0, 2)) }, want: ErrPayloadSize}}},
		{"get config too big", []step{{m: func(*testing.T) *message { return msg(ReqGetConfig, append(le32(0, 300, 0), make([]byte, 300)...)) }, want: ErrConfigRange}}},
		{"get config size vs payload", []step{{m: func(*testing.T) *message { return msg(ReqGetConfig, append(le32(0, 8, 0), make([]byte, 4)...)) }, want: ErrPayloadSize}}},
		{"get config short header", []step{{m: func(*testing.T) *message { return msg(ReqGetConfig, le32(0, 0)) }, want: ErrPayloadSize}}},
		{"add mem reg no fd", []step{owner, {m: func(*testing.T) *message {
			return msg(ReqAddMemReg, append(le64(0), le64(good[0], good[1], good[2], good[3])...))
		}, want: ErrFdCount}}},
		{"rem mem reg absent", []step{owner, mem, {m: func(*testing.T) *message {
			return msg(ReqRemMemReg, append(le64(0), le64(8*mb, mb, 0, 0)...))
		}, want: guestmem.ErrNotMapped}}},
		{"ring outside memory", []step{owner, mem, ok(ReqSetVringNum, le32(0, 128)),
			ok(ReqSetVringAddr, append(le32(0, 0), le64(1<<50, 1<<50+8192, 1<<50+4096, 0)...)),
			{m: func(t *testing.T) *message { return msg(ReqSetVringKick, le64(0), eventfd(t)) }, want: guestmem.ErrNotMapped}}},
		{"ring misaligned", []step{owner, mem, ok(ReqSetVringNum, le32(0, 128)),
			ok(ReqSetVringAddr, append(le32(0, 0), le64(good[2]+8, good[2]+8192, good[2]+4096, 0)...)),
			{m: func(t *testing.T) *message { return msg(ReqSetVringKick, le64(0), eventfd(t)) }, want: virtq.ErrBadAlignment}}},
		{"vring num while running", []step{owner, mem, ok(ReqSetVringNum, le32(0, 128)),
			ok(ReqSetVringAddr, append(le32(0, 0), le64(good[2], good[2]+8192, good[2]+4096, 0)...)),
			{m: func(t *testing.T) *message { return msg(ReqSetVringKick, le64(0), eventfd(t)) }},
			{m: func(*testing.T) *message { return msg(ReqSetVringNum, le32(0, 64)) }, want: ErrRingRunning}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s, _ := testSession(t)
			for i, st := range tc.steps {
				err := s.handle(st.m(t))
				if st.want == nil {
					if err != nil {
						t.Fatalf("step %d: %v", i, err)
					}
					continue
				}
				if !errors.Is(err, st.want) {
					t.Fatalf("step %d: error %v, want %v", i, err, st.want)
				}
			}
		})
	}
}

func TestHeaderErrors(t *testing.T) {
	hdr := func(req, flags, size uint32) []byte { return le32(req, flags, size) }
	cases := []struct {
		name string
		b    []byte
		want error
	}{
		{"version 0", hdr(1, 0, 0), ErrBadVersion},
		{"version 2", hdr(1, 2, 0), ErrBadVersion},
		{"reply flag", hdr(1, flagVersion|flagReply, 0), ErrBadVersion},
		{"huge payload", hdr(1, flagVersion, 1<<20), ErrPayloadTooBig},
	}
	for _, tc := range cases {
		if _, err := decodeHeader(tc.b); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
	}
	if h, err := decodeHeader(hdr(5, flagVersion|flagNeedReply, 40)); err != nil || h.Request != ReqSetMemTable || !h.needReply() || h.Size != 40 {
		t.Errorf("good header: %+v %v", h, err)
	}
}

// TestReplyAck: a request with NEED_REPLY gets 0 on success and non-zero on
// failure, and a failing request ends the session.
func TestReplyAck(t *testing.T) {
	s, peer := testSession(t)
	if err := s.handle(msg(ReqSetProtocolFeatures, le64(ProtoReplyAck))); err != nil {
		t.Fatal(err)
	}
	m := msg(ReqSetOwner, nil)
	m.Flags |= flagNeedReply
	if err := s.handle(m); err != nil {
		t.Fatal(err)
	}
	m = msg(ReqSetVringNum, le32(7, 128))
	m.Flags |= flagNeedReply
	if err := s.handle(m); !errors.Is(err, ErrQueueIndex) {
		t.Fatalf("bad vring index: %v", err)
	}
	want := [][]byte{append(le32(uint32(ReqSetOwner), flagVersion|flagReply, 8), le64(0)...),
		append(le32(uint32(ReqSetVringNum), flagVersion|flagReply, 8), le64(1)...)}
	for i, w := range want {
		got := make([]byte, len(w))
		if _, err := peer.Read(got); err != nil || string(got) != string(w) {
			t.Fatalf("ack %d: %x, want %x (%v)", i, got, w, err)
		}
	}
}

// FuzzMessage feeds arbitrary message streams to a session: it must never
// panic or hang, whatever it is sent.
func FuzzMessage(f *testing.F) {
	f.Add(byte(1), append(le32(uint32(ReqSetOwner), 1, 0), append(le32(uint32(ReqSetMemTable), 1, 40), memTable(1, [4]uint64{0, 1 << 20, 1 << 40, 0})...)...))
	f.Add(byte(0), append(le32(uint32(ReqGetConfig), 1, 20), append(le32(0, 8, 0), make([]byte, 8)...)...))
	f.Add(byte(2), append(le32(uint32(ReqSetVringKick), 1, 8), le64(0)...))
	proto := append(le32(uint32(ReqSetOwner), 1, 0), append(le32(uint32(ReqSetProtocolFeatures), 1, 8), le64(ProtoInflightShmfd|ProtoLogShmfd)...)...)
	f.Add(byte(0), append(proto, append(le32(uint32(ReqGetInflightFd), 1, 24), append(le64(0, 0), le32(128<<16|2, 0)...)...)...))
	f.Add(byte(1), append(proto, append(le32(uint32(ReqSetInflightFd), 1, 24), append(le64(1<<20, 0), le32(128<<16|2, 0)...)...)...))
	f.Add(byte(1), append(proto, append(le32(uint32(ReqSetLogBase), 1, 16), le64(4096, 0)...)...))
	f.Fuzz(func(t *testing.T, nfds byte, stream []byte) {
		s, _ := testSession(t)
		for len(stream) >= headerSize {
			h, err := decodeHeader(stream)
			if err != nil {
				return
			}
			stream = stream[headerSize:]
			if int(h.Size) > len(stream) {
				return
			}
			m := &message{header: h, payload: stream[:h.Size]}
			stream = stream[h.Size:]
			for i := 0; i < int(nfds%4); i++ {
				if i%2 == 0 {
					m.fds = append(m.fds, memfd(t, 1<<20))
				} else {
					m.fds = append(m.fds, eventfd(t))
				}
			}
			if err := s.handle(m); err != nil {
				return
			}
		}
	})
}
