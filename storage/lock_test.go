package storage

import (
	"bufio"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// lockHelperEnv makes the test binary a process that takes a volume's lock,
// says so on stdout and waits to be killed (TestLockDiesWithHolder).
const lockHelperEnv = "HEMD_TEST_LOCK_HELPER"

func TestMain(m *testing.M) {
	if path := os.Getenv(lockHelperEnv); path != "" {
		l, err := OpenLock(path, LockOptions{Socket: "/run/helper.sock"})
		if err == nil {
			err = l.TryAcquire()
		}
		if err != nil {
			os.Stdout.WriteString("error " + err.Error() + "\n")
			os.Exit(1)
		}
		os.Stdout.WriteString("locked\n")
		time.Sleep(time.Minute)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func mustLock(t *testing.T, path string, o LockOptions) *Lock {
	t.Helper()
	l, err := OpenLock(path, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// inUseBy checks that err refuses the lock naming holder pid and socket.
func inUseBy(t *testing.T, err error, pid int, socket string, shared bool) {
	t.Helper()
	var iu *InUseError
	if !errors.As(err, &iu) || !errors.Is(err, ErrInUse) {
		t.Fatalf("got %v, want an InUseError", err)
	}
	if iu.Holder == nil {
		t.Fatalf("%v: no holder named", err)
	}
	if h := iu.Holder; h.PID != pid || h.Socket != socket || h.Shared != shared {
		t.Fatalf("holder %+v, want pid %d socket %s shared %v", *h, pid, socket, shared)
	}
	if !strings.Contains(err.Error(), "pid "+strconv.Itoa(pid)) || !strings.Contains(err.Error(), socket) {
		t.Fatalf("error %q does not name pid %d and socket %s", err, pid, socket)
	}
}

// Exclusive against exclusive: the second is refused, naming the first,
// until the first lets go; the holder record lives beside the file while the
// lock is held.
func TestLockExclusive(t *testing.T) {
	_, p := newFile(t, 1<<20, Options{})
	a := mustLock(t, p, LockOptions{Socket: "/run/a.sock"})
	b := mustLock(t, p, LockOptions{Socket: "/run/b.sock"})
	if err := a.TryAcquire(); err != nil {
		t.Fatal(err)
	}
	if err := a.TryAcquire(); err != nil {
		t.Fatalf("held lock taken again: %v", err)
	}
	if a.RecordPath() != p+".hemd-holder" {
		t.Fatalf("record %s, want beside %s", a.RecordPath(), p)
	}
	if _, err := os.Stat(a.RecordPath()); err != nil {
		t.Fatalf("no holder record: %v", err)
	}
	inUseBy(t, b.TryAcquire(), os.Getpid(), "/run/a.sock", false)
	if b.Held() {
		t.Fatal("refused lock says it is held")
	}
	a.Release()
	if _, err := os.Stat(a.RecordPath()); !os.IsNotExist(err) {
		t.Fatalf("holder record left after release: %v", err)
	}
	if err := b.TryAcquire(); err != nil {
		t.Fatalf("after release: %v", err)
	}
	inUseBy(t, a.TryAcquire(), os.Getpid(), "/run/b.sock", false)
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if err := a.TryAcquire(); err != nil {
		t.Fatalf("after close: %v", err)
	}
	if err := b.TryAcquire(); err == nil || errors.Is(err, ErrInUse) {
		t.Fatalf("closed lock: %v, want an error that is not in-use", err)
	}
}

// Shared claims go together; an exclusive one is refused while any is held,
// and refuses them while it is held.
func TestLockShared(t *testing.T) {
	_, p := newFile(t, 1<<20, Options{})
	r1 := mustLock(t, p, LockOptions{Shared: true, Socket: "/run/r1.sock"})
	r2 := mustLock(t, p, LockOptions{Shared: true, Socket: "/run/r2.sock"})
	w := mustLock(t, p, LockOptions{Socket: "/run/w.sock"})
	if err := r1.TryAcquire(); err != nil {
		t.Fatal(err)
	}
	if err := r2.TryAcquire(); err != nil {
		t.Fatalf("second reader: %v", err)
	}
	inUseBy(t, w.TryAcquire(), os.Getpid(), "/run/r2.sock", true)
	r2.Release()
	// r1 still reads: the writer is still refused (r1 wrote the record
	// before r2 replaced it; r2 removed its own, so none names r1, but the
	// lock tells a reader holds it).
	var iu *InUseError
	if err := w.TryAcquire(); !errors.As(err, &iu) || !iu.Shared || !strings.Contains(err.Error(), "read-only") {
		t.Fatalf("writer while a reader holds: %v", err)
	}
	r1.Release()
	if err := w.TryAcquire(); err != nil {
		t.Fatalf("writer after the readers left: %v", err)
	}
	inUseBy(t, r1.TryAcquire(), os.Getpid(), "/run/w.sock", false)
}

// Closing other descriptors of the file, as a classic POSIX lock would not
// survive, leaves the lock held.
func TestLockSurvivesOtherCloses(t *testing.T) {
	f, p := newFile(t, 1<<20, Options{})
	l, err := f.NewLock(LockOptions{Socket: "/run/a.sock"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := l.TryAcquire(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		o, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		o.Close()
		g, err := Open(p, Options{})
		if err != nil {
			t.Fatal(err)
		}
		g.Close()
	}
	f.Close()
	inUseBy(t, mustLock(t, p, LockOptions{}).TryAcquire(), os.Getpid(), "/run/a.sock", false)
}

// A lock dies with its holder: after SIGKILL the next one takes it at once,
// and the record the dead one left is not taken for a live holder.
func TestLockDiesWithHolder(t *testing.T) {
	_, p := newFile(t, 1<<20, Options{})
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), lockHelperEnv+"="+p)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || line != "locked\n" {
		t.Fatalf("helper: %q, %v", line, err)
	}
	l := mustLock(t, p, LockOptions{Socket: "/run/next.sock"})
	inUseBy(t, l.TryAcquire(), cmd.Process.Pid, "/run/helper.sock", false)

	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	if _, err := os.Stat(l.RecordPath()); err != nil {
		t.Fatalf("the killed holder's record should still be there: %v", err)
	}
	// The dead holder's record with another process holding the lock
	// without a record: nobody is named.
	raw, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	lk := unix.Flock_t{Type: unix.F_WRLCK}
	if err := unix.FcntlFlock(raw.Fd(), unix.F_OFD_SETLK, &lk); err != nil {
		t.Fatal(err)
	}
	var iu *InUseError
	if err := l.TryAcquire(); !errors.As(err, &iu) || iu.Holder != nil {
		t.Fatalf("stale record: %v, want in use by an unnamed holder", err)
	}
	raw.Close()

	if err := l.TryAcquire(); err != nil {
		t.Fatalf("after the holder was killed: %v", err)
	}
	h, err := readRecord(l.RecordPath())
	if err != nil || h.PID != os.Getpid() || h.Socket != "/run/next.sock" {
		t.Fatalf("record after take-over: %+v, %v", h, err)
	}
}

// Acquire waits for the holder to let go, and names it when its context
// ends first.
func TestLockAcquireWaits(t *testing.T) {
	_, p := newFile(t, 1<<20, Options{})
	a := mustLock(t, p, LockOptions{Socket: "/run/a.sock"})
	b := mustLock(t, p, LockOptions{Socket: "/run/b.sock"})
	if err := a.TryAcquire(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 80*time.Millisecond)
	defer cancel()
	deadline, _ := ctx.Deadline()
	inUseBy(t, b.Acquire(ctx), os.Getpid(), "/run/a.sock", false)
	if early := time.Until(deadline); early > 0 {
		t.Fatalf("gave up %v before its context ended", early)
	}

	go func() {
		time.Sleep(100 * time.Millisecond)
		a.Release()
	}()
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	began := time.Now()
	if err := b.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	// The upper bound allows for a loaded machine (-race, two cores).
	if d := time.Since(began); d < 100*time.Millisecond || d > 8*time.Second {
		t.Fatalf("took the lock after %v, want just after the release at 100 ms", d)
	}
	// An ended context still tries once.
	done, cancelDone := context.WithCancel(context.Background())
	cancelDone()
	b.Release()
	if err := a.Acquire(done); err != nil {
		t.Fatalf("free lock with an ended context: %v", err)
	}
}

// The record of a volume reached through a symbolic link lies beside the
// file itself, where a hemd that names the file finds it.
func TestLockRecordBesideRealFile(t *testing.T) {
	_, p := newFile(t, 1<<20, Options{})
	link := filepath.Join(t.TempDir(), "link.img")
	if err := os.Symlink(p, link); err != nil {
		t.Fatal(err)
	}
	a := mustLock(t, link, LockOptions{Socket: "/run/a.sock"})
	if err := a.TryAcquire(); err != nil {
		t.Fatal(err)
	}
	if a.RecordPath() != p+".hemd-holder" {
		t.Fatalf("record %s, want %s", a.RecordPath(), p+".hemd-holder")
	}
	inUseBy(t, mustLock(t, p, LockOptions{}).TryAcquire(), os.Getpid(), "/run/a.sock", false)
}

// A block device's holder records itself under the runtime directory, keyed
// by the device number.
func TestLockBlockDevice(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("loop devices need root")
	}
	_, p := newFile(t, 4<<20, Options{})
	out, err := exec.Command("losetup", "--find", "--show", p).Output()
	if err != nil {
		t.Skipf("no loop device here: %v", err)
	}
	dev := strings.TrimSpace(string(out))
	defer exec.Command("losetup", "-d", dev).Run()
	var st unix.Stat_t
	if err := unix.Stat(dev, &st); err != nil {
		t.Fatal(err)
	}
	rt := t.TempDir()
	f, err := Open(dev, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	a, err := f.NewLock(LockOptions{Socket: "/run/a.sock", RuntimeDir: rt})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if err := a.TryAcquire(); err != nil {
		t.Fatal(err)
	}
	want := filepath.Join(rt, "holders", "blockdev-"+strconv.Itoa(int(unix.Major(st.Rdev)))+":"+strconv.Itoa(int(unix.Minor(st.Rdev))))
	if a.RecordPath() != want {
		t.Fatalf("record %s, want %s", a.RecordPath(), want)
	}
	inUseBy(t, mustLock(t, dev, LockOptions{RuntimeDir: rt}).TryAcquire(), os.Getpid(), "/run/a.sock", false)
}
