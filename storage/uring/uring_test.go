package uring

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// newRing sets up a ring or skips the test where io_uring is refused.
func newRing(tb testing.TB, entries uint32) *Ring {
	tb.Helper()
	r, err := New(entries)
	if errors.Is(err, ErrUnavailable) {
		tb.Skipf("io_uring refused by this kernel or sandbox, skipping: %v", err)
	}
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { r.Close() })
	return r
}

// tempFile returns an open read-write temp file of the given size.
func tempFile(tb testing.TB, size int64) *os.File {
	tb.Helper()
	f, err := os.Create(filepath.Join(tb.TempDir(), "data"))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { f.Close() })
	if err := f.Truncate(size); err != nil {
		tb.Fatal(err)
	}
	return f
}

// iovecs splits buf into pieces of the given lengths (the last takes the rest).
func iovecs(buf []byte, lens ...int) []unix.Iovec {
	var iov []unix.Iovec
	for len(buf) > 0 {
		n := len(buf)
		if len(lens) > 0 {
			n, lens = min(lens[0], n), lens[1:]
		}
		v := unix.Iovec{Base: &buf[0]}
		v.SetLen(n)
		iov = append(iov, v)
		buf = buf[n:]
	}
	return iov
}

// results collects completions and checks each user value arrives once.
type results map[uint64]int32

func (m results) add(tb testing.TB) func(uint64, int32) {
	return func(user uint64, res int32) {
		if _, dup := m[user]; dup {
			tb.Errorf("user %d completed twice", user)
		}
		m[user] = res
	}
}

func (m results) check(tb testing.TB, want map[uint64]int32) {
	tb.Helper()
	if len(m) != len(want) {
		tb.Errorf("%d completions, want %d", len(m), len(want))
	}
	for user, w := range want {
		if got, ok := m[user]; !ok {
			tb.Errorf("user %d: no completion", user)
		} else if got != w {
			tb.Errorf("user %d: res %d, want %d", user, got, w)
		}
	}
}

func TestLayout(t *testing.T) {
	if s := unsafe.Sizeof(params{}); s != 120 {
		t.Errorf("io_uring_params is %d bytes, want 120", s)
	}
	if s := unsafe.Sizeof(sqe{}); s != 64 {
		t.Errorf("io_uring_sqe is %d bytes, want 64", s)
	}
	if s := unsafe.Sizeof(cqe{}); s != 16 {
		t.Errorf("io_uring_cqe is %d bytes, want 16", s)
	}
	if o := unsafe.Offsetof(params{}.sqOff); o != 40 {
		t.Errorf("sq_off at %d, want 40", o)
	}
	if o := unsafe.Offsetof(params{}.cqOff); o != 80 {
		t.Errorf("cq_off at %d, want 80", o)
	}
	if o := unsafe.Offsetof(sqe{}.userData); o != 32 {
		t.Errorf("sqe user_data at %d, want 32", o)
	}
}

func TestNew(t *testing.T) {
	for _, n := range []uint32{0, maxEntries + 1} {
		if _, err := New(n); err == nil || errors.Is(err, ErrUnavailable) {
			t.Errorf("New(%d) = %v, want a plain error", n, err)
		}
	}
	for _, c := range []struct{ entries, cap uint32 }{{1, 1}, {32, 32}, {33, 64}, {1000, 1024}} {
		r := newRing(t, c.entries)
		if r.Cap() != int(c.cap) {
			t.Errorf("New(%d).Cap() = %d, want %d", c.entries, r.Cap(), c.cap)
		}
	}
}

