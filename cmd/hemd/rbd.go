//go:build cgo && !norbd

package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"sync"

	"github.com/hemd/hemd/hem/volume"
	"github.com/hemd/hemd/storage"
	"github.com/hemd/hemd/storage/rbd"
	"github.com/hemd/hemd/vhost/blk"
)

// rbdBuilt says this hemd can serve volumes on Ceph RBD.
const rbdBuilt = true

// rbdLocate returns the location of image (or snapshot) n on cluster c.
func rbdLocate(n rbd.Name, c rbd.Cluster) (volume.Location, error) {
	return &rbdLocation{name: n, cluster: c.WithDefaults()}, nil
}

// rbdLocation is a volume on an RBD image, or a snapshot of one.
type rbdLocation struct {
	name    rbd.Name
	cluster rbd.Cluster

	mu     sync.Mutex
	stores []*rbdStore // opened here: Remove closes them first
}

func (l *rbdLocation) String() string { return l.name.String() }

// SnapshotID is the RBD snapshot's name: the hemd snapshot id.
func (l *rbdLocation) SnapshotID() string { return l.name.Snap }

func (l *rbdLocation) track(img *rbd.Image) *rbdStore {
	st := &rbdStore{Image: img}
	l.mu.Lock()
	l.stores = append(l.stores, st)
	l.mu.Unlock()
	return st
}

// Open opens the image (a snapshot read-only). Only the cluster's timeout
// bounds it: a Location has no context.
func (l *rbdLocation) Open(readOnly bool) (volume.Store, error) {
	img, err := rbd.Open(context.Background(), l.cluster, l.name, rbd.Options{ReadOnly: readOnly})
	if err != nil {
		return nil, err
	}
	return l.track(img), nil
}

// Create makes the image under a temporary name beside it
// (IMAGE.creating-…), calls init on it, flushes it and renames it into place;
// an image already there is never replaced. A killed Create leaves at most
// the temporary image.
func (l *rbdLocation) Create(size int64, init func(volume.Store) error) (volume.Store, error) {
	if l.name.Snap != "" {
		return nil, fmt.Errorf("%s is a snapshot: a volume is made in an image", l.name)
	}
	conn, err := rbd.Connect(context.Background(), l.cluster)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	if ok, err := conn.Exists(l.name); err != nil {
		return nil, err
	} else if ok {
		return nil, fmt.Errorf("%s: %w", l.name, fs.ErrExist)
	}
	tmp := l.tempName()
	if err := conn.Create(tmp, size); err != nil {
		return nil, err
	}
	return l.finish(conn, tmp, init)
}

// tempName is a new temporary name beside the image.
func (l *rbdLocation) tempName() rbd.Name {
	var b [6]byte
	rand.Read(b[:])
	t := l.name
	t.Image += ".creating-" + hex.EncodeToString(b[:])
	return t
}

// finish opens the new image tmp, calls init on it, flushes it and renames
// it into place; on failure the image goes.
func (l *rbdLocation) finish(conn *rbd.Conn, tmp rbd.Name, init func(volume.Store) error) (volume.Store, error) {
	img, err := conn.Open(context.Background(), tmp, rbd.Options{})
	if err != nil {
		conn.Remove(tmp)
		return nil, err
	}
	st := &rbdStore{Image: img}
	fail := func(err error) (volume.Store, error) {
		img.Close()
		if rerr := conn.Remove(tmp); rerr != nil {
			err = fmt.Errorf("%w (and %s stays: %v)", err, tmp, rerr)
		}
		return nil, err
	}
	if err := init(st); err != nil {
		return fail(err)
	}
	if err := img.Flush(); err != nil {
		return fail(err)
	}
	if err := img.Rename(l.name); err != nil {
		return fail(err)
	}
	l.mu.Lock()
	l.stores = append(l.stores, st)
	l.mu.Unlock()
	return st, nil
}

