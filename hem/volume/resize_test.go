package volume

import (
	"errors"
	"strings"
	"testing"
)

// growFile is an in-memory volume file that can grow, and that fails (a
// crash) at its failAt-th operation (Grow, WriteAt or Sync, counted from
// 1): a write at that point is torn, half of it written.
type growFile struct {
	memFile
	ops    int
	failAt int
}

var errCrash = errors.New("crash")

func (g *growFile) op() bool {
	g.ops++
	return g.failAt != 0 && g.ops == g.failAt
}

func (g *growFile) Grow(size int64) error {
	if g.op() {
		return errCrash
	}
	if int(size) > len(g.b) {
		g.b = append(g.b, make([]byte, int(size)-len(g.b))...)
	}
	return nil
}

func (g *growFile) WriteAt(p []byte, off int64) (int, error) {
	if g.op() {
		n, _ := g.memFile.WriteAt(p[:len(p)/2], off)
		return n, errCrash
	}
	return g.memFile.WriteAt(p, off)
}

func (g *growFile) Sync() error {
	if g.op() {
		return errCrash
	}
	return nil
}

// newGrowFile holds a volume of h.SizeBytes.
func newGrowFile(t *testing.T, h *Header) *growFile {
	t.Helper()
	g := &growFile{memFile: memFile{b: make([]byte, h.DataOffset+h.SizeBytes)}}
	if err := Write(&g.memFile, h); err != nil {
		t.Fatal(err)
	}
	return g
}

func TestResizeGrows(t *testing.T) {
	h := goodHeader()
	h.SizeBytes = 64 << 20
	g := newGrowFile(t, h)
	old, nh, err := Resize(g, 96<<20)
	if err != nil {
		t.Fatal(err)
	}
	if old.SizeBytes != 64<<20 || nh.SizeBytes != 96<<20 || nh.Seq != old.Seq+1 {
		t.Fatalf("old %d seq %d, new %d seq %d", old.SizeBytes, old.Seq, nh.SizeBytes, nh.Seq)
	}
	if uint64(len(g.b)) != DataOffset+96<<20 {
		t.Fatalf("storage %d bytes after the resize", len(g.b))
	}
	// Both copies say the new size.
	for i, off := range []int64{0, BackupOffset} {
		c, err := decodeCopy(g.b[off:off+CopySize], uint16(i))
		if err != nil || c.SizeBytes != 96<<20 || c.Seq != nh.Seq {
			t.Fatalf("copy %d: %+v, %v", i, c, err)
		}
	}
	// The same size again changes nothing.
	ops := g.ops
	_, same, err := Resize(g, 96<<20)
	if err != nil || same.Seq != nh.Seq || g.ops != ops {
		t.Fatalf("resize to the same size: seq %d, %d operations, %v", same.Seq, g.ops-ops, err)
	}
}

func TestResizeRefused(t *testing.T) {
	h := goodHeader()
	h.SizeBytes = 64 << 20
	h.DataUnitSize = 4096
	h.BlockSize = 4096
	for _, tc := range []struct {
		name string
		size uint64
		want error
	}{
		{"shrink", 32 << 20, ErrShrink},
		{"not a block multiple", 64<<20 + 512, nil},
		{"zero", 0, nil},
		{"huge", 1 << 63, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := newGrowFile(t, h)
			before := append([]byte(nil), g.b...)
			_, _, err := Resize(g, tc.size)
			if err == nil {
				t.Fatal("resize accepted")
			}
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("error %v, want %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), h.VolumeID) {
				t.Errorf("error %q does not name the volume", err)
			}
			if string(before) != string(g.b) || g.ops != 0 {
				t.Fatalf("a refused resize touched the volume (%d operations)", g.ops)
			}
		})
	}
	// A volume that is still being made does not grow.
	c := goodHeader()
	c.State, c.Operation = StateCreating, &Operation{Kind: OpImport, Source: "/img", SourceSize: 1 << 20}
	if _, _, err := Resize(newGrowFile(t, c), 2<<30); !errors.Is(err, ErrNotAvailable) {
		t.Fatalf("resize of a creating volume: %v", err)
	}
}

// A crash at any point of a resize (grow, write or sync of either copy, a
// write torn in half) leaves a header that says the old size or the new
// one, and storage that holds at least that much.
func TestResizeCrashSafe(t *testing.T) {
	h := goodHeader()
	h.SizeBytes = 8 << 20
	const newSize = 24 << 20
	// Grow, write copy 0, sync, write copy 1, sync: five operations.
	for failAt := 1; failAt <= 5; failAt++ {
		g := newGrowFile(t, h)
		old, _ := Read(&g.memFile)
		g.failAt = failAt
		if _, _, err := Resize(g, newSize); !errors.Is(err, errCrash) {
			t.Fatalf("crash at operation %d: %v", failAt, err)
		}
		got, err := Read(&g.memFile)
		if err != nil {
			t.Fatalf("crash at operation %d: header unreadable: %v", failAt, err)
		}
		switch {
		case got.Seq == old.Seq && got.SizeBytes == old.SizeBytes:
		case got.Seq == old.Seq+1 && got.SizeBytes == newSize:
		default:
			t.Fatalf("crash at operation %d: header says %d bytes at seq %d (was %d at %d)", failAt, got.SizeBytes, got.Seq, old.SizeBytes, old.Seq)
		}
		if uint64(len(g.b)) < got.DataOffset+got.SizeBytes {
			t.Fatalf("crash at operation %d: header says %d bytes, storage holds %d", failAt, got.SizeBytes, len(g.b))
		}
		// The resize run again completes.
		g.failAt = 0
		if _, nh, err := Resize(g, newSize); err != nil || nh.SizeBytes != newSize {
			t.Fatalf("resize after the crash at %d: %v", failAt, err)
		}
	}
}
