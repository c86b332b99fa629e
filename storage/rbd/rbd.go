//go:build cgo && !norbd

package rbd

/*
#cgo LDFLAGS: -lrbd -lrados
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <rados/librados.h>
#include <rbd/librbd.h>

#include "rbd.h"

// hemd_run hands every transfer to librbd, then waits for each: the whole
// batch is in flight at once. A transfer librbd refuses gets its error in
// ret.
void hemd_run(rbd_image_t img, hemd_op *ops, int n) {
	for (int i = 0; i < n; i++) {
		hemd_op *o = &ops[i];
		o->c = NULL;
		int r = rbd_aio_create_completion(NULL, NULL, &o->c);
		if (r < 0) {
			o->ret = r;
			o->c = NULL;
			continue;
		}
		if (o->write) {
			r = rbd_aio_writev(img, o->iov, o->iovcnt, o->off, o->c);
		} else {
			r = rbd_aio_readv(img, o->iov, o->iovcnt, o->off, o->c);
		}
		if (r < 0) {
			o->ret = r;
			rbd_aio_release(o->c);
			o->c = NULL;
		}
	}
	for (int i = 0; i < n; i++) {
		hemd_op *o = &ops[i];
		if (o->c == NULL) {
			continue;
		}
		rbd_aio_wait_for_complete(o->c);
		o->ret = rbd_aio_get_return_value(o->c);
		rbd_aio_release(o->c);
		o->c = NULL;
	}
}

static int hemd_diff_cb(uint64_t off, size_t len, int exists, void *arg) {
	hemd_extents *x = arg;
	if (!exists) {
		return 0;
	}
	if (x->n > 0 && x->e[x->n-1].off + x->e[x->n-1].len == off) {
		x->e[x->n-1].len += len;
		return 0;
	}
	if (x->n == x->cap) {
		size_t cap = x->cap ? 2*x->cap : 64;
		hemd_extent *e = realloc(x->e, cap * sizeof *e);
		if (e == NULL) {
			return -ENOMEM;
		}
		x->e = e;
		x->cap = cap;
	}
	x->e[x->n].off = off;
	x->e[x->n].len = len;
	x->n++;
	return 0;
}

// hemd_diff lists the allocated extents of [off, off+len) (whole objects,
// the parent's included), merged where they touch.
static int hemd_diff(rbd_image_t img, uint64_t off, uint64_t len, hemd_extents *x) {
	return rbd_diff_iterate2(img, NULL, off, len, 1, 1, hemd_diff_cb, x);
}


int hemd_create(rados_ioctx_t io, const char *name, uint64_t size, uint64_t features) {
	rbd_image_options_t o;
	rbd_image_options_create(&o);
	rbd_image_options_set_uint64(o, RBD_IMAGE_OPTION_FEATURES, features);
	int r = rbd_create4(io, name, size, o);
	rbd_image_options_destroy(o);
	return r;
}

int hemd_clone(rados_ioctx_t pio, const char *parent, const char *snap, rados_ioctx_t cio, const char *child, uint64_t features) {
	rbd_image_options_t o;
	rbd_image_options_create(&o);
	rbd_image_options_set_uint64(o, RBD_IMAGE_OPTION_FEATURES, features);
	int r = rbd_clone3(pio, parent, snap, cio, child, o);
	rbd_image_options_destroy(o);
	return r;
}
*/
import "C"

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/ceph/go-ceph/rados"
)

// Features of the images hemd creates: layering (clones), exclusive-lock
// (the one-writer claim), object-map and fast-diff (allocated ranges without
// reading every object), deep-flatten.
const Features = C.RBD_FEATURE_LAYERING | C.RBD_FEATURE_EXCLUSIVE_LOCK | C.RBD_FEATURE_OBJECT_MAP |
	C.RBD_FEATURE_FAST_DIFF | C.RBD_FEATURE_DEEP_FLATTEN

// Conn is a connection to a cluster as one cephx client. Its methods are
// safe for concurrent use.
type Conn struct {
	cluster Cluster
	conn    *rados.Conn
	mons    string // mon_host, for errors

	mu     sync.Mutex
	ioctxs map[string]*rados.IOContext // by pool/namespace
	users  int                         // open images and the caller; shut down at 0
}

