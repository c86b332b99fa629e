package main

// Volumes on Ceph RBD: a volume named rbd:POOL/IMAGE (a snapshot
// rbd:POOL/IMAGE@snap-…) instead of a path. The image holds the same
// volume format as a file (the header copies in its first MiB), so every
// volume command works on it; how to reach its cluster is given per volume
// (ceph.conf, cephx client id, keyring) with flags or in the config file.
// The librbd side is rbd.go; rbd_norbd.go stands in for it in a hemd built
// with -tags norbd.

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"

	"github.com/hemd/hemd/hem/volume"
	"github.com/hemd/hemd/storage"
	"github.com/hemd/hemd/storage/rbd"
	"github.com/hemd/hemd/vhost/blk"
)

// cephSettings say how a volume on Ceph RBD reaches its cluster. They are
// embedded in volumeConfig (config file keys ceph_conf, ceph_id,
// ceph_keyring) and set by the --ceph-* flags.
type cephSettings struct {
	// CephConf is the cluster's ceph.conf (default /etc/ceph/ceph.conf, or
	// $HEMD_CEPH_CONF).
	CephConf string `toml:"ceph_conf"`
	// CephID is the cephx client id, without "client." (default admin, or
	// $HEMD_CEPH_ID).
	CephID string `toml:"ceph_id"`
	// CephKeyring is the client's keyring file (default: what ceph.conf
	// says, or $HEMD_CEPH_KEYRING).
	CephKeyring string `toml:"ceph_keyring"`
}

// Environment defaults of the --ceph-* flags.
const (
	cephConfEnv    = "HEMD_CEPH_CONF"
	cephIDEnv      = "HEMD_CEPH_ID"
	cephKeyringEnv = "HEMD_CEPH_KEYRING"
)

// flags registers --ceph-conf, --ceph-id and --ceph-keyring on fs.
func (c *cephSettings) flags(fs *flag.FlagSet) {
	fs.StringVar(&c.CephConf, "ceph-conf", os.Getenv(cephConfEnv), "for rbd:POOL/IMAGE volumes: the cluster's ceph.conf (default "+rbd.DefaultConf+"; $"+cephConfEnv+")")
	fs.StringVar(&c.CephID, "ceph-id", os.Getenv(cephIDEnv), "for rbd:POOL/IMAGE volumes: cephx client id, without client. (default admin; $"+cephIDEnv+")")
	fs.StringVar(&c.CephKeyring, "ceph-keyring", os.Getenv(cephKeyringEnv), "for rbd:POOL/IMAGE volumes: the client's keyring (default: as ceph.conf says; $"+cephKeyringEnv+")")
}

// fillFromEnv fills what the config file left unset from the environment.
func (c *cephSettings) fillFromEnv() {
	for p, env := range map[*string]string{&c.CephConf: cephConfEnv, &c.CephID: cephIDEnv, &c.CephKeyring: cephKeyringEnv} {
		if *p == "" {
			*p = os.Getenv(env)
		}
	}
}

// cluster returns the settings as package rbd takes them.
func (c cephSettings) cluster() rbd.Cluster {
	return rbd.Cluster{Conf: c.CephConf, ID: c.CephID, Keyring: c.CephKeyring}
}

// locate returns where the volume name is: rbd:POOL/IMAGE[@SNAP] on the
// cluster c, or a file.
func locate(name string, c cephSettings) (volume.Location, error) {
	if !rbd.IsName(name) {
		return volume.FileAt(name), nil
	}
	n, err := rbd.ParseName(name)
	if err != nil {
		return nil, err
	}
	return rbdLocate(n, c.cluster())
}

// isRBD reports whether name is an RBD image or snapshot.
func isRBD(name string) bool { return rbd.IsName(name) }

// rbdTarget is the name under which a snapshot of the RBD volume vol is
// made: the second argument of hemd snapshot create, which may be the
// whole name (rbd:POOL/IMAGE@snap-…), just the snapshot id, or "" for a new
// id (idFlag, if set, or a fresh one).
func rbdTarget(vol rbd.Name, arg, idFlag string) (string, error) {
	id := idFlag
	switch {
	case arg == "":
	case rbd.IsName(arg):
		n, err := rbd.ParseName(arg)
		if err != nil {
			return "", err
		}
		if n.Pool != vol.Pool || n.Namespace != vol.Namespace || n.Image != vol.Image || n.Snap == "" {
			return "", fmt.Errorf("a snapshot of %s is named %s@SNAPSHOT-ID, not %s: an RBD snapshot lives in its image", vol, vol, arg)
		}
		if id != "" && id != n.Snap {
			return "", fmt.Errorf("--id %s and %s name two snapshots", id, arg)
		}
		id = n.Snap
	default:
		if id != "" && id != arg {
			return "", fmt.Errorf("--id %s and %s name two snapshots", id, arg)
		}
		id = arg
	}
	if id == "" {
		id = volume.NewID("snap")
	}
	if !volume.ValidSnapshotID(id) {
		return "", fmt.Errorf("snapshot id %q is not snap- and 17 hex digits (an RBD snapshot of a volume is named by its snapshot id)", id)
	}
	return id, nil
}

// backing is a served volume's storage: a file or block device
// (*storage.File) or an RBD image (rbd.go).
type backing interface {
	blk.Store
	io.ReaderAt
	io.WriterAt
	Grow(size int64) error
	Close() error
	// Stat and StartCOW are the file's: an RBD image has no file to stat,
	// and its snapshots are native (hemd snapshot create rbd:…).
	Stat() (os.FileInfo, error)
	StartCOW(off, n int64, dst io.WriterAt, o storage.COWOptions) (*storage.COW, error)
}

// claim is a served volume's one-writer lock: a storage.Lock on its file,
// or an RBD image's exclusive lock.
type claim interface {
	blk.Claim
	TryAcquire() error
	Held() bool
	Close() error
}

// openBacking opens a served volume's storage and its claim (not taken): a
// file or block device, or an RBD image (within its cluster's timeout).
// sock names the holder's socket in its record.
func openBacking(ctx context.Context, v volumeConfig, sock string, log *slog.Logger) (backing, claim, error) {
	if rbd.IsName(v.Path) {
		return openRBDBacking(ctx, v, sock, log)
	}
	st, err := storage.Open(v.Path, storage.Options{ReadOnly: v.ReadOnly, Direct: v.Direct, Discard: v.Discard})
	if err != nil {
		return nil, nil, err
	}
	lock, err := st.NewLock(storage.LockOptions{Shared: v.ReadOnly, Socket: sock, Log: log})
	if err != nil {
		st.Close()
		return nil, nil, err
	}
	return st, lock, nil
}

// ioRBD says a volume's I/O goes through librbd, a queue's batch in flight
// at once (rbd_aio_readv, rbd_aio_writev): status and metrics show it.
const ioRBD = "rbd"

// ioOf is how I/O reaches the storage before io_uring is tried: librbd for
// an RBD image, one system call per request for a file.
func ioOf(st backing) string {
	if _, ok := st.(*storage.File); ok {
		return ioSync
	}
	return ioRBD
}

// section returns the window [off, off+size) of a served volume's storage:
// the data area the guest sees.
func section(st backing, off, size int64) (blk.Store, error) {
	if area, ok, err := rbdSection(st, off, size); ok {
		return area, err
	}
	f, ok := st.(*storage.File)
	if !ok {
		return nil, fmt.Errorf("no data area in %T", st)
	}
	return storage.NewSection(f, off, size)
}
