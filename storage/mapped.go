package storage

import (
	"fmt"
	"os"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A mapped view: the file mapped read-only, so that a read whose pages are
// in the page cache is served straight from them, without a system call to
// copy them (an encrypted volume's reads are decrypted from the page cache
// into guest memory: one pass over the data instead of the kernel's copy and
// then the decryption in place). Pages that are not resident are never
// touched through the mapping (a major fault would stall the queue's thread
// on the disk): those reads go the usual way.

// mapView is a File's read-only mapping of its first len(b) bytes.
type mapView struct {
	mu sync.RWMutex // held shared while a caller reads the mapping
	b  []byte
}

// mapPageSize is the page size mincore reports in.
var mapPageSize = os.Getpagesize()

// mapMaxPages bounds a read served from the mapping: its residency vector
// lives on the stack.
const mapMaxPages = 256

// Map maps the file read-only for ViewMapped. A store opened with O_DIRECT
// is not mapped (its writes bypass the page cache the mapping reads). The
// mapping covers the size at the time; later growth is read the usual way.
func (s *File) Map() error {
	if s.opts.Direct {
		return fmt.Errorf("map %s: opened with O_DIRECT", s.path)
	}
	size := s.Size()
	if size <= 0 || int64(int(size)) != size {
		return fmt.Errorf("map %s: size %d", s.path, size)
	}
	b, err := unix.Mmap(s.fd, 0, int(size), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("map %s: %w", s.path, err)
	}
	// The kernel's readahead on faults is for sequential readers: hemd
	// never faults pages in through the mapping.
	_ = unix.Madvise(b, unix.MADV_RANDOM)
	s.view.mu.Lock()
	old := s.view.b
	s.view.b = b
	s.view.mu.Unlock()
	if old != nil {
		_ = unix.Munmap(old)
	}
	return nil
}

// ViewMapped calls fn with the n bytes at off as the page cache holds them,
// if the file is mapped and every page of the range is resident; it reports
// whether it did. fn must not keep the slice.
func (s *File) ViewMapped(off int64, n int, fn func([]byte)) bool {
	v := &s.view
	v.mu.RLock()
	defer v.mu.RUnlock()
	if v.b == nil || n <= 0 || off < 0 || off+int64(n) > int64(len(v.b)) {
		return false
	}
	first := off &^ int64(mapPageSize-1)
	pages := (off + int64(n) - first + int64(mapPageSize) - 1) / int64(mapPageSize)
	if pages > mapMaxPages {
		return false
	}
	var vec [mapMaxPages]byte
	if !resident(v.b[first:off+int64(n)], vec[:pages]) {
		return false
	}
	fn(v.b[off : off+int64(n)])
	return true
}

// resident reports whether every page of b (page aligned) is in memory.
func resident(b []byte, vec []byte) bool {
	_, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), uintptr(unsafe.Pointer(&vec[0])))
	if e != 0 {
		return false
	}
	for _, p := range vec {
		if p&1 == 0 {
			return false
		}
	}
	return true
}

// unmap drops the mapping (Close).
func (s *File) unmap() {
	s.view.mu.Lock()
	defer s.view.mu.Unlock()
	if s.view.b != nil {
		_ = unix.Munmap(s.view.b)
		s.view.b = nil
	}
}

// ViewMapped is File.ViewMapped within the section.
func (s *Section) ViewMapped(off int64, n int, fn func([]byte)) bool {
	if off < 0 || off+int64(n) > s.Size() {
		return false
	}
	return s.f.ViewMapped(s.base+off, n, fn)
}
