//go:build cgo && !norbd

package rbd

// One writer at a time: a volume on RBD is claimed with librbd's exclusive
// lock (the image feature exclusive-lock), taken with rbd_lock_acquire. A
// lock taken that way is never handed to another client that asks for it:
// another client's writes fail at once (EROFS), so a second hemd cannot
// write even if it tried. The holder records itself in the image's metadata
// (key hemd.holder) so that a refused process can name it.
//
// A holder that dies keeps the lock until its watch on the image times out
// (osd_client_watch_timeout, 30 s by default). Its successor does not wait
// for that when it can tell the holder is dead: the record names a process
// on this host that no longer runs, the holder let its lease run out (a
// shared cls lock on the header object, writerLeaseLock, 8 s, renewed every
// 2 s: a host that died or hangs, wherever it is; the OSD's clock decides),
// or the owner has no watch left on the image. It then breaks the lock,
// which blocklists the dead client (so it can never write again, should it
// not be dead after all), and takes it.

/*
#include <errno.h>
#include <stdlib.h>
#include "rbd.h"

static int hemd_lock_owners(rbd_image_t img, char **owners, size_t *n) {
	rbd_lock_mode_t mode;
	return rbd_lock_get_owners(img, &mode, owners, n);
}
*/
import "C"

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/hemd/hemd/storage"
)

// holderKey is the image metadata key of the holder record.
const holderKey = "hemd.holder"

// LockOptions say how an image is claimed.
type LockOptions struct {
	// Socket is the vhost-user socket the holder serves, recorded so that a
	// refused process can name it.
	Socket string
	// Log gets the breaking of a dead holder's lock, and a warning when the
	// holder record cannot be written. Nil: no log.
	Log *slog.Logger
	// Lease is how long a claim outlives its last renewal: a reader's
	// (ReadClaim; 0: 30 s) or a writer's (Lock; 0: 8 s, renewed at a
	// quarter of it).
	Lease time.Duration
}

const (
	// writerLeaseLock is the cls lock on the header object under which a
	// writer keeps its lease, its lock-owner address the cookie.
	writerLeaseLock = "hemd.writer"
	// writerLease is a writer's lease by default: a holder that missed
	// about four renewals is dead.
	writerLease = 8 * time.Second
)

// record is what the holder of an image records about itself.
type record struct {
	storage.Holder
	// Owner is the holder's client as librbd names a lock owner (its
	// address): a record whose owner does not hold the lock is stale.
	Owner string `json:"owner"`
	// Lease says the holder keeps a lease (writerLeaseLock, cookie Owner):
	// once it has run out, the holder is dead.
	Lease bool `json:"lease,omitempty"`
}

// Lock is a claim on an image: its exclusive lock and the record of its
// holder. Its methods are safe for concurrent use.
type Lock struct {
	m     *Image
	o     LockOptions
	log   *slog.Logger
	mu    sync.Mutex
	held  bool
	owner string        // this client as a lock owner, once the record is written
	stop  chan struct{} // ends the lease's renewal; nil: none runs
}

// NewLock returns the image's claim, not taken. Closing the image releases
// it (the last one made, if several).
func (m *Image) NewLock(o LockOptions) (*Lock, error) {
	if m.opts.ReadOnly {
		return nil, fmt.Errorf("lock %s: opened read-only", m.name)
	}
	l := &Lock{m: m, o: o, log: o.Log}
	if l.log == nil {
		l.log = slog.New(slog.DiscardHandler)
	}
	m.lock.Store(l)
	return l, nil
}

// Held reports whether this Lock holds the image.
func (l *Lock) Held() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.held
}

// errBusy is a lock attempt refused because of another holder.
var errBusy = storage.ErrBusy

