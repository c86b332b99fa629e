//go:build cgo && !norbd

package rbd

import (
	"bytes"
	"context"
	"testing"
)

// A section of an image grows with its image (rbd_resize): reads and writes
// reach the new end, what was written stays, the image opened again has the
// new size, and shrinking is refused.
func TestSectionGrow(t *testing.T) {
	const base, size, grown = 1 << 20, 4 << 20, 8 << 20
	n := newImage(t, base+size)
	m := open(t, n, Options{})
	sec, err := NewSection(m, base, size)
	if err != nil {
		t.Fatal(err)
	}
	old := fill(1, 4096)
	if _, err := sec.WriteAtv([][]byte{old}, size-4096); err != nil {
		t.Fatal(err)
	}
	if _, err := sec.WriteAtv([][]byte{fill(2, 4096)}, size); err == nil {
		t.Fatal("write past the section's end accepted before Grow")
	}
	if err := sec.Grow(size - 4096); err == nil {
		t.Fatal("shrink accepted")
	}
	if err := sec.Grow(grown); err != nil {
		t.Fatal(err)
	}
	if sec.Size() != grown || m.Size() != base+grown {
		t.Fatalf("after Grow: section %d bytes, image %d; want %d and %d", sec.Size(), m.Size(), grown, base+grown)
	}
	tail := fill(3, 4096)
	if _, err := sec.WriteAtv([][]byte{tail}, grown-4096); err != nil {
		t.Fatalf("write at the new end: %v", err)
	}
	got := make([]byte, 4096)
	for _, c := range []struct {
		off  int64
		want []byte
	}{{size - 4096, old}, {grown - 4096, tail}, {size, make([]byte, 4096)}} {
		if _, err := sec.ReadAtv([][]byte{got}, c.off); err != nil || !bytes.Equal(got, c.want) {
			t.Fatalf("read at %d after Grow: %v, equal %v", c.off, err, bytes.Equal(got, c.want))
		}
	}
	m2, err := Open(context.Background(), testCluster(), n, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Close()
	if m2.Size() != base+grown {
		t.Fatalf("image opened again: %d bytes, want %d", m2.Size(), base+grown)
	}
}
