package storage

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// TestViewMapped: the mapping shows what was written through the file, at
// the section's offsets; ranges past the mapping (the file grew) or not
// mapped at all are refused; an O_DIRECT store is not mapped.
func TestViewMapped(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if f.ViewMapped(0, 4096, func([]byte) {}) {
		t.Fatal("a view before Map")
	}
	want := bytes.Repeat([]byte("mapped!"), 1000)
	if _, err := f.WriteAt(want, 8192+100); err != nil {
		t.Fatal(err)
	}
	if err := f.Map(); err != nil {
		t.Fatal(err)
	}
	sec, err := NewSection(f, 8192, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	var got []byte
	if !sec.ViewMapped(100, len(want), func(b []byte) { got = append(got, b...) }) || !bytes.Equal(got, want) {
		t.Fatalf("section view: %q...", got[:min(len(got), 16)])
	}
	// Written after Map: the same page cache.
	if _, err := f.WriteAt([]byte("later"), 8192+100); err != nil {
		t.Fatal(err)
	}
	if !sec.ViewMapped(100, 5, func(b []byte) { got = append(got[:0], b...) }) || string(got) != "later" {
		t.Fatalf("a write after Map not seen: %q", got)
	}
	if sec.ViewMapped(64<<10-10, 20, func([]byte) {}) {
		t.Fatal("a view past the section's end")
	}
	if err := f.Grow(2 << 20); err != nil {
		t.Fatal(err)
	}
	if f.ViewMapped(1<<20, 4096, func([]byte) {}) {
		t.Fatal("a view past the mapping (the file grew after Map)")
	}
	if f.ViewMapped(0, mapMaxPages*mapPageSize+1, func([]byte) {}) {
		t.Fatal("a view larger than mapMaxPages")
	}
	d, err := Open(path, Options{Direct: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := d.Map(); err == nil {
		t.Fatal("an O_DIRECT store mapped")
	}
}
