// Package storage is hemd's backing store: a regular file or a block device
// read and written with positioned, vectored I/O. It sees only what hemd
// writes (ciphertext for an encrypted volume) and knows nothing of volumes.
package storage

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Options say how a backing file is opened.
type Options struct {
	ReadOnly bool
	// Direct opens the file with O_DIRECT as well; aligned I/O bypasses the
	// page cache, and I/O that is not aligned falls back to the cached path.
	Direct bool
	// Discard lets Punch free space (as dm-crypt's allow_discards).
	Discard bool
}

// ErrDiscardOff means discard was not enabled for this store.
var ErrDiscardOff = errors.New("discard is not enabled for this volume")

// File is an open backing file or block device. Its methods are safe for
// concurrent use.
type File struct {
	f       *os.File
	fd      int
	dfd     int          // O_DIRECT fd or -1
	size    atomic.Int64 // grows with Grow (grow.go)
	blockDv bool
	opts    Options
	path    string

	// gate is held shared by every write for as long as it runs, and
	// exclusively for the instant a copy-before-write snapshot starts
	// (StartCOW): that instant is the snapshot's point in time.
	gate  sync.RWMutex
	cows  atomic.Pointer[[]*COW] // running snapshots; nil: none
	cowMu sync.Mutex             // serializes changes to cows

	view mapView // Map's read-only mapping (mapped.go)
}

// Open opens a regular file or a block device.
func Open(path string, opts Options) (*File, error) {
	flag := os.O_RDWR
	if opts.ReadOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("open backing store: %w", err) // names the path
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open backing store: %w", err)
	}
	s := &File{f: f, fd: int(f.Fd()), dfd: -1, opts: opts, path: path}
	switch {
	case st.Mode().IsRegular():
		s.size.Store(st.Size())
	case st.Mode()&os.ModeDevice != 0 && st.Mode()&os.ModeCharDevice == 0:
		s.blockDv = true
		var sz uint64
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(s.fd), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&sz))); e != 0 {
			f.Close()
			return nil, fmt.Errorf("open backing store %s: size of block device: %w", path, e)
		}
		s.size.Store(int64(sz))
	default:
		f.Close()
		return nil, fmt.Errorf("open backing store %s: not a regular file or block device", path)
	}
	if opts.Direct {
		dfd, err := unix.Open(path, flag|unix.O_DIRECT|unix.O_CLOEXEC, 0)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("open backing store %s with O_DIRECT: %w", path, err)
		}
		s.dfd = dfd
	}
	return s, nil
}

// Size returns the size in bytes.
func (s *File) Size() int64 { return s.size.Load() }

// Path returns the path the store was opened from.
func (s *File) Path() string { return s.path }

// Stat returns the file's (or block device's) information, for telling
// whether a path names the file that is open.
func (s *File) Stat() (os.FileInfo, error) { return s.f.Stat() }

// ReadOnly reports whether the store was opened read-only.
func (s *File) ReadOnly() bool { return s.opts.ReadOnly }

// CanDiscard reports whether Punch may free space.
func (s *File) CanDiscard() bool { return s.opts.Discard }

// maxIov is the most buffers one preadv/pwritev call takes (IOV_MAX).
const maxIov = 1024

// directAlign is the alignment O_DIRECT needs of addresses, lengths and
// offsets (the logical block size of common devices).
const directAlign = 512

func (s *File) pick(bufs [][]byte, off int64) int {
	if s.dfd < 0 || off%directAlign != 0 {
		return s.fd
	}
	for _, b := range bufs {
		if len(b)%directAlign != 0 || (len(b) > 0 && uintptr(unsafe.Pointer(&b[0]))%directAlign != 0) {
			return s.fd
		}
	}
	return s.dfd
}

// ReadAtv fills bufs from off on. Bytes past the end of the store read as zero.
func (s *File) ReadAtv(bufs [][]byte, off int64) (int, error) {
	fd := s.pick(bufs, off)
	return vio(bufs, off, func(iov [][]byte, o int64) (int, error) {
		n, err := unix.Preadv(fd, iov, o)
		if err == nil && n == 0 {
			// End of file: the rest reads as zeros.
			for _, b := range iov {
				clear(b)
			}
			return total(iov), nil
		}
		return n, err
	})
}

// WriteAtv writes bufs from off on.
func (s *File) WriteAtv(bufs [][]byte, off int64) (int, error) {
	if s.opts.ReadOnly {
		return 0, fmt.Errorf("write %s: %w", s.path, os.ErrPermission)
	}
	s.gate.RLock()
	defer s.gate.RUnlock()
	s.copyBefore(off, int64(total(bufs)))
	return s.writeAtv(bufs, off)
}

