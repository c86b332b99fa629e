package vhost

import (
	"fmt"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// logPageSize is the granule of the dirty log (VHOST_LOG_PAGE): one bit per
// 4 KiB page of guest physical memory.
const logPageSize = 0x1000

// dirtyLog is the migration dirty log the front-end shares with
// SET_LOG_BASE: bit p set means guest page p was written by the back-end.
// Queue goroutines mark pages while the session goroutine may replace the
// log (a resize), so marks hold the read lock and the swap the write lock.
// on is true while VHOST_F_LOG_ALL is negotiated and a log is mapped.
type dirtyLog struct {
	on      atomic.Bool
	logAll  atomic.Bool // VHOST_F_LOG_ALL negotiated
	mu      sync.RWMutex
	mapping []byte // whole mmap of the log fd
	bits    []byte // mapping[offset:offset+size]
	// outside counts marks that fell past the end of the log: the front-end
	// sized it too small, and those pages may migrate stale.
	outside atomic.Uint64
}

// set maps size bytes at offset of fd as the new log and unmaps the old one.
func (l *dirtyLog) set(fd int, size, offset uint64) error {
	if size == 0 || size > 1<<40 || offset > 1<<40 || offset%8 != 0 {
		return fmt.Errorf("%w: log size %d offset %d", ErrPayloadSize, size, offset)
	}
	if err := fitsFile(fd, size+offset); err != nil {
		return fmt.Errorf("dirty log: %w", err)
	}
	m, err := unix.Mmap(fd, 0, int(size+offset), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("mmap dirty log (%d bytes at %d): %w", size, offset, err)
	}
	l.mu.Lock()
	old := l.mapping
	l.mapping, l.bits = m, m[offset:offset+size]
	l.mu.Unlock()
	if old != nil {
		_ = unix.Munmap(old)
	}
	l.on.Store(l.logAll.Load())
	return nil
}

// setLogAll records whether VHOST_F_LOG_ALL is negotiated.
func (l *dirtyLog) setLogAll(v bool) {
	l.logAll.Store(v)
	l.mu.RLock()
	mapped := l.bits != nil
	l.mu.RUnlock()
	l.on.Store(v && mapped)
}

// close unmaps the log; nothing is logged until the next set.
func (l *dirtyLog) close() {
	l.on.Store(false)
	l.mu.Lock()
	old := l.mapping
	l.mapping, l.bits = nil, nil
	l.mu.Unlock()
	if old != nil {
		_ = unix.Munmap(old)
	}
}

// mark sets the bits of every page in [gpa, gpa+n). Call it after the write
// it records: the front-end clears bits while it copies pages, so a bit set
// before the write could be cleared before the data lands.
func (l *dirtyLog) mark(gpa, n uint64) {
	if n == 0 {
		return
	}
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.bits == nil {
		return
	}
	first, last := gpa/logPageSize, (gpa+n-1)/logPageSize
	for p := first; p <= last; p++ {
		i := p / 8
		if i >= uint64(len(l.bits)) {
			l.outside.Add(1)
			return
		}
		orByte(&l.bits[i], byte(1)<<(p%8))
	}
}

// orByte ORs v into *b atomically, through the aligned 64-bit word holding
// it. The front-end reads and clears the log concurrently a 64-bit word at
// a time (QEMU: an atomic exchange per unsigned long), and x86 guarantees
// atomicity between locked operations only at the same address and size:
// a narrower OR racing the exchange could be lost.
func orByte(b *byte, v byte) {
	p := uintptr(unsafe.Pointer(b))
	w := (*uint64)(unsafe.Add(unsafe.Pointer(b), -int(p&7)))
	atomic.OrUint64(w, uint64(v)<<((p&7)*8))
}

// contains reports whether addr lies in the log's mapping.
func (l *dirtyLog) contains(addr uintptr) bool {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return inMapping(l.mapping, addr)
}

// inMapping reports whether addr lies in m.
func inMapping(m []byte, addr uintptr) bool {
	if len(m) == 0 {
		return false
	}
	base := uintptr(unsafe.Pointer(&m[0]))
	return addr >= base && addr-base < uintptr(len(m))
}

// fitsFile checks that fd's file holds n bytes: touching a shared mapping
// past the end of its file is SIGBUS, so a front-end that claims more than
// it sent would crash the back-end.
func fitsFile(fd int, n uint64) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("fstat: %w", err)
	}
	if st.Size < 0 || uint64(st.Size) < n {
		return fmt.Errorf("%w: %d bytes claimed, the file has %d", ErrPayloadSize, n, st.Size)
	}
	return nil
}
