package storage

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// alignedBuf returns n bytes of page-aligned memory (for O_DIRECT, and so
// io_uring writes): the batch sends aligned writes on an O_DIRECT file
// through the ring.
func alignedBuf(t *testing.T, n int) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

// snapFile is a new sparse file of n bytes to hold a snapshot.
func snapFile(t *testing.T, n int64) *os.File {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "snap"))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(n); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func readAll(t *testing.T, r io.ReaderAt, off, n int64) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := r.ReadAt(b, off); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	return b
}

// Every write path copies the old contents of the chunks it touches before
// it writes them, and only of chunks in the snapshot's range: WriteAtv,
// WriteAt, a Section, a batch's writes through io_uring and its plain ones,
// Punch and ZeroRange. The snapshot holds the range as it was when it
// started; the file holds the writes.
func TestCOWEveryWritePath(t *testing.T) {
	const size, base, n, chunk = 8 << 20, 1 << 20, 7 << 20, 64 << 10
	f, _ := newFile(t, size, Options{Direct: true, Discard: true})
	model := make([]byte, size)
	for p := 0; p < size; p += 4096 {
		for i := range 4096 {
			model[p+i] = byte(p/4096*7 + i%13 + 1)
		}
	}
	clear(model[6<<20 : 7<<20]) // a hole in the range
	if _, err := f.WriteAt(model[:6<<20], 0); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(model[7<<20:], 7<<20); err != nil {
		t.Fatal(err)
	}
	before := bytes.Clone(model[base : base+n])

	dst := snapFile(t, n)
	c, err := f.StartCOW(base, n, dst, COWOptions{Chunk: chunk, DstZeroed: true})
	if err != nil {
		t.Fatal(err)
	}
	if c.Stats().Paused <= 0 || c.Stats().Chunks != n/chunk {
		t.Fatalf("stats %+v", c.Stats())
	}
	fill := func(b []byte, v byte) []byte {
		for i := range b {
			b[i] = v
		}
		return b
	}
	put := func(off int64, p []byte) { copy(model[off:], p) }
	sec, err := NewSection(f, base, n)
	if err != nil {
		t.Fatal(err)
	}
	ring := f.NewBatch(4, false)
	defer ring.Close()
	if !ring.Uring() {
		t.Fatalf("io_uring refused: %v", ring.Why())
	}
	secRing := sec.NewBatch(4, false)
	defer secRing.Close()
	aligned := alignedBuf(t, 3*4096)

	paths := []struct {
		name  string
		write func() error
	}{
		{"WriteAtv across a chunk boundary", func() error {
			a, b := fill(make([]byte, 3000), 0xa1), fill(make([]byte, 5000), 0xa2)
			off := int64(base + 3*chunk - 3000)
			put(off, a)
			put(off+3000, b)
			_, err := f.WriteAtv([][]byte{a, b}, off)
			return err
		}},
		{"WriteAt", func() error {
			p := fill(make([]byte, 512), 0xb1)
			put(base+5*chunk+512, p)
			_, err := f.WriteAt(p, base+5*chunk+512)
			return err
		}},
		{"Section.WriteAtv", func() error {
			p := fill(make([]byte, 4096), 0xc1)
			put(base+7*chunk, p)
			_, err := sec.WriteAtv([][]byte{p}, 7*chunk)
			return err
		}},
		{"batch write through io_uring (O_DIRECT, aligned)", func() error {
			p := fill(aligned[:4096], 0xd1)
			put(base+9*chunk, p)
			return runBatch(ring, p, base+9*chunk)
		}},
		{"batch write, plain pwritev (not aligned)", func() error {
			p := fill(make([]byte, 1000), 0xd2)
			put(base+11*chunk+7, p)
			return runBatch(ring, p, base+11*chunk+7)
		}},
		{"Section batch write through io_uring", func() error {
			p := fill(aligned[4096:3*4096], 0xd3)
			put(base+13*chunk-4096, p) // two chunks
			return runBatch(secRing, p, 13*chunk-4096)
		}},
		{"Punch", func() error {
			put(base+20*chunk, make([]byte, 2*chunk))
			return f.Punch(base+20*chunk, 2*chunk)
		}},
		{"ZeroRange", func() error {
			put(base+30*chunk+4096, make([]byte, 100<<10))
			return f.ZeroRange(base+30*chunk+4096, 100<<10)
		}},
		{"WriteAt into the hole", func() error {
			p := fill(make([]byte, 4096), 0xe1)
			put(6<<20+8192, p)
			_, err := f.WriteAt(p, 6<<20+8192)
			return err
		}},
		{"WriteAt at the end of the range", func() error {
			p := fill(make([]byte, 4096), 0xe2)
			put(size-4096, p)
			_, err := f.WriteAt(p, size-4096)
			return err
		}},
	}
	for _, p := range paths {
		was := c.Stats().CopiedByWrites
		if err := p.write(); err != nil {
			t.Fatalf("%s: %v", p.name, err)
		}
		if c.Stats().CopiedByWrites <= was {
			t.Errorf("%s copied nothing before it wrote (%d chunks copied by writes)", p.name, was)
		}
	}
	// Outside the range (the header of a volume): nothing copied.
	was := c.Stats().CopiedByWrites
	hdr := fill(make([]byte, 4096), 0xf1)
	put(4096, hdr)
	if _, err := f.WriteAt(hdr, 4096); err != nil {
		t.Fatal(err)
	}
	if c.Stats().CopiedByWrites != was {
		t.Error("a write outside the range copied a chunk")
	}
	if err := c.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	st := c.Stats()
	t.Logf("stats: %+v", st)
	if st.CopiedByWrites+st.CopiedByCopier+st.Holes != st.Chunks || st.Holes < (1<<20)/chunk-2 {
		t.Errorf("chunks copied by writes %d + by the copier %d + holes %d != %d (or the hole was not skipped)",
			st.CopiedByWrites, st.CopiedByCopier, st.Holes, st.Chunks)
	}
	if got := readAll(t, dst, 0, n); !bytes.Equal(got, before) {
		t.Fatalf("snapshot differs from the range as it was at its start at %d", firstDiff(got, before))
	}
	if got := readAll(t, f, 0, size); !bytes.Equal(got, model) {
		t.Fatalf("file differs from what was written at %d", firstDiff(got, model))
	}
	// The snapshot stays sparse where the source had a hole or zeros.
	var fst unix.Stat_t
	if err := unix.Fstat(int(dst.Fd()), &fst); err != nil {
		t.Fatal(err)
	}
	if alloc := fst.Blocks * 512; alloc > n-(1<<20) {
		t.Errorf("snapshot allocates %d bytes: the hole was copied", alloc)
	}
	// Done: writes copy nothing more.
	if f.cows.Load() != nil {
		t.Fatal("tracker still installed after Run")
	}
	if _, err := f.WriteAt(hdr, base); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, dst, 0, 4096); !bytes.Equal(got, before[:4096]) {
		t.Fatal("a write after the snapshot completed changed it")
	}
}

