package volume

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// stopAt is an image that cancels the import (as SIGINT does) or fails
// with err once the import reads at or past offset at.
type stopAt struct {
	r      *bytes.Reader
	at     int64
	cancel context.CancelFunc
	err    error
}

func (s *stopAt) ReadAt(p []byte, off int64) (int, error) {
	if off >= s.at {
		if s.err != nil {
			return 0, s.err
		}
		s.cancel()
	}
	return s.r.ReadAt(p, off)
}

func newImportVolume(t *testing.T, kms KMS, size int) *Volume {
	t.Helper()
	v, err := Create(context.Background(), kms, filepath.Join(t.TempDir(), "v"), CreateOptions{Size: uint64(size), KeyID: "k1",
		Pending: &Operation{Kind: OpImport, Source: "/img", SourceSize: uint64(size)}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	if v.Head.State != StateCreating {
		t.Fatalf("a volume made for an import starts %s", v.Head.State)
	}
	return v
}

func reopen(t *testing.T, v *Volume) *Volume {
	t.Helper()
	v.Close()
	v2, err := Open(v.Path(), false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v2.Close() })
	return v2
}

// An interrupted import stays creating at its last checkpoint, is refused
// for export, resumes only from the same image, and then reads back whole.
func TestImportInterruptedAndResumed(t *testing.T) {
	kms := newFakeKMS("k1")
	const size = 8 << 20
	img := image(size)
	v := newImportVolume(t, kms, size)
	ctx, cancel := context.WithCancel(context.Background())
	src := &stopAt{r: bytes.NewReader(img), at: 5 << 20, cancel: cancel}
	err := v.Import(ctx, kms, src, size, ImportOptions{Source: "/img", CheckpointEvery: 2 << 20})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("interrupted import: %v", err)
	}
	v = reopen(t, v)
	h := v.Head
	if h.State != StateCreating || h.Operation.Kind != OpImport || h.Operation.Done != 6<<20 || h.Operation.SourceSize != size {
		t.Fatalf("after the interruption: %s %+v", h.State, h.Operation)
	}
	if err := h.Servable(v.Path()); !errors.Is(err, ErrNotAvailable) || !strings.Contains(err.Error(), "interrupted at 75 %") {
		t.Fatalf("servable: %v", err)
	}
	if err := v.Export(context.Background(), kms, io.Discard, nil); !errors.Is(err, ErrNotAvailable) {
		t.Fatalf("export of a creating volume: %v", err)
	}
	if _, err := v.Snapshot(context.Background(), filepath.Join(t.TempDir(), "s"), ""); !errors.Is(err, ErrNotAvailable) {
		t.Fatalf("snapshot of a creating volume: %v", err)
	}
	// Another size, or other bytes of the same size, is not the same image:
	// refused, and the checkpoint stays.
	if err := v.Import(context.Background(), kms, bytes.NewReader(img[:size-512]), size-512, ImportOptions{Resume: true}); err == nil ||
		!strings.Contains(err.Error(), "not the same image") {
		t.Fatalf("resume from a shorter image: %v", err)
	}
	other := append([]byte(nil), img...)
	other[5<<20+7] ^= 1 // in the MiB before the checkpoint
	if err := v.Import(context.Background(), kms, bytes.NewReader(other), size, ImportOptions{Resume: true}); !errors.Is(err, errDifferentImage) {
		t.Fatalf("resume from another image: %v", err)
	}
	if v.Head.State != StateCreating || v.Head.Operation.Done != 6<<20 {
		t.Fatalf("a refused resume changed the header: %s %+v", v.Head.State, v.Head.Operation)
	}
	var first int64 = -1
	err = v.Import(context.Background(), kms, bytes.NewReader(img), size, ImportOptions{Resume: true,
		Progress: func(done, _ int64) {
			if first < 0 {
				first = done
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	if first != 7<<20 {
		t.Fatalf("resume started with %d bytes done, want the checkpoint plus a chunk", first)
	}
	v = reopen(t, v)
	if v.Head.State != StateAvailable || v.Head.Operation != nil {
		t.Fatalf("after the resume: %s %+v", v.Head.State, v.Head.Operation)
	}
	if !bytes.Equal(export(t, kms, v), img) {
		t.Fatal("resumed import reads different data")
	}
	if err := v.Import(context.Background(), kms, bytes.NewReader(img), size, ImportOptions{Resume: true}); err == nil ||
		!strings.Contains(err.Error(), "no import to resume") {
		t.Fatalf("resume of an available volume: %v", err)
	}
}

// An import that fails (not interrupted) leaves the volume in state error
// with the reason; a resume after the cause is fixed completes it.
func TestImportFailureIsError(t *testing.T) {
	kms := newFakeKMS("k1")
	const size = 6 << 20
	img := image(size)
	v := newImportVolume(t, kms, size)
	src := &stopAt{r: bytes.NewReader(img), at: 3 << 20, err: errors.New("input/output error")}
	if err := v.Import(context.Background(), kms, src, size, ImportOptions{Source: "/img", CheckpointEvery: 1 << 20}); err == nil {
		t.Fatal("import from a failing image succeeded")
	}
	v = reopen(t, v)
	h := v.Head
	if h.State != StateError || h.Operation.Done != 3<<20 || !strings.Contains(h.Operation.Error, "input/output error") {
		t.Fatalf("after the failure: %s %+v", h.State, h.Operation)
	}
	if err := h.Servable(v.Path()); !strings.Contains(err.Error(), "in state error") || !strings.Contains(err.Error(), "input/output error") {
		t.Fatalf("servable: %v", err)
	}
	if err := v.Import(context.Background(), kms, bytes.NewReader(img), size, ImportOptions{Resume: true}); err != nil {
		t.Fatal(err)
	}
	if v.Head.State != StateAvailable || !bytes.Equal(export(t, kms, v), img) {
		t.Fatalf("resumed after an error: %s", v.Head.State)
	}
	// An image that is shorter than it said is an error too, not a
	// volume padded with stale data.
	v2 := newImportVolume(t, kms, size)
	err := v2.Import(context.Background(), kms, bytes.NewReader(img[:size/2]), size, ImportOptions{Source: "/img"})
	if err == nil || !strings.Contains(err.Error(), "changed size") || v2.Head.State != StateError {
		t.Fatalf("short image: %v, state %s", err, v2.Head.State)
	}
}

// Importing into an existing available volume makes it creating for the
// time of the import; one held by another writer is refused.
func TestImportIntoExisting(t *testing.T) {
	kms := newFakeKMS("k1")
	dir := t.TempDir()
	v, err := Create(context.Background(), kms, filepath.Join(dir, "v"), CreateOptions{Size: 2 << 20, KeyID: "k1"})
	if err != nil {
		t.Fatal(err)
	}
	if v.Head.State != StateAvailable {
		t.Fatalf("a blank volume is %s", v.Head.State)
	}
	// Create holds the lock while the volume is open: a second writer is
	// refused, and InUse says so.
	w, err := Open(v.Path(), false)
	if err != nil {
		t.Fatal(err)
	}
	if !w.InUse() {
		t.Fatal("InUse is false while another open holds the lock")
	}
	img := image(1 << 20)
	if err := w.Import(context.Background(), kms, bytes.NewReader(img), 1<<20, ImportOptions{Source: "/img"}); err == nil ||
		!strings.Contains(err.Error(), "in use by another process") {
		t.Fatalf("second writer: %v", err)
	}
	v.Close()
	if w.InUse() {
		t.Fatal("InUse after the holder closed")
	}
	var during State
	err = w.Import(context.Background(), kms, bytes.NewReader(img), 1<<20, ImportOptions{Source: "/img",
		Progress: func(int64, int64) {
			h, _ := Read(w.f)
			during = h.State
		}})
	if err != nil {
		t.Fatal(err)
	}
	if during != StateCreating || w.Head.State != StateAvailable {
		t.Fatalf("state during the import %s, after %s", during, w.Head.State)
	}
	w.Close()
}

// Snapshots, copies and restores are made creating, end available, refuse
// a source that is not available, and leave no file when they fail.
func TestCopiesAndStates(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	kms := newFakeKMS("k1", "k2")
	v, err := Create(ctx, kms, filepath.Join(dir, "v"), CreateOptions{Size: 2 << 20, KeyID: "k1"})
	if err != nil {
		t.Fatal(err)
	}
	img := image(2 << 20)
	if err := v.Import(ctx, kms, bytes.NewReader(img), int64(len(img)), ImportOptions{Source: "/img"}); err != nil {
		t.Fatal(err)
	}
	snap, err := v.Snapshot(ctx, filepath.Join(dir, "s"), "")
	if err != nil {
		t.Fatal(err)
	}
	cp, err := snap.CopySnapshot(ctx, kms, filepath.Join(dir, "c"), "k2", "")
	if err != nil {
		t.Fatal(err)
	}
	r, err := Create(ctx, kms, filepath.Join(dir, "r"), CreateOptions{Parent: cp.Path()})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(export(t, kms, r), img) {
		t.Fatal("restore of a copy reads different data")
	}
	for _, x := range []*Volume{snap, cp, r} {
		x.Close()
		y, err := Open(x.Path(), true)
		if err != nil {
			t.Fatal(err)
		}
		if y.Head.State != StateAvailable || y.Head.Operation != nil {
			t.Fatalf("%s: %s %+v", y.Head.VolumeID, y.Head.State, y.Head.Operation)
		}
		y.Close()
	}
	// A copy that fails half made (the source key does not unwrap) leaves
	// nothing behind, not even a temporary file.
	src, err := Open(snap.Path(), true)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if _, err := src.CopySnapshot(ctx, noDecrypt{kms}, filepath.Join(dir, "bad"), "k2", ""); err == nil {
		t.Fatal("copy with a key that does not unwrap succeeded")
	}
	// A snapshot made creating (as a killed one is) is refused as a source.
	cs, _ := os.ReadFile(snap.Path())
	broken := filepath.Join(dir, "creating-snap")
	os.WriteFile(broken, cs, 0o600)
	f, _ := os.OpenFile(broken, os.O_RDWR, 0)
	h, _ := Read(f)
	h.State, h.Operation = StateCreating, &Operation{Kind: OpSnapshot, Source: v.Head.VolumeID, SourceSize: h.SizeBytes}
	if err := Write(f, h); err != nil {
		t.Fatal(err)
	}
	f.Close()
	bs, err := Open(broken, true)
	if err != nil {
		t.Fatal(err)
	}
	defer bs.Close()
	if _, err := bs.CopySnapshot(ctx, kms, filepath.Join(dir, "c2"), "k2", ""); !errors.Is(err, ErrNotAvailable) {
		t.Fatalf("copy of a creating snapshot: %v", err)
	}
	if _, err := Create(ctx, kms, filepath.Join(dir, "r2"), CreateOptions{Parent: broken}); !errors.Is(err, ErrNotAvailable) {
		t.Fatalf("restore from a creating snapshot: %v", err)
	}
	entries, _ := os.ReadDir(dir)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if strings.Join(names, " ") != "c creating-snap r s v" {
		t.Fatalf("files left: %v", names)
	}
}

// ExportFile writes beside its target and renames: the target is the whole
// plaintext or absent, never a part.
func TestExportFile(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	kms := newFakeKMS("k1")
	v, err := Create(ctx, kms, filepath.Join(dir, "v"), CreateOptions{Size: 2 << 20, KeyID: "k1"})
	if err != nil {
		t.Fatal(err)
	}
	img := image(2 << 20)
	if err := v.Import(ctx, kms, bytes.NewReader(img), int64(len(img)), ImportOptions{Source: "/img"}); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out.raw")
	if err := v.ExportFile(ctx, kms, out, nil); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(out); !bytes.Equal(got, img) {
		t.Fatal("export differs")
	}
	if err := v.ExportFile(ctx, kms, out, nil); err == nil || !strings.Contains(err.Error(), "exists") {
		t.Fatalf("export over an existing file: %v", err)
	}
	// Cancelled half way: no target, no partial file.
	cctx, cancel := context.WithCancel(ctx)
	w := filepath.Join(dir, "cancelled.raw")
	err = v.ExportFile(cctx, kms, w, func(done, _ int64) {
		if done >= 1<<20 {
			cancel()
		}
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled export: %v", err)
	}
	if m, _ := filepath.Glob(filepath.Join(dir, "cancelled.raw*")); len(m) != 0 {
		t.Fatalf("cancelled export left %v", m)
	}
}

// noDecrypt is a KMS whose Decrypt fails.
type noDecrypt struct{ *fakeKMS }

func (noDecrypt) Decrypt(context.Context, []byte, map[string]string, []byte) (string, error) {
	return "", errors.New("DisabledException")
}
