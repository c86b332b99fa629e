package storage

import (
	"fmt"
	"sync/atomic"
)

// Section is a window of a File: offset 0 of the section is offset base of
// the file. An encrypted volume's data area is a section past its header.
type Section struct {
	f    *File
	base int64
	size atomic.Int64 // grows with Grow (grow.go)
}

// NewSection returns the window [base, base+size) of f.
func NewSection(f *File, base, size int64) (*Section, error) {
	if base < 0 || size <= 0 || base+size < base || base+size > f.Size() {
		return nil, fmt.Errorf("section %d+%d of %s (%d bytes): out of range", base, size, f.Path(), f.Size())
	}
	s := &Section{f: f, base: base}
	s.size.Store(size)
	return s, nil
}

// Size returns the section's size.
func (s *Section) Size() int64 { return s.size.Load() }

// ReadAtv reads bufs at off within the section.
func (s *Section) ReadAtv(bufs [][]byte, off int64) (int, error) {
	return s.f.ReadAtv(bufs, s.base+off)
}

// WriteAtv writes bufs at off within the section.
func (s *Section) WriteAtv(bufs [][]byte, off int64) (int, error) {
	return s.f.WriteAtv(bufs, s.base+off)
}

// Flush flushes the file.
func (s *Section) Flush() error { return s.f.Flush() }

// Punch frees a range of the section.
func (s *Section) Punch(off, n int64) error { return s.f.Punch(s.base+off, n) }

// ZeroRange zeroes a range of the section.
func (s *Section) ZeroRange(off, n int64) error { return s.f.ZeroRange(s.base+off, n) }
