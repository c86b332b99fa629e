package datakey

import (
	"bytes"
	"context"
	"errors"
	"os"
	"strings"
	"testing"
)

func testKey() []byte {
	k := make([]byte, 64)
	for i := range k {
		k[i] = byte(i*7 + 1)
	}
	return k
}

func unwrapWith(key []byte) Unwrap {
	return func(_ context.Context, dst []byte) error { copy(dst, key); return nil }
}

func TestLifecycle(t *testing.T) {
	k := New(4096)
	if k.State() != Detached {
		t.Fatal("new key not detached")
	}
	x, err := k.Attach(context.Background(), unwrapWith(testKey()))
	if err != nil {
		t.Fatal(err)
	}
	if k.State() != Attached {
		t.Fatalf("state %v", k.State())
	}
	if _, err := k.Attach(context.Background(), unwrapWith(testKey())); !errors.Is(err, ErrAttached) {
		t.Fatalf("second attach: %v", err)
	}
	// The page is locked and holds the schedules, whose first round keys
	// are the key halves.
	if !bytes.Contains(k.page, testKey()[:16]) || !bytes.Contains(k.page, testKey()[32:48]) {
		t.Fatal("the key schedules are not in the locked page")
	}
	if !locked(t, k.page) {
		t.Fatal("key page is not locked")
	}
	buf := make([]byte, 4096)
	x.Encrypt(buf, buf, 7)
	released := false
	k.release = func(p []byte) {
		if !bytes.Equal(p, make([]byte, len(p))) {
			t.Error("key page not zero when released")
		}
		released = true
		releasePage(p)
	}
	k.Zeroize()
	if k.State() != Detached || k.page != nil || !released {
		t.Fatal("not detached after Zeroize")
	}
	// Re-attach unwraps again and gives the same cipher.
	x2, err := k.Attach(context.Background(), unwrapWith(testKey()))
	if err != nil {
		t.Fatal(err)
	}
	buf2 := make([]byte, 4096)
	x2.Encrypt(buf2, buf2, 7)
	if !bytes.Equal(buf, buf2) {
		t.Fatal("re-attached key encrypts differently")
	}
	k.Zeroize()
}

// A failed unwrap or a bad key leaves the key detached.
func TestAttachFailures(t *testing.T) {
	k := New(512)
	boom := errors.New("key is disabled")
	if _, err := k.Attach(context.Background(), func(context.Context, []byte) error { return boom }); !errors.Is(err, boom) {
		t.Fatalf("unwrap error: %v", err)
	}
	if k.State() != Detached {
		t.Fatal("not detached after a failed unwrap")
	}
	same := bytes.Repeat([]byte{9}, 64)
	if _, err := k.Attach(context.Background(), unwrapWith(same)); err == nil {
		t.Fatal("equal key halves accepted")
	}
	if k.State() != Detached || k.page != nil {
		t.Fatal("not detached after a refused key")
	}
}

// locked reports whether the page containing p is mlocked, not dumped and not
// inherited by a fork (VmFlags lo, dd, dc in
// /proc/self/smaps).
func locked(t *testing.T, p []byte) bool {
	b, err := os.ReadFile("/proc/self/smaps")
	if err != nil {
		t.Fatal(err)
	}
	addr := uintptrOf(p)
	var inRange bool
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 0 && strings.Contains(f[0], "-") && !strings.HasSuffix(f[0], ":") {
			var lo, hi uint64
			if _, err := fmtSscanf(f[0], &lo, &hi); err == nil {
				inRange = uint64(addr) >= lo && uint64(addr) < hi
			}
			continue
		}
		if inRange && strings.HasPrefix(line, "VmFlags:") {
			return strings.Contains(line, " lo") && strings.Contains(line, " dd") && strings.Contains(line, " dc")
		}
	}
	return false
}

// TestLocked: NewLocked's memory is locked, out of dumps and forks, whole
// pages; Free wipes it and may be called twice.
func TestLocked(t *testing.T) {
	l, err := NewLocked(5000)
	if err != nil {
		t.Fatal(err)
	}
	b := l.Bytes()
	if len(b) != 8192 {
		t.Fatalf("%d bytes, want two pages", len(b))
	}
	copy(b, testKey())
	if !locked(t, b) {
		t.Fatal("memory is not locked, MADV_DONTDUMP and MADV_DONTFORK")
	}
	l.Free()
	l.Free()
	if l.Bytes() != nil {
		t.Fatal("Bytes after Free")
	}
	if _, err := NewLocked(0); !errors.Is(err, ErrLock) {
		t.Fatalf("NewLocked(0): %v", err)
	}
}
