package storage

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func newFile(t *testing.T, size int64, opts Options) (*File, string) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		t.Fatal(err)
	}
	f, err := Open(p, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f, p
}

func TestVectoredIO(t *testing.T) {
	for _, direct := range []bool{false, true} {
		f, p := newFile(t, 1<<20, Options{Direct: direct})
		// Buffers of odd sizes (not O_DIRECT-aligned) and aligned ones.
		bufs := [][]byte{bytes.Repeat([]byte{1}, 100), bytes.Repeat([]byte{2}, 412), bytes.Repeat([]byte{3}, 4096)}
		if n, err := f.WriteAtv(bufs, 4096); err != nil || n != 4608 {
			t.Fatalf("direct=%v write: %d %v", direct, n, err)
		}
		got := [][]byte{make([]byte, 4000), make([]byte, 608)}
		if n, err := f.ReadAtv(got, 4096); err != nil || n != 4608 {
			t.Fatalf("direct=%v read: %d %v", direct, n, err)
		}
		if !bytes.Equal(append(got[0], got[1]...), bytes.Join(bufs, nil)) {
			t.Fatalf("direct=%v: read back differs", direct)
		}
		if err := f.Flush(); err != nil {
			t.Fatal(err)
		}
		b, _ := os.ReadFile(p)
		if !bytes.Equal(b[4096:4096+4608], bytes.Join(bufs, nil)) {
			t.Fatalf("direct=%v: file content differs", direct)
		}
	}
}

// More buffers than one preadv takes (IOV_MAX) are split over several calls.
func TestManyBuffers(t *testing.T) {
	f, _ := newFile(t, 1<<20, Options{})
	var bufs [][]byte
	for i := 0; i < 3000; i++ {
		bufs = append(bufs, []byte{byte(i), byte(i >> 8)})
	}
	if n, err := f.WriteAtv(bufs, 0); err != nil || n != 6000 {
		t.Fatalf("write: %d %v", n, err)
	}
	got := make([]byte, 6000)
	f.ReadAt(got, 0)
	if !bytes.Equal(got, bytes.Join(bufs, nil)) {
		t.Fatal("content differs")
	}
}

func TestReadPastEndIsZero(t *testing.T) {
	f, p := newFile(t, 8192, Options{})
	os.Truncate(p, 4096) // the file shrank under the store
	b := bytes.Repeat([]byte{9}, 8192)
	if _, err := f.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b, make([]byte, 8192)) {
		t.Fatal("bytes past the end are not zero")
	}
}

func TestPunchAndZero(t *testing.T) {
	f, _ := newFile(t, 1<<20, Options{})
	if err := f.Punch(0, 4096); !errors.Is(err, ErrDiscardOff) {
		t.Fatalf("punch without discard: %v", err)
	}
	f, _ = newFile(t, 1<<20, Options{Discard: true})
	f.WriteAt(bytes.Repeat([]byte{7}, 65536), 0)
	if err := f.Punch(4096, 8192); err != nil {
		t.Fatal(err)
	}
	if err := f.ZeroRange(32768, 4096); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 65536)
	f.ReadAt(got, 0)
	want := bytes.Repeat([]byte{7}, 65536)
	clear(want[4096 : 4096+8192])
	clear(want[32768 : 32768+4096])
	if !bytes.Equal(got, want) {
		t.Fatal("punched / zeroed ranges wrong")
	}
}

func TestReadOnlyAndErrors(t *testing.T) {
	_, p := newFile(t, 4096, Options{})
	f, err := Open(p, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(make([]byte, 512), 0); !errors.Is(err, os.ErrPermission) {
		t.Fatalf("write read-only: %v", err)
	}
	if _, err := Open(filepath.Join(t.TempDir(), "missing"), Options{}); err == nil {
		t.Fatal("opened a missing file")
	}
	if _, err := Open(t.TempDir(), Options{}); err == nil || !strings.Contains(err.Error(), "is a directory") {
		t.Fatalf("opened a directory: %v", err)
	}
	if _, err := Open("/dev/null", Options{}); err == nil || !strings.Contains(err.Error(), "not a regular file or block device") {
		t.Fatalf("opened a character device: %v", err)
	}
}

// A block device (a loop device over a file) is sized by ioctl and served
// like a file.
func TestBlockDevice(t *testing.T) {
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
	f, err := Open(dev, Options{Discard: true})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if f.Size() != 4<<20 {
		t.Fatalf("size %d", f.Size())
	}
	want := bytes.Repeat([]byte{5}, 4096)
	if _, err := f.WriteAt(want, 8192); err != nil {
		t.Fatal(err)
	}
	if err := f.ZeroRange(8192, 4096); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	f.ReadAt(got, 8192)
	if !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatal("zeroed range on block device not zero")
	}
}

func TestSection(t *testing.T) {
	f, p := newFile(t, 3<<20, Options{})
	s, err := NewSection(f, 1<<20, 2<<20)
	if err != nil {
		t.Fatal(err)
	}
	if s.Size() != 2<<20 {
		t.Fatalf("size %d", s.Size())
	}
	s.WriteAtv([][]byte{[]byte("section")}, 10)
	b, _ := os.ReadFile(p)
	if string(b[1<<20+10:1<<20+17]) != "section" {
		t.Fatal("section write not at base+off")
	}
	if _, err := NewSection(f, 2<<20, 2<<20); err == nil {
		t.Fatal("section beyond the file accepted")
	}
}
