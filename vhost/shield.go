package vhost

import (
	"runtime"

	"golang.org/x/sys/unix"
)

// shielded runs fn on an OS thread of its own with the asynchronous signals
// blocked, and restores both afterwards.
//
// A signal delivered while a cipher keeps its round keys in vector registers
// makes the kernel save those registers (XSAVE) in the signal frame, on the
// thread's signal stack, where they stay after the key is wiped. Data-path
// goroutines run shielded, so no key material reaches a signal frame.
// Synchronous signals (faults) stay unblocked: Go turns them into panics.
func shielded(fn func()) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var set, old unix.Sigset_t
	for sig := 1; sig <= 64; sig++ {
		switch unix.Signal(sig) {
		case unix.SIGSEGV, unix.SIGBUS, unix.SIGFPE, unix.SIGILL, unix.SIGTRAP, unix.SIGSYS:
			continue
		}
		set.Val[(sig-1)/64] |= 1 << ((uint(sig) - 1) % 64)
	}
	if err := unix.PthreadSigmask(unix.SIG_BLOCK, &set, &old); err != nil {
		fn()
		return
	}
	defer unix.PthreadSigmask(unix.SIG_SETMASK, &old, nil)
	fn()
}