// Connect connects to the cluster, within c.Timeout: an unreachable
// cluster, a wrong keyring or client id is an error naming the cluster.
func Connect(ctx context.Context, c Cluster) (*Conn, error) {
	c = c.WithDefaults()
	conn, err := rados.NewConnWithUser(c.ID)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", c, err)
	}
	cn := &Conn{cluster: c, conn: conn, ioctxs: map[string]*rados.IOContext{}, users: 1}
	fail := func(err error) (*Conn, error) {
		conn.Shutdown()
		return nil, err
	}
	if _, err := os.Stat(c.Conf); err != nil {
		return fail(fmt.Errorf("%s: %w", c, err))
	}
	if err := conn.ReadConfigFile(c.Conf); err != nil {
		return fail(fmt.Errorf("%s: read %s: %w", c, c.Conf, err))
	}
	if c.Keyring != "" {
		if _, err := os.Stat(c.Keyring); err != nil {
			return fail(fmt.Errorf("%s: keyring: %w", c, err))
		}
	}
	secs := strconv.Itoa(max(1, int((c.Timeout+time.Second-1)/time.Second)))
	for k, v := range map[string]string{
		"keyring": c.Keyring,
		// Connecting and monitor commands give up after the timeout;
		// reads and writes do not (rados_osd_op_timeout stays 0): an OSD
		// that restarts stalls I/O, it does not fail it.
		"client_mount_timeout": secs,
		"rados_mon_op_timeout": secs,
	} {
		if v == "" {
			continue
		}
		if err := conn.SetConfigOption(k, v); err != nil {
			return fail(fmt.Errorf("%s: set %s: %w", c, k, err))
		}
	}
	cn.mons, _ = conn.GetConfigOption("mon_host")
	done := make(chan error, 1)
	go func() { done <- conn.Connect() }()
	select {
	case err = <-done:
	case <-ctx.Done():
		// Connect gives up by itself after client_mount_timeout; the
		// connection is shut down then.
		go func() {
			<-done
			conn.Shutdown()
		}()
		return nil, fmt.Errorf("%s: connect: %w", cn, ctx.Err())
	}
	if err != nil {
		return fail(fmt.Errorf("%s: connect: %w", cn, connectError(err, c.Timeout)))
	}
	return cn, nil
}

// connectError says what a failed connect most likely means.
func connectError(err error, timeout time.Duration) error {
	switch {
	case errno(err) == syscall.ETIMEDOUT:
		return fmt.Errorf("no monitor answered within %v: %w", timeout, err)
	case errno(err) == syscall.EACCES || errno(err) == syscall.EPERM:
		return fmt.Errorf("refused by the monitors: wrong client id or keyring: %w", err)
	case errno(err) == syscall.ENOENT:
		return fmt.Errorf("no keyring for the client (set the keyring): %w", err)
	}
	return err
}

// errno returns the errno in a go-ceph error, or 0.
func errno(err error) syscall.Errno {
	var e interface{ ErrorCode() int }
	if errors.As(err, &e) && e.ErrorCode() < 0 {
		return syscall.Errno(-e.ErrorCode())
	}
	var en syscall.Errno
	if errors.As(err, &en) {
		return en
	}
	return 0
}

// String names the cluster: its monitors, ceph.conf and client.
func (c *Conn) String() string {
	if c.mons == "" {
		return c.cluster.String()
	}
	return fmt.Sprintf("cluster at %s (%s, client.%s)", c.mons, c.cluster.Conf, c.cluster.ID)
}

// Cluster returns how the connection was made.
func (c *Conn) Cluster() Cluster { return c.cluster }

// InstanceID is the connection's client instance: client.ID in lock owners.
func (c *Conn) InstanceID() uint64 { return c.conn.GetInstanceID() }

// Close drops the caller's hold on the connection; it shuts down when the
// images opened on it are closed too.
func (c *Conn) Close() { c.release() }

func (c *Conn) hold() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.users == 0 {
		return false
	}
	c.users++
	return true
}

func (c *Conn) release() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.users == 0 {
		return
	}
	c.users--
	if c.users > 0 {
		return
	}
	for _, ioc := range c.ioctxs {
		ioc.Destroy()
	}
	c.ioctxs = nil
	c.conn.Shutdown()
}

// ioctx returns the I/O context of n's pool and namespace.
func (c *Conn) ioctx(n Name) (*rados.IOContext, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.users == 0 {
		return nil, fmt.Errorf("%s: connection closed", c)
	}
	key := n.Pool + "/" + n.Namespace
	if ioc := c.ioctxs[key]; ioc != nil {
		return ioc, nil
	}
	ioc, err := c.conn.OpenIOContext(n.Pool)
	if err != nil {
		if errno(err) == syscall.ENOENT {
			return nil, fmt.Errorf("%s: pool %s does not exist", c, n.Pool)
		}
		return nil, fmt.Errorf("%s: pool %s: %w", c, n.Pool, err)
	}
	ioc.SetNamespace(n.Namespace)
	c.ioctxs[key] = ioc
	return ioc, nil
}

