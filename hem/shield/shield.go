// Package shield runs work on secrets with the asynchronous signals blocked.
//
// A signal delivered while a cipher keeps its round keys (or an RSA
// operation its intermediates) in vector registers makes the kernel save
// those registers (XSAVE) in the signal frame, on the thread's signal stack,
// where they stay after the key is wiped. hemd's data path, its attach and
// every step that handles a data key or a recipient key run shielded, so no
// key material reaches a signal frame. Synchronous signals (faults) stay
// unblocked: Go turns them into panics, and the runtime still preempts the
// work at its function calls.
package shield

import (
	"runtime"

	"golang.org/x/sys/unix"
)

// Run runs fn on an OS thread of its own with the asynchronous signals
// blocked, and restores both afterwards.
func Run(fn func()) {
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
