package blk

import (
	"bytes"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// TestMappedReads: reads served from the file's mapping (pages resident)
// return what was written, encrypted or not, whatever the guest buffers'
// split (data units straddling two buffers); pages the page cache does not
// hold are read the usual way.
func TestMappedReads(t *testing.T) {
	for _, tc := range []struct {
		name string
		keys *testKeys
		bs   uint32
	}{{"plain", nil, 512}, {"xts-512", &testKeys{unit: 512}, 512}, {"xts-4096", &testKeys{unit: 4096}, 4096}} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := Config{BlockSize: tc.bs}
			if tc.keys != nil {
				cfg.Keys = tc.keys
			}
			r := newRig(t, rigOpts{cfg: cfg, mapped: true, mapReadMin: 8192})
			want := pattern(32<<10, 5)
			if st, _, _ := r.do(0, blkIO{typ: TypeOut, sector: 64, data: want}); st != StatusOK {
				t.Fatalf("write: %d", st)
			}
			mapped := func() uint64 { return r.dev.stats[0].MappedReads.Load() }
			for _, split := range []int{0, 4096, 1000, 512 + 8} {
				before := mapped()
				st, _, got := r.do(0, blkIO{typ: TypeIn, sector: 64, data: make([]byte, len(want)), write: true, split: split})
				if st != StatusOK || !bytes.Equal(got, want) {
					t.Fatalf("split %d: status %d, equal %v", split, st, bytes.Equal(got, want))
				}
				if mapped() != before+1 {
					t.Fatalf("split %d: the read was not served from the mapping", split)
				}
			}
			// Smaller than mapReadMin: batched as before.
			before := mapped()
			if st, _, got := r.do(0, blkIO{typ: TypeIn, sector: 64, data: make([]byte, 4096), write: true}); st != StatusOK || !bytes.Equal(got, want[:4096]) {
				t.Fatalf("small read: status %d", st)
			}
			if mapped() != before {
				t.Fatal("a read below mapReadMin was served from the mapping")
			}
			// Pages the page cache does not hold: read through the batch, and
			// right. (Pages read through the mapping are mapped, and stay.)
			const other = 1024
			if st, _, _ := r.do(0, blkIO{typ: TypeOut, sector: other, data: want}); st != StatusOK {
				t.Fatalf("write: %d", st)
			}
			f, err := os.Open(r.path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if err := unix.Fdatasync(int(f.Fd())); err != nil {
				t.Fatal(err)
			}
			if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
				t.Fatal(err)
			}
			before = mapped()
			st, _, got := r.do(0, blkIO{typ: TypeIn, sector: other, data: make([]byte, len(want)), write: true})
			if st != StatusOK || !bytes.Equal(got, want) {
				t.Fatalf("evicted: status %d, equal %v", st, bytes.Equal(got, want))
			}
			if mapped() != before {
				t.Fatal("pages the page cache did not hold were read through the mapping")
			}
		})
	}
}
