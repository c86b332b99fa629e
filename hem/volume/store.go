package volume

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// Where a volume lives. A volume is a header region and a data area in one
// store: a file (or block device) by default, or any other block store (a
// Ceph RBD image) through a Location its caller supplies; the format and the
// operations are the same on all of them.

// Store is the storage of one volume.
type Store interface {
	io.ReaderAt
	io.WriterAt
	// Sync makes everything written so far durable.
	Sync() error
	Close() error
}

// Location is where a volume is, or is to be made.
type Location interface {
	// String names the volume in messages and in the commands they
	// suggest: a path, or rbd:POOL/IMAGE.
	String() string
	// Open opens the volume's store; a missing store is fs.ErrNotExist.
	Open(readOnly bool) (Store, error)
	// Create makes a new store of size bytes and calls init on it before
	// the store appears at the location: a process killed during Create
	// leaves nothing there, or a store that init completed. An existing
	// store is never replaced (fs.ErrExist).
	Create(size int64, init func(Store) error) (Store, error)
	// Remove removes the store (whose Store may still be open).
	Remove() error
}

// Optional abilities of a Store.
type (
	// claimer is a Store that claims its volume for the process, as the
	// operations that fill a volume do (see Volume.lock): Claim fails at
	// once if another process holds the volume; the claim ends when the
	// store closes or the process dies. InUse reports whether another
	// process holds it.
	claimer interface {
		Claim() error
		InUse() bool
	}
	// dataRanger is a Store that can tell the ranges of [off, off+n) that
	// hold data (the rest reads as zeros), so that copies skip holes. fn
	// gets offsets relative to off.
	dataRanger interface {
		DataRanges(off, n int64, fn func(off, n int64) error) error
	}
	// datasyncer is a Store whose data can be made durable more cheaply
	// than with Sync (fdatasync rather than fsync).
	datasyncer interface {
		Datasync() error
	}
	// sizer is a Store that knows its size.
	sizer interface {
		Size() (int64, error)
	}
)

// Cloner is a Location that can make a volume from a snapshot without
// copying its data (an RBD clone of an RBD snapshot): Clone makes a new
// store at the location that reads as parent does, in constant time, and
// calls init on it before it appears there. ok is false, with nothing done,
// when it cannot clone from parent (another kind of store, another
// cluster): the data is copied then.
type Cloner interface {
	Clone(parent Store, init func(Store) error) (st Store, ok bool, err error)
}

// SnapshotLocation is a Location that can be a snapshot native to its store
// (an RBD snapshot of an image that holds a volume): the volume as it was,
// with the snapshot's id. Opened, it reads as a snapshot: its header's id is
// SnapshotID, its parent none. SnapshotID is "" for a location that is not a
// snapshot.
type SnapshotLocation interface {
	Location
	SnapshotID() string
}

// FileAt returns the location of a volume file (or block device) at path.
func FileAt(path string) Location { return fileLocation(path) }

type fileLocation string

func (l fileLocation) String() string { return string(l) }

func (l fileLocation) Open(readOnly bool) (Store, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(string(l), flag, 0)
	if err != nil {
		return nil, err
	}
	return &fileStore{f}, nil
}

// Create makes the file and calls init on it under a temporary name beside
// it, then renames it into place (never replacing a file there) and syncs
// the directory.
func (l fileLocation) Create(size int64, init func(Store) error) (Store, error) {
	path := string(l)
	if _, err := os.Lstat(path); err == nil {
		return nil, fmt.Errorf("%s: %w", path, fs.ErrExist)
	}
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, filepath.Base(path)+".creating-*")
	if err != nil {
		return nil, err
	}
	tmp := f.Name()
	fail := func(err error) (Store, error) {
		f.Close()
		os.Remove(tmp)
		return nil, err
	}
	st := &fileStore{f}
	if err := f.Truncate(size); err != nil {
		return fail(err)
	}
	if err := init(st); err != nil {
		return fail(err)
	}
	if err := renameNoReplace(tmp, path); err != nil {
		return fail(err)
	}
	if err := syncDir(dir); err != nil {
		f.Close()
		os.Remove(path)
		return nil, err
	}
	return st, nil
}

func (l fileLocation) Remove() error { return os.Remove(string(l)) }

// fileStore is a volume file.
type fileStore struct{ *os.File }

// Claim takes an open file description lock (F_OFD_SETLK) on the whole
// file, the kind hemd serve claims a volume with.
func (s *fileStore) Claim() error {
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: io.SeekStart} // Start 0, Len 0: the whole file
	if err := unix.FcntlFlock(s.Fd(), unix.F_OFD_SETLK, &lk); err != nil {
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES) {
			return errClaimed
		}
		return err
	}
	return nil
}

// errClaimed is a claim refused because another process holds the volume.
var errClaimed = errors.New("in use by another process")

func (s *fileStore) InUse() bool {
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: io.SeekStart}
	if err := unix.FcntlFlock(s.Fd(), unix.F_OFD_GETLK, &lk); err != nil {
		return false
	}
	return lk.Type != unix.F_UNLCK
}

func (s *fileStore) Datasync() error { return unix.Fdatasync(int(s.Fd())) }

// Size is the file's size; a block device's is not known here (0, nil).
func (s *fileStore) Size() (int64, error) {
	st, err := s.Stat()
	if err != nil || !st.Mode().IsRegular() {
		return 0, err
	}
	return st.Size(), nil
}

// DataRanges finds data with SEEK_DATA/SEEK_HOLE, aligned to 4 KiB; where
// the filesystem cannot tell, the whole range is data.
func (s *fileStore) DataRanges(base, size int64, fn func(off, n int64) error) error {
	fd := int(s.Fd())
	end := base + size
	for pos := base; pos < end; {
		data, err := unix.Seek(fd, pos, unix.SEEK_DATA)
		if err == unix.ENXIO {
			return nil // only a hole is left
		}
		if err != nil {
			return fn(pos-base, end-pos)
		}
		if data >= end {
			return nil
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil || hole > end {
			hole = end
		}
		data &^= 4095
		if data < pos {
			data = pos
		}
		if err := fn(data-base, hole-data); err != nil {
			return err
		}
		pos = hole
	}
	return nil
}

// datasync makes st's data durable.
func datasync(st Store) error {
	if d, ok := st.(datasyncer); ok {
		return d.Datasync()
	}
	return st.Sync()
}

// forData calls fn for each range of [base, base+size) of st that holds
// data, as offsets relative to base; a store that cannot tell has data
// everywhere.
func forData(st Store, base, size int64, fn func(off, n int64) error) error {
	if d, ok := st.(dataRanger); ok {
		return d.DataRanges(base, size, fn)
	}
	return fn(0, size)
}