func TestRoundTrip(t *testing.T) {
	r := newRing(t, 32)
	f := tempFile(t, 0)
	fd := int(f.Fd())
	rng := rand.New(rand.NewPCG(1, 2))

	type op struct {
		off  int64
		data []byte
	}
	sizes := []int{512, 1024, 4096, 4608, 8192, 16384, 65536, 131072, 131072 - 512, 1536}
	var ops []op
	var off int64
	for i := range 24 {
		data := make([]byte, sizes[i%len(sizes)])
		for j := range data {
			data[j] = byte(rng.Uint32())
		}
		off += int64(rng.IntN(16)) * 512 // leave holes
		ops = append(ops, op{off, data})
		off += int64(len(data))
	}

	got, want := results{}, map[uint64]int32{}
	for i, o := range ops {
		n := len(o.data)
		if !r.Writev(fd, iovecs(o.data, 512, n/4, n/3), o.off, uint64(100+i)) {
			t.Fatalf("Writev %d refused", i)
		}
		want[uint64(100+i)] = int32(n)
	}
	if err := r.Submit(got.add(t)); err != nil {
		t.Fatal(err)
	}
	got.check(t, want)

	file, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(file)) != off {
		t.Fatalf("file is %d bytes, want %d", len(file), off)
	}

	bufs := make([][]byte, len(ops))
	got = results{}
	clear(want)
	for i, o := range ops {
		bufs[i] = make([]byte, len(o.data))
		n := len(o.data)
		if !r.Readv(fd, iovecs(bufs[i], n/2, 512), o.off, uint64(1<<40+i)) {
			t.Fatalf("Readv %d refused", i)
		}
		want[uint64(1<<40+i)] = int32(n)
	}
	if err := r.Submit(got.add(t)); err != nil {
		t.Fatal(err)
	}
	got.check(t, want)
	for i, o := range ops {
		if !bytes.Equal(bufs[i], o.data) {
			t.Errorf("op %d: read back differs", i)
		}
		if !bytes.Equal(file[o.off:o.off+int64(len(o.data))], o.data) {
			t.Errorf("op %d: file content differs", i)
		}
	}
}

func TestQueueFull(t *testing.T) {
	r := newRing(t, 8)
	f := tempFile(t, 1<<16)
	buf := make([]byte, 512)
	for round := range 3 {
		for i := range r.Cap() {
			if !r.Readv(int(f.Fd()), iovecs(buf), int64(i)*512, uint64(i)) {
				t.Fatalf("round %d: Readv %d refused before Cap", round, i)
			}
		}
		if r.Readv(int(f.Fd()), iovecs(buf), 0, 99) || r.Writev(int(f.Fd()), iovecs(buf), 0, 99) {
			t.Fatalf("round %d: op queued past Cap", round)
		}
		got := results{}
		if err := r.Submit(got.add(t)); err != nil {
			t.Fatal(err)
		}
		if len(got) != r.Cap() {
			t.Fatalf("round %d: %d completions, want %d", round, len(got), r.Cap())
		}
	}
	if err := r.Submit(func(uint64, int32) { t.Error("completion from an empty Submit") }); err != nil {
		t.Errorf("empty Submit: %v", err)
	}
	// A nil fn discards the results.
	r.Readv(int(f.Fd()), iovecs(buf), 0, 1)
	if err := r.Submit(nil); err != nil {
		t.Errorf("Submit(nil): %v", err)
	}
}

