//go:build cgo && !norbd

package rbd

/*
#include <errno.h>
#include <stdlib.h>
#include "rbd.h"

int hemd_create(rados_ioctx_t io, const char *name, uint64_t size, uint64_t features);
int hemd_clone(rados_ioctx_t pio, const char *parent, const char *snap, rados_ioctx_t cio, const char *child, uint64_t features);
*/
import "C"

import (
	"fmt"
	"os"
	"syscall"
	"unsafe"

	"github.com/ceph/go-ceph/rados"
)

// imageErr wraps librbd's error of op on image n.
func (c *Conn) imageErr(op string, n Name, r C.int) error {
	switch r {
	case -C.EEXIST:
		return fmt.Errorf("%s %s: %w", op, n, os.ErrExist)
	case -C.ENOENT:
		return fmt.Errorf("%s %s: %w", op, n, os.ErrNotExist)
	}
	return fmt.Errorf("%s %s: %s: %w", op, n, c, syscall.Errno(-r))
}

// Create makes a new image n of size bytes with Features. An existing image
// is an error (os.ErrExist).
func (c *Conn) Create(n Name, size int64) error {
	if n.Snap != "" {
		return fmt.Errorf("create %s: a snapshot is not an image", n)
	}
	ioc, err := c.ioctx(n)
	if err != nil {
		return fmt.Errorf("create %s: %w", n, err)
	}
	cname := C.CString(n.Image)
	defer C.free(unsafe.Pointer(cname))
	if r := C.hemd_create(C.rados_ioctx_t(ioc.Pointer()), cname, C.uint64_t(size), Features); r < 0 {
		return c.imageErr("create", n, r)
	}
	return nil
}

// Remove removes the image n (which must have no snapshots).
func (c *Conn) Remove(n Name) error {
	ioc, err := c.ioctx(n)
	if err != nil {
		return fmt.Errorf("remove %s: %w", n, err)
	}
	cname := C.CString(n.Image)
	defer C.free(unsafe.Pointer(cname))
	if r := C.rbd_remove(C.rados_ioctx_t(ioc.Pointer()), cname); r < 0 {
		return c.imageErr("remove", n, r)
	}
	return nil
}

// Rename renames image from to to's image name (in the same pool and
// namespace); an existing image to is never replaced (os.ErrExist).
func (c *Conn) Rename(from, to Name) error {
	if from.Pool != to.Pool || from.Namespace != to.Namespace || from.Snap != "" || to.Snap != "" {
		return fmt.Errorf("rename %s to %s: not two images of one pool", from, to)
	}
	ioc, err := c.ioctx(from)
	if err != nil {
		return fmt.Errorf("rename %s: %w", from, err)
	}
	cf, ct := C.CString(from.Image), C.CString(to.Image)
	defer C.free(unsafe.Pointer(cf))
	defer C.free(unsafe.Pointer(ct))
	if r := C.rbd_rename(C.rados_ioctx_t(ioc.Pointer()), cf, ct); r < 0 {
		return c.imageErr("rename "+from.String()+" to", to, r)
	}
	return nil
}

// Exists reports whether the image (or snapshot) n exists.
func (c *Conn) Exists(n Name) (bool, error) {
	ioc, err := c.ioctx(n)
	if err != nil {
		return false, err
	}
	cname := C.CString(n.Image)
	defer C.free(unsafe.Pointer(cname))
	var img C.rbd_image_t
	var csnap *C.char
	if n.Snap != "" {
		csnap = C.CString(n.Snap)
		defer C.free(unsafe.Pointer(csnap))
	}
	r := C.rbd_open_read_only(C.rados_ioctx_t(ioc.Pointer()), cname, &img, csnap)
	if r == -C.ENOENT {
		return false, nil
	}
	if r < 0 {
		return false, c.imageErr("open", n, r)
	}
	C.rbd_close(img)
	return true, nil
}

