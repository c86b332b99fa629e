//go:build cgo && !norbd

package rbd

import (
	"encoding/json"
	"errors"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/hemd/hemd/storage"
)

// TestReadClaim: readers share an image and keep a writer out, naming one
// of them; once they let go the writer takes it, and then a reader is kept
// out, naming the writer.
func TestReadClaim(t *testing.T) {
	n := newImage(t, 4<<20)
	r1, r2, w := open(t, n, Options{ReadOnly: true}), open(t, n, Options{ReadOnly: true}), open(t, n, Options{})
	c1, err := r1.NewReadClaim(LockOptions{Socket: "/run/r1.sock"})
	if err != nil {
		t.Fatal(err)
	}
	c2, _ := r2.NewReadClaim(LockOptions{Socket: "/run/r2.sock"})
	lw, _ := w.NewLock(LockOptions{Socket: "/run/w.sock"})
	if err := c1.TryAcquire(); err != nil {
		t.Fatal(err)
	}
	if err := c2.TryAcquire(); err != nil {
		t.Fatalf("a second reader: %v", err)
	}
	err = lw.TryAcquire()
	var iu *storage.InUseError
	if !errors.As(err, &iu) || iu.Holder == nil || !iu.Holder.Shared || !strings.HasPrefix(iu.Holder.Socket, "/run/r") {
		t.Fatalf("a writer while two readers serve: %v", err)
	}
	if !strings.Contains(err.Error(), "read-only since") {
		t.Fatalf("the refusal does not say the holder reads: %v", err)
	}
	if lw.Held() || w.InUse() || r1.InUse() {
		t.Fatal("the refused writer kept the exclusive lock")
	}
	c1.Release()
	if err := lw.TryAcquire(); err == nil {
		t.Fatal("a writer while one reader serves")
	}
	c2.Release()
	if err := lw.TryAcquire(); err != nil {
		t.Fatalf("the writer once the readers let go: %v", err)
	}
	c3, _ := r1.NewReadClaim(LockOptions{Socket: "/run/r3.sock"})
	err = c3.TryAcquire()
	if !errors.As(err, &iu) || iu.Holder == nil || iu.Holder.Shared || iu.Holder.Socket != "/run/w.sock" {
		t.Fatalf("a reader while the writer serves: %v", err)
	}
	if c3.Held() {
		t.Fatal("a refused reader holds its claim")
	}
	lw.Release()
	if err := c3.TryAcquire(); err != nil {
		t.Fatalf("a reader once the writer let go: %v", err)
	}
	c3.Release()
	if rs, err := r1.readers(nil); err != nil || len(rs) != 0 {
		t.Fatalf("readers after every release: %v %v", rs, err)
	}
}

// TestReadClaimDeadReader: a writer breaks the claim of a reader on this
// host that has exited at once, and waits for the lease of one elsewhere.
func TestReadClaimDeadReader(t *testing.T) {
	n := newImage(t, 4<<20)
	r, w := open(t, n, Options{ReadOnly: true}), open(t, n, Options{})
	lw, _ := w.NewLock(LockOptions{})

	exited := exec.Command("true")
	if err := exited.Run(); err != nil {
		t.Fatal(err)
	}
	dead, _ := r.NewReadClaim(LockOptions{})
	dead.cookie = cookieFor(t, storage.Holder{Program: "hemd", PID: exited.Process.Pid, Host: hostname(t), Shared: true})
	if err := dead.lock(false); err != nil {
		t.Fatal(err)
	}
	if err := lw.TryAcquire(); err != nil {
		t.Fatalf("a writer after a reader on this host exited: %v", err)
	}
	lw.Release()

	remote, _ := r.NewReadClaim(LockOptions{Lease: 4 * time.Second})
	remote.cookie = cookieFor(t, storage.Holder{Program: "hemd", PID: 1, Host: "elsewhere.example", Shared: true})
	if err := remote.lock(false); err != nil {
		t.Fatal(err)
	}
	err := lw.TryAcquire()
	var iu *storage.InUseError
	if !errors.As(err, &iu) || iu.Holder == nil || iu.Holder.Host != "elsewhere.example" {
		t.Fatalf("a writer while a reader elsewhere holds its lease: %v", err)
	}
	if !strings.Contains(err.Error(), "elsewhere.example") {
		t.Fatalf("the refusal does not name the reader's host: %v", err)
	}
	time.Sleep(4500 * time.Millisecond) // the lease, never renewed, ends
	if err := lw.TryAcquire(); err != nil {
		t.Fatalf("a writer after the reader's lease ended: %v", err)
	}
}

func cookieFor(t *testing.T, h storage.Holder) string {
	b, err := json.Marshal(h)
	if err != nil {
		t.Fatal(err)
	}
	return string(b) + " test"
}

func hostname(t *testing.T) string {
	return storage.Self("", true).Host
}