// Remove closes what was opened here (an image with watchers cannot go),
// then removes the image.
func (l *rbdLocation) Remove() error {
	l.mu.Lock()
	stores := l.stores
	l.stores = nil
	l.mu.Unlock()
	for _, st := range stores {
		st.Close()
	}
	conn, err := rbd.Connect(context.Background(), l.cluster)
	if err != nil {
		return err
	}
	defer conn.Close()
	return conn.Remove(l.name)
}

// Clone makes the volume a copy-on-write clone of parent, an RBD snapshot
// on the same cluster: constant time whatever the size. Another parent is
// not for cloning (ok false): the data is copied then.
func (l *rbdLocation) Clone(parent volume.Store, init func(volume.Store) error) (volume.Store, bool, error) {
	ps, ok := parent.(*rbdStore)
	if !ok || ps.Name().Snap == "" || ps.Conn().Cluster() != l.cluster || l.name.Snap != "" {
		return nil, false, nil
	}
	conn := ps.Conn()
	if ok, err := conn.Exists(l.name); err != nil {
		return nil, false, err
	} else if ok {
		return nil, false, fmt.Errorf("%s: %w", l.name, fs.ErrExist)
	}
	tmp := l.tempName()
	if err := conn.Clone(ps.Name(), tmp); err != nil {
		return nil, false, err
	}
	st, err := l.finish(conn, tmp, init)
	return st, err == nil, err
}

// rbdStore is an open image as a volume's store.
type rbdStore struct {
	*rbd.Image
}

// Sync writes back what librbd caches.
func (s *rbdStore) Sync() error { return s.Flush() }

// Claim takes the image's exclusive lock for the process (until Close), or
// says who holds it.
func (s *rbdStore) Claim() error {
	l, err := s.NewLock(rbd.LockOptions{})
	if err != nil {
		return err
	}
	return l.TryAcquire()
}

// rbdSnapshot takes an RBD snapshot of the volume at name (a point in time,
// no data copied, taken by the client that writes the image if one does)
// and returns the snapshot's name. Only an available hemd volume is
// snapshotted.
func rbdSnapshot(ctx context.Context, name rbd.Name, c rbd.Cluster, snapID string) (rbd.Name, *volume.Header, error) {
	img, err := rbd.Open(ctx, c, name, rbd.Options{})
	if err != nil {
		return rbd.Name{}, nil, err
	}
	defer img.Close()
	h, err := volume.Read(img)
	if errors.Is(err, volume.ErrNotVolume) {
		return rbd.Name{}, nil, fmt.Errorf("%s is a raw image without a hemd header: only hemd volumes have snapshots", name)
	}
	if err != nil {
		return rbd.Name{}, nil, fmt.Errorf("volume %s: %w", name, err)
	}
	if err := h.Servable(name.String()); err != nil {
		return rbd.Name{}, nil, fmt.Errorf("snapshot: %w", err)
	}
	sn, err := img.Snapshot(snapID)
	return sn, h, err
}

// rbdSnapshotCopy gives a snapshot copied into an RBD image (a volume whose
// id is a snapshot id) an RBD snapshot of that id, so that volumes can be
// cloned from it: rbd:POOL/IMAGE@snap-….
func rbdSnapshotCopy(loc volume.Location, snapID string) (string, error) {
	l, ok := loc.(*rbdLocation)
	if !ok {
		return loc.String(), nil
	}
	img, err := rbd.Open(context.Background(), l.cluster, l.name, rbd.Options{})
	if err != nil {
		return "", err
	}
	defer img.Close()
	sn, err := img.Snapshot(snapID)
	if err != nil {
		return "", err
	}
	return sn.String(), nil
}

// rbdBacking is an RBD image served.
type rbdBacking struct{ *rbd.Image }

var errRBDNoFile = errors.New("an RBD image is not a file")

func (rbdBacking) Stat() (os.FileInfo, error) { return nil, errRBDNoFile }