// writeAtv is WriteAtv for a caller that holds the gate and has copied
// the range for any snapshot.
func (s *File) writeAtv(bufs [][]byte, off int64) (int, error) {
	fd := s.pick(bufs, off)
	return vio(bufs, off, func(iov [][]byte, o int64) (int, error) { return unix.Pwritev(fd, iov, o) })
}

// ReadAt implements io.ReaderAt.
func (s *File) ReadAt(p []byte, off int64) (int, error) { return s.ReadAtv([][]byte{p}, off) }

// WriteAt implements io.WriterAt.
func (s *File) WriteAt(p []byte, off int64) (int, error) { return s.WriteAtv([][]byte{p}, off) }

func total(bufs [][]byte) int {
	n := 0
	for _, b := range bufs {
		n += len(b)
	}
	return n
}

// vio runs op until every byte of bufs is transferred, resuming after short
// transfers and EINTR, IOV_MAX buffers at a time.
func vio(bufs [][]byte, off int64, op func([][]byte, int64) (int, error)) (int, error) {
	done, owned := 0, false
	for len(bufs) > 0 {
		n, err := op(bufs[:min(len(bufs), maxIov)], off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return done, err
		}
		if n == 0 {
			return done, io.ErrUnexpectedEOF
		}
		done += n
		off += int64(n)
		for len(bufs) > 0 && n >= len(bufs[0]) {
			n -= len(bufs[0])
			bufs = bufs[1:]
		}
		if n > 0 {
			// A short transfer ended inside a buffer: go on from there on a
			// copy, leaving the caller's slice alone (rare).
			if !owned {
				bufs, owned = append([][]byte(nil), bufs...), true
			}
			bufs[0] = bufs[0][n:]
		}
	}
	return done, nil
}

// Flush makes written data durable (fdatasync).
func (s *File) Flush() error {
	if err := unix.Fdatasync(s.fd); err != nil {
		return fmt.Errorf("flush %s: %w", s.path, err)
	}
	return nil
}

// Punch frees the range so that it reads as zeros, if discard is enabled.
func (s *File) Punch(off, n int64) error {
	if !s.opts.Discard {
		return ErrDiscardOff
	}
	if s.opts.ReadOnly {
		return fmt.Errorf("discard %s: %w", s.path, os.ErrPermission)
	}
	s.gate.RLock()
	defer s.gate.RUnlock()
	s.copyBefore(off, n)
	if s.blockDv {
		r := [2]uint64{uint64(off), uint64(n)}
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(s.fd), unix.BLKDISCARD, uintptr(unsafe.Pointer(&r))); e != 0 {
			return fmt.Errorf("discard %s: %w", s.path, e)
		}
		return nil
	}
	if err := unix.Fallocate(s.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n); err != nil {
		return fmt.Errorf("discard %s: %w", s.path, err)
	}
	return nil
}

// ZeroRange makes the range read as zeros, allocating it, without sending
// the zeros through memory where the kernel can do it.
func (s *File) ZeroRange(off, n int64) error {
	if s.opts.ReadOnly {
		return fmt.Errorf("write zeroes %s: %w", s.path, os.ErrPermission)
	}
	s.gate.RLock()
	defer s.gate.RUnlock()
	s.copyBefore(off, n)
	var err error
	if s.blockDv {
		r := [2]uint64{uint64(off), uint64(n)}
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(s.fd), unix.BLKZEROOUT, uintptr(unsafe.Pointer(&r))); e != 0 {
			err = e
		}
	} else {
		err = unix.Fallocate(s.fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	}
	if err == nil {
		return nil
	}
	// Not supported by the filesystem: write the zeros.
	zero := make([]byte, min(n, 1<<20))
	for n > 0 {
		c := min(n, int64(len(zero)))
		if _, werr := s.writeAtv([][]byte{zero[:c]}, off); werr != nil {
			return fmt.Errorf("write zeroes %s: %w", s.path, werr)
		}
		off += c
		n -= c
	}
	return nil
}

// Close flushes and closes the store.
func (s *File) Close() error {
	var err error
	if !s.opts.ReadOnly {
		err = s.Flush()
	}
	if s.dfd >= 0 {
		unix.Close(s.dfd)
		s.dfd = -1
	}
	s.unmap()
	if cerr := s.f.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("close %s: %w", s.path, cerr)
	}
	return err
}
