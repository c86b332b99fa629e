// Package datakey keeps a volume's data key while a VM has the volume
// attached: the KMS unwraps it straight into one page of locked memory
// (mlock, MADV_DONTDUMP, MADV_DONTFORK) that also holds the XTS key
// schedules, and Zeroize wipes and frees that page when the VM stops.
package datakey

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/hemd/hemd/hem"
	"golang.org/x/sys/unix"
)

// State is where a data key is in its lifecycle.
type State int

// Lifecycle: Detached → Attaching (KMS Decrypt) → Attached → Detached
// (zeroized), and again at the next attach.
const (
	Detached State = iota
	Attaching
	Attached
)

func (s State) String() string {
	return [...]string{"detached", "attaching", "attached"}[s]
}

// Unwrap asks the KMS for the plaintext data key and writes its 64 bytes
// into dst, which is locked memory: an implementation must not keep or log
// it, and should wipe any copy of its own.
type Unwrap func(ctx context.Context, dst []byte) error

// Errors.
var (
	ErrAttached = errors.New("data key already attached")
	ErrLock     = errors.New("cannot lock key memory")
)

// pageSize is the locked region: the 64-byte key, then the XTS schedules.
const pageSize = 4096

// Key is one volume's data key. Its methods are safe for concurrent use.
type Key struct {
	mu    sync.Mutex
	state State
	page  []byte
	xts   *hem.XTS
	unit  int
	// release unlocks and unmaps a wiped page (tests look at it first).
	release func([]byte)
}

// New returns a detached key for data units of unitSize bytes.
func New(unitSize int) *Key { return &Key{unit: unitSize, release: releasePage} }

func releasePage(p []byte) {
	unix.Munlock(p)
	unix.Munmap(p)
}

// State returns the key's state.
func (k *Key) State() State {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.state
}

// lockedPage maps one anonymous page, locks it in RAM and keeps it out of
// core dumps and forked children.
func lockedPage() ([]byte, error) { return lockedMap(pageSize) }

// lockedMap maps size bytes (whole pages) as lockedPage does.
func lockedMap(size int) ([]byte, error) {
	p, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, fmt.Errorf("%w: mmap: %v", ErrLock, err)
	}
	for _, step := range []struct {
		name string
		fn   func() error
	}{
		{"mlock", func() error { return unix.Mlock(p) }},
		{"MADV_DONTDUMP", func() error { return unix.Madvise(p, unix.MADV_DONTDUMP) }},
		{"MADV_DONTFORK", func() error { return unix.Madvise(p, unix.MADV_DONTFORK) }},
	} {
		if err := step.fn(); err != nil {
			unix.Munmap(p)
			return nil, fmt.Errorf("%w: %s: %v (raise RLIMIT_MEMLOCK or allow CAP_IPC_LOCK)", ErrLock, step.name, err)
		}
	}
	return p, nil
}

// Locked is memory with the key page's protections (outside the Go heap,
// mlocked, MADV_DONTDUMP, MADV_DONTFORK) for the secrets that help unwrap a
// data key: a recipient's private key, a KMS's working copy of a plaintext.
// Free wipes and unmaps it. Its methods are safe for concurrent use, but
// the bytes are the caller's to guard.
type Locked struct {
	mu sync.Mutex
	b  []byte
}

// NewLocked maps size bytes, rounded up to whole pages.
func NewLocked(size int) (*Locked, error) {
	if size <= 0 {
		return nil, fmt.Errorf("%w: size %d", ErrLock, size)
	}
	ps := unix.Getpagesize()
	p, err := lockedMap((size + ps - 1) &^ (ps - 1))
	if err != nil {
		return nil, err
	}
	return &Locked{b: p}, nil
}

// Bytes is the locked memory; nil once freed.
func (l *Locked) Bytes() []byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b
}

// Free zeroes, unlocks and unmaps the memory. It may be called more than
// once.
func (l *Locked) Free() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.b != nil {
		clear(l.b)
		releasePage(l.b)
		l.b = nil
	}
}

// Attach unwraps the key into locked memory and returns the volume's cipher.
// On error nothing of the key stays in the page, and the key stays detached.
func (k *Key) Attach(ctx context.Context, unwrap Unwrap) (*hem.XTS, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.state != Detached {
		return nil, ErrAttached
	}
	page, err := lockedPage()
	if err != nil {
		return nil, err
	}
	k.state, k.page = Attaching, page
	fail := func(err error) (*hem.XTS, error) {
		k.wipeLocked()
		return nil, err
	}
	dek := page[:hem.KeySize:hem.KeySize]
	if err := unwrap(ctx, dek); err != nil {
		return fail(err)
	}
	x, err := hem.NewXTSIn(page[hem.KeySize:], dek, k.unit)
	if err != nil {
		return fail(fmt.Errorf("data key: %w", err))
	}
	// The schedules are all the cipher needs: the key itself goes now.
	clear(dek)
	k.xts, k.state = x, Attached
	return x, nil
}

// Zeroize wipes the key and its schedules and frees the page. The cipher
// returned by Attach must no longer be used. It is a no-op when detached.
func (k *Key) Zeroize() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.wipeLocked()
}

func (k *Key) wipeLocked() {
	if k.xts != nil {
		k.xts.Wipe()
		k.xts = nil
	}
	if k.page != nil {
		clear(k.page)
		k.release(k.page)
		k.page = nil
	}
	k.state = Detached
}