func runBatch(b *Batch, p []byte, off int64) error {
	if !b.Write([][]byte{p}, off) {
		return errors.New("batch full")
	}
	var err error
	b.Run(func(_ int, e error) { err = e })
	return err
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// slowWriter delays every write into the snapshot, so that the guest's
// writes overtake the background copier.
type slowWriter struct {
	w     io.WriterAt
	delay time.Duration
	fail  atomic.Bool
}

func (s *slowWriter) WriteAt(p []byte, off int64) (int, error) {
	time.Sleep(s.delay)
	if s.fail.Load() {
		return 0, errors.New("disk full (test)")
	}
	return s.w.WriteAt(p, off)
}

// Writers on every path race snapshots that copy slowly: every snapshot is a
// state the file was in, a cut of the acknowledged write order consistent
// with every block's generation. Run with -race.
func TestCOWConcurrentWriters(t *testing.T) {
	for _, chunk := range []int64{4096, 64 << 10, 1 << 20} {
		t.Run(fmt.Sprintf("chunk=%d", chunk), func(t *testing.T) { testCOWConcurrent(t, chunk) })
	}
}

const tagBlock = 4096

// tag fills a block with its number and generation, and a filler that
// depends on both (so a torn or misplaced block is seen).
func tag(p []byte, block, gen uint64) {
	binary.LittleEndian.PutUint64(p[0:], block)
	binary.LittleEndian.PutUint64(p[8:], gen)
	x := block*0x9e3779b97f4a7c15 ^ gen*0xbf58476d1ce4e5b9 | 1
	for i := 16; i+8 <= len(p); i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(p[i:], x)
	}
}

