package blk

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/hemd/hemd/vhost/frontend"
)

// One kick brings many requests of every kind: the batched path (reads
// through io_uring, writes between them, flush, GET_ID and bad requests in
// order) completes each with the status and data the one-at-a-time path
// gives, on a plain and on an encrypted disk.
func TestMixedBatch(t *testing.T) {
	for _, enc := range []bool{false, true} {
		for _, sync := range []bool{false, true} {
			cfg := Config{}
			if enc {
				cfg.Keys = &testKeys{unit: 512}
			}
			r := newRig(t, rigOpts{sync: sync, cfg: cfg})
			capacity := r.dev.Capacity() / sectorSize
			// Batch 1: 16 writes of distinct ranges, odd splits included,
			// with a flush, a GET_ID and a request past the end among them.
			var ios []blkIO
			var want [][]byte
			for i := range 16 {
				d := pattern(8192+512*i, byte(i))
				want = append(want, d)
				ios = append(ios, blkIO{typ: TypeOut, sector: uint64(64 * i), data: d, split: []int{0, 4096, 1000}[i%3]})
				switch i {
				case 5:
					ios = append(ios, blkIO{typ: TypeFlush})
				case 9:
					ios = append(ios, blkIO{typ: TypeGetID, data: make([]byte, idLen), write: true})
				case 12:
					ios = append(ios, blkIO{typ: TypeIn, sector: capacity - 1, data: make([]byte, 4096), write: true})
				}
			}
			res := r.batch(0, ios)
			for i, io := range ios {
				wantSt := byte(StatusOK)
				if io.typ == TypeIn {
					wantSt = StatusIOErr // past the end
				}
				if res[i].st != wantSt {
					t.Fatalf("enc=%v sync=%v: request %d (type %d): status %d, want %d", enc, sync, i, io.typ, res[i].st, wantSt)
				}
				if io.typ == TypeGetID && !bytes.HasPrefix(res[i].data, []byte(r.dev.serial)) {
					t.Fatalf("enc=%v sync=%v: GET_ID %q", enc, sync, res[i].data)
				}
			}
			// Batch 2: read them all back at once, with other splits.
			ios = ios[:0]
			for i, d := range want {
				ios = append(ios, blkIO{typ: TypeIn, sector: uint64(64 * i), data: make([]byte, len(d)), write: true, split: []int{0, 4096, 3000}[i%3]})
			}
			res = r.batch(0, ios)
			for i, d := range want {
				if res[i].st != StatusOK || res[i].n != uint32(len(d))+1 || !bytes.Equal(res[i].data, d) {
					t.Fatalf("enc=%v sync=%v: read %d: status %d len %d equal %v", enc, sync, i, res[i].st, res[i].n, bytes.Equal(res[i].data, d))
				}
			}
			// What reached the file is ciphertext on the encrypted disk.
			raw := make([]byte, len(want[3]))
			if _, err := r.store.ReadAt(raw, 64*3*sectorSize); err != nil {
				t.Fatal(err)
			}
			if bytes.Equal(raw, want[3]) == enc {
				t.Fatalf("enc=%v sync=%v: file holds %s", enc, sync, map[bool]string{true: "plaintext", false: "something else than the data"}[bytes.Equal(raw, want[3])])
			}
		}
	}
}

type ioResult struct {
	st   byte
	n    uint32
	data []byte
}

// batch puts every request on queue q, kicks once and waits for all.
func (r *rig) batch(q int, ios []blkIO) []ioResult {
	r.t.Helper()
	qu := r.c.Queues[q]
	type pend struct{ st, data uint64 }
	byHead := map[uint16]int{}
	pends := make([]pend, len(ios))
	for i, io := range ios {
		bufs, st, data := r.build(io)
		head, err := qu.Add(bufs)
		if err != nil {
			r.t.Fatal(err)
		}
		byHead[head], pends[i] = i, pend{st, data}
	}
	if err := qu.Kick(); err != nil {
		r.t.Fatal(err)
	}
	out := make([]ioResult, len(ios))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var used []frontend.Used
	for len(used) < len(ios) {
		var err error
		if used, err = qu.Wait(ctx, used); err != nil {
			r.t.Fatalf("waiting for %d completions, have %d: %v", len(ios), len(used), err)
		}
	}
	for _, u := range used {
		i, ok := byHead[u.Head]
		if !ok {
			r.t.Fatalf("completion of unknown head %d", u.Head)
		}
		st, n, data := r.result(ios[i], pends[i].st, pends[i].data, u)
		out[i] = ioResult{st, n, data}
	}
	return out
}
