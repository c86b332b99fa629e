package blk

import (
	"bytes"
	"sync"
	"testing"
)

// runCounter is a Batch that records how many transfers each Run carried.
type runCounter struct {
	Batch
	mu     *sync.Mutex
	queued int
	runs   *[]int
}

func (b *runCounter) Read(bufs [][]byte, off int64) bool {
	ok := b.Batch.Read(bufs, off)
	if ok {
		b.queued++
	}
	return ok
}

func (b *runCounter) Write(bufs [][]byte, off int64) bool {
	ok := b.Batch.Write(bufs, off)
	if ok {
		b.queued++
	}
	return ok
}

func (b *runCounter) Run(done func(int, error)) {
	b.mu.Lock()
	*b.runs = append(*b.runs, b.queued)
	b.mu.Unlock()
	b.queued = 0
	b.Batch.Run(done)
}

// On a local store an encrypted queue runs 128 KiB writes 8 at a time (its
// 1 MiB bounce buffer) and reads 4 at a time (512 KiB parts, decrypted while
// in cache); on a remote store (Config.Remote: RBD) the whole batch is in
// flight at once, both ways. The data is the same either way.
func TestRemoteKeepsBatchInFlight(t *testing.T) {
	for _, remote := range []bool{false, true} {
		var mu sync.Mutex
		var runs []int
		r := newRig(t, rigOpts{size: 16 << 20, cfg: Config{Keys: &testKeys{unit: 512}, Remote: remote},
			wrapBatch: func(b Batch) Batch { return &runCounter{Batch: b, mu: &mu, runs: &runs} }})
		const n, size = 16, 128 << 10
		var ios []blkIO
		for i := range n {
			ios = append(ios, blkIO{typ: TypeOut, sector: uint64(i * size / 512), data: pattern(size, byte(i))})
		}
		for i, res := range r.batch(0, ios) {
			if res.st != StatusOK {
				t.Fatalf("remote=%v: write %d: status %d", remote, i, res.st)
			}
		}
		mu.Lock()
		writeRuns := append([]int(nil), runs...)
		runs = runs[:0]
		mu.Unlock()
		ios = ios[:0]
		for i := range n {
			ios = append(ios, blkIO{typ: TypeIn, sector: uint64(i * size / 512), data: make([]byte, size), write: true})
		}
		for i, res := range r.batch(0, ios) {
			if res.st != StatusOK || !bytes.Equal(res.data, pattern(size, byte(i))) {
				t.Fatalf("remote=%v: read %d: status %d, data equal %v", remote, i, res.st, bytes.Equal(res.data, pattern(size, byte(i))))
			}
		}
		mu.Lock()
		readRuns := append([]int(nil), runs...)
		mu.Unlock()
		most := func(rs []int) int {
			m := 0
			for _, x := range rs {
				m = max(m, x)
			}
			return m
		}
		wantW, wantR := bounceSize/size, readChunk/size
		if remote {
			wantW, wantR = n, n
		}
		if most(writeRuns) != wantW || most(readRuns) != wantR {
			t.Fatalf("remote=%v: most transfers in one run: writes %d (runs %v), reads %d (runs %v); want %d and %d",
				remote, most(writeRuns), writeRuns, most(readRuns), readRuns, wantW, wantR)
		}
	}
}
