package vhost

import (
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// A fuzz record is one message as a hostile front-end sends it:
//
//	op      low 6 bits: request; bit 6: NEED_REPLY; bit 7: once the session
//	        handled it, shrink the last memfd sent to 0 (the SIGBUS attack)
//	fds     bits 0-1: how many fds (0-3); bit 2+i: fd i is an eventfd,
//	        else a 1 MiB memfd
//	len     payload length; the payload follows. A record cut short by the
//	        end of the input is sent as far as it goes, and the connection
//	        then stays open (a half-sent message).
const (
	fuzzReplyBit  = 1 << 6
	fuzzShrinkBit = 1 << 7
)

func fuzzRec(req Request, bits byte, fdKinds []byte, payload []byte) []byte {
	fds := byte(len(fdKinds))
	for i, k := range fdKinds {
		fds |= k << (2 + i)
	}
	b := []byte{byte(req)&0x3f | bits, fds, byte(len(payload))}
	return append(b, payload...)
}

func cat(bs ...[]byte) []byte {
	var out []byte
	for _, b := range bs {
		out = append(out, b...)
	}
	return out
}

// FuzzSession drives a whole session, its message loop, fd passing, queue
// goroutines and teardown, over a socket: whatever a front-end sends, the
// session ends or goes on, and never panics, faults the process or hangs.
func FuzzSession(f *testing.F) {
	const mb = 1 << 20
	const uva = 0x7f0000000000
	const memfdKind, eventfdKind = 0, 1
	owner := fuzzRec(ReqSetOwner, 0, nil, nil)
	proto := fuzzRec(ReqSetProtocolFeatures, 0, nil, le64(ProtoInflightShmfd|ProtoLogShmfd|ProtoReplyAck|ProtoConfigureMemSlots))
	features := fuzzRec(ReqSetFeatures, 0, nil, le64(FeatVersion1|FeatProtocolFeatures|FeatEventIdx))
	mem := fuzzRec(ReqSetMemTable, 0, []byte{memfdKind}, memTable(1, [4]uint64{0, mb, uva, 0}))
	ring := cat(
		fuzzRec(ReqSetVringNum, 0, nil, le32(0, 64)),
		fuzzRec(ReqSetVringBase, 0, nil, le32(0, 0)),
		fuzzRec(ReqSetVringAddr, 0, nil, append(le32(0, 0), le64(uva, uva+8192, uva+4096, 0)...)),
		fuzzRec(ReqSetVringCall, 0, []byte{eventfdKind}, le64(0)),
	)
	kick := cat(fuzzRec(ReqSetVringKick, 0, []byte{eventfdKind}, le64(0)), fuzzRec(ReqSetVringEnable, 0, nil, le32(0, 1)))
	// A ring without a kick fd: hemd polls it every millisecond.
	poll := cat(fuzzRec(ReqSetVringKick, 0, nil, le64(vringNoFd)), fuzzRec(ReqSetVringEnable, 0, nil, le32(0, 1)))
	// Guest memory shrunk between the memory table and the ring's start.
	f.Add(cat(owner, proto, features, fuzzRec(ReqSetMemTable, fuzzShrinkBit, []byte{memfdKind}, memTable(1, [4]uint64{0, mb, uva, 0})), ring, kick))
	// Guest memory shrunk under a running (polled) ring.
	f.Add(cat(owner, proto, features, mem, ring, poll, fuzzRec(ReqGetFeatures, fuzzShrinkBit, nil, nil), fuzzRec(ReqGetQueueNum, 0, nil, nil)))
	// Rings kicked before the memory table.
	f.Add(cat(owner, proto, features, ring, kick, mem, fuzzRec(ReqGetVringBase, 0, nil, le32(0, 0))))
	// The dirty log shrunk after SET_LOG_BASE.
	f.Add(cat(owner, proto, features, mem, ring, poll, fuzzRec(ReqSetLogBase, fuzzShrinkBit, []byte{memfdKind}, le64(4096, 0)),
		fuzzRec(ReqSetFeatures, 0, nil, le64(FeatVersion1|FeatProtocolFeatures|FeatEventIdx|FeatLogAll)),
		fuzzRec(ReqSetVringAddr, 0, nil, append(le32(0, vringFLog), le64(uva, uva+8192, uva+4096, 8192)...)),
		fuzzRec(ReqGetQueueNum, 0, nil, nil)))
	// A front-end's inflight region shrunk before the ring starts.
	f.Add(cat(owner, proto, features, mem, fuzzRec(ReqSetInflightFd, fuzzShrinkBit, []byte{memfdKind}, append(le64(8192, 0), le32(1|64<<16, 0)...)), ring, kick))
	// hemd's own inflight region, and a ring on it.
	f.Add(cat(owner, proto, features, mem, fuzzRec(ReqGetInflightFd, 0, nil, append(le64(0, 0), le32(1|64<<16, 0)...)), ring, kick))
	// An added region shrunk, with the ring in it; a removal of one never
	// added.
	f.Add(cat(owner, proto, features, mem, fuzzRec(ReqAddMemReg, fuzzShrinkBit, []byte{memfdKind}, le64(0, 2*mb, mb, uva+2*mb, 0)),
		fuzzRec(ReqSetVringNum, 0, nil, le32(0, 64)),
		fuzzRec(ReqSetVringAddr, 0, nil, append(le32(0, 0), le64(uva+2*mb, uva+2*mb+8192, uva+2*mb+4096, 0)...)),
		kick, fuzzRec(ReqRemMemReg, 0, nil, le64(0, 8*mb, mb, 0, 0))))
	// Half a header, and a header whose payload never comes.
	f.Add([]byte{byte(ReqSetOwner), 0, 40, 1, 2, 3})
	f.Add(cat(owner, []byte{byte(ReqSetMemTable), 1, 200}, memTable(1, [4]uint64{0, mb, uva, 0})))
	// A reply asked for a failing request, fds on a request that takes none.
	f.Add(cat(proto, fuzzRec(ReqSetVringNum, fuzzReplyBit, nil, le32(7, 128)), fuzzRec(ReqGetFeatures, 0, []byte{memfdKind, eventfdKind, memfdKind}, nil)))

	f.Fuzz(func(t *testing.T, in []byte) {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		conn := func(fd int) *net.UnixConn {
			fl := os.NewFile(uintptr(fd), "sock")
			c, err := net.FileConn(fl)
			fl.Close()
			if err != nil {
				t.Fatal(err)
			}
			return c.(*net.UnixConn)
		}
		a, peer := conn(fds[0]), conn(fds[1])
		defer peer.Close()
		s := newSession(&fakeDevice{}, a, slog.New(slog.DiscardHandler), 50*time.Millisecond)
		ended := make(chan error, 1)
		go func() { ended <- s.serve(context.Background()) }()
		// Replies: the request codes of those that came, in order.
		replies := make(chan Request, 64)
		go func() {
			defer close(replies)
			var h [headerSize]byte
			for {
				if _, err := io.ReadFull(peer, h[:]); err != nil {
					return
				}
				size := binary.LittleEndian.Uint32(h[8:])
				if _, err := io.CopyN(io.Discard, peer, int64(size)); err != nil {
					return
				}
				select {
				case replies <- Request(binary.LittleEndian.Uint32(h[0:])):
				default:
				}
			}
		}()
		// handled waits until the session has handled every message sent
		// so far: it answers GET_FEATURES in order.
		handled := func() {
			if _, err := peer.Write(le32(uint32(ReqGetFeatures), flagVersion, 0)); err != nil {
				return
			}
			for {
				select {
				case r, ok := <-replies:
					if !ok || r == ReqGetFeatures {
						return
					}
				case <-time.After(5 * time.Second):
					t.Fatal("no reply to GET_FEATURES in 5 s")
				}
			}
		}

		// A session that stops reading must not block the fuzzer: it is
		// caught hanging below.
		peer.SetWriteDeadline(time.Now().Add(5 * time.Second))
		var sent []int // memfds sent, kept to shrink them later
		defer func() { closeFds(sent) }()
		for len(in) >= 3 {
			op, fdb, n := in[0], in[1], int(in[2])
			in = in[3:]
			var rights []int
			for i := 0; i < int(fdb&3); i++ {
				var fd int
				if fdb&(1<<(2+i)) != 0 {
					fd, err = unix.Eventfd(0, unix.EFD_CLOEXEC)
				} else {
					fd, err = unix.MemfdCreate("fuzz", unix.MFD_CLOEXEC)
					if err == nil {
						err = unix.Ftruncate(fd, mb)
						sent = append(sent, fd)
					}
				}
				if err != nil {
					t.Fatal(err)
				}
				rights = append(rights, fd)
			}
			flags := uint32(flagVersion)
			if op&fuzzReplyBit != 0 {
				flags |= flagNeedReply
			}
			msg := append(le32(uint32(op&0x3f), flags, uint32(n)), in[:min(n, len(in))]...)
			var oob []byte
			if len(rights) > 0 {
				oob = unix.UnixRights(rights...)
			}
			_, _, werr := peer.WriteMsgUnix(msg, oob, nil)
			for _, fd := range rights {
				if !contains(sent, fd) {
					unix.Close(fd)
				}
			}
			if werr != nil {
				break // the session ended
			}
			if op&fuzzShrinkBit != 0 {
				handled()
				if len(sent) > 0 {
					_ = unix.Ftruncate(sent[len(sent)-1], 0)
				}
			}
			if n > len(in) {
				// Half sent: the session must give up on it by itself.
				select {
				case <-ended:
				case <-time.After(5 * time.Second):
					t.Fatal("session kept a half-sent message for 5 s")
				}
				return
			}
			in = in[n:]
		}
		// Let polled rings look at their memory before the front-end
		// hangs up.
		time.Sleep(2 * time.Millisecond)
		peer.CloseWrite()
		select {
		case <-ended:
		case <-time.After(10 * time.Second):
			t.Fatal("session did not end 10 s after the front-end hung up")
		}
	})
}

func contains(fds []int, fd int) bool {
	for _, f := range fds {
		if f == fd {
			return true
		}
	}
	return false
}