// untag returns the generation a block holds: 0 for zeros (never written,
// or zeroed), an error for anything that is not a whole tagged block.
func untag(p []byte, block uint64) (uint64, error) {
	if bytes.Equal(p, make([]byte, len(p))) {
		return 0, nil
	}
	gen := binary.LittleEndian.Uint64(p[8:])
	want := make([]byte, len(p))
	tag(want, block, gen)
	if !bytes.Equal(p, want) {
		return 0, fmt.Errorf("block %d: not a whole block of generation %d (block field %d)", block, gen, binary.LittleEndian.Uint64(p))
	}
	return gen, nil
}

// history is the writes of one block, in order: one in flight at a time.
type history struct {
	mu     sync.Mutex
	writes []tagWrite
}

// tagWrite is one write of a block: the generation it wrote (0 for zeros)
// and the event numbers of its issue and its acknowledgement.
type tagWrite struct {
	gen        uint64
	issue, ack int64
}

// inFlight is the ack of a write not acknowledged yet.
const inFlight = int64(1) << 62

// span is the event numbers k with lo <= k < hi: the snapshot point lies
// between events k and k+1.
type span struct{ lo, hi int64 }

// cut finds a point in window consistent with every block: a block that
// holds generation g (0: zeros) took it from a write issued before the
// point whose successor was acknowledged after it. It returns the spans of
// points that are, empty if none.
func cut(window span, blocks []*history, got []uint64) ([]span, error) {
	const inf = inFlight
	ok := []span{window}
	for b, h := range blocks {
		var allowed []span
		if got[b] == 0 { // the initial zeros
			hi := inf
			if len(h.writes) > 0 {
				hi = h.writes[0].ack
			}
			allowed = append(allowed, span{-inf, hi})
		}
		found := got[b] == 0
		for i, w := range h.writes {
			if w.gen != got[b] {
				continue
			}
			found = true
			hi := inf
			if i+1 < len(h.writes) {
				hi = h.writes[i+1].ack
			}
			allowed = append(allowed, span{w.issue, hi})
		}
		if !found {
			return nil, fmt.Errorf("block %d holds generation %d, which was never written", b, got[b])
		}
		ok = intersect(ok, allowed)
		if len(ok) == 0 {
			return nil, fmt.Errorf("no cut in events [%d, %d) is consistent with block %d at generation %d (writes %+v)",
				window.lo, window.hi, b, got[b], h.writes)
		}
	}
	return ok, nil
}

// intersect intersects two unions of spans; the result is sorted and
// merged.
func intersect(a, b []span) []span {
	var out []span
	for _, x := range a {
		for _, y := range b {
			if lo, hi := max(x.lo, y.lo), min(x.hi, y.hi); lo < hi {
				out = append(out, span{lo, hi})
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].lo < out[j].lo })
	merged := out[:0]
	for _, x := range out {
		if k := len(merged) - 1; k >= 0 && x.lo <= merged[k].hi {
			merged[k].hi = max(merged[k].hi, x.hi)
			continue
		}
		merged = append(merged, x)
	}
	return merged
}

