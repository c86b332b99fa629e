// Package rbd is hemd's Ceph RBD backing store: an image read and written
// through librbd (a queue's batch of transfers in flight at once with
// rbd_aio_readv/rbd_aio_writev), the image's exclusive lock as the volume's
// one-writer claim, and the image operations volumes need (create, rename,
// remove, snapshot, clone, the allocated ranges). Like package storage it
// sees only what hemd writes, ciphertext for an encrypted volume, and knows
// nothing of volumes.
//
// An image is named rbd:POOL/IMAGE (rbd:POOL/NAMESPACE/IMAGE in a
// namespace), a snapshot of it rbd:POOL/IMAGE@SNAP. How to reach the cluster
// (ceph.conf, the cephx client id and its keyring) is given beside the name.
//
// The librbd binding needs cgo and librbd-dev; build with -tags norbd for a
// hemd without RBD (only this file is built then: names still parse, and
// opening an image says hemd was built without RBD).
package rbd

import (
	"errors"
	"fmt"
	"strings"
	"time"
)

// Prefix starts the name of an RBD image.
const Prefix = "rbd:"

// IsName reports whether s names an RBD image (rbd:...), not a path.
func IsName(s string) bool { return strings.HasPrefix(s, Prefix) }

// Name is an image, or a snapshot of one.
type Name struct {
	Pool      string
	Namespace string // "" for the pool's default namespace
	Image     string
	Snap      string // "" for the image itself
}

// ParseName parses rbd:POOL/IMAGE, rbd:POOL/NAMESPACE/IMAGE, each with an
// optional @SNAP.
func ParseName(s string) (Name, error) {
	if !IsName(s) {
		return Name{}, fmt.Errorf("%q is not an RBD image name (rbd:POOL/IMAGE)", s)
	}
	rest := s[len(Prefix):]
	var n Name
	if i := strings.IndexByte(rest, '@'); i >= 0 {
		rest, n.Snap = rest[:i], rest[i+1:]
		if n.Snap == "" {
			return Name{}, fmt.Errorf("%q: empty snapshot name after @", s)
		}
	}
	parts := strings.Split(rest, "/")
	switch len(parts) {
	case 2:
		n.Pool, n.Image = parts[0], parts[1]
	case 3:
		n.Pool, n.Namespace, n.Image = parts[0], parts[1], parts[2]
	default:
		return Name{}, fmt.Errorf("%q: want rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE", s)
	}
	for what, v := range map[string]string{"pool": n.Pool, "image": n.Image, "snapshot": n.Snap, "namespace": n.Namespace} {
		if err := checkPart(what, v); err != nil {
			return Name{}, fmt.Errorf("%q: %w", s, err)
		}
	}
	if n.Pool == "" || n.Image == "" || (len(parts) == 3 && n.Namespace == "") {
		return Name{}, fmt.Errorf("%q: empty pool, namespace or image name", s)
	}
	return n, nil
}

// checkPart refuses what librbd or the name's syntax cannot take.
func checkPart(what, v string) error {
	if len(v) > 255 {
		return fmt.Errorf("%s name longer than 255 bytes", what)
	}
	for _, r := range v {
		if r < 0x20 || r == 0x7f || r == '/' || r == '@' {
			return fmt.Errorf("%s name %q holds %q", what, v, r)
		}
	}
	return nil
}

// String returns the name as ParseName takes it.
func (n Name) String() string {
	s := Prefix + n.Pool + "/"
	if n.Namespace != "" {
		s += n.Namespace + "/"
	}
	s += n.Image
	if n.Snap != "" {
		s += "@" + n.Snap
	}
	return s
}

// AtSnap returns the name of snapshot snap of the image.
func (n Name) AtSnap(snap string) Name {
	n.Snap = snap
	return n
}

// Cluster says how to reach a Ceph cluster as one cephx client.
type Cluster struct {
	// Conf is the ceph.conf to read (mon_host and the rest); default
	// /etc/ceph/ceph.conf.
	Conf string
	// ID is the cephx client id without "client." (default "admin").
	ID string
	// Keyring is the client's keyring file; default: what ceph.conf says
	// (or /etc/ceph/ceph.client.ID.keyring).
	Keyring string
	// Timeout bounds connecting to the monitors and opening an image
	// (default DefaultTimeout): an unreachable cluster is an error after
	// it, never a hang. Reads and writes of an open image wait as long as
	// it takes (an OSD that restarts stalls them, it does not fail them).
	Timeout time.Duration
}

// DefaultTimeout bounds connecting to a cluster and opening an image.
const DefaultTimeout = 15 * time.Second

// DefaultConf is where ceph.conf is by default.
const DefaultConf = "/etc/ceph/ceph.conf"

// WithDefaults fills in the defaults.
func (c Cluster) WithDefaults() Cluster {
	if c.Conf == "" {
		c.Conf = DefaultConf
	}
	if c.ID == "" {
		c.ID = "admin"
	}
	c.ID = strings.TrimPrefix(c.ID, "client.")
	if c.Timeout <= 0 {
		c.Timeout = DefaultTimeout
	}
	return c
}

// String names the cluster in errors: its ceph.conf and client.
func (c Cluster) String() string {
	c = c.WithDefaults()
	return fmt.Sprintf("cluster of %s as client.%s", c.Conf, c.ID)
}

// ErrNotBuilt is the error of opening an image in a hemd built with -tags
// norbd (or without cgo).
var ErrNotBuilt = errors.New("this hemd was built without Ceph RBD support (-tags norbd): build it with make build")