func TestErrorResults(t *testing.T) {
	r := newRing(t, 16)
	f := tempFile(t, 8192)
	wo, err := os.OpenFile(f.Name(), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer wo.Close()
	ro, err := os.Open(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()

	buf := make([]byte, 4096)
	r.Readv(int(f.Fd()), iovecs(buf), 0, 1)
	r.Readv(int(wo.Fd()), iovecs(buf), 0, 2)
	r.Readv(-1, iovecs(buf), 0, 3)
	r.Writev(int(ro.Fd()), iovecs(buf), 0, 4)
	r.Readv(int(f.Fd()), iovecs(buf), -2, 5)
	r.Readv(int(f.Fd()), make([]unix.Iovec, 1025), 0, 6) // > IOV_MAX
	r.Readv(int(f.Fd()), nil, 0, 7)
	r.Readv(1<<40, iovecs(buf), 0, 8)
	r.Readv(int(f.Fd()), iovecs(buf), 4096, 9)
	got := results{}
	if err := r.Submit(got.add(t)); err != nil {
		t.Fatal(err)
	}
	got.check(t, map[uint64]int32{
		1: 4096,
		2: -int32(unix.EBADF),
		3: -int32(unix.EBADF),
		4: -int32(unix.EBADF),
		5: -int32(unix.EINVAL),
		6: -int32(unix.EINVAL),
		7: 0,
		8: -int32(unix.EBADF),
		9: 4096,
	})
}

// TestPartialSubmit makes the kernel stop consuming SQEs at an invalid one
// (an unknown opcode fails at submission, not at completion), so Submit must
// resubmit the rest.
func TestPartialSubmit(t *testing.T) {
	r := newRing(t, 8)
	f := tempFile(t, 1<<16)
	buf := make([]byte, 8*512)
	want := map[uint64]int32{}
	for i := range 8 {
		r.Readv(int(f.Fd()), iovecs(buf[i*512:(i+1)*512]), int64(i)*512, uint64(i))
		want[uint64(i)] = 512
	}
	r.sqes[(r.tail-5)&r.sqMask].opcode = 0xff
	want[3] = -int32(unix.EINVAL)
	got := results{}
	if err := r.Submit(got.add(t)); err != nil {
		t.Fatal(err)
	}
	got.check(t, want)
}

func TestPastEOF(t *testing.T) {
	r := newRing(t, 4)
	f := tempFile(t, 10000)
	a, b, c := make([]byte, 4096), make([]byte, 4096), make([]byte, 1000)
	r.Readv(int(f.Fd()), iovecs(a, 1000), 8192, 1)
	r.Readv(int(f.Fd()), iovecs(b), 10000, 2)
	r.Readv(int(f.Fd()), iovecs(c), 1<<30, 3)
	got := results{}
	if err := r.Submit(got.add(t)); err != nil {
		t.Fatal(err)
	}
	got.check(t, map[uint64]int32{1: 10000 - 8192, 2: 0, 3: 0})
}

// TestManyBatches runs batches of random reads and writes on distinct blocks
// through a small ring, wrapping its heads and tails many times, and checks
// every read against a shadow copy of the file.
func TestManyBatches(t *testing.T) {
	const block, blocks = 4096, 256
	r := newRing(t, 32)
	if r.Cap() != 32 {
		t.Fatalf("Cap %d, want 32", r.Cap())
	}
	f := tempFile(t, block*blocks)
	fd := int(f.Fd())
	shadow := make([]byte, block*blocks)
	rng := rand.New(rand.NewPCG(3, 4))

	type op struct {
		write bool
		off   int
		buf   []byte
	}
	user := uint64(0)
	for batch := range 2000 {
		ops := map[uint64]op{}
		want := map[uint64]int32{}
		for _, b := range rng.Perm(blocks)[:1+rng.IntN(32)] {
			start := rng.IntN(block)
			o := op{write: rng.IntN(2) == 0, off: b*block + start, buf: make([]byte, 1+rng.IntN(block-start))}
			pieces := []int{1 + rng.IntN(len(o.buf)), 1 + rng.IntN(len(o.buf))}
			user++
			var ok bool
			if o.write {
				for i := range o.buf {
					o.buf[i] = byte(rng.Uint32())
				}
				ok = r.Writev(fd, iovecs(o.buf, pieces...), int64(o.off), user)
			} else {
				ok = r.Readv(fd, iovecs(o.buf, pieces...), int64(o.off), user)
			}
			if !ok {
				t.Fatalf("batch %d: op refused after %d", batch, len(ops))
			}
			ops[user], want[user] = o, int32(len(o.buf))
		}
		got := results{}
		if err := r.Submit(got.add(t)); err != nil {
			t.Fatalf("batch %d: %v", batch, err)
		}
		got.check(t, want)
		for u, o := range ops {
			if o.write {
				copy(shadow[o.off:], o.buf)
			} else if !bytes.Equal(o.buf, shadow[o.off:o.off+len(o.buf)]) {
				t.Fatalf("batch %d: read %d at %d differs from what was written", batch, u, o.off)
			}
		}
		if t.Failed() {
			t.Fatalf("batch %d failed", batch)
		}
	}
	file, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(file, shadow) {
		t.Error("file differs from the shadow copy")
	}
}

func TestClose(t *testing.T) {
	r := newRing(t, 4)
	f := tempFile(t, 4096)
	buf := make([]byte, 512)
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if r.Readv(int(f.Fd()), iovecs(buf), 0, 1) || r.Writev(int(f.Fd()), iovecs(buf), 0, 1) {
		t.Error("op queued on a closed ring")
	}
	if err := r.Submit(nil); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Submit on a closed ring: %v, want ErrClosed", err)
	}
}

// BenchmarkBatch32x4K reads 32 4-KiB blocks of a page-cached file, with one
// preadv each or with one ring submission.
func BenchmarkBatch32x4K(b *testing.B) {
	const n, size = 32, 4096
	f := tempFile(b, 1<<20)
	fd := int(f.Fd())
	data := bytes.Repeat([]byte{0xa5}, 1<<20)
	if _, err := f.WriteAt(data, 0); err != nil {
		b.Fatal(err)
	}
	bufs := make([][]byte, n)
	iovs := make([][]unix.Iovec, n)
	for i := range bufs {
		bufs[i] = make([]byte, size)
		iovs[i] = iovecs(bufs[i])
	}
	off := func(i int) int64 { return int64(i) * 7 * size % (1 << 20) }

	b.Run("preadv", func(b *testing.B) {
		b.SetBytes(n * size)
		for b.Loop() {
			for i := range n {
				if got, err := unix.Preadv(fd, bufs[i:i+1], off(i)); err != nil || got != size {
					b.Fatal(got, err)
				}
			}
		}
	})
	b.Run("uring", func(b *testing.B) {
		r := newRing(b, n)
		b.SetBytes(n * size)
		check := func(user uint64, res int32) {
			if res != size {
				b.Fatalf("op %d: res %d", user, res)
			}
		}
		for b.Loop() {
			for i := range n {
				r.Readv(fd, iovs[i], off(i), uint64(i))
			}
			if err := r.Submit(check); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// Reads handed to the kernel's worker threads (ReadvAsync), with the
// workers bounded (SetMaxWorkers) and each completion reported as it comes
// (SubmitEach), read the same bytes as inline ones, and fn sees every op
// exactly once.
func TestAsyncReadsEach(t *testing.T) {
	r := newRing(t, 32)
	if err := r.SetMaxWorkers(1, 0); err != nil {
		t.Fatal(err)
	}
	const n, size = 24, 64 << 10
	data := make([]byte, n*size)
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	f := tempFile(t, 0)
	if _, err := f.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	fd := int(f.Fd())
	bufs := make([][]byte, n)
	want := map[uint64]int32{}
	for i := range n {
		bufs[i] = make([]byte, size)
		read := r.ReadvAsync
		if i%3 == 0 {
			read = r.Readv // mixed with inline reads
		}
		if !read(fd, iovecs(bufs[i], size/2, 512), int64(i*size), uint64(i)) {
			t.Fatalf("read %d refused", i)
		}
		want[uint64(i)] = size
	}
	got := results{}
	if err := r.SubmitEach(got.add(t)); err != nil {
		t.Fatal(err)
	}
	got.check(t, want)
	for i := range n {
		if !bytes.Equal(bufs[i], data[i*size:(i+1)*size]) {
			t.Fatalf("read %d differs", i)
		}
	}
}

// Continuous use: ops are handed over with Flush as they come, more are
// queued while earlier ones are in flight (up to Cap in all), Wait returns
// once at least one is done, every op completes exactly once, and the
// registered eventfd is readable after a completion.
func TestContinuous(t *testing.T) {
	r := newRing(t, 4)
	f := tempFile(t, 1<<20)
	if _, err := f.WriteAt(bytes.Repeat([]byte{0x5a}, 1<<20), 0); err != nil {
		t.Fatal(err)
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	if err := r.RegisterEventfd(efd); err != nil {
		t.Fatal(err)
	}
	got := results{}
	want := map[uint64]int32{}
	bufs := make([][]byte, 40)
	next := 0
	for next < len(bufs) || r.InFlight() > 0 {
		for next < len(bufs) {
			bufs[next] = make([]byte, 4096)
			if !r.Readv(int(f.Fd()), iovecs(bufs[next]), int64(next)*4096, uint64(next)) {
				break // Cap in flight: wait for one
			}
			want[uint64(next)] = 4096
			next++
		}
		if r.InFlight() > r.Cap() {
			t.Fatalf("%d in flight, cap %d", r.InFlight(), r.Cap())
		}
		if err := r.Flush(); err != nil {
			t.Fatal(err)
		}
		n := len(got)
		if err := r.Wait(got.add(t)); err != nil {
			t.Fatal(err)
		}
		if len(got) == n {
			t.Fatal("Wait returned with nothing completed")
		}
	}
	got.check(t, want)
	for i, b := range bufs {
		if !bytes.Equal(b, bytes.Repeat([]byte{0x5a}, 4096)) {
			t.Fatalf("read %d: wrong data", i)
		}
	}
	var cnt [8]byte
	if n, err := unix.Read(efd, cnt[:]); err != nil || n != 8 || binary.LittleEndian.Uint64(cnt[:]) == 0 {
		t.Fatalf("eventfd after completions: %d bytes, %v", n, err)
	}
	if r.Ready() || r.InFlight() != 0 {
		t.Fatalf("ready %v with %d in flight after all were reaped", r.Ready(), r.InFlight())
	}
	if err := r.Wait(got.add(t)); err != nil {
		t.Fatalf("Wait with nothing in flight: %v", err)
	}
}