func testCOWConcurrent(t *testing.T, chunk int64) {
	const size, base, blocks, writers = 9 << 20, 1 << 20, 2048, 4 // 8 MiB of 4 KiB blocks past a 1 MiB header
	f, _ := newFile(t, size, Options{Direct: true, Discard: true})
	var events atomic.Int64
	hist := make([]*history, blocks)
	for i := range hist {
		hist[i] = &history{}
	}
	ctx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var werr atomic.Value
	var nwrites [4]atomic.Int64 // by path
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), uint64(chunk)))
			ring := f.NewBatch(8, false)
			defer ring.Close()
			buf := alignedBuf(t, 8*tagBlock)
			gens := make(map[int]uint64)
			for ctx.Err() == nil {
				path := rng.IntN(4)
				var bs []int // blocks of this writer's one request: all its own
				for range 1 + rng.IntN(4) {
					b := rng.IntN(blocks/writers)*writers + w
					if !containsInt(bs, b) {
						bs = append(bs, b)
					}
				}
				if path != 1 {
					bs = bs[:1]
				}
				// Recorded at issue, so that a check sees the writes in
				// flight too; the ack is filled in after.
				issue := events.Add(1)
				var err error
				idx := make([]int, len(bs))
				for k, b := range bs {
					gens[b]++
					g := gens[b]
					if path >= 2 {
						g = 0 // zeroed
					}
					tag(buf[k*tagBlock:(k+1)*tagBlock], uint64(b), gens[b])
					h := hist[b]
					h.mu.Lock()
					idx[k] = len(h.writes)
					h.writes = append(h.writes, tagWrite{gen: g, issue: issue, ack: inFlight})
					h.mu.Unlock()
				}
				off := func(b int) int64 { return base + int64(b)*tagBlock }
				switch path {
				case 0: // WriteAtv, in two buffers
					p := buf[:tagBlock]
					_, err = f.WriteAtv([][]byte{p[:1000], p[1000:]}, off(bs[0]))
				case 1: // a batch: aligned, so through io_uring
					for k, b := range bs {
						ring.Write([][]byte{buf[k*tagBlock : (k+1)*tagBlock]}, off(b))
					}
					ring.Run(func(_ int, e error) {
						if e != nil {
							err = e
						}
					})
				case 2:
					err = f.ZeroRange(off(bs[0]), tagBlock)
				case 3:
					err = f.Punch(off(bs[0]), tagBlock)
				}
				ack := events.Add(1)
				if err != nil {
					werr.Store(err)
					return
				}
				nwrites[path].Add(1)
				for k, b := range bs {
					h := hist[b]
					h.mu.Lock()
					h.writes[idx[k]].ack = ack
					h.mu.Unlock()
				}
			}
		}()
	}
	defer func() {
		stop()
		wg.Wait()
	}()
	var copiedByWrites int64
	for s := range 4 {
		time.Sleep(5 * time.Millisecond)
		dst := &slowWriter{w: snapFile(t, blocks*tagBlock), delay: 200 * time.Microsecond}
		req := events.Add(1)
		c, err := f.StartCOW(base, blocks*tagBlock, dst, COWOptions{Chunk: chunk, DstZeroed: true})
		if err != nil {
			t.Fatal(err)
		}
		ans := events.Add(1)
		if err := c.Run(context.Background()); err != nil {
			t.Fatal(err)
		}
		st := c.Stats()
		copiedByWrites += st.CopiedByWrites
		// The blocks' histories hold every write issued before ans.
		got := make([]uint64, blocks)
		img := readAll(t, dst.w.(*os.File), 0, blocks*tagBlock)
		for b := range blocks {
			if got[b], err = untag(img[b*tagBlock:(b+1)*tagBlock], uint64(b)); err != nil {
				t.Fatalf("snapshot %d: %v", s, err)
			}
		}
		for _, h := range hist {
			h.mu.Lock()
		}
		spans, err := cut(span{req, ans}, hist, got)
		for _, h := range hist {
			h.mu.Unlock()
		}
		if err != nil {
			t.Fatalf("snapshot %d (events %d..%d, %+v): %v", s, req, ans, st, err)
		}
		t.Logf("snapshot %d: paused %v, consistent with the cut in events %v of [%d, %d); chunks copied by writes %d, by the copier %d, holes %d",
			s, st.Paused, spans, req, ans, st.CopiedByWrites, st.CopiedByCopier, st.Holes)
	}
	stop()
	wg.Wait()
	if e := werr.Load(); e != nil {
		t.Fatal(e)
	}
	for p := range nwrites {
		if nwrites[p].Load() == 0 {
			t.Errorf("write path %d never ran", p)
		}
	}
	if copiedByWrites == 0 {
		t.Error("no write ever overtook the copier: the copy-before-write path was not exercised")
	}
}

