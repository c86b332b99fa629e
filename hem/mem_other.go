//go:build !unix

package hem

import "sync"

// ownedMem is key memory hem allocated itself. Without mmap it is a Go heap
// allocation, which the garbage collector does not move.
type ownedMem struct {
	b    []byte
	once sync.Once
}

func allocKeyMem(n int) (*ownedMem, error) {
	return &ownedMem{b: make([]byte, n)}, nil
}

// free zeroes the memory; it is safe to call more than once.
func (m *ownedMem) free() {
	m.once.Do(func() { clear(m.b) })
}
