package storage

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// A stream leaves the same bytes in the file and reads the same bytes back
// as one system call per transfer, for transfers of any shape (odd sizes,
// more buffers than one readv takes, past the end of the file, O_DIRECT
// aligned and not), queued a few at a time while earlier ones are in flight,
// each reported exactly once.
func TestStreamMatchesSync(t *testing.T) {
	for _, direct := range []bool{false, true} {
		const size = 4 << 20
		fu, pu := newFile(t, size, Options{Direct: direct})
		fs, ps := newFile(t, size, Options{Direct: direct})
		st, err := fu.NewStream(16)
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		bs := fs.NewBatch(16, true)
		defer bs.Close()
		arena := alignedBuf(t, 16<<20)
		rng := rand.New(rand.NewPCG(2, uint64(len(pu))))
		for round := range 150 {
			ops := randomOps(rng, size)
			var got [2][][][]byte
			at := 0
			for k := range 2 {
				for i, o := range ops {
					bufs := make([][]byte, len(o.lens))
					for j, l := range o.lens {
						if k == 0 && l%512 == 0 && at+l <= len(arena) {
							bufs[j] = arena[at : at+l] // O_DIRECT aligned
							at += (l + 4095) &^ 4095
						} else {
							bufs[j] = make([]byte, l)
						}
						for x := range bufs[j] {
							bufs[j][x] = 0xee // must be overwritten
							if o.write {
								bufs[j][x] = byte(int(o.off) + j*7 + x + round)
							}
						}
					}
					got[k] = append(got[k], bufs)
					if k == 1 {
						if o.write {
							bs.Write(bufs, o.off)
						} else {
							bs.Read(bufs, o.off)
						}
						continue
					}
					queue := st.Read
					if o.write {
						queue = st.Write
					}
					if !queue(bufs, o.off, uint64(1000+i)) {
						t.Fatalf("round %d: stream full after %d ops", round, i)
					}
					if i%3 == 2 {
						st.Submit() // some in flight before the rest is queued
					}
				}
				if k == 1 {
					bs.Run(func(i int, err error) {
						if err != nil {
							t.Fatalf("sync op %d: %v", i, err)
						}
					})
					continue
				}
				st.Submit()
				seen := make([]bool, len(ops))
				for n := 0; n < len(ops); {
					if st.InFlight() == 0 {
						t.Fatalf("round %d: %d of %d reported, none in flight", round, n, len(ops))
					}
					st.Wait(func(tag uint64, err error) {
						i := int(tag) - 1000
						if i < 0 || i >= len(ops) || seen[i] {
							t.Fatalf("round %d: tag %d unknown or reported twice", round, tag)
						}
						if err != nil {
							t.Fatalf("round %d op %d (%+v): %v", round, i, ops[i], err)
						}
						seen[i] = true
						n++
					})
				}
				if st.InFlight() != 0 || st.Ready() {
					t.Fatalf("round %d: %d in flight after every op was reported", round, st.InFlight())
				}
			}
			for i, o := range ops {
				if !o.write && !bytes.Equal(bytes.Join(got[0][i], nil), bytes.Join(got[1][i], nil)) {
					t.Fatalf("direct=%v round %d: read %d differs between the stream and sync", direct, round, i)
				}
			}
			clear(arena[:at])
		}
		a, _ := os.ReadFile(pu)
		c, _ := os.ReadFile(ps)
		if !bytes.Equal(a, c) {
			t.Fatalf("direct=%v: files differ between the stream and sync", direct)
		}
	}
}

