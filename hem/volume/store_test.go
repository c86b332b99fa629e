package volume

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"path/filepath"
	"sync"
	"testing"
)

// memPool is a block store with native snapshots and clones (a stand-in
// for an RBD pool): named images of bytes, a snapshot a frozen copy.
type memPool struct {
	mu     sync.Mutex
	images map[string]*memImage
	clones int // Clone calls that cloned
	copies int // bytes written to images
}

type memImage struct {
	data    []byte
	claimed bool
	synced  bool
}

func newMemPool() *memPool { return &memPool{images: map[string]*memImage{}} }

// memLoc is an image (snap "") or a snapshot ("img@snap") of the pool.
type memLoc struct {
	p          *memPool
	name, snap string
}

func (l memLoc) key() string {
	if l.snap != "" {
		return l.name + "@" + l.snap
	}
	return l.name
}

func (l memLoc) String() string { return "mem:" + l.key() }

func (l memLoc) SnapshotID() string { return l.snap }

func (l memLoc) Open(readOnly bool) (Store, error) {
	l.p.mu.Lock()
	defer l.p.mu.Unlock()
	im := l.p.images[l.key()]
	if im == nil {
		return nil, fs.ErrNotExist
	}
	return &memStore{l: l, im: im, ro: readOnly || l.snap != ""}, nil
}

func (l memLoc) Create(size int64, init func(Store) error) (Store, error) {
	return l.make(make([]byte, size), init)
}

func (l memLoc) make(data []byte, init func(Store) error) (Store, error) {
	l.p.mu.Lock()
	if l.p.images[l.key()] != nil {
		l.p.mu.Unlock()
		return nil, fs.ErrExist
	}
	l.p.mu.Unlock()
	// Made aside, put in place once init is done.
	st := &memStore{l: l, im: &memImage{data: data}}
	if err := init(st); err != nil {
		return nil, err
	}
	l.p.mu.Lock()
	defer l.p.mu.Unlock()
	l.p.images[l.key()] = st.im
	return st, nil
}

func (l memLoc) Remove() error {
	l.p.mu.Lock()
	defer l.p.mu.Unlock()
	delete(l.p.images, l.key())
	return nil
}

// Clone clones a snapshot of this pool; anything else is not its to clone.
func (l memLoc) Clone(parent Store, init func(Store) error) (Store, bool, error) {
	ps, ok := parent.(*memStore)
	if !ok || ps.l.p != l.p || ps.l.snap == "" {
		return nil, false, nil
	}
	st, err := l.make(append([]byte(nil), ps.im.data...), init)
	if err == nil {
		l.p.clones++
	}
	return st, err == nil, err
}

// snapshot freezes image name as name@snap.
func (p *memPool) snapshot(name, snap string) memLoc {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.images[name+"@"+snap] = &memImage{data: append([]byte(nil), p.images[name].data...)}
	return memLoc{p: p, name: name, snap: snap}
}

type memStore struct {
	l      memLoc
	im     *memImage
	ro     bool
	closed bool
	mine   bool // this store claimed the image
}

func (s *memStore) ReadAt(b []byte, off int64) (int, error) {
	if s.closed {
		return 0, fs.ErrClosed
	}
	if off >= int64(len(s.im.data)) {
		return 0, io.EOF
	}
	n := copy(b, s.im.data[off:])
	if n < len(b) {
		return n, io.EOF
	}
	return n, nil
}

func (s *memStore) WriteAt(b []byte, off int64) (int, error) {
	if s.ro || s.closed {
		return 0, fs.ErrPermission
	}
	if off+int64(len(b)) > int64(len(s.im.data)) {
		return 0, errors.New("past the end")
	}
	s.l.p.copies += len(b)
	s.im.synced = false
	return copy(s.im.data[off:], b), nil
}

func (s *memStore) Sync() error { s.im.synced = true; return nil }

func (s *memStore) Close() error {
	if s.mine {
		s.im.claimed = false
	}
	s.closed = true
	return nil
}

func (s *memStore) Claim() error {
	if s.im.claimed {
		return errClaimed
	}
	s.im.claimed, s.mine = true, true
	return nil
}

func (s *memStore) InUse() bool { return s.im.claimed && !s.mine }

