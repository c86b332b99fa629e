package guestmem

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"
)

func memfd(t *testing.T, size int64) int {
	fd, err := unix.MemfdCreate("g", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	unix.Ftruncate(fd, size)
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

func TestTranslate(t *testing.T) {
	tbl, err := NewTable([]Region{
		{GuestPhysAddr: 0, Size: 1 << 20, UserAddr: 0x10000000},
		{GuestPhysAddr: 4 << 20, Size: 1 << 20, UserAddr: 0x20000000, MmapOffset: 4096},
	}, []int{memfd(t, 1<<20), memfd(t, 1<<20+4096)})
	if err != nil {
		t.Fatal(err)
	}
	defer tbl.Unmap()
	cases := []struct {
		gpa, n uint64
		ok     bool
	}{
		{0, 16, true}, {1<<20 - 16, 16, true}, {1<<20 - 8, 16, false}, {1 << 20, 1, false},
		{4 << 20, 1 << 20, true}, {5<<20 - 1, 2, false}, {1<<64 - 1, 2, false}, {3 << 20, 0, false},
	}
	for _, c := range cases {
		b, err := tbl.Slice(c.gpa, c.n)
		if c.ok != (err == nil) || (err == nil && uint64(len(b)) != c.n) {
			t.Errorf("Slice(%#x, %d): %d bytes, %v", c.gpa, c.n, len(b), err)
		}
		if err != nil && !errors.Is(err, ErrNotMapped) {
			t.Errorf("Slice(%#x, %d): %v, want ErrNotMapped", c.gpa, c.n, err)
		}
	}
	// Both address spaces name the same bytes.
	g, _ := tbl.Slice(4<<20+8, 4)
	u, _ := tbl.UserSlice(0x20000000+8, 4)
	g[0] = 42
	if u[0] != 42 {
		t.Fatal("guest and front-end addresses do not alias")
	}
	if gpa, ok := tbl.UserToGuest(0x20000010); !ok || gpa != 4<<20+16 {
		t.Fatalf("UserToGuest: %#x %v", gpa, ok)
	}
}

func TestAddRemove(t *testing.T) {
	tbl, err := NewTable([]Region{{Size: 1 << 20, UserAddr: 1 << 30}}, []int{memfd(t, 1<<20)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tbl.With(Region{GuestPhysAddr: 1 << 19, Size: 1 << 20, UserAddr: 2 << 30}, memfd(t, 1<<20)); !errors.Is(err, ErrOverlap) {
		t.Fatalf("overlapping add: %v", err)
	}
	r := Region{GuestPhysAddr: 8 << 20, Size: 1 << 20, UserAddr: 3 << 30}
	t2, err := tbl.With(r, memfd(t, 1<<20))
	if err != nil {
		t.Fatal(err)
	}
	if t2.Len() != 2 {
		t.Fatalf("%d regions", t2.Len())
	}
	t3, unmap, err := t2.Without(r)
	if err != nil {
		t.Fatal(err)
	}
	unmap()
	if _, err := t3.Slice(8<<20, 1); !errors.Is(err, ErrNotMapped) {
		t.Fatalf("removed region still mapped: %v", err)
	}
	if _, _, err := t3.Without(r); !errors.Is(err, ErrNotMapped) {
		t.Fatalf("removing twice: %v", err)
	}
	t3.Unmap()
}