// Sleep returns when a transfer in flight completes, reporting it, or when a
// watched fd is readable, saying which; an fd stays watched from one call to
// the next until it fires.
func TestStreamSleep(t *testing.T) {
	f, _ := newFile(t, 1<<20, Options{Direct: true})
	st, err := f.NewStream(4)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	fds, ready := []int{efd}, make([]bool, 1)
	buf := alignedBuf(t, 4096)
	if !st.Read([][]byte{buf}, 4096, 7) {
		t.Fatal("read refused")
	}
	st.Submit()
	var tags []uint64
	collect := func(tag uint64, err error) {
		if err != nil {
			t.Fatal(err)
		}
		tags = append(tags, tag)
	}
	for len(tags) == 0 {
		st.Sleep(fds, ready, collect)
		if ready[0] {
			t.Fatal("an eventfd nobody wrote found readable")
		}
	}
	if len(tags) != 1 || tags[0] != 7 || st.InFlight() != 0 {
		t.Fatalf("reaped %v, %d in flight", tags, st.InFlight())
	}
	// Nothing in flight: Sleep waits for the fd (watched since the first
	// call) alone.
	go func() {
		time.Sleep(20 * time.Millisecond)
		var one [8]byte
		one[0] = 1
		unix.Write(efd, one[:])
	}()
	st.Sleep(fds, ready, collect)
	if !ready[0] || len(tags) != 1 {
		t.Fatalf("Sleep returned with ready %v, %d reported", ready[0], len(tags))
	}
}

// A snapshot's point in time falls between writes: StartCOW waits for the
// writes a stream has in flight, the stream takes no new write meanwhile
// (Write refuses until those in flight are reaped), and the snapshot holds
// the writes done before it and none after.
func TestStreamSnapshotBetweenWrites(t *testing.T) {
	const size = 1 << 20
	f, _ := newFile(t, size, Options{Direct: true})
	st, err := f.NewStream(8)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	before, after := alignedBuf(t, 4096), alignedBuf(t, 4096)
	for i := range before {
		before[i], after[i] = 0xbb, 0xaa
	}
	if !st.Write([][]byte{before}, 8192, 1) {
		t.Fatal("first write refused")
	}
	st.Submit()
	dst := snapFile(t, size)
	started := make(chan *COW, 1)
	go func() {
		c, err := f.StartCOW(0, size, dst, COWOptions{})
		if err != nil {
			t.Error(err)
		}
		started <- c
	}()
	// StartCOW now waits for the write in flight (a writer is waiting for
	// the gate once a reader cannot take it)...
	deadline := time.Now().Add(10 * time.Second)
	for f.gate.TryRLock() {
		f.gate.RUnlock()
		if time.Now().After(deadline) {
			t.Fatal("StartCOW never waited for the stream's write")
		}
		time.Sleep(time.Millisecond)
	}
	// ... and the stream refuses a new write rather than wait for the gate
	// while it holds it.
	if st.Write([][]byte{after}, 8192, 2) {
		t.Fatal("a write was taken while a snapshot waited for the one in flight")
	}
	select {
	case <-started:
		t.Fatal("StartCOW returned while a write was in flight")
	case <-time.After(50 * time.Millisecond):
	}
	st.Submit()
	for st.InFlight() > 0 {
		st.Wait(func(tag uint64, err error) {
			if err != nil {
				t.Fatal(err)
			}
		})
	}
	c := <-started
	// The write after the snapshot's point in time is taken now.
	if !st.Write([][]byte{after}, 8192, 3) {
		t.Fatal("write after the snapshot refused with nothing in flight")
	}
	st.Submit()
	st.Wait(func(tag uint64, err error) {
		if tag != 3 || err != nil {
			t.Fatalf("tag %d: %v", tag, err)
		}
	})
	if err := c.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	snap := make([]byte, 4096)
	if _, err := dst.ReadAt(snap, 8192); err != nil {
		t.Fatal(err)
	}
	now := make([]byte, 4096)
	if _, err := f.ReadAt(now, 8192); err != nil {
		t.Fatal(err)
	}
	if snap[0] != 0xbb || now[0] != 0xaa {
		t.Fatalf("snapshot holds %#x (want the write before it, 0xbb), the file %#x (want 0xaa)", snap[0], now[0])
	}
}

// A write to a read-only store is reported failed (ErrPermission); reads go
// on.
func TestStreamReadOnly(t *testing.T) {
	_, p := newFile(t, 1<<20, Options{})
	f, err := Open(p, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.NewStream(4)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	st.Write([][]byte{make([]byte, 512)}, 0, 1)
	st.Read([][]byte{make([]byte, 512)}, 0, 2)
	st.Submit()
	errs := map[uint64]error{}
	for st.InFlight() > 0 {
		st.Wait(func(tag uint64, err error) { errs[tag] = err })
	}
	if !errors.Is(errs[1], os.ErrPermission) || errs[2] != nil {
		t.Fatalf("write: %v, read: %v", errs[1], errs[2])
	}
}
