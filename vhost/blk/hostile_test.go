package blk

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hemd/hemd/vhost"
	"github.com/hemd/hemd/vhost/frontend"
	"golang.org/x/sys/unix"
	"unsafe"
)

// logBuf collects a device's log lines for a test to look for.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// wait returns the first line holding every one of subs, failing the test
// after 10 s.
func (l *logBuf) wait(t *testing.T, subs ...string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		l.mu.Lock()
		lines := strings.Split(l.b.String(), "\n")
		l.mu.Unlock()
	next:
		for _, line := range lines {
			for _, s := range subs {
				if !strings.Contains(line, s) {
					continue next
				}
			}
			return line
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("no log line with %q", subs)
	return ""
}

// sessionEnded waits until the back-end has closed c's connection.
func sessionEnded(t *testing.T, c *frontend.Client) {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		_, err := c.Recv(vhost.ReqGetFeatures)
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("the back-end sent a message instead of ending the session")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the session did not end")
	}
}

// memfdOf makes a memfd of size bytes mapped shared, for regions a test
// hands to the back-end itself.
func memfdOf(t *testing.T, size int) (int, []byte) {
	t.Helper()
	fd, err := unix.MemfdCreate("hostile", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		t.Fatal(err)
	}
	m, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(m); unix.Close(fd) })
	return fd, m
}

func shrink(t *testing.T, fd int, size int64) {
	t.Helper()
	if err := unix.Ftruncate(fd, size); err != nil {
		t.Fatalf("shrink: %v", err)
	}
}

// A front-end that shrinks a file it shared (guest memory, an added region,
// the dirty log, its inflight region) after hemd mapped it makes hemd's next
// touch of the lost pages fault. The fault ends that session only, with a
// log line naming the volume and the region; the process, a neighbour
// volume it serves and the next session of this volume all go on. Without
// the fault handling SIGBUS kills the test process.
func TestSharedMemoryShrinks(t *testing.T) {
	cases := []struct {
		name   string
		fe     frontend.Options
		region string
		// misbehave shrinks something and sends what makes hemd touch it.
		misbehave func(t *testing.T, r *rig)
	}{
		{"guest memory under a running ring", frontend.Options{}, "guest memory region 0",
			func(t *testing.T, r *rig) {
				r.prepare(TypeOut, 0, pattern(4096, 1), 4096)
				shrink(t, r.c.MemFd(), 0)
				r.c.Queues[0].Kick()
			}},
		{"guest memory below a request header", frontend.Options{}, "guest memory region 0",
			func(t *testing.T, r *rig) {
				// The rings stay mapped; the request lies past the new end.
				if _, err := r.c.Alloc(2<<20, 4096); err != nil {
					t.Fatal(err)
				}
				r.prepare(TypeIn, 0, nil, 4096)
				shrink(t, r.c.MemFd(), 1<<20)
				r.c.Queues[0].Kick()
			}},
		{"guest memory before ring start", frontend.Options{}, "guest memory region 0",
			func(t *testing.T, r *rig) {
				base, err := r.c.StopQueue(0)
				if err != nil {
					t.Fatal(err)
				}
				shrink(t, r.c.MemFd(), 0)
				// The back-end reads the used index as the ring starts.
				_ = r.c.Queues[0].Restart(uint16(base))
			}},
		{"added memory region", frontend.Options{}, "guest memory region 1",
			func(t *testing.T, r *rig) {
				const gpa, size = 64 << 20, 1 << 20
				fd, mem := memfdOf(t, size)
				p := le64(0)
				p = append(p, le64(gpa)...)
				p = append(p, le64(size)...)
				p = append(p, le64(uint64(uintptrOf(mem)))...)
				p = append(p, le64(0)...)
				if _, err := r.c.Request(vhost.ReqAddMemReg, p, []int{fd}, false); err != nil {
					t.Fatal(err)
				}
				// The request's header lives in the added region.
				binary.LittleEndian.PutUint32(mem[0:], TypeIn)
				data, _ := r.c.Alloc(4096, 4096)
				st, _ := r.c.Alloc(1, 1)
				if _, err := r.c.Queues[0].Add([]frontend.Buf{{Addr: gpa, Len: 16}, {Addr: data, Len: 4096, Write: true}, {Addr: st, Len: 1, Write: true}}); err != nil {
					t.Fatal(err)
				}
				shrink(t, fd, 0)
				r.c.Queues[0].Kick()
			}},
		{"dirty log", frontend.Options{Log: true}, "dirty log",
			func(t *testing.T, r *rig) {
				fd, _ := memfdOf(t, 4096)
				p := append(le64(4096), le64(0)...)
				if _, err := r.c.Request(vhost.ReqSetLogBase, p, []int{fd}, true); err != nil {
					t.Fatal(err)
				}
				if err := r.c.SetLogAll(true); err != nil {
					t.Fatal(err)
				}
				shrink(t, fd, 0)
				r.prepare(TypeIn, 0, nil, 4096)
				r.c.Queues[0].Kick()
			}},
		{"inflight region from the front-end", frontend.Options{Inflight: true}, "inflight region (sent by the front-end",
			func(t *testing.T, r *rig) {
				base, err := r.c.StopQueue(0)
				if err != nil {
					t.Fatal(err)
				}
				// A region of the front-end's own instead of hemd's.
				const size = 4096
				fd, m := memfdOf(t, size)
				binary.LittleEndian.PutUint16(m[8:], 1)    // version
				binary.LittleEndian.PutUint16(m[10:], 128) // desc_num
				p := append(le64(size), le64(0)...)
				p = append(p, le32(1|128<<16, 0)...)
				if _, err := r.c.Request(vhost.ReqSetInflightFd, p, []int{fd}, false); err != nil {
					t.Fatal(err)
				}
				if err := r.c.Queues[0].Restart(uint16(base)); err != nil {
					t.Fatal(err)
				}
				shrink(t, fd, 0)
				r.prepare(TypeIn, 0, nil, 4096)
				r.c.Queues[0].Kick()
			}},
	}
	for _, enc := range []bool{false, true} {
		for _, tc := range cases {
			t.Run(fmt.Sprintf("%s/enc=%v", tc.name, enc), func(t *testing.T) {
				var lb logBuf
				o := rigOpts{fe: tc.fe, logTo: &lb}
				if enc {
					o.cfg.Keys = &testKeys{unit: 512}
				}
				r := newRig(t, o)
				// A neighbour volume served by the same process.
				nb := newRig(t, rigOpts{cfg: Config{ID: "vol-0000000000000000b"}})
				if st, _, _ := r.do(0, blkIO{typ: TypeOut, sector: 8, data: pattern(4096, 7)}); st != StatusOK {
					t.Fatalf("write before: status %d", st)
				}
				tc.misbehave(t, r)
				sessionEnded(t, r.c)
				line := lb.wait(t, "shrank shared memory", "volume=vol-0123456789abcdef0", tc.region)
				t.Logf("hemd logged: %s", line)

				if st, _, _ := nb.do(0, blkIO{typ: TypeOut, sector: 1, data: pattern(512, 9)}); st != StatusOK {
					t.Fatalf("neighbour volume: status %d", st)
				}
				r.c.Close()
				r.c = r.dial(frontend.Options{})
				st, _, got := r.do(0, blkIO{typ: TypeIn, sector: 8, data: make([]byte, 4096), write: true})
				if st != StatusOK || !bytes.Equal(got, pattern(4096, 7)) {
					t.Fatalf("next session: status %d, data intact %v", st, bytes.Equal(got, pattern(4096, 7)))
				}
			})
		}
	}
}

