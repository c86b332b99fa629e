//go:build unix

package hem

import (
	"sync"

	"golang.org/x/sys/unix"
)

// ownedMem is key memory hem allocated itself: an anonymous private
// mapping, outside the Go heap, so the garbage collector never copies it.
type ownedMem struct {
	b    []byte
	once sync.Once
}

func allocKeyMem(n int) (*ownedMem, error) {
	size := (n + unix.Getpagesize() - 1) &^ (unix.Getpagesize() - 1)
	b, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANON)
	if err != nil {
		return nil, err
	}
	return &ownedMem{b: b}, nil
}

// free zeroes and unmaps the memory; it is safe to call more than once.
func (m *ownedMem) free() {
	m.once.Do(func() {
		clear(m.b)
		_ = unix.Munmap(m.b)
	})
}
