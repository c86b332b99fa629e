package storage

import (
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Grow makes the store at least size bytes, durably: a regular file is
// extended (sparse) and synced; a block device must have been grown by its
// owner (lvextend, a SAN, ...), and its new size is read. It never shrinks.
func (s *File) Grow(size int64) error {
	if s.opts.ReadOnly {
		return fmt.Errorf("grow %s: %w", s.path, os.ErrPermission)
	}
	if size < 0 {
		return fmt.Errorf("grow %s to %d bytes: negative size", s.path, size)
	}
	if s.blockDv {
		var sz uint64
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(s.fd), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&sz))); e != 0 {
			return fmt.Errorf("grow %s: size of block device: %w", s.path, e)
		}
		s.size.Store(int64(sz))
		if int64(sz) < size {
			return fmt.Errorf("grow %s: the block device has %d bytes, %d are needed: grow the device first", s.path, sz, size)
		}
		return nil
	}
	if size <= s.Size() {
		return nil
	}
	if err := s.f.Truncate(size); err != nil {
		return fmt.Errorf("grow %s: %w", s.path, err)
	}
	// The new size is metadata: fsync, not fdatasync, makes it durable.
	if err := s.f.Sync(); err != nil {
		return fmt.Errorf("grow %s: sync: %w", s.path, err)
	}
	s.size.Store(size)
	return nil
}

// Grow makes the section size bytes long, growing its file as needed.
func (s *Section) Grow(size int64) error {
	if size < s.Size() {
		return fmt.Errorf("grow section of %s to %d bytes: it has %d", s.f.Path(), size, s.Size())
	}
	if err := s.f.Grow(s.base + size); err != nil {
		return err
	}
	s.size.Store(size)
	return nil
}
