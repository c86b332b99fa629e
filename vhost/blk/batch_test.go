package blk

import (
	"bytes"
	"context"
	"encoding/binary"
	"os"
	"testing"
	"time"

	"github.com/hemd/hemd/storage"
	"github.com/hemd/hemd/vhost/frontend"
	"github.com/hemd/hemd/vhost/virtq"
)

// One kick brings many requests of every kind: the batched path (reads
// through io_uring, writes between them, flush, GET_ID and bad requests in
// order) completes each with the status and data the one-at-a-time path
// gives, on a plain and on an encrypted disk; on the encrypted one also with
// every read copied by the kernel's workers and decrypted as it completes
// (asyncReads), and with none.
func TestMixedBatch(t *testing.T) {
	for _, enc := range []bool{false, true} {
		for _, mode := range []struct {
			sync     bool
			asyncMin int
		}{{false, 0}, {true, 0}, {false, 1}, {false, -1}} {
			sync := mode.sync
			if !enc && mode.asyncMin != 0 {
				continue
			}
			cfg := Config{}
			if enc {
				cfg.Keys = &testKeys{unit: 512}
			}
			r := newRig(t, rigOpts{sync: sync, cfg: cfg, asyncReadMin: mode.asyncMin})
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
	// All of them at once: the queue finds the whole batch when it looks.
	qu.Hold()
	for i, io := range ios {
		bufs, st, data := r.build(io)
		head, err := qu.Add(bufs)
		if err != nil {
			r.t.Fatal(err)
		}
		byHead[head], pends[i] = i, pend{st, data}
	}
	qu.Release()
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

// The batched data path allocates nothing per request once warm: chains of
// reads and writes, plain and encrypted.
func TestBatchNoAllocs(t *testing.T) {
	for _, enc := range []bool{false, true} {
		path := t.TempDir() + "/disk.img"
		if err := os.WriteFile(path, make([]byte, 1<<20), 0o600); err != nil {
			t.Fatal(err)
		}
		st, err := storage.Open(path, storage.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		cfg := Config{ID: "vol-0123456789abcdef0", Store: WithBatches(st, func(d int) Batch { return st.NewBatch(d, false) })}
		if enc {
			cfg.Keys = &testKeys{unit: 512}
		}
		dev, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if err := dev.Start(context.Background(), dev.Features()); err != nil {
			t.Fatal(err)
		}
		w := dev.Handler(0).(*worker)
		defer w.Close()
		const n = 32
		chains := make([]*virtq.Chain, n)
		written := make([]uint32, n)
		for i := range chains {
			hdr := make([]byte, 16)
			binary.LittleEndian.PutUint32(hdr, uint32(i%2)) // IN, OUT
			binary.LittleEndian.PutUint64(hdr[8:], uint64(8*i))
			chains[i] = &virtq.Chain{Head: uint16(i), Segs: []virtq.Seg{
				{Len: 16, Buf: hdr},
				{Len: 4096, Buf: make([]byte, 4096), Write: i%2 == 0},
				{Len: 1, Buf: make([]byte, 1), Write: true},
			}}
		}
		w.HandleBatch(chains, written) // warm: the ring, the request slots
		if allocs := testing.AllocsPerRun(50, func() { w.HandleBatch(chains, written) }); allocs != 0 {
			t.Fatalf("enc=%v: %.1f allocations per batch of %d requests", enc, allocs, n)
		}
		for i, c := range chains {
			if c.Segs[2].Buf[0] != StatusOK || written[i] != uint32(1+4096*(1-i%2)) {
				t.Fatalf("enc=%v: request %d: status %d written %d", enc, i, c.Segs[2].Buf[0], written[i])
			}
		}
		if !w.batch.b.(*storage.Batch).Uring() {
			t.Log("io_uring refused here: the fallback was measured")
		}
		dev.Stop()
	}
}