// Options say how an image is opened.
type Options struct {
	ReadOnly bool
	// Discard lets Punch free space.
	Discard bool
}

// ErrDiscardOff means discard was not enabled for this image.
var ErrDiscardOff = errors.New("discard is not enabled for this volume")

// ErrUnreachable is a cluster that cannot serve an image now (Reachable).
var ErrUnreachable = errors.New("the cluster cannot serve the image")

// Image is an open RBD image (or a snapshot of one, read-only). Its I/O
// methods are safe for concurrent use; librbd keeps many transfers in
// flight.
type Image struct {
	conn *Conn
	name Name
	img  C.rbd_image_t
	size atomic.Int64 // grows with Grow
	opts Options

	mu     sync.RWMutex // held shared by I/O, exclusively by Close
	closed bool
	lock   atomic.Pointer[Lock] // the claim made with NewLock, if any
}

// Open connects to the cluster and opens the image (or snapshot) n, all
// within c.Timeout. Closing the image closes the connection.
func Open(ctx context.Context, c Cluster, n Name, o Options) (*Image, error) {
	conn, err := Connect(ctx, c)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", n, err)
	}
	img, err := conn.Open(ctx, n, o)
	conn.Close() // the image holds it now, or nobody does
	if err != nil {
		return nil, err
	}
	return img, nil
}

// Open opens the image (or snapshot, read-only) n on this connection,
// giving up after the cluster's timeout or when ctx ends.
func (c *Conn) Open(ctx context.Context, n Name, o Options) (*Image, error) {
	if n.Snap != "" {
		o.ReadOnly = true
	}
	ioc, err := c.ioctx(n)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", n, err)
	}
	if !c.hold() {
		return nil, fmt.Errorf("open %s: %s: connection closed", n, c)
	}
	ctx, cancel := context.WithTimeout(ctx, c.cluster.Timeout)
	defer cancel()
	type result struct {
		img C.rbd_image_t
		r   C.int
	}
	done := make(chan result, 1)
	go func() {
		cname, csnap := C.CString(n.Image), (*C.char)(nil)
		defer C.free(unsafe.Pointer(cname))
		if n.Snap != "" {
			csnap = C.CString(n.Snap)
			defer C.free(unsafe.Pointer(csnap))
		}
		var img C.rbd_image_t
		var r C.int
		if o.ReadOnly {
			r = C.rbd_open_read_only(C.rados_ioctx_t(ioc.Pointer()), cname, &img, csnap)
		} else {
			r = C.rbd_open(C.rados_ioctx_t(ioc.Pointer()), cname, &img, csnap)
		}
		done <- result{img, r}
	}()
	var res result
	select {
	case res = <-done:
	case <-ctx.Done():
		// librbd cannot be interrupted: the open finishes (or fails) on
		// its own, and is undone then.
		go func() {
			if res := <-done; res.r == 0 {
				C.rbd_close(res.img)
			}
			c.release()
		}()
		return nil, fmt.Errorf("open %s: %s: no answer within %v: %w", n, c, c.cluster.Timeout, ctx.Err())
	}
	if res.r < 0 {
		c.release()
		err := syscall.Errno(-res.r)
		switch err {
		case syscall.ENOENT:
			if n.Snap != "" {
				return nil, fmt.Errorf("open %s: %s: no such image or snapshot: %w", n, c, os.ErrNotExist)
			}
			return nil, fmt.Errorf("open %s: %s: no such image: %w", n, c, os.ErrNotExist)
		case syscall.EPERM, syscall.EACCES:
			return nil, fmt.Errorf("open %s: %s: permission denied (the client's caps do not cover pool %s): %w", n, c, n.Pool, err)
		}
		return nil, fmt.Errorf("open %s: %s: %w", n, c, err)
	}
	im := &Image{conn: c, name: n, img: res.img, opts: o}
	var size C.uint64_t
	if r := C.rbd_get_size(im.img, &size); r < 0 {
		im.Close()
		return nil, fmt.Errorf("open %s: size: %w", n, syscall.Errno(-r))
	}
	im.size.Store(int64(size))
	return im, nil
}

// Name returns the image's name.
func (m *Image) Name() Name { return m.name }

// Path returns the image's name as a string (rbd:POOL/IMAGE).
func (m *Image) Path() string { return m.name.String() }

// Conn returns the connection the image was opened on.
func (m *Image) Conn() *Conn { return m.conn }

