//go:build cgo && !norbd

package rbd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hemd/hemd/storage"
)

// TestLockOneWriter: the holder's lock refuses a second claimant, naming the
// holder; the second's writes fail at once; a release hands the image over.
func TestLockOneWriter(t *testing.T) {
	n := newImage(t, 4<<20)
	a, b := open(t, n, Options{}), open(t, n, Options{})
	la, err := a.NewLock(LockOptions{Socket: "/run/a.sock"})
	if err != nil {
		t.Fatal(err)
	}
	lb, _ := b.NewLock(LockOptions{Socket: "/run/b.sock"})
	if err := la.TryAcquire(); err != nil {
		t.Fatal(err)
	}
	if !la.Held() || lb.Held() {
		t.Fatal("Held")
	}
	if a.InUse() || !b.InUse() {
		t.Fatalf("InUse: holder %v, other %v", a.InUse(), b.InUse())
	}
	err = lb.TryAcquire()
	var iu *storage.InUseError
	if !errors.As(err, &iu) || iu.Holder == nil || iu.Holder.PID != os.Getpid() || iu.Holder.Socket != "/run/a.sock" {
		t.Fatalf("second claim: %v", err)
	}
	if !strings.Contains(err.Error(), "socket /run/a.sock") {
		t.Fatalf("refusal does not name the socket: %v", err)
	}
	if _, err := b.WriteAt([]byte("intruder"), 0); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("the other client's write: %v", err)
	}
	if _, err := a.WriteAt([]byte("holder"), 0); err != nil {
		t.Fatal(err)
	}
	// A snapshot taken through another client while the holder writes:
	// librbd has the holder take it.
	if _, err := b.Snapshot("snap-during-hold"); err != nil {
		t.Fatalf("snapshot by another client while the lock is held: %v", err)
	}
	if !la.Held() {
		t.Fatal("the holder lost its lock to a snapshot")
	}
	if _, err := a.WriteAt([]byte("holder2"), 0); err != nil {
		t.Fatalf("the holder's write after the snapshot: %v", err)
	}
	// A timed-out Acquire names the holder too.
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	err = lb.Acquire(ctx)
	cancel()
	if !errors.As(err, &iu) || iu.Holder.Socket != "/run/a.sock" {
		t.Fatalf("Acquire against a live holder: %v", err)
	}
	// Hand over, as at a migration's switchover.
	got := make(chan error, 1)
	t0 := time.Now()
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		got <- lb.Acquire(ctx)
	}()
	time.Sleep(200 * time.Millisecond)
	la.Release()
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	t.Logf("taken over %v after the release", time.Since(t0)-200*time.Millisecond)
	if _, err := a.WriteAt([]byte("old holder"), 0); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("the old holder's write after the hand-off: %v", err)
	}
	if _, err := b.WriteAt([]byte("new holder"), 0); err != nil {
		t.Fatal(err)
	}
	if err := la.TryAcquire(); !errors.As(err, &iu) || iu.Holder.Socket != "/run/b.sock" {
		t.Fatalf("old holder's claim: %v", err)
	}
	lb.Close()
	if err := la.TryAcquire(); err != nil {
		t.Fatal(err)
	}
	if _, err := open(t, n, Options{ReadOnly: true}).NewLock(LockOptions{}); err == nil {
		t.Fatal("a lock on a read-only image")
	}
}

// holderChild is a subprocess that takes an image's lock, writes and
// flushes, says so and waits to be killed. HEMD_RBD_HOLDER_NORECORD removes
// its holder record (a holder on another host, or one that is not hemd).
func holderChild() {
	n, err := ParseName(os.Getenv("HEMD_RBD_HOLDER"))
	if err == nil {
		var m *Image
		c := Cluster{Conf: os.Getenv("HEMD_RBD_CONF"), ID: os.Getenv("HEMD_RBD_ID"), Keyring: os.Getenv("HEMD_RBD_KEYRING")}
		if m, err = Open(context.Background(), c, n, Options{}); err == nil {
			o := LockOptions{Socket: "/run/child.sock"}
			if d, err := time.ParseDuration(os.Getenv("HEMD_RBD_HOLDER_LEASE")); err == nil {
				o.Lease = d
			}
			l, _ := m.NewLock(o)
			if err = l.TryAcquire(); err == nil {
				if os.Getenv("HEMD_RBD_HOLDER_NORECORD") != "" {
					m.removeMetadata(holderKey)
				}
				if _, err = m.WriteAt([]byte("written by the child"), 0); err == nil {
					err = m.Flush()
				}
			}
		}
	}
	if err != nil {
		fmt.Println("error", err)
		os.Exit(1)
	}
	fmt.Println("holding", n)
	time.Sleep(time.Hour)
}