func (b rbdBacking) StartCOW(int64, int64, io.WriterAt, storage.COWOptions) (*storage.COW, error) {
	return nil, fmt.Errorf("%s is on Ceph RBD: its snapshots are RBD snapshots, point in time and without a copy: hemd snapshot create %s", b.Name(), b.Name())
}

// rbdSnapshotReader is the claim of an RBD snapshot served read-only: none
// is needed, a snapshot does not change under its readers.
type rbdSnapshotReader struct{}

func (rbdSnapshotReader) Acquire(context.Context) error { return nil }
func (rbdSnapshotReader) TryAcquire() error             { return nil }
func (rbdSnapshotReader) Release()                      {}
func (rbdSnapshotReader) Held() bool                    { return true }
func (rbdSnapshotReader) Close() error                  { return nil }

// openRBDBacking opens the RBD image of a served volume, within the
// cluster's timeout, and its claim (not taken).
func openRBDBacking(ctx context.Context, v volumeConfig, sock string, log *slog.Logger) (backing, claim, error) {
	n, err := rbd.ParseName(v.Path)
	if err != nil {
		return nil, nil, err
	}
	if n.Snap != "" && !v.ReadOnly {
		return nil, nil, fmt.Errorf("%s is a snapshot: it is served read-only (--read-only, read_only = true)", n)
	}
	v.cephSettings.fillFromEnv() // what a config file left unset
	img, err := rbd.Open(ctx, v.cephSettings.cluster(), n, rbd.Options{ReadOnly: v.ReadOnly, Discard: v.Discard})
	if err != nil {
		return nil, nil, err
	}
	if n.Snap != "" {
		return rbdBacking{img}, rbdSnapshotReader{}, nil
	}
	if v.ReadOnly {
		// Readers share the image and keep writers out (storage/rbd/share.go).
		rc, err := img.NewReadClaim(rbd.LockOptions{Socket: sock, Log: log})
		if err != nil {
			img.Close()
			return nil, nil, err
		}
		return rbdBacking{img}, rc, nil
	}
	lock, err := img.NewLock(rbd.LockOptions{Socket: sock, Log: log})
	if err != nil {
		img.Close()
		return nil, nil, err
	}
	return rbdBacking{img}, lock, nil
}

// rbdSection returns the window [off, off+size) of an RBD image served,
// with librbd's asynchronous I/O for a queue's batch; ok is false if st is
// not an RBD image.
func rbdSection(st backing, off, size int64) (area blk.Store, ok bool, err error) {
	b, ok := st.(rbdBacking)
	if !ok {
		return nil, false, nil
	}
	sec, err := rbd.NewSection(b.Image, off, size)
	if err != nil {
		return nil, true, err
	}
	return rbdArea{sec}, true, nil
}

// rbdArea is the data area of a volume on RBD. Its queues stream (each
// request in flight until librbd completes it: 1.03-1.17x of batches,
// storage/rbd/TODO.md); batches serve where a stream cannot open.
type rbdArea struct{ *rbd.Section }

func (a rbdArea) NewBatch(depth int) (blk.Batch, error) { return a.Section.NewBatch(depth), nil }

func (a rbdArea) NewStream(depth int) (blk.Stream, error) {
	s, err := a.Section.NewStream(depth)
	if err != nil {
		return nil, err
	}
	return s, nil
}

// Both serve their queues as streams.
var (
	_ blk.StreamStore = rbdArea{}
	_ blk.StreamStore = rbdBacking{}
)

// NewStream makes the whole image (a raw one) a blk.StreamStore.
func (b rbdBacking) NewStream(depth int) (blk.Stream, error) {
	s, err := b.Image.NewStream(depth)
	if err != nil {
		return nil, err
	}
	return s, nil
}

// NewBatch makes the whole image (a raw one, without a hemd header) a
// blk.BatchStore.
func (b rbdBacking) NewBatch(depth int) (blk.Batch, error) { return b.Image.NewBatch(depth), nil }
