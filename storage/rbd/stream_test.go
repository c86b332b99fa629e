//go:build cgo && !norbd

package rbd

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"testing"
)

// TestStream keeps mixed reads and writes in flight from several goroutines
// at once (each its own stream, as the queues do) on a section of an image,
// queueing new ones as earlier ones are reported, in any order, and checks
// every read and the image against a model.
func TestStream(t *testing.T) {
	const size, base, secSize = 64 << 20, 1 << 20, 32 << 20
	m := open(t, newImage(t, size), Options{})
	sec, err := NewSection(m, base, secSize)
	if err != nil {
		t.Fatal(err)
	}
	const workers, total, depth = 4, 600, 32
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := sec.NewStream(depth)
			if err != nil {
				errs <- err
				return
			}
			defer st.Close()
			lo := int64(w) * (secSize / workers)
			model := make([]byte, secSize/workers)
			r := rand.New(rand.NewPCG(uint64(w), 2))
			type op struct {
				write bool
				off   int64
				bufs  [][]byte
			}
			inFlight := map[uint64]op{}
			busy := map[int64]bool{} // 64 KiB blocks with a transfer in flight
			var failed error
			report := func(tag uint64, err error) {
				o := inFlight[tag]
				delete(inFlight, tag)
				delete(busy, o.off/65536)
				if err != nil && failed == nil {
					failed = fmt.Errorf("worker %d op %d: %w", w, tag, err)
				}
				at := o.off
				for _, p := range o.bufs {
					if !o.write && !bytes.Equal(p, model[at:at+int64(len(p))]) && failed == nil {
						failed = fmt.Errorf("worker %d: read %d at %d differs", w, tag, at)
					}
					at += int64(len(p))
				}
			}
			for tag := uint64(0); tag < total || len(inFlight) > 0; {
				for tag < total && st.Room() {
					blk := r.Int64N(int64(len(model)) / 65536)
					if busy[blk] {
						continue // in flight together, two transfers have no order
					}
					o := op{write: r.IntN(2) == 0, off: blk * 65536}
					for range 1 + r.IntN(4) {
						o.bufs = append(o.bufs, make([]byte, 4096*(1+r.IntN(3))))
					}
					if o.write {
						at := o.off
						for _, p := range o.bufs {
							for i := range p {
								p[i] = byte(r.Uint32())
							}
							copy(model[at:], p) // no read of it is in flight
							at += int64(len(p))
						}
					}
					queue := st.Read
					if o.write {
						queue = st.Write
					}
					if !queue(o.bufs, lo+o.off, tag) {
						errs <- fmt.Errorf("worker %d: stream with room refused a transfer", w)
						return
					}
					busy[blk], inFlight[tag] = true, o
					tag++
				}
				st.Submit()
				if st.InFlight() != len(inFlight) {
					errs <- fmt.Errorf("worker %d: %d in flight, want %d", w, st.InFlight(), len(inFlight))
					return
				}
				st.Wait(report)
				if failed != nil {
					errs <- failed
					return
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
}

// A stream on a read-only image reports its writes failed and its reads
// done; on a closed image every transfer fails, naming it; a stream holds
// its image open while transfers are in flight.
func TestStreamErrors(t *testing.T) {
	n := newImage(t, 4<<20)
	ro := open(t, n, Options{ReadOnly: true})
	st, err := ro.NewStream(4)
	if err != nil {
		t.Fatal(err)
	}
	st.Write([][]byte{make([]byte, 4096)}, 0, 1)
	st.Read([][]byte{make([]byte, 4096)}, 0, 2)
	got := map[uint64]error{}
	for st.InFlight() > 0 {
		st.Wait(func(tag uint64, err error) { got[tag] = err })
	}
	if !errors.Is(got[1], os.ErrPermission) || got[2] != nil {
		t.Fatalf("read-only image: write %v, read %v", got[1], got[2])
	}
	st.Close()

	m := open(t, n, Options{})
	st, err = m.NewStream(4)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if !st.Write([][]byte{bytes.Repeat([]byte{9}, 4096)}, 8192, 3) {
		t.Fatal("write refused")
	}
	closed := make(chan error, 1)
	go func() { closed <- m.Close() }()
	for st.InFlight() > 0 {
		st.Wait(func(tag uint64, err error) {
			if err != nil {
				t.Errorf("write in flight while the image closed: %v", err)
			}
		})
	}
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	st.Read([][]byte{make([]byte, 4096)}, 0, 4)
	st.Wait(func(tag uint64, err error) {
		if !errors.Is(err, os.ErrClosed) {
			t.Fatalf("read of a closed image: %v", err)
		}
	})
}