func containsInt(s []int, v int) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// A snapshot that cannot be written fails; the writes that copy for it
// never do, and once it failed they copy nothing more. A snapshot whose
// context ends stops.
func TestCOWFailureNeverFailsWrites(t *testing.T) {
	f, _ := newFile(t, 4<<20, Options{})
	if _, err := f.WriteAt(bytes.Repeat([]byte{7}, 4<<20), 0); err != nil {
		t.Fatal(err)
	}
	dst := &slowWriter{w: snapFile(t, 4<<20)}
	dst.fail.Store(true)
	c, err := f.StartCOW(0, 4<<20, dst, COWOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("after"), 100); err != nil {
		t.Fatalf("write failed with its snapshot: %v", err)
	}
	if err := c.Run(context.Background()); err == nil || !bytes.Contains([]byte(err.Error()), []byte("disk full")) {
		t.Fatalf("Run: %v, want the snapshot's write error", err)
	}
	if f.cows.Load() != nil {
		t.Fatal("failed snapshot still installed")
	}
	if _, err := f.WriteAt([]byte("later"), 1<<20); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	c, err = f.StartCOW(0, 4<<20, snapFile(t, 4<<20), COWOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Run(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Run with an ended context: %v", err)
	}
	if err := c.Run(context.Background()); err == nil {
		t.Fatal("second Run accepted")
	}
}

// Two snapshots at once each hold their own point in time.
func TestCOWOverlappingSnapshots(t *testing.T) {
	const n = 2 << 20
	f, _ := newFile(t, n, Options{})
	a := bytes.Repeat([]byte{0xaa}, n)
	f.WriteAt(a, 0)
	d1, d2 := snapFile(t, n), snapFile(t, n)
	c1, err := f.StartCOW(0, n, d1, COWOptions{})
	if err != nil {
		t.Fatal(err)
	}
	x := bytes.Repeat([]byte{0xbb}, 100<<10)
	f.WriteAt(x, 300<<10)
	c2, err := f.StartCOW(0, n, d2, COWOptions{Chunk: 4096})
	if err != nil {
		t.Fatal(err)
	}
	y := bytes.Repeat([]byte{0xcc}, 1<<20)
	f.WriteAt(y, 200<<10)
	errs := make(chan error, 2)
	go func() { errs <- c1.Run(context.Background()) }()
	go func() { errs <- c2.Run(context.Background()) }()
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(readAll(t, d1, 0, n), a) {
		t.Error("first snapshot is not the file at its start")
	}
	want := bytes.Clone(a)
	copy(want[300<<10:], x)
	if !bytes.Equal(readAll(t, d2, 0, n), want) {
		t.Error("second snapshot is not the file at its start")
	}
}

func TestCOWBadInput(t *testing.T) {
	f, _ := newFile(t, 1<<20, Options{})
	dst := snapFile(t, 1<<20)
	for _, c := range []struct {
		off, n, chunk int64
		want          string
	}{
		{0, 1 << 20, 3000, "power of two"},
		{0, 1 << 20, 2 << 20, "power of two"},
		{0, 2 << 20, 0, "out of range"},
		{-1, 4096, 0, "out of range"},
		{4096, 0, 0, "out of range"},
	} {
		_, err := f.StartCOW(c.off, c.n, dst, COWOptions{Chunk: c.chunk})
		if err == nil || !bytes.Contains([]byte(err.Error()), []byte(c.want)) {
			t.Errorf("StartCOW(%d, %d, chunk %d): %v, want %q", c.off, c.n, c.chunk, err, c.want)
		}
	}
	if f.cows.Load() != nil {
		t.Fatal("a refused snapshot was installed")
	}
}
