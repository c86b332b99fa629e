//go:build cgo && !norbd

package rbd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hemd/hemd/storage/rbd/cephtest"
)

// cluster is the package's one-node cluster (TestMain).
var cluster *cephtest.Cluster

func TestMain(m *testing.M) {
	if os.Getenv("HEMD_RBD_HOLDER") != "" {
		holderChild() // a subprocess of TestDeadHolder
		return
	}
	os.Exit(cephtest.Main(cephtest.Options{}, func(c *cephtest.Cluster) int {
		cluster = c
		return m.Run()
	}))
}

func testCluster() Cluster {
	return Cluster{Conf: cluster.Conf, ID: cluster.ClientID, Keyring: cluster.Keyring}
}

var imageSeq atomic.Int64

// newImage creates an image of size bytes, removed when the test ends, and
// returns its name.
func newImage(t testing.TB, size int64) Name {
	t.Helper()
	n := Name{Pool: cluster.Pool, Image: fmt.Sprintf("%s-%d", strings.ReplaceAll(t.Name(), "/", "-"), imageSeq.Add(1))}
	c := connect(t)
	if err := c.Create(n, size); err != nil {
		t.Fatal(err)
	}
	return n
}

// connect connects as the hemd client; the connection closes with the test.
func connect(t testing.TB) *Conn {
	t.Helper()
	c, err := Connect(context.Background(), testCluster())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func open(t testing.TB, n Name, o Options) *Image {
	t.Helper()
	m, err := Open(context.Background(), testCluster(), n, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func fill(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 7))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// TestReadWrite writes vectors of buffers and single buffers at odd
// places, reads them back both ways, and checks the edges: past the end,
// a closed image, a read-only image.
func TestReadWrite(t *testing.T) {
	const size = 32 << 20
	n := newImage(t, size)
	m := open(t, n, Options{})
	if m.Size() != size || m.Path() != n.String() {
		t.Fatalf("size %d path %s", m.Size(), m.Path())
	}
	want := make([]byte, size)
	for i, at := range []int64{0, 4096, 4<<20 - 1024, 9 << 20, size - 65536} {
		a, b, c := fill(uint64(i), 512), fill(uint64(i)+100, 8192), fill(uint64(i)+200, 1536)
		if n, err := m.WriteAtv([][]byte{a, b, c}, at); err != nil || n != 512+8192+1536 {
			t.Fatalf("WriteAtv at %d: %d, %v", at, n, err)
		}
		copy(want[at:], append(append(append([]byte(nil), a...), b...), c...))
	}
	if _, err := m.WriteAt(fill(99, 4096), 20<<20); err != nil {
		t.Fatal(err)
	}
	copy(want[20<<20:], fill(99, 4096))
	if err := m.Flush(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, size)
	for off := 0; off < size; off += 1 << 20 {
		x, y := got[off:off+4096], got[off+4096:off+1<<20]
		if n, err := m.ReadAtv([][]byte{x, y}, int64(off)); err != nil || n != 1<<20 {
			t.Fatalf("ReadAtv at %d: %d %v", off, n, err)
		}
	}
	if !bytes.Equal(got, want) {
		t.Fatal("read back differs")
	}
	// io.ReaderAt: a read across the end is short with io.EOF.
	p := make([]byte, 8192)
	if n, err := m.ReadAt(p, size-4096); n != 4096 || err != io.EOF || !bytes.Equal(p[:4096], want[size-4096:]) {
		t.Fatalf("ReadAt across the end: %d %v", n, err)
	}
	if _, err := m.ReadAt(p, size); err != io.EOF {
		t.Fatalf("ReadAt at the end: %v", err)
	}
	if _, err := m.WriteAt(p, size-4096); err == nil || !strings.Contains(err.Error(), "past the end") {
		t.Fatalf("WriteAt across the end: %v", err)
	}
	// Another opener sees the data; read-only refuses writes.
	ro := open(t, n, Options{ReadOnly: true})
	if _, err := ro.ReadAt(got[:4096], 20<<20); err != nil || !bytes.Equal(got[:4096], fill(99, 4096)) {
		t.Fatalf("read-only reader: %v", err)
	}
	if _, err := ro.WriteAt(got[:4096], 0); !errors.Is(err, os.ErrPermission) {
		t.Fatalf("write to a read-only image: %v", err)
	}
	// Write zeroes; discard only when enabled.
	if err := m.ZeroRange(4096, 8192); err != nil {
		t.Fatal(err)
	}
	if _, err := m.ReadAt(got[:8192], 4096); err != nil || !bytes.Equal(got[:8192], make([]byte, 8192)) {
		t.Fatal("ZeroRange left data")
	}
	if err := m.Punch(0, 4096); !errors.Is(err, ErrDiscardOff) {
		t.Fatalf("Punch without discard: %v", err)
	}
	d := open(t, n, Options{Discard: true})
	if err := d.Punch(9<<20, 1<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := d.ReadAt(got[:1<<20], 9<<20); err != nil || !bytes.Equal(got[:1<<20], make([]byte, 1<<20)) {
		t.Fatal("Punch left data")
	}
	m.Close()
	if _, err := m.ReadAt(p, 0); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("read after close: %v", err)
	}
	if err := m.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
}

// TestBatch runs batches of mixed reads and writes from several goroutines
// at once (each its own batch, as the queues do) on a section of an image,
// and checks the image against a model.
func TestBatch(t *testing.T) {
	const size, base, secSize = 64 << 20, 1 << 20, 32 << 20
	m := open(t, newImage(t, size), Options{})
	sec, err := NewSection(m, base, secSize)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := NewSection(m, base, size); err == nil {
		t.Fatal("a section past the end")
	}
	const workers, rounds, depth = 4, 20, 32
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b := sec.NewBatch(depth)
			defer b.Close()
			// Each worker owns an 8 MiB slice of the section.
			lo := int64(w) * (secSize / workers)
			model := make([]byte, secSize/workers)
			r := rand.New(rand.NewPCG(uint64(w), 1))
			for round := 0; round < rounds; round++ {
				type op struct {
					write bool
					off   int64
					bufs  [][]byte
				}
				var ops []op
				used := map[int64]bool{}
				for len(ops) < depth {
					blk := r.Int64N(int64(len(model)) / 65536)
					if used[blk] {
						continue
					}
					used[blk] = true
					o := op{write: r.IntN(2) == 0, off: blk * 65536}
					for k := 0; k < 1+r.IntN(4); k++ {
						o.bufs = append(o.bufs, make([]byte, 4096*(1+r.IntN(3))))
					}
					if o.write {
						for _, p := range o.bufs {
							for i := range p {
								p[i] = byte(r.Uint32())
							}
						}
					}
					if !b.queue(o.write, o.bufs, lo+o.off) {
						errs <- fmt.Errorf("batch full after %d", len(ops))
						return
					}
					ops = append(ops, o)
				}
				if b.Read(nil, 0) {
					errs <- errors.New("a full batch took another transfer")
					return
				}
				failed := error(nil)
				b.Run(func(i int, err error) {
					if err != nil && failed == nil {
						failed = fmt.Errorf("op %d: %w", i, err)
					}
				})
				if failed != nil {
					errs <- failed
					return
				}
				for _, o := range ops {
					at := o.off
					for _, p := range o.bufs {
						if o.write {
							copy(model[at:], p)
						} else if !bytes.Equal(p, model[at:at+int64(len(p))]) {
							errs <- fmt.Errorf("worker %d round %d: read at %d differs", w, round, at)
							return
						}
						at += int64(len(p))
					}
				}
			}
			got := make([]byte, len(model))
			if _, err := sec.ReadAtv([][]byte{got}, lo); err != nil || !bytes.Equal(got, model) {
				errs <- fmt.Errorf("worker %d: final read: %v", w, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	// The section starts at base: nothing was written before it.
	head := make([]byte, base)
	if _, err := m.ReadAt(head, 0); err != nil || !bytes.Equal(head, make([]byte, base)) {
		t.Fatal("a section write landed before its base")
	}
}

// TestDataRanges: only the objects written are listed, a clone lists its
// parent's, and a range not written reads as zeros.
func TestDataRanges(t *testing.T) {
	n := newImage(t, 64<<20)
	m := open(t, n, Options{})
	for _, at := range []int64{1 << 20, 13 << 20, 60 << 20} {
		if _, err := m.WriteAt([]byte("data"), at); err != nil {
			t.Fatal(err)
		}
	}
	ranges := func(m *Image, off, size int64) (rs [][2]int64) {
		t.Helper()
		if err := m.DataRanges(off, size, func(o, n int64) error {
			rs = append(rs, [2]int64{o, n})
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		return rs
	}
	// 4 MiB objects: [0,4M), [12M,16M), [60M,64M); relative to off.
	if got, want := fmt.Sprint(ranges(m, 0, 64<<20)), fmt.Sprint([][2]int64{{0, 4 << 20}, {12 << 20, 4 << 20}, {60 << 20, 4 << 20}}); got != want {
		t.Fatalf("ranges %s, want %s", got, want)
	}
	if got, want := fmt.Sprint(ranges(m, 2<<20, 12<<20)), fmt.Sprint([][2]int64{{0, 2 << 20}, {10 << 20, 2 << 20}}); got != want {
		t.Fatalf("ranges of a window %s, want %s", got, want)
	}
	stop := errors.New("stop")
	if err := m.DataRanges(0, 64<<20, func(o, n int64) error { return stop }); err != stop {
		t.Fatalf("fn's error: %v", err)
	}
}

// TestSnapshotClone: a snapshot is point in time, a clone reads its
// parent's data and writes its own, the snapshot cannot go while a clone
// depends on it.
func TestSnapshotClone(t *testing.T) {
	c := connect(t)
	n := newImage(t, 16<<20)
	m := open(t, n, Options{})
	m.WriteAt(bytes.Repeat([]byte("A"), 8192), 0)
	sn, err := m.Snapshot("snap-1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Snapshot("snap-1"); !errors.Is(err, os.ErrExist) {
		t.Fatalf("second snapshot of one name: %v", err)
	}
	if _, err := m.Snapshot("a/b"); err == nil {
		t.Fatal("a snapshot named a/b")
	}
	m.WriteAt(bytes.Repeat([]byte("B"), 4096), 0)
	if s, err := m.Snapshots(); err != nil || fmt.Sprint(s) != "[snap-1]" {
		t.Fatalf("snapshots %v %v", s, err)
	}
	snap := open(t, sn, Options{})
	if !snap.ReadOnly() {
		t.Fatal("a snapshot opened writable")
	}
	p := make([]byte, 8192)
	snap.ReadAt(p, 0)
	if !bytes.Equal(p, bytes.Repeat([]byte("A"), 8192)) {
		t.Fatal("the snapshot is not the image as it was")
	}
	child := Name{Pool: n.Pool, Image: n.Image + "-clone"}
	if err := c.Clone(sn, child); err != nil {
		t.Fatal(err)
	}
	if err := c.Clone(sn, child); !errors.Is(err, os.ErrExist) {
		t.Fatalf("clone onto an existing image: %v", err)
	}
	if err := c.Clone(n.AtSnap("nosuch"), Name{Pool: n.Pool, Image: "x"}); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("clone of a missing snapshot: %v", err)
	}
	cm := open(t, child, Options{})
	cm.ReadAt(p, 0)
	if !bytes.Equal(p, bytes.Repeat([]byte("A"), 8192)) {
		t.Fatal("the clone does not read its parent")
	}
	cm.WriteAt(bytes.Repeat([]byte("C"), 4096), 4096)
	snap.ReadAt(p, 0)
	if !bytes.Equal(p, bytes.Repeat([]byte("A"), 8192)) {
		t.Fatal("a write to the clone reached the snapshot")
	}
	if err := m.RemoveSnapshot("snap-1"); err == nil {
		t.Fatal("removed a snapshot a clone depends on")
	}
	cm.Close()
	if err := c.Remove(child); err != nil {
		t.Fatal(err)
	}
	snap.Close()
	if err := m.RemoveSnapshot("snap-1"); err != nil {
		t.Fatal(err)
	}
	// Rename never replaces.
	other := newImage(t, 1<<20)
	if err := c.Rename(other, n); !errors.Is(err, os.ErrExist) {
		t.Fatalf("rename onto an existing image: %v", err)
	}
	moved := Name{Pool: n.Pool, Image: other.Image + "-moved"}
	if err := c.Rename(other, moved); err != nil {
		t.Fatal(err)
	}
	if ok, err := c.Exists(moved); !ok || err != nil {
		t.Fatalf("renamed image: %v %v", ok, err)
	}
	if ok, err := c.Exists(other); ok || err != nil {
		t.Fatalf("old name: %v %v", ok, err)
	}
}

// TestErrors: what an operator gets wrong is named, within the timeout.
func TestErrors(t *testing.T) {
	ctx := context.Background()
	n := newImage(t, 1<<20)
	check := func(what string, err error, want ...string) {
		t.Helper()
		if err == nil {
			t.Fatalf("%s: no error", what)
		}
		for _, w := range want {
			if !strings.Contains(err.Error(), w) {
				t.Fatalf("%s: %v; want %q in it", what, err, w)
			}
		}
	}
	missing := Name{Pool: n.Pool, Image: "no-such-image"}
	_, err := Open(ctx, testCluster(), missing, Options{})
	check("missing image", err, "rbd:rbd/no-such-image", "no such image")
	if !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing image: %v is not ErrNotExist", err)
	}
	_, err = Open(ctx, testCluster(), Name{Pool: "nopool", Image: "x"}, Options{})
	check("missing pool", err, "pool nopool does not exist")

	// A wrong keyring: the key of another client.
	dir := t.TempDir()
	wrong := filepath.Join(dir, "wrong.keyring")
	kr, _ := os.ReadFile(cluster.Keyring)
	os.WriteFile(wrong, bytes.Replace(kr, []byte("[client.hemd]"), []byte("[client.intruder]"), 1), 0o600)
	c := testCluster()
	c.ID, c.Keyring, c.Timeout = "intruder", wrong, 5*time.Second
	t0 := time.Now()
	_, err = Open(ctx, c, n, Options{})
	check("unknown client", err, "client.intruder", cluster.Conf)
	t.Logf("unknown client refused in %v: %v", time.Since(t0).Round(time.Millisecond), err)
	c = testCluster()
	c.Keyring = filepath.Join(dir, "none")
	_, err = Open(ctx, c, n, Options{})
	check("missing keyring", err, "keyring", "none")

	// Nobody listens at the monitor address: refused within the timeout.
	conf := filepath.Join(dir, "ceph.conf")
	l, _ := os.ReadFile(cluster.Conf)
	os.WriteFile(conf, bytes.Replace(l, []byte(cluster.MonAddr), []byte("127.0.0.1:9"), 1), 0o644)
	c = testCluster()
	c.Conf, c.Timeout = conf, 3*time.Second
	t0 = time.Now()
	_, err = Open(ctx, c, n, Options{})
	took := time.Since(t0)
	check("unreachable cluster", err, "127.0.0.1:9", n.String())
	if took > 10*time.Second {
		t.Fatalf("unreachable cluster refused after %v, timeout 3s", took)
	}
	t.Logf("unreachable cluster refused in %v: %v", took.Round(time.Millisecond), err)
	_, err = Open(ctx, Cluster{Conf: filepath.Join(dir, "missing.conf")}, n, Options{})
	check("missing ceph.conf", err, "missing.conf")
}