// try takes the lock if it is free or its holder is dead.
func (l *Lock) try() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.held {
		return nil
	}
	owners, err := l.m.lockOwners()
	if err != nil {
		return fmt.Errorf("lock %s: owners: %w", l.m.name, err)
	}
	if len(owners) > 0 {
		dead, why := l.dead(owners[0])
		if !dead {
			return errBusy
		}
		l.log.Warn("breaking the lock of a dead holder (its client is blocklisted)", "image", l.m.name.String(), "owner", owners[0], "why", why)
		if err := l.m.lockBreak(owners[0]); err != nil && err != syscall.ENOENT {
			return fmt.Errorf("lock %s: break the lock of dead client %s: %w", l.m.name, owners[0], err)
		}
	}
	if err := l.m.lockAcquire(); err != nil {
		if err == syscall.EROFS || err == syscall.EBUSY || err == syscall.EAGAIN {
			return errBusy // another client took it meanwhile
		}
		return fmt.Errorf("lock %s: %w", l.m.name, err)
	}
	// Readers first (share.go): a writer that finds one lets go.
	readers, err := l.m.readers(l.log)
	if err != nil || len(readers) > 0 {
		if rerr := l.m.lockRelease(); rerr != nil {
			l.log.Error("release the exclusive lock", "image", l.m.name.String(), "err", rerr)
		}
		if err != nil {
			return fmt.Errorf("lock %s: %w", l.m.name, err)
		}
		return errBusy
	}
	l.held = true
	l.writeRecord()
	return nil
}

// dead reports whether owner, which holds the lock, is dead: the record
// names it and a process on this host that no longer runs, or says it
// keeps a lease that has run out; or it has no watch on the image left.
func (l *Lock) dead(owner string) (bool, string) {
	if rec, err := l.readRecord(); err == nil && rec.Owner == owner {
		if !rec.Holder.Alive() {
			return true, fmt.Sprintf("%s pid %d on this host has exited", rec.Program, rec.PID)
		}
		if rec.Lease {
			if live, err := l.m.leased(writerLeaseLock, owner); err == nil && !live {
				return true, fmt.Sprintf("%s pid %d on %s let its lease run out", rec.Program, rec.PID, rec.Host)
			}
		}
	}
	watchers, err := l.m.watchers()
	if err != nil {
		return false, ""
	}
	for _, w := range watchers {
		if w == owner {
			return false, ""
		}
	}
	return true, "it has no watch on the image (timed out)"
}

// writeRecord records this process as the holder, under the lock, after
// taking its lease (the record says whether it did) and starting its
// renewal.
func (l *Lock) writeRecord() {
	l.owner = ""
	owners, err := l.m.lockOwners()
	if err != nil || len(owners) != 1 {
		l.log.Warn("holder record not written: a process refused the volume cannot name this one", "image", l.m.name.String(), "owners", owners, "err", err)
		return
	}
	owner, lease := owners[0], l.o.Lease
	if lease <= 0 {
		lease = writerLease
	}
	leased := true
	if err := l.m.leaseLock(writerLeaseLock, owner, "hemd writer lease", lease, false); err != nil {
		leased = false
		l.log.Warn("no lease taken: a successor on another host waits for this holder's watch to time out", "image", l.m.name.String(), "err", err)
	}
	rec := record{Holder: storage.Self(l.o.Socket, false), Owner: owner, Lease: leased}
	b, _ := json.Marshal(rec)
	if err := l.m.setMetadata(holderKey, string(b)); err != nil {
		l.log.Warn("holder record not written: a process refused the volume cannot name this one", "image", l.m.name.String(), "err", err)
	}
	l.owner = owner
	if leased {
		l.renewLease(owner, lease)
	}
}

// renewLease renews the lease at a quarter of its length until the lock is
// released, so that a successor anywhere can tell a holder that stopped (a
// host that died or hangs) long before its watch times out. Call it with
// l.mu held.
func (l *Lock) renewLease(owner string, lease time.Duration) {
	stop := make(chan struct{})
	l.stop = stop
	go func() {
		t := time.NewTicker(lease / 4)
		defer t.Stop()
		failing := false
		for {
			select {
			case <-stop:
				return
			case <-t.C:
			}
			err := l.m.leaseLock(writerLeaseLock, owner, "hemd writer lease", lease, true)
			if err != nil && !failing {
				l.log.Warn("lease not renewed: once it runs out a successor takes this holder for dead and fences it", "image", l.m.name.String(), "err", err)
			}
			failing = err != nil
		}
	}()
}

