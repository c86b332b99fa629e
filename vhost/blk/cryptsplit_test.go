package blk

import (
	"bytes"
	"testing"

	"github.com/hemd/hemd/hem"
)

// splitTasks makes n requests of sizes from sizes over guest buffers cut at
// odd places, filled from seed; it returns the tasks and their buffers.
func splitTasks(t *testing.T, sizes []int, seed byte, decrypt bool, dst bool) []cryptTask {
	t.Helper()
	var tasks []cryptTask
	unit := uint64(7)
	for i, n := range sizes {
		data := pattern(n, seed+byte(i))
		cut := (n / 3) | 8 // not a unit boundary
		bufs := [][]byte{data[:cut], data[cut:]}
		tk := cryptTask{data: bufs, n: n, unit0: unit, decrypt: decrypt}
		if dst {
			tk.dst = make([]byte, n)
		}
		tasks = append(tasks, tk)
		unit += uint64(n/512) + 3
	}
	return tasks
}

func flat(t cryptTask) []byte {
	if t.dst != nil {
		return t.dst
	}
	return bytes.Join(t.data, nil)
}

// The crypto of a batch split between a queue's goroutine and its helper
// gives what the queue's goroutine alone gives, for encryptions into the
// bounce buffer and decryptions in place, units straddling guest buffers.
func TestCryptSplitMatchesOneCore(t *testing.T) {
	x, err := hem.NewXTS(testXTSKey(), 512)
	if err != nil {
		t.Fatal(err)
	}
	sizes := []int{4096, 128 << 10, 512, 64 << 10, 4096, 1 << 20, 8192}
	for _, decrypt := range []bool{false, true} {
		one := &worker{xform: x, scratch: make([]byte, 512), cryptCPUs: 1}
		two := &worker{xform: x, scratch: make([]byte, 512), cryptCPUs: splitCPUs}
		a := splitTasks(t, sizes, 1, decrypt, !decrypt)
		b := splitTasks(t, sizes, 1, decrypt, !decrypt)
		one.cryptAll(a)
		two.cryptAll(b)
		if two.crypter == nil {
			t.Fatal("no helper started for a 1.3 MiB batch on two CPUs")
		}
		for i := range a {
			if !bytes.Equal(flat(a[i]), flat(b[i])) {
				t.Fatalf("decrypt=%v: task %d (%d bytes) differs when split", decrypt, i, a[i].n)
			}
			if bytes.Equal(flat(a[i]), pattern(a[i].n, 1+byte(i))) {
				t.Fatalf("decrypt=%v: task %d unchanged", decrypt, i)
			}
		}
		// And back: decrypting what was encrypted gives the pattern.
		if !decrypt {
			for i := range b {
				b[i] = cryptTask{data: [][]byte{b[i].dst}, n: b[i].n, unit0: b[i].unit0, decrypt: true}
			}
			two.cryptAll(b)
			for i := range b {
				if !bytes.Equal(b[i].data[0], pattern(b[i].n, 1+byte(i))) {
					t.Fatalf("task %d does not decrypt back", i)
				}
			}
		}
		two.stopCrypter()
	}
}

// faultValue stands for the runtime error a fault on guest memory panics
// with (it has Addr).
type faultValue struct{}

func (faultValue) Addr() uintptr { return 0xdead000 }
func (faultValue) Error() string { return "fault" }

// faultXTS faults on the helper's share: every unit from 1000 on.
type faultXTS struct{ *hem.XTS }

func (f faultXTS) Decrypt(dst, src []byte, unit uint64) {
	if unit >= 1000 {
		panic(faultValue{})
	}
	f.XTS.Decrypt(dst, src, unit)
}

// A fault met by the helper is raised on the queue's goroutine (where the
// runner ends the session), and the helper serves the next batch.
func TestCryptSplitFaultOnHelper(t *testing.T) {
	x, err := hem.NewXTS(testXTSKey(), 512)
	if err != nil {
		t.Fatal(err)
	}
	w := &worker{xform: faultXTS{x}, scratch: make([]byte, 512), cryptCPUs: splitCPUs}
	defer w.stopCrypter()
	tasks := []cryptTask{
		{data: [][]byte{make([]byte, 256<<10)}, n: 256 << 10, unit0: 0, decrypt: true},
		{data: [][]byte{make([]byte, 256<<10)}, n: 256 << 10, unit0: 1000, decrypt: true},
	}
	func() {
		defer func() {
			if v := recover(); v == nil {
				t.Fatal("the helper's fault was not raised on the queue's goroutine")
			} else if _, ok := v.(interface{ Addr() uintptr }); !ok {
				t.Fatalf("raised %v, want the fault", v)
			}
		}()
		w.cryptAll(tasks)
	}()
	tasks[1].unit0 = 2
	w.cryptAll(tasks) // no fault now, the helper still serves
}
