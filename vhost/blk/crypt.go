package blk

import (
	"runtime/debug"

	"github.com/hemd/hemd/hem/shield"
)

// cryptTask is the encryption or decryption of one request's data: the
// first n bytes of data, which start at data unit unit0. A decryption runs
// in place; an encryption writes dst and leaves data (guest memory) alone.
type cryptTask struct {
	dst     []byte
	data    [][]byte
	n       int
	unit0   uint64
	decrypt bool
}

// splitMin is the least a batch's crypto must weigh, in bytes, before a
// share of it goes to a helper on another core: below it, waking the helper
// costs more than it saves.
const splitMin = 256 << 10

// splitCPUs is the fewest CPUs hemd may use for a queue to split its crypto
// with a helper. On two (the project's machine), the other CPU runs the
// front-end and the split lost everywhere: 4 KiB reads -19%, 128 KiB writes
// -15%, 128 KiB reads +2% (vhost/blk/PERFORMANCE.md).
const splitCPUs = 4

// crypter is a queue's helper goroutine: it takes a share of a batch's
// crypto on another core while the queue's goroutine does the rest. Like the
// queue's, its thread runs with the asynchronous signals blocked, so no key
// material reaches a signal frame.
type crypter struct {
	jobs    chan []cryptTask
	done    chan any // nil, or what the helper's share panicked with
	scratch []byte
}

// cryptAll carries out tasks: on the queue's goroutine alone when they are
// light or the worker has no helper, else split in two shares of about the
// same weight, the second on the helper.
func (w *worker) cryptAll(tasks []cryptTask) {
	total := 0
	for i := range tasks {
		total += tasks[i].n
	}
	if total < w.splitMin || len(tasks) < 2 || !w.startCrypter() {
		w.runTasks(tasks, w.scratch)
		return
	}
	// The helper takes the tail, about half the bytes.
	cut, acc := len(tasks)-1, 0
	for cut > 0 && acc+tasks[cut].n <= total/2 {
		acc += tasks[cut].n
		cut--
	}
	cut++
	if cut == len(tasks) {
		w.runTasks(tasks, w.scratch)
		return
	}
	w.crypter.jobs <- tasks[cut:]
	var v any
	func() {
		// Should this share fault, the helper is waited for all the same:
		// nothing touches guest memory or the key once the queue stops.
		defer func() { v = <-w.crypter.done }()
		w.runTasks(tasks[:cut], w.scratch)
	}()
	if v != nil {
		// A fault on guest memory (the front-end shrank it) met by the
		// helper is raised on the queue's goroutine, where the runner
		// turns it into the end of the session.
		panic(v)
	}
}

// runTasks carries out tasks, using scratch for a data unit that straddles
// two guest buffers.
func (w *worker) runTasks(tasks []cryptTask, scratch []byte) {
	us := w.xform.UnitSize()
	for i := range tasks {
		t := &tasks[i]
		if t.decrypt {
			walkUnits(t.data, t.n, us, scratch, true, func(b []byte, rel int) {
				w.xform.Decrypt(b, b, t.unit0+uint64(rel/us))
			})
			continue
		}
		walkUnits(t.data, t.n, us, scratch, false, func(src []byte, rel int) {
			w.xform.Encrypt(t.dst[rel:rel+len(src)], src, t.unit0+uint64(rel/us))
		})
	}
}

// startCrypter starts the worker's helper goroutine if it has none; false
// means the worker works alone (one CPU).
func (w *worker) startCrypter() bool {
	if w.crypter != nil {
		return true
	}
	if w.cryptCPUs < splitCPUs {
		return false
	}
	c := &crypter{jobs: make(chan []cryptTask), done: make(chan any), scratch: make([]byte, w.xform.UnitSize())}
	w.crypter = c
	go shield.Run(func() {
		debug.SetPanicOnFault(true)
		for tasks := range c.jobs {
			c.done <- c.run(w, tasks)
		}
	})
	return true
}

// run carries out the helper's share, returning what it panicked with.
func (c *crypter) run(w *worker, tasks []cryptTask) (v any) {
	defer func() { v = recover() }()
	w.runTasks(tasks, c.scratch)
	return nil
}

// stopCrypter ends the helper goroutine.
func (w *worker) stopCrypter() {
	if w.crypter != nil {
		close(w.crypter.jobs)
		w.crypter = nil
	}
}
