//go:build cgo && !norbd

package rbd

// Readers and the writer: librbd's exclusive lock is for writers only, so a
// hemd that serves an image read-only claims it with a shared lock of its
// own on the image's header object (a cls lock named readersLock, beside
// the one librbd uses). The two claims exclude each other by their order:
// a reader takes its shared lock and then looks for a writer (the exclusive
// lock's owner); a writer takes the exclusive lock and then looks for
// readers. Whichever comes second sees the first and lets go: never a
// reader and a writer at once.
//
// A reader's lock is a lease (readerLease), renewed while it serves: a
// reader that dies lets go when its lease ends, or at once when its record
// names a process on this host that no longer runs.

/*
#include <errno.h>
#include <stdlib.h>
#include "rbd.h"
*/
import "C"

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/ceph/go-ceph/rados"
	"github.com/hemd/hemd/storage"
)

const (
	// readersLock is the cls lock on the header object readers share.
	readersLock = "hemd.readers"
	readersTag  = "hemd"
	// readerLease is how long a reader's claim outlives its last renewal.
	readerLease = 30 * time.Second
)

// ReadClaim is a read-only server's claim on an image: a shared lease on
// its header that writers (Lock) respect. Its methods are safe for
// concurrent use.
type ReadClaim struct {
	m      *Image
	o      LockOptions
	log    *slog.Logger
	lease  time.Duration
	cookie string

	mu   sync.Mutex
	held bool
	stop chan struct{} // ends the renewal
	done chan struct{}
}

// NewReadClaim returns the read-only claim on m, not taken. A snapshot
// needs none (it does not change), nor does anything that does not serve.
func (m *Image) NewReadClaim(o LockOptions) (*ReadClaim, error) {
	// The cookie carries the reader's record (rados_list_lockers returns
	// no descriptions): its holder JSON, then a nonce.
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return nil, fmt.Errorf("read claim on %s: %w", m.name, err)
	}
	rec, _ := json.Marshal(storage.Self(o.Socket, true))
	c := &ReadClaim{m: m, o: o, log: o.Log, lease: o.Lease, cookie: string(rec) + " " + hex.EncodeToString(b[:])}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	if c.lease <= 0 {
		c.lease = readerLease
	}
	return c, nil
}

// Held reports whether the claim is taken.
func (c *ReadClaim) Held() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.held
}

// TryAcquire takes the claim unless a writer holds the image; the error
// then wraps storage.ErrInUse and names the writer.
func (c *ReadClaim) TryAcquire() error {
	err := c.try()
	if err == errBusy {
		return c.m.writerInUse()
	}
	return err
}

// Acquire takes the claim, trying again until the writer lets go or ctx
// ends.
func (c *ReadClaim) Acquire(ctx context.Context) error {
	return storage.AcquireLoop(ctx, lockPoll, c.try, c.m.writerInUse)
}

func (c *ReadClaim) try() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.held {
		return nil
	}
	if err := c.lock(false); err != nil {
		return err
	}
	// Fail closed: a writer that cannot be ruled out is a writer.
	if owners, err := c.m.lockOwners(); err != nil || len(owners) > 0 {
		c.unlock()
		if err != nil {
			return fmt.Errorf("read claim on %s: the exclusive lock's owners: %w", c.m.name, err)
		}
		return errBusy
	}
	c.held = true
	c.stop, c.done = make(chan struct{}), make(chan struct{})
	go c.renew(c.stop, c.done)
	return nil
}

// lock takes (or renews) the shared lease.
func (c *ReadClaim) lock(renew bool) error {
	if err := c.m.leaseLock(readersLock, c.cookie, "hemd read-only claim", c.lease, renew); err != nil {
		return fmt.Errorf("read claim on %s: %w", c.m.name, err)
	}
	return nil
}

func (c *ReadClaim) unlock() {
	if err := c.m.leaseUnlock(readersLock, c.cookie); err != nil {
		c.log.Warn("read claim not released: writers wait until its lease ends", "image", c.m.name.String(), "lease", c.lease, "err", err)
	}
}

// renew keeps the lease while the claim is held, renewed at a third of
// it; it warns if a writer holds the image after all (the lease lapsed
// while the cluster could not be reached).
func (c *ReadClaim) renew(stop, done chan struct{}) {
	defer close(done)
	t := time.NewTicker(c.lease / 3)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		if err := c.lock(true); err != nil {
			c.log.Warn("read claim not renewed", "image", c.m.name.String(), "err", err)
			continue
		}
		if owners, _ := c.m.lockOwners(); len(owners) > 0 {
			c.log.Error("a writer holds an image served read-only (this reader's lease lapsed): the guest may read changing data", "image", c.m.name.String())
		}
	}
}

// Release lets go of the claim.
func (c *ReadClaim) Release() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.held {
		return
	}
	close(c.stop)
	<-c.done
	c.held = false
	if !c.m.isClosed() {
		c.unlock()
	}
}