// startHolder runs holderChild on n and waits until it holds the lock;
// env is added to the child's environment.
func startHolder(t *testing.T, n Name, noRecord bool, env ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "HEMD_RBD_HOLDER="+n.String(), "HEMD_RBD_CONF="+cluster.Conf,
		"HEMD_RBD_ID="+cluster.ClientID, "HEMD_RBD_KEYRING="+cluster.Keyring)
	cmd.Env = append(cmd.Env, env...)
	if noRecord {
		cmd.Env = append(cmd.Env, "HEMD_RBD_HOLDER_NORECORD=1")
	}
	out, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "holding") {
		t.Fatalf("holder: %q %v", line, err)
	}
	return cmd
}

// TestDeadHolder: a holder killed with SIGKILL on this host is found dead
// by its record; its successor breaks the lock at once, and the dead
// client is blocklisted.
func TestDeadHolder(t *testing.T) {
	n := newImage(t, 4<<20)
	child := startHolder(t, n, false)
	m := open(t, n, Options{})
	l, _ := m.NewLock(LockOptions{})
	var iu *storage.InUseError
	if err := l.TryAcquire(); !errors.As(err, &iu) || iu.Holder.PID != child.Process.Pid {
		t.Fatalf("claim while the child lives: %v", err)
	}
	owners, _ := m.lockOwners()
	child.Process.Kill()
	child.Wait()
	t0 := time.Now()
	if err := l.TryAcquire(); err != nil {
		t.Fatal(err)
	}
	t.Logf("the dead holder's lock broken and taken in %v", time.Since(t0).Round(time.Millisecond))
	if time.Since(t0) > 5*time.Second {
		t.Fatalf("took %v", time.Since(t0))
	}
	p := make([]byte, 20)
	if _, err := m.ReadAt(p, 0); err != nil || string(p) != "written by the child" {
		t.Fatalf("the child's flushed write: %q %v", p, err)
	}
	if _, err := m.WriteAt([]byte("successor"), 0); err != nil {
		t.Fatal(err)
	}
	bl, err := cluster.Ceph(context.Background(), "osd", "blocklist", "ls")
	if err != nil || len(owners) != 1 || !strings.Contains(string(bl), strings.TrimPrefix(owners[0], "v2:")) {
		t.Fatalf("the dead client %v is not blocklisted: %v\n%s", owners, err, bl)
	}
}

// TestDeadHolderLeaseRunOut: a holder that stops (SIGSTOP: a host that
// hangs or died elsewhere; its process on this host looks alive and its
// watch has not timed out yet) stops renewing its lease; once the lease has
// run out its successor breaks the lock, blocklisting it, well before the
// watch times out (10 s in the test cluster).
func TestDeadHolderLeaseRunOut(t *testing.T) {
	n := newImage(t, 4<<20)
	child := startHolder(t, n, false, "HEMD_RBD_HOLDER_LEASE=1s")
	m := open(t, n, Options{})
	l, _ := m.NewLock(LockOptions{})
	time.Sleep(1500 * time.Millisecond) // longer than the lease, renewed all along
	var iu *storage.InUseError
	if err := l.TryAcquire(); !errors.As(err, &iu) || iu.Holder.PID != child.Process.Pid {
		t.Fatalf("claim while the holder renews its lease: %v", err)
	}
	owners, _ := m.lockOwners()
	if err := child.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
	defer cancel()
	if err := l.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("the stopped holder's lock broken and taken %v after it stopped", time.Since(t0).Round(time.Millisecond))
	if d := time.Since(t0); d < 500*time.Millisecond || d > 5*time.Second {
		t.Fatalf("taken %v after the holder stopped: want its lease (1 s), not its watch (10 s)", d)
	}
	bl, err := cluster.Ceph(context.Background(), "osd", "blocklist", "ls")
	if err != nil || len(owners) != 1 || !strings.Contains(string(bl), strings.TrimPrefix(owners[0], "v2:")) {
		t.Fatalf("the stopped client %v is not blocklisted: %v\n%s", owners, err, bl)
	}
	if _, err := m.WriteAt([]byte("successor"), 0); err != nil {
		t.Fatal(err)
	}
}

// TestDeadHolderNoRecord: a dead holder that left no record (on another
// host, say) is found dead when its watch on the image times out (10 s in
// the test cluster), and its lock is broken then.
func TestDeadHolderNoRecord(t *testing.T) {
	n := newImage(t, 4<<20)
	child := startHolder(t, n, true)
	m := open(t, n, Options{})
	l, _ := m.NewLock(LockOptions{})
	err := l.TryAcquire()
	if err == nil || !errors.Is(err, storage.ErrInUse) || !strings.Contains(err.Error(), "no holder record") {
		t.Fatalf("claim while the child lives: %v", err)
	}
	child.Process.Kill()
	child.Wait()
	t0 := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := l.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("the dead holder's lock taken %v after the kill", time.Since(t0).Round(time.Millisecond))
}