// TestOtherStore runs the volume operations on a store that is not a file:
// create, import, export, claims; a native snapshot reads as a snapshot;
// a volume from it is cloned (nothing copied) where the store can, copied
// into a file otherwise; a snapshot copy re-encrypts into the store with
// progress; a volume imported from a file into the store and back exports
// the same bytes.
func TestOtherStore(t *testing.T) {
	ctx := context.Background()
	kms := newFakeKMS("k1", "k2")
	p := newMemPool()
	vl := memLoc{p: p, name: "vol"}
	v, err := CreateAt(ctx, kms, vl, CreateOptions{Size: 2 << 20, KeyID: "k1"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := CreateAt(ctx, kms, vl, CreateOptions{Size: 2 << 20, KeyID: "k1"}); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("create over an existing volume: %v", err)
	}
	img := image(1<<20 + 512)
	if err := v.Import(ctx, kms, bytes.NewReader(img), int64(len(img)), ImportOptions{Source: "img"}); err != nil {
		t.Fatal(err)
	}
	if !p.images["vol"].synced {
		t.Fatal("import did not sync the store")
	}
	if bytes.Contains(p.images["vol"].data, []byte("HEMD PLAINTEXT MARKER")) {
		t.Fatal("plaintext in the store")
	}
	// The creator holds the claim: another opener sees it in use, and its
	// import is refused.
	other, err := OpenAt(vl, false)
	if err != nil {
		t.Fatal(err)
	}
	if !other.InUse() {
		t.Fatal("InUse while the creator holds the volume")
	}
	if err := other.Import(ctx, kms, bytes.NewReader(img), int64(len(img)), ImportOptions{Source: "img"}); err == nil {
		t.Fatal("a second import while the volume is claimed")
	}
	other.Close()
	v.Close()

	// A native snapshot opens as a snapshot of the volume.
	sl := p.snapshot("vol", "snap-00000000000000001")
	s, err := OpenAt(sl, true)
	if err != nil {
		t.Fatal(err)
	}
	if s.Head.VolumeID != "snap-00000000000000001" || s.Path() != "mem:vol@snap-00000000000000001" {
		t.Fatalf("snapshot view: %s at %s", s.Head.VolumeID, s.Path())
	}
	s.Close()
	if _, err := OpenAt(p.snapshot("vol", "daily"), true); err == nil {
		t.Fatal("a snapshot whose name is no snapshot id opened")
	}

	// A volume from it in the same pool: cloned, available, nothing copied.
	before := p.copies
	c, err := CreateAt(ctx, kms, memLoc{p: p, name: "clone"}, CreateOptions{ParentAt: sl})
	if err != nil {
		t.Fatal(err)
	}
	if p.clones != 1 || p.copies-before > 2*CopySize {
		t.Fatalf("clone: %d clones, %d bytes written", p.clones, p.copies-before)
	}
	if !c.Head.Available() || c.Head.ParentSnapshot != "snap-00000000000000001" || !ValidVolumeID(c.Head.VolumeID) || c.Head.VolumeID == s.Head.VolumeID {
		t.Fatalf("clone header %+v", c.Head)
	}
	if got := export(t, kms, c); !bytes.Equal(got[:len(img)], img) {
		t.Fatal("the clone does not read the snapshot's data")
	}
	c.Close()

	// Into a file: copied.
	dir := t.TempDir()
	f, err := CreateAt(ctx, kms, FileAt(filepath.Join(dir, "from-snap")), CreateOptions{ParentAt: sl})
	if err != nil {
		t.Fatal(err)
	}
	if got := export(t, kms, f); !bytes.Equal(got[:len(img)], img) {
		t.Fatal("the file volume from the snapshot differs")
	}
	f.Close()

	// A copy under another key into the store, with progress.
	src, _ := OpenAt(sl, true)
	defer src.Close()
	var last, total int64
	cp, err := src.CopySnapshotTo(ctx, kms, memLoc{p: p, name: "copy"}, "k2", "", func(d, t int64) { last, total = d, t })
	if err != nil {
		t.Fatal(err)
	}
	if last != total || total != 2<<20 {
		t.Fatalf("progress ended at %d of %d", last, total)
	}
	if cp.Head.KeyID != "arn:k2" || bytes.Equal(cp.Head.WrappedDEK, src.Head.WrappedDEK) || !ValidSnapshotID(cp.Head.VolumeID) {
		t.Fatalf("copy header %+v", cp.Head)
	}
	if got := export(t, kms, cp); !bytes.Equal(got[:len(img)], img) {
		t.Fatal("the copy differs")
	}
	cp.Close()

	// A failed create leaves nothing behind.
	_, err = CreateAt(ctx, kms, memLoc{p: p, name: "bad"}, CreateOptions{Size: 1000, KeyID: "k1"})
	if err == nil || p.images["bad"] != nil {
		t.Fatalf("bad create: %v", err)
	}
	if _, err := OpenAt(memLoc{p: p, name: "none"}, true); !errors.Is(err, fs.ErrNotExist) || !bytes.Contains([]byte(err.Error()), []byte("mem:none")) {
		t.Fatalf("open of a missing volume: %v", err)
	}
}
