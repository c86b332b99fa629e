package main

import (
	"errors"

	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestNoDumpFlag(t *testing.T) {
	v, err := noDump()
	if err != nil {
		t.Fatal(err)
	}
	got, err := unix.PrctlRetInt(unix.PR_GET_DUMPABLE, 0, 0, 0, 0)
	if err != nil || v != 0 || got != 0 {
		t.Fatalf("dumpable flag reads %d (noDump said %d, err %v), want 0", got, v, err)
	}
}

// abort starts cmd in dir with core dumps allowed (RLIMIT_CORE unlimited),
// waits until ready says it runs, sends SIGABRT and returns whether the
// kernel reports a core dumped and the core files in dir.
func abort(t *testing.T, cmd *exec.Cmd, dir string, ready func() bool) (bool, []string) {
	t.Helper()
	cmd.Dir = dir
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	lim := unix.Rlimit{Cur: unix.RLIM_INFINITY, Max: unix.RLIM_INFINITY}
	if err := unix.Prlimit(cmd.Process.Pid, unix.RLIMIT_CORE, &lim, nil); err != nil {
		t.Fatalf("prlimit RLIMIT_CORE: %v", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for !ready() {
		if time.Now().After(deadline) {
			t.Fatalf("%s did not get ready", cmd.Path)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := cmd.Process.Signal(syscall.SIGABRT); err != nil {
		t.Fatal(err)
	}
	err := cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("%s after SIGABRT: %v, want death by signal", cmd.Path, err)
	}
	ws := ee.Sys().(syscall.WaitStatus)
	if !ws.Signaled() || ws.Signal() != syscall.SIGABRT {
		t.Fatalf("%s after SIGABRT: %v, want death by SIGABRT", cmd.Path, err)
	}
	cores, _ := filepath.Glob(filepath.Join(dir, "core*"))
	return ws.CoreDump(), cores
}

// hemd serve and hemd kms serve killed by SIGABRT, with core dumps allowed
// and Go asked to crash (GOTRACEBACK=crash), leave no core: they are
// non-dumpable. A control process in the same conditions does leave one, so
// the check is not vacuous.
func TestNoCoreDump(t *testing.T) {
	pattern, err := os.ReadFile("/proc/sys/kernel/core_pattern")
	if err != nil {
		t.Fatal(err)
	}
	if p := strings.TrimSpace(string(pattern)); strings.HasPrefix(p, "|") || strings.HasPrefix(p, "/") {
		t.Fatalf("kernel.core_pattern is %q: this test needs cores written in the crashing process's directory (the Debian default, core)", p)
	}
	ctl := t.TempDir()
	dumped, cores := abort(t, exec.Command("sleep", "60"), ctl, func() bool { return true })
	if !dumped || len(cores) == 0 {
		t.Fatalf("control: a dumpable process killed by SIGABRT left no core (dumped %v, files %v); the check below would prove nothing", dumped, cores)
	}

	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	img := filepath.Join(dir, "disk.img")
	sparse(t, img, 1<<20)
	for _, tc := range []struct {
		name  string
		args  []string
		ready func(out *syncBuffer) bool
	}{
		{"serve", []string{"serve", "--socket", filepath.Join(dir, "s.sock"), "--volume", img}, func(out *syncBuffer) bool {
			return strings.Contains(out.String(), "serving")
		}},
		{"kms serve", []string{"kms", "serve", "--listen", "unix:" + filepath.Join(dir, "kms.sock")}, func(*syncBuffer) bool {
			_, err := os.Stat(filepath.Join(dir, "kms.sock"))
			return err == nil
		}},
	} {
		out := &syncBuffer{}
		cmd := exec.Command(os.Args[0], tc.args...)
		cmd.Env = append(os.Environ(), "HEMD_TEST_MAIN=1", "GOTRACEBACK=crash", "HEMD_STATE_DIR="+state, "SOFTHSM2_CONF=")
		cmd.Stdout, cmd.Stderr = out, out
		wd := t.TempDir()
		dumped, cores := abort(t, cmd, wd, func() bool { return tc.ready(out) })
		if dumped || len(cores) > 0 {
			t.Errorf("hemd %s killed by SIGABRT dumped core (kernel says %v, files %v)\n%s", tc.name, dumped, cores, out.String())
		}
		if !strings.Contains(out.String(), "SIGABRT") {
			t.Errorf("hemd %s: Go did not report the SIGABRT it crashed on:\n%s", tc.name, out.String())
		}
	}
}