// readRecord reads the holder record.
func (l *Lock) readRecord() (*record, error) { return l.m.holderRecord() }

// writer names the client that holds the image's exclusive lock (a
// *storage.InUseError naming the hemd, if its holder record is the
// owner's); nil if none does.
func (m *Image) writer() error {
	owners, _ := m.lockOwners()
	if len(owners) == 0 {
		return nil
	}
	if rec, err := m.holderRecord(); err == nil && rec.Owner == owners[0] {
		return &storage.InUseError{Holder: &rec.Holder}
	}
	return fmt.Errorf("in use by RBD client %s (not a hemd, or one that left no holder record): %w", owners[0], storage.ErrInUse)
}

// holderRecord reads the record of the writer that holds the image.
func (m *Image) holderRecord() (*record, error) {
	v, err := m.metadata(holderKey)
	if err != nil {
		return nil, err
	}
	var rec record
	if err := json.Unmarshal([]byte(v), &rec); err != nil {
		return nil, fmt.Errorf("holder record of %s: %w", m.name, err)
	}
	if rec.PID <= 0 {
		return nil, fmt.Errorf("holder record of %s: no pid", m.name)
	}
	return &rec, nil
}

// inUse is the refusal: it names the holder if the record is its own.
func (l *Lock) inUse() error {
	if err := l.m.writer(); err != nil {
		return err
	}
	if readers, err := l.m.readers(l.log); err == nil && len(readers) > 0 {
		return &storage.InUseError{Holder: &readers[0], Shared: true}
	}
	return &storage.InUseError{}
}

// TryAcquire takes the lock if no other live client holds it (it returns
// at once if this Lock holds it already). Otherwise the error wraps
// storage.ErrInUse, naming the holder (a *storage.InUseError when the
// holder is a hemd).
func (l *Lock) TryAcquire() error {
	err := l.try()
	if errors.Is(err, errBusy) {
		return l.inUse()
	}
	return err
}

// lockPoll is how often Acquire tries again.
const lockPoll = 50 * time.Millisecond

// Acquire takes the lock, trying again until the holder lets go (or is
// found dead) or ctx ends; then the error names the holder.
func (l *Lock) Acquire(ctx context.Context) error {
	return storage.AcquireLoop(ctx, lockPoll, l.try, l.inUse)
}

// Release lets go of the lock (removing this holder's record first),
// writing back what librbd caches. It does nothing if the lock is not held.
func (l *Lock) Release() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.release()
}

func (l *Lock) release() {
	if l.stop != nil {
		close(l.stop)
		l.stop = nil
	}
	if !l.held {
		return
	}
	if l.m.isClosed() {
		l.held = false // closing the image released it
		return
	}
	if err := l.m.removeMetadata(holderKey); err != nil && err != syscall.ENOENT {
		l.log.Warn("holder record not removed", "image", l.m.name.String(), "err", err)
	}
	if err := l.m.lockRelease(); err != nil {
		l.log.Error("release the exclusive lock", "image", l.m.name.String(), "err", err)
		return
	}
	l.held = false
	// The lease goes last: a record whose holder has no lease would be
	// taken for dead.
	if l.owner != "" {
		if err := l.m.leaseUnlock(writerLeaseLock, l.owner); err != nil {
			l.log.Debug("writer lease not released: it runs out", "image", l.m.name.String(), "err", err)
		}
	}
}

// Close releases the lock.
func (l *Lock) Close() error {
	l.Release()
	return nil
}

func (m *Image) isClosed() bool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.closed
}

// InUse reports whether a client other than this one holds the image's
// exclusive lock.
func (m *Image) InUse() bool {
	owners, err := m.lockOwners()
	if err != nil || len(owners) == 0 {
		return false
	}
	if img, err := m.use(); err == nil {
		var own C.int
		r := C.rbd_is_exclusive_lock_owner(img, &own)
		m.done()
		if r == 0 && own != 0 {
			return false
		}
	}
	return true
}