// The inflight region hemd hands out (GET_INFLIGHT_FD) is sealed: the
// front-end can neither shrink nor grow it, nor lift the seals.
func TestInflightRegionSealed(t *testing.T) {
	r := newRig(t, rigOpts{fe: frontend.Options{Inflight: true}})
	fd := r.c.InflightFd()
	if fd < 0 {
		t.Fatal("no inflight region")
	}
	seals, err := unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
	if err != nil {
		t.Fatal(err)
	}
	want := unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_SEAL
	if seals&want != want {
		t.Fatalf("seals %#x, want %#x", seals, want)
	}
	if err := unix.Ftruncate(fd, 0); err != unix.EPERM {
		t.Fatalf("shrinking hemd's inflight memfd: %v, want EPERM", err)
	}
	if err := unix.Ftruncate(fd, 1<<20); err != unix.EPERM {
		t.Fatalf("growing hemd's inflight memfd: %v, want EPERM", err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_WRITE); err != unix.EPERM {
		t.Fatalf("adding a seal: %v, want EPERM", err)
	}
	if st, _, _ := r.do(0, blkIO{typ: TypeOut, data: pattern(512, 1)}); st != StatusOK {
		t.Fatalf("I/O after: status %d", st)
	}
}

func uintptrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[0])) }

// A connection that sends part of a message and stops is closed once the
// message is overdue, so that it cannot hold the socket's one front-end
// slot; the next front-end is served. A connection idle between messages
// (a paused VM) stays.
func TestHalfSentMessage(t *testing.T) {
	const timeout = 300 * time.Millisecond
	for _, tc := range []struct {
		name string
		sent []byte
	}{
		{"half a header", []byte{1, 0, 0, 0, 1}},
		{"header without its payload", append(le32(uint32(vhost.ReqSetFeatures), 1, 8), 1, 2, 3)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var lb logBuf
			r := newRig(t, rigOpts{noDial: true, logTo: &lb, msgTimeout: timeout})
			nc, err := net.Dial("unix", r.sock)
			if err != nil {
				t.Fatal(err)
			}
			defer nc.Close()
			if _, err := nc.Write(tc.sent); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			nc.SetReadDeadline(time.Now().Add(10 * time.Second))
			var b [1]byte
			if _, err := nc.Read(b[:]); !errors.Is(err, io.EOF) {
				t.Fatalf("stalled connection: read %v, want EOF (closed by hemd)", err)
			}
			if d := time.Since(start); d < timeout {
				t.Fatalf("closed after %v, before the %v timeout", d, timeout)
			}
			lb.wait(t, "front-end session ended", "not complete in time")
			// The slot is free: a real front-end is served.
			r.c = r.dial(frontend.Options{})
			if st, _, _ := r.do(0, blkIO{typ: TypeOut, data: pattern(512, 1)}); st != StatusOK {
				t.Fatalf("next front-end: status %d", st)
			}
		})
	}
	t.Run("idle between messages", func(t *testing.T) {
		r := newRig(t, rigOpts{msgTimeout: timeout})
		time.Sleep(3 * timeout)
		if st, _, _ := r.do(0, blkIO{typ: TypeOut, data: pattern(512, 1)}); st != StatusOK {
			t.Fatalf("after idling: status %d", st)
		}
	})
}

// A front-end that kicks and enables its rings before it sends the memory
// table gets them started when the table arrives, not a silent stall.
func TestRingsBeforeMemTable(t *testing.T) {
	for _, q := range []int{1, 2} {
		r := newRig(t, rigOpts{cfg: Config{Queues: q}, fe: frontend.Options{MemLast: true, Queues: q}})
		for i := range q {
			if st, _, _ := r.do(i, blkIO{typ: TypeOut, sector: uint64(i), data: pattern(512, byte(i))}); st != StatusOK {
				t.Fatalf("queue %d: status %d", i, st)
			}
		}
	}
}
