package shield

import (
	"os"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// blocked reads the calling thread's blocked-signal mask from procfs.
func blocked(t *testing.T) uint64 {
	t.Helper()
	b, err := os.ReadFile("/proc/thread-self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "SigBlk:"); ok {
			m, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			return m
		}
	}
	t.Fatal("no SigBlk in /proc/thread-self/status")
	return 0
}

func bit(s unix.Signal) uint64 { return 1 << (uint(s) - 1) }

func TestRunBlocksAsyncSignalsOnly(t *testing.T) {
	var inside uint64
	Run(func() { inside = blocked(t) })
	for _, s := range []unix.Signal{unix.SIGURG, unix.SIGPROF, unix.SIGUSR1, unix.SIGTERM, unix.SIGCHLD} {
		if inside&bit(s) == 0 {
			t.Errorf("signal %v not blocked inside Run (mask %#x)", s, inside)
		}
	}
	for _, s := range []unix.Signal{unix.SIGSEGV, unix.SIGBUS, unix.SIGFPE, unix.SIGILL} {
		if inside&bit(s) != 0 {
			t.Errorf("synchronous signal %v blocked inside Run (mask %#x)", s, inside)
		}
	}
}

func TestRunRestoresMask(t *testing.T) {
	var before, after uint64
	Run(func() {
		// Nested: the outer Run's thread must get its mask back.
		before = blocked(t)
		Run(func() {})
		after = blocked(t)
	})
	if before != after {
		t.Fatalf("mask %#x after nested Run, want %#x", after, before)
	}
}
