package vhost

import (
	"errors"
	"fmt"
	"runtime/debug"
)

// Shared memory can fail under hemd: a front-end may shrink the file behind
// a mapping after handing it over (ftruncate on a memfd), and the next touch
// of a page past the new end is SIGBUS. The goroutines that touch shared
// memory (the session's and every queue's) run with debug.SetPanicOnFault,
// so such a fault becomes a panic that guarded turns into a FaultError: the
// session ends and hemd goes on. The data path keeps synchronous signals
// unblocked (shielded) for this.

// ErrSharedMemoryFault is a fault on memory a front-end shared: it shrank
// the file behind a mapping.
var ErrSharedMemoryFault = errors.New("shared memory fault")

// FaultError is a fault at Addr, met by the goroutine named in Where ("queue
// 2", "control"). Region names the mapping, once the session has looked it
// up.
type FaultError struct {
	Addr   uintptr
	Where  string
	Region string
}

func (e *FaultError) Error() string {
	r := e.Region
	if r == "" {
		r = "an unknown mapping"
	}
	return fmt.Sprintf("%s in %s at %#x (%s): the front-end shrank the file behind it",
		ErrSharedMemoryFault, r, e.Addr, e.Where)
}

func (e *FaultError) Unwrap() error { return ErrSharedMemoryFault }

// guarded runs fn with faults turned into a *FaultError. Other panics go on:
// they are bugs, not something a front-end did to shared memory.
func guarded(where string, fn func() error) (err error) {
	old := debug.SetPanicOnFault(true)
	defer debug.SetPanicOnFault(old)
	defer func() {
		if v := recover(); v != nil {
			f, ok := v.(interface{ Addr() uintptr })
			if !ok {
				panic(v)
			}
			err = &FaultError{Addr: f.Addr(), Where: where}
		}
	}()
	return fn()
}

// describeFault names the mapping that holds the fault's address. It runs on
// the session goroutine, which owns the mappings.
func (s *session) describeFault(e *FaultError) {
	if e.Region != "" {
		return
	}
	switch {
	case s.mem != nil:
		if d, ok := s.mem.Locate(e.Addr); ok {
			e.Region = d
			return
		}
	}
	if s.dlog.contains(e.Addr) {
		e.Region = "the dirty log (SET_LOG_BASE)"
		return
	}
	if s.inflight != nil && s.inflight.contains(e.Addr) {
		e.Region = "the inflight region (" + s.inflight.origin + ")"
	}
}