// lockOwners returns the clients that own the image's exclusive lock.
func (m *Image) lockOwners() ([]string, error) {
	if m.opts.ReadOnly {
		return m.headerLockOwners()
	}
	img, err := m.use()
	if err != nil {
		return nil, err
	}
	defer m.done()
	var owners [8]*C.char
	n := C.size_t(len(owners))
	r := C.hemd_lock_owners(img, &owners[0], &n)
	if r == -C.ENOENT {
		return nil, nil
	}
	if r < 0 {
		return nil, syscall.Errno(-r)
	}
	defer C.rbd_lock_get_owners_cleanup(&owners[0], n)
	var s []string
	for i := 0; i < int(n); i++ {
		s = append(s, C.GoString(owners[i]))
	}
	return s, nil
}

// watchers returns the addresses of the clients watching the image.
func (m *Image) watchers() ([]string, error) {
	img, err := m.use()
	if err != nil {
		return nil, err
	}
	defer m.done()
	var w [64]C.rbd_image_watcher_t
	n := C.size_t(len(w))
	if r := C.rbd_watchers_list(img, &w[0], &n); r < 0 {
		return nil, syscall.Errno(-r)
	}
	defer C.rbd_watchers_list_cleanup(&w[0], n)
	var s []string
	for i := 0; i < int(n); i++ {
		s = append(s, C.GoString(w[i].addr))
	}
	return s, nil
}

func (m *Image) lockAcquire() error {
	img, err := m.use()
	if err != nil {
		return err
	}
	defer m.done()
	if r := C.rbd_lock_acquire(img, C.RBD_LOCK_MODE_EXCLUSIVE); r < 0 {
		return syscall.Errno(-r)
	}
	return nil
}

func (m *Image) lockRelease() error {
	img, err := m.use()
	if err != nil {
		return err
	}
	defer m.done()
	if r := C.rbd_lock_release(img); r < 0 {
		return syscall.Errno(-r)
	}
	return nil
}

func (m *Image) lockBreak(owner string) error {
	img, err := m.use()
	if err != nil {
		return err
	}
	defer m.done()
	c := C.CString(owner)
	defer C.free(unsafe.Pointer(c))
	if r := C.rbd_lock_break(img, C.RBD_LOCK_MODE_EXCLUSIVE, c); r < 0 {
		return syscall.Errno(-r)
	}
	return nil
}

// metadata returns the image's metadata value for key (ENOENT: none).
func (m *Image) metadata(key string) (string, error) {
	img, err := m.use()
	if err != nil {
		return "", err
	}
	defer m.done()
	ck := C.CString(key)
	defer C.free(unsafe.Pointer(ck))
	size := C.size_t(4096)
	for {
		buf := (*C.char)(C.malloc(size))
		n := size
		r := C.rbd_metadata_get(img, ck, buf, &n)
		if r == -C.ERANGE && n > size {
			C.free(unsafe.Pointer(buf))
			size = n
			continue
		}
		defer C.free(unsafe.Pointer(buf))
		if r < 0 {
			return "", syscall.Errno(-r)
		}
		return C.GoString(buf), nil
	}
}

func (m *Image) setMetadata(key, value string) error {
	img, err := m.use()
	if err != nil {
		return err
	}
	defer m.done()
	ck, cv := C.CString(key), C.CString(value)
	defer C.free(unsafe.Pointer(ck))
	defer C.free(unsafe.Pointer(cv))
	if r := C.rbd_metadata_set(img, ck, cv); r < 0 {
		return syscall.Errno(-r)
	}
	return nil
}

func (m *Image) removeMetadata(key string) error {
	img, err := m.use()
	if err != nil {
		return err
	}
	defer m.done()
	ck := C.CString(key)
	defer C.free(unsafe.Pointer(ck))
	if r := C.rbd_metadata_remove(img, ck); r < 0 {
		return syscall.Errno(-r)
	}
	return nil
}