// Size returns the image's size in bytes (as it was at open, or grown by
// Grow).
func (m *Image) Size() int64 { return m.size.Load() }

// Grow makes the image at least size bytes (rbd_resize); it never shrinks.
func (m *Image) Grow(size int64) error {
	if m.opts.ReadOnly {
		return fmt.Errorf("grow %s: %w", m.name, os.ErrPermission)
	}
	if size <= m.Size() {
		return nil
	}
	img, err := m.use()
	if err != nil {
		return err
	}
	defer m.done()
	if r := C.rbd_resize(img, C.uint64_t(size)); r < 0 {
		return m.ioErr("grow", C.ssize_t(r))
	}
	m.size.Store(size)
	return nil
}

// ReadOnly reports whether the image was opened read-only.
func (m *Image) ReadOnly() bool { return m.opts.ReadOnly }

// CanDiscard reports whether Punch may free space.
func (m *Image) CanDiscard() bool { return m.opts.Discard }

// use holds the image open for one call; done must be called after.
func (m *Image) use() (C.rbd_image_t, error) {
	m.mu.RLock()
	if m.closed {
		m.mu.RUnlock()
		return nil, fmt.Errorf("%s: %w", m.name, os.ErrClosed)
	}
	return m.img, nil
}

func (m *Image) done() { m.mu.RUnlock() }

// ioErr wraps a librbd error of an I/O call.
func (m *Image) ioErr(op string, r C.ssize_t) error {
	err := syscall.Errno(-r)
	if err == syscall.EROFS && !m.opts.ReadOnly {
		return fmt.Errorf("%s %s: %w (another client holds the image's exclusive lock)", op, m.name, err)
	}
	return fmt.Errorf("%s %s: %w", op, m.name, err)
}

// ReadAtv fills bufs from off on.
func (m *Image) ReadAtv(bufs [][]byte, off int64) (int, error) {
	return m.rw(false, bufs, off)
}

// WriteAtv writes bufs from off on.
func (m *Image) WriteAtv(bufs [][]byte, off int64) (int, error) {
	if m.opts.ReadOnly {
		return 0, fmt.Errorf("write %s: %w", m.name, os.ErrPermission)
	}
	return m.rw(true, bufs, off)
}

// ReadAt implements io.ReaderAt. Past the end of the image is io.EOF.
func (m *Image) ReadAt(p []byte, off int64) (int, error) {
	size := m.Size()
	if off >= size {
		return 0, io.EOF
	}
	if rest := size - off; int64(len(p)) > rest {
		n, err := m.rw(false, [][]byte{p[:rest]}, off)
		if err == nil {
			err = io.EOF
		}
		return n, err
	}
	return m.rw(false, [][]byte{p}, off)
}

// WriteAt implements io.WriterAt.
func (m *Image) WriteAt(p []byte, off int64) (int, error) { return m.WriteAtv([][]byte{p}, off) }

// rw carries out one transfer as a batch of one.
func (m *Image) rw(write bool, bufs [][]byte, off int64) (int, error) {
	n := total(bufs)
	if n == 0 {
		return 0, nil
	}
	if size := m.Size(); off < 0 || off+int64(n) > size {
		return 0, fmt.Errorf("%s: %d bytes at %d: past the end of the image (%d bytes)", m.name, n, off, size)
	}
	b := newBatch(m, 1)
	defer b.Close()
	b.queue(write, bufs, off)
	var err error
	b.Run(func(_ int, e error) { err = e })
	if err != nil {
		return 0, err
	}
	return n, nil
}

func total(bufs [][]byte) int {
	n := 0
	for _, b := range bufs {
		n += len(b)
	}
	return n
}

// Flush makes written data durable (librbd's cache written back).
func (m *Image) Flush() error {
	img, err := m.use()
	if err != nil {
		return err
	}
	defer m.done()
	if r := C.rbd_flush(img); r < 0 {
		return m.ioErr("flush", C.ssize_t(r))
	}
	return nil
}

// Sync is Flush (for code written for files).
func (m *Image) Sync() error { return m.Flush() }

// Punch frees the range so that it reads as zeros, if discard is enabled.
func (m *Image) Punch(off, n int64) error {
	if !m.opts.Discard {
		return ErrDiscardOff
	}
	if m.opts.ReadOnly {
		return fmt.Errorf("discard %s: %w", m.name, os.ErrPermission)
	}
	img, err := m.use()
	if err != nil {
		return err
	}
	defer m.done()
	if r := C.rbd_discard(img, C.uint64_t(off), C.uint64_t(n)); r < 0 {
		return m.ioErr("discard", C.ssize_t(r))
	}
	return nil
}