// Close releases the claim.
func (c *ReadClaim) Close() error {
	c.Release()
	return nil
}

// leaseLock takes (renew: renews) a lease for d under the shared cls lock
// name on the image's header object, held by cookie. A lease not renewed
// runs out by the OSD's clock.
func (m *Image) leaseLock(name, cookie, desc string, d time.Duration, renew bool) error {
	oid, ioc, err := m.header()
	if err != nil {
		return err
	}
	var flags *byte
	if renew {
		f := byte(1) // LOCK_FLAG_MAY_RENEW
		flags = &f
	}
	r, err := ioc.LockShared(oid, name, cookie, readersTag, desc, d, flags)
	switch {
	case err != nil:
		return err
	case r == -int(syscall.EBUSY):
		// Only another tag (not a hemd) or an exclusive holder gets here.
		return fmt.Errorf("lock %s on %s is held by another program: %w", name, oid, storage.ErrInUse)
	}
	return nil
}

// leaseUnlock ends cookie's lease under name.
func (m *Image) leaseUnlock(name, cookie string) error {
	oid, ioc, err := m.header()
	if err == nil {
		_, err = ioc.Unlock(oid, name, cookie)
	}
	return err
}

// leased reports whether cookie holds a lease under name that has not run
// out.
func (m *Image) leased(name, cookie string) (bool, error) {
	oid, ioc, err := m.header()
	if err != nil {
		return false, err
	}
	info, err := ioc.ListLockers(oid, name)
	if err != nil {
		if errno(err) == syscall.ENOENT {
			return false, nil
		}
		return false, err
	}
	for _, c := range info.Cookies {
		if c == cookie {
			return true, nil
		}
	}
	return false, nil
}

// readers returns the hemds that hold a read claim on the image, after
// breaking the claims of readers on this host that no longer run.
func (m *Image) readers(log *slog.Logger) ([]storage.Holder, error) {
	oid, ioc, err := m.header()
	if err != nil {
		return nil, err
	}
	info, err := ioc.ListLockers(oid, readersLock)
	if err != nil {
		if errno(err) == syscall.ENOENT {
			return nil, nil
		}
		return nil, fmt.Errorf("readers of %s: %w", m.name, err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var live []storage.Holder
	for i := range info.Clients {
		var h storage.Holder
		_ = json.NewDecoder(strings.NewReader(info.Cookies[i])).Decode(&h)
		if h.PID > 0 && !h.Alive() {
			log.Warn("breaking the read claim of a reader that has exited", "image", m.name.String(), "reader", h.String())
			if _, err := ioc.BreakLock(oid, readersLock, info.Clients[i], info.Cookies[i]); err == nil {
				continue
			}
		}
		if h.PID <= 0 {
			h = storage.Holder{Program: info.Clients[i], Shared: true}
		}
		live = append(live, h)
	}
	return live, nil
}

// headerLockOwners returns the clients that own the image's exclusive lock
// as its header's cls lock lists them: librbd answers rbd_lock_get_owners
// with EINVAL on an image opened read-only.
func (m *Image) headerLockOwners() ([]string, error) {
	oid, ioc, err := m.header()
	if err != nil {
		return nil, err
	}
	info, err := ioc.ListLockers(oid, "rbd_lock") // librbd's RBD_LOCK_NAME
	if err != nil {
		if errno(err) == syscall.ENOENT {
			return nil, nil
		}
		return nil, err
	}
	var owners []string
	for i, cookie := range info.Cookies {
		if !strings.HasPrefix(cookie, "auto ") || i >= len(info.Addrs) {
			continue // not the exclusive-lock feature's (rbd lock add)
		}
		// "v1:127.0.0.1:0/281399584", where librbd says "127.0.0.1:0/281399584".
		a := info.Addrs[i]
		for _, p := range []string{"v1:", "v2:", "any:"} {
			a = strings.TrimPrefix(a, p)
		}
		owners = append(owners, a)
	}
	return owners, nil
}

// header returns the name of the image's header object and its pool's
// I/O context.
func (m *Image) header() (string, *rados.IOContext, error) {
	img, err := m.use()
	if err != nil {
		return "", nil, err
	}
	defer m.done()
	var buf [64]C.char
	if r := C.rbd_get_id(img, &buf[0], C.size_t(len(buf))); r < 0 {
		return "", nil, fmt.Errorf("%s: image id: %w", m.name, syscall.Errno(-r))
	}
	ioc, err := m.conn.ioctx(m.name)
	if err != nil {
		return "", nil, err
	}
	return "rbd_header." + C.GoString((*C.char)(unsafe.Pointer(&buf[0]))), ioc, nil
}

// writerInUse is a reader's refusal: it names the writer if it left a
// record.
func (m *Image) writerInUse() error {
	err := m.writer()
	if err == nil {
		err = &storage.InUseError{}
	}
	return fmt.Errorf("%s: %w", m.name, err)
}
