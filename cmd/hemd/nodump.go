package main

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// noDump makes the process non-dumpable (prctl PR_SET_DUMPABLE 0): the
// kernel writes no core file for it, and processes of other users (and of
// the same user without CAP_SYS_PTRACE) cannot ptrace it or read its memory
// through /proc. Every hemd command may hold a data key (serve, volume
// import and export, snapshot copy) or the KMS's working copies of one
// (kms serve); MADV_DONTDUMP keeps the key page out of a core, but a thread
// caught in the cipher has round keys in its saved vector registers, which a
// core would carry. It returns the flag read back.
func noDump() (int, error) {
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		return -1, fmt.Errorf("prctl PR_SET_DUMPABLE 0: %w", err)
	}
	v, err := unix.PrctlRetInt(unix.PR_GET_DUMPABLE, 0, 0, 0, 0)
	if err != nil {
		return -1, fmt.Errorf("prctl PR_GET_DUMPABLE: %w", err)
	}
	if v != 0 {
		return v, fmt.Errorf("prctl PR_GET_DUMPABLE reads %d after setting 0", v)
	}
	return v, nil
}