// ZeroRange makes the range read as zeros without sending zeros over the
// network.
func (m *Image) ZeroRange(off, n int64) error {
	if m.opts.ReadOnly {
		return fmt.Errorf("write zeroes %s: %w", m.name, os.ErrPermission)
	}
	img, err := m.use()
	if err != nil {
		return err
	}
	defer m.done()
	for n > 0 {
		c := min(n, 1<<30) // rbd_write_zeroes returns the length as an int
		if r := C.rbd_write_zeroes(img, C.uint64_t(off), C.size_t(c), 0, 0); r < 0 {
			return m.ioErr("write zeroes", r)
		}
		off, n = off+c, n-c
	}
	return nil
}

// DataRanges calls fn for each allocated range of [off, off+n), in order:
// whole RBD objects (4 MiB by default) written in this image or its
// parent; the rest reads as zeros.
func (m *Image) DataRanges(off, n int64, fn func(off, n int64) error) error {
	img, err := m.use()
	if err != nil {
		return err
	}
	var x C.hemd_extents
	r := C.hemd_diff(img, C.uint64_t(off), C.uint64_t(n), &x)
	m.done()
	defer C.free(unsafe.Pointer(x.e))
	if r < 0 {
		return m.ioErr("list allocated ranges of", C.ssize_t(r))
	}
	ext := unsafe.Slice(x.e, x.n)
	for _, e := range ext {
		s, l := max(int64(e.off), off), int64(e.off+e.len)
		l = min(l, off+n) - s
		if l <= 0 {
			continue
		}
		if err := fn(s-off, l); err != nil {
			return err
		}
	}
	return nil
}

// Rename renames the open image to to's image name (in its pool and
// namespace), never replacing an existing image (os.ErrExist).
func (m *Image) Rename(to Name) error {
	to.Pool, to.Namespace, to.Snap = m.name.Pool, m.name.Namespace, ""
	if err := m.conn.Rename(m.name, to); err != nil {
		return err
	}
	m.name = to
	return nil
}

// Close flushes (a writable image) and closes the image, and its
// connection if Open made it. It waits for the calls in progress.
func (m *Image) Close() error {
	if l := m.lock.Load(); l != nil {
		// Its record goes before the lock does (closing the image would
		// release the lock and leave the record behind).
		l.Release()
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	m.closed = true
	var err error
	if !m.opts.ReadOnly {
		if r := C.rbd_flush(m.img); r < 0 {
			err = m.ioErr("flush", C.ssize_t(r))
		}
	}
	if r := C.rbd_close(m.img); r < 0 && err == nil {
		err = fmt.Errorf("close %s: %w", m.name, syscall.Errno(-r))
	}
	m.img = nil
	m.conn.release()
	return err
}

// Reachable tells whether the cluster can serve the image now, without
// touching the image (whose I/O would wait for an OSD as long as it takes):
// its monitors answer, within the connection's timeout, and at least one OSD
// is up. hemd asks before a front-end sees the disk, so that a VM is refused
// a volume whose cluster is gone instead of hanging on its first read. The
// error names the cluster and the image.
func (m *Image) Reachable(ctx context.Context) error {
	if m.isClosed() {
		return fmt.Errorf("%s: %w", m.name, os.ErrClosed)
	}
	type answer struct {
		out []byte
		err error
	}
	ch := make(chan answer, 1)
	go func() {
		out, _, err := m.conn.conn.MonCommand([]byte(`{"prefix": "osd stat", "format": "json"}`))
		ch <- answer{out, err}
	}()
	var a answer
	select {
	case a = <-ch:
	case <-ctx.Done():
		return fmt.Errorf("%s on %s: the monitors did not answer: %w", m.name, m.conn, ctx.Err())
	}
	if a.err != nil {
		return fmt.Errorf("%s on %s: the monitors did not answer: %w", m.name, m.conn, connectError(a.err, m.conn.cluster.Timeout))
	}
	var st struct {
		NumOSDs   int `json:"num_osds"`
		NumUpOSDs int `json:"num_up_osds"`
	}
	if err := json.Unmarshal(a.out, &st); err != nil {
		return fmt.Errorf("%s on %s: osd stat: %w", m.name, m.conn, err)
	}
	if st.NumUpOSDs == 0 {
		return fmt.Errorf("%s on %s: %w: none of its %d OSDs is up", m.name, m.conn, ErrUnreachable, st.NumOSDs)
	}
	return nil
}