// Clone makes image child a copy-on-write clone of snapshot parent (whose
// Snap is set): it takes constant time whatever the size, reads of what
// the child has not written go to the parent. The snapshot must be
// protected (Snapshot protects what it makes).
func (c *Conn) Clone(parent, child Name) error {
	if parent.Snap == "" || child.Snap != "" {
		return fmt.Errorf("clone %s to %s: want a snapshot and an image", parent, child)
	}
	pio, err := c.ioctx(parent)
	if err != nil {
		return fmt.Errorf("clone %s: %w", parent, err)
	}
	cio, err := c.ioctx(child)
	if err != nil {
		return fmt.Errorf("clone %s to %s: %w", parent, child, err)
	}
	cp, cs, cc := C.CString(parent.Image), C.CString(parent.Snap), C.CString(child.Image)
	defer C.free(unsafe.Pointer(cp))
	defer C.free(unsafe.Pointer(cs))
	defer C.free(unsafe.Pointer(cc))
	if err := c.protect(pio, parent, cp, cs); err != nil {
		return err
	}
	if r := C.hemd_clone(C.rados_ioctx_t(pio.Pointer()), cp, cs, C.rados_ioctx_t(cio.Pointer()), cc, Features); r < 0 {
		if r == -C.ENOENT {
			return fmt.Errorf("clone %s: no such snapshot: %w", parent, os.ErrNotExist)
		}
		return c.imageErr("clone "+parent.String()+" to", child, r)
	}
	return nil
}

// protect protects snapshot parent if it is not (a snapshot made by hand,
// or one whose Snapshot was killed before it protected it).
func (c *Conn) protect(pio *rados.IOContext, parent Name, cp, cs *C.char) error {
	var img C.rbd_image_t
	if r := C.rbd_open(C.rados_ioctx_t(pio.Pointer()), cp, &img, nil); r < 0 {
		return c.imageErr("clone", parent, r)
	}
	defer C.rbd_close(img)
	var prot C.int
	if r := C.rbd_snap_is_protected(img, cs, &prot); r < 0 {
		if r == -C.ENOENT {
			return fmt.Errorf("clone %s: no such snapshot: %w", parent, os.ErrNotExist)
		}
		return c.imageErr("clone", parent, r)
	}
	if prot == 0 {
		if r := C.rbd_snap_protect(img, cs); r < 0 && r != -C.EBUSY {
			return c.imageErr("protect snapshot", parent, r)
		}
	}
	return nil
}

// Snapshot takes snapshot name of the image, point in time (librbd asks the
// client that holds the exclusive lock, which makes it between two of its
// writes), and protects it so that it can be cloned.
func (m *Image) Snapshot(name string) (Name, error) {
	sn := m.name.AtSnap(name)
	if err := checkPart("snapshot", name); err != nil || name == "" {
		return sn, fmt.Errorf("snapshot %s: bad name %q", m.name, name)
	}
	img, err := m.use()
	if err != nil {
		return sn, err
	}
	defer m.done()
	cs := C.CString(name)
	defer C.free(unsafe.Pointer(cs))
	if r := C.rbd_snap_create(img, cs); r < 0 {
		return sn, m.conn.imageErr("snapshot", sn, r)
	}
	if r := C.rbd_snap_protect(img, cs); r < 0 {
		err := m.conn.imageErr("protect snapshot", sn, r)
		C.rbd_snap_remove(img, cs)
		return sn, err
	}
	return sn, nil
}

// RemoveSnapshot unprotects and removes snapshot name of the image; it
// fails while a clone depends on it.
func (m *Image) RemoveSnapshot(name string) error {
	sn := m.name.AtSnap(name)
	img, err := m.use()
	if err != nil {
		return err
	}
	defer m.done()
	cs := C.CString(name)
	defer C.free(unsafe.Pointer(cs))
	var prot C.int
	if r := C.rbd_snap_is_protected(img, cs, &prot); r < 0 {
		return m.conn.imageErr("remove snapshot", sn, r)
	}
	if prot != 0 {
		if r := C.rbd_snap_unprotect(img, cs); r < 0 {
			if r == -C.EBUSY {
				return fmt.Errorf("remove snapshot %s: volumes are cloned from it: %w", sn, syscall.EBUSY)
			}
			return m.conn.imageErr("unprotect snapshot", sn, r)
		}
	}
	if r := C.rbd_snap_remove(img, cs); r < 0 {
		return m.conn.imageErr("remove snapshot", sn, r)
	}
	return nil
}

// Snapshots lists the image's snapshots by name.
func (m *Image) Snapshots() ([]string, error) {
	img, err := m.use()
	if err != nil {
		return nil, err
	}
	defer m.done()
	max := C.int(16)
	for {
		snaps := make([]C.rbd_snap_info_t, max)
		r := C.rbd_snap_list(img, &snaps[0], &max)
		if r == -C.ERANGE {
			continue
		}
		if r < 0 {
			return nil, m.conn.imageErr("list snapshots of", m.name, r)
		}
		var names []string
		for i := 0; i < int(r); i++ {
			names = append(names, C.GoString(snaps[i].name))
		}
		C.rbd_snap_list_end(&snaps[0])
		return names, nil
	}
}
