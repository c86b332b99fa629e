package storage

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"testing"
)

// The io_uring batch and its fallback (one system call per transfer) leave
// the same bytes in the file and read the same bytes back, for transfers of
// any shape: odd buffer sizes, more buffers than one readv takes, reads past
// the end of the file, O_DIRECT-aligned and not, buffered writes through the
// ring or not, buffered reads on the kernel's worker threads or inline.
func TestBatchMatchesSync(t *testing.T) {
	for _, mode := range []struct{ direct, ringWrites, async bool }{{false, false, false}, {false, true, false}, {true, false, false}, {false, false, true}, {true, false, true}} {
		direct := mode.direct
		const size = 4 << 20
		fu, pu := newFile(t, size, Options{Direct: direct})
		fs, ps := newFile(t, size, Options{Direct: direct})
		bu, bs := fu.NewBatch(16, false), fs.NewBatch(16, true)
		bu.ringWrites = mode.ringWrites
		if mode.async {
			// Every buffered read goes to the kernel's workers.
			if err := bu.SetAsyncReads(1, 2); err != nil {
				t.Fatal(err)
			}
		}
		defer bu.Close()
		defer bs.Close()
		if !bu.Uring() {
			t.Skip("the kernel refuses io_uring here (io_uring_disabled, seccomp): only the fallback runs, and hemd serve warns")
		}
		if bs.Uring() {
			t.Fatal("sync batch uses io_uring")
		}
		rng := rand.New(rand.NewPCG(1, uint64(len(pu))))
		for round := range 300 {
			ops := randomOps(rng, size)
			var got [2][][][]byte
			for k, b := range []*Batch{bu, bs} {
				for _, o := range ops {
					bufs := make([][]byte, len(o.lens))
					for j, l := range o.lens {
						bufs[j] = make([]byte, l)
						if o.write {
							for x := range bufs[j] {
								bufs[j][x] = byte(int(o.off) + j*7 + x + round)
							}
						} else {
							for x := range bufs[j] {
								bufs[j][x] = 0xee // must be overwritten
							}
						}
					}
					got[k] = append(got[k], bufs)
					queue := b.Read
					if o.write {
						queue = b.Write
					}
					if !queue(bufs, o.off) {
						t.Fatalf("round %d: batch full after %d ops", round, len(got[k]))
					}
				}
				calls, seen := 0, make([]bool, len(ops))
				b.Run(func(i int, err error) {
					// In queue order, but an asynchronous read is reported
					// as it completes.
					if seen[i] || (i != calls && !(mode.async && b == bu)) {
						t.Fatalf("round %d: done(%d) out of order or twice, call %d", round, i, calls)
					}
					seen[i] = true
					calls++
					if err != nil {
						t.Fatalf("round %d op %d (%+v): %v", round, i, ops[i], err)
					}
				})
				if calls != len(ops) {
					t.Fatalf("round %d: %d done calls for %d ops", round, calls, len(ops))
				}
			}
			for i, o := range ops {
				if !o.write && !bytes.Equal(bytes.Join(got[0][i], nil), bytes.Join(got[1][i], nil)) {
					t.Fatalf("direct=%v round %d: read %d differs between io_uring and sync", direct, round, i)
				}
			}
		}
		a, _ := os.ReadFile(pu)
		c, _ := os.ReadFile(ps)
		if !bytes.Equal(a, c) {
			t.Fatalf("direct=%v: files differ between io_uring and sync", direct)
		}
	}
}

type testOp struct {
	write bool
	off   int64
	lens  []int
}

// randomOps returns up to 16 transfers of any shape on a file of size bytes:
// odd buffer sizes, more buffers than one readv takes, reads past the end,
// O_DIRECT-aligned and not; no two overlap (transfers in flight together
// have no order, nor do a guest's).
func randomOps(rng *rand.Rand, size int) []testOp {
	var ops []testOp
	for range 1 + rng.IntN(16) {
		o := testOp{write: rng.IntN(2) == 0, off: int64(rng.IntN(size/512)) * 512}
		nb := 1 + rng.IntN(4)
		if rng.IntN(50) == 0 {
			nb = 1500 // past IOV_MAX
		}
		for range nb {
			l := 512 * (1 + rng.IntN(16))
			if rng.IntN(4) == 0 {
				l = 1 + rng.IntN(3000) // not O_DIRECT-aligned
			}
			o.lens = append(o.lens, l)
		}
		if !o.write && rng.IntN(10) == 0 {
			o.off = int64(size) - 1024 // runs past the end: zeros
		}
		if o.write && o.off+int64(sum(o.lens)) > int64(size) {
			o.off = (int64(size) - int64(sum(o.lens))) &^ 511
			if o.off < 0 {
				continue
			}
		}
		if !overlaps(ops, o) {
			ops = append(ops, o)
		}
	}
	return ops
}

func overlaps(ops []testOp, o testOp) bool {
	for _, p := range ops {
		if o.off < p.off+int64(sum(p.lens)) && p.off < o.off+int64(sum(o.lens)) {
			return true
		}
	}
	return false
}

func sum(l []int) int {
	n := 0
	for _, x := range l {
		n += x
	}
	return n
}

// A write on a read-only store fails with ErrPermission, through the ring or
// not, and leaves the other transfers of the batch alone.
func TestBatchReadOnly(t *testing.T) {
	f, p := newFile(t, 1<<20, Options{})
	if err := os.WriteFile(p, bytes.Repeat([]byte{7}, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	f.Close()
	ro, err := Open(p, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	for _, sync := range []bool{false, true} {
		b := ro.NewBatch(4, sync)
		buf := make([]byte, 4096)
		b.Write([][]byte{make([]byte, 4096)}, 0)
		b.Read([][]byte{buf}, 8192)
		var errs []error
		b.Run(func(i int, err error) { errs = append(errs, err) })
		b.Close()
		if len(errs) != 2 || !errors.Is(errs[0], os.ErrPermission) || errs[1] != nil {
			t.Fatalf("sync=%v: errors %v", sync, errs)
		}
		if !bytes.Equal(buf, bytes.Repeat([]byte{7}, 4096)) {
			t.Fatalf("sync=%v: read wrong data", sync)
		}
	}
}

// A batch past its depth refuses more transfers until it runs.
func TestBatchFull(t *testing.T) {
	f, _ := newFile(t, 1<<20, Options{})
	b := f.NewBatch(2, false)
	defer b.Close()
	buf := [][]byte{make([]byte, 512)}
	if !b.Read(buf, 0) || !b.Read(buf, 512) || b.Read(buf, 1024) {
		t.Fatal("depth 2 batch: want two transfers queued, the third refused")
	}
	b.Run(func(int, error) {})
	if !b.Read(buf, 0) {
		t.Fatal("after Run the batch takes transfers again")
	}
	b.Run(func(int, error) {})
}

// A batch says why it makes one system call per transfer.
func TestBatchWhy(t *testing.T) {
	f, _ := newFile(t, 1<<20, Options{})
	b := f.NewBatch(4, true)
	defer b.Close()
	if b.Uring() || b.Why() == nil {
		t.Fatalf("sync batch: Uring %v, Why %v", b.Uring(), b.Why())
	}
	u := f.NewBatch(4, false)
	defer u.Close()
	if u.Uring() != (u.Why() == nil) {
		t.Fatalf("Uring %v but Why %v", u.Uring(), u.Why())
	}
}
