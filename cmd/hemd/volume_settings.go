package main

// Per-volume settings beyond the disk itself: provisioned performance
// (iops, throughput and their bursts), which hemd volume modify and SIGHUP
// change at run time, and who may connect to the volume's socket (its
// owner, group and mode), which libvirt's QEMU needs.

import (
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/hemd/hemd/vhost"
	"github.com/hemd/hemd/vhost/blk"
)

// volumeExtra is embedded in volumeConfig: its keys sit in [[volume]].
type volumeExtra struct {
	// IOPS is the most reads and writes per second, all queues together;
	// 0 (the default) is unlimited.
	IOPS uint64 `toml:"iops"`
	// Throughput is the most MB/s (10^6 bytes) read and written; 0 is
	// unlimited.
	Throughput uint64 `toml:"throughput"`
	// IOPSBurst is how many requests may go at once after an idle spell
	// (the token bucket's size); default a tenth of a second's worth.
	IOPSBurst uint64 `toml:"iops_burst"`
	// ThroughputBurst is the same in MB; default a tenth of a second's
	// worth.
	ThroughputBurst uint64 `toml:"throughput_burst"`
	// SocketOwner and SocketGroup own the vhost-user socket (user and
	// group names or numbers); default hemd's user, and the group
	// $HEMD_SOCKET_GROUP names if it exists.
	SocketOwner string `toml:"socket_owner"`
	SocketGroup string `toml:"socket_group"`
	// SocketMode is the socket's mode, octal ("0660"); default 0660 with a
	// socket group, else 0600. Bits for others are refused.
	SocketMode string `toml:"socket_mode"`
}

// socketGroupEnv names the group every volume's socket gets unless its
// config says otherwise: the shipped units set it to libvirt-qemu, the
// group libvirt's QEMU runs in. A group that does not exist is passed over
// with a warning.
const socketGroupEnv = "HEMD_SOCKET_GROUP"

// bytesPerMB is the unit of throughput: MB/s as hemd bench reports it.
const bytesPerMB = 1_000_000

// limits are the blk limits the settings ask for.
func (x volumeExtra) limits() blk.Limits {
	return blk.Limits{IOPS: x.IOPS, BPS: x.Throughput * bytesPerMB, IOPSBurst: x.IOPSBurst, BPSBurst: x.ThroughputBurst * bytesPerMB}
}

// check checks the settings (the socket's owner and group are looked up
// when the socket is made).
func (x volumeExtra) check() error {
	if x.Throughput > 1<<40/bytesPerMB || x.ThroughputBurst > 1<<40/bytesPerMB {
		return fmt.Errorf("throughput %d MB/s (burst %d MB) out of range", x.Throughput, x.ThroughputBurst)
	}
	if _, err := blk.NewThrottle(x.limits()); err != nil {
		return err
	}
	if _, err := parseSocketMode(x.SocketMode); err != nil {
		return err
	}
	return nil
}

// parseSocketMode parses an octal mode; "" is 0 (the default).
func parseSocketMode(s string) (os.FileMode, error) {
	if s == "" {
		return 0, nil
	}
	m, err := strconv.ParseUint(strings.TrimPrefix(s, "0o"), 8, 32)
	if err != nil || m > 0o777 {
		return 0, fmt.Errorf("socket_mode %q: want octal permission bits such as \"0660\"", s)
	}
	if m&0o007 != 0 {
		return 0, fmt.Errorf("socket_mode %s: %w (a front-end reads the volume's plaintext): give a group access instead (socket_group, 0660)", s, vhost.ErrSocketMode)
	}
	if m&0o600 != 0o600 {
		return 0, fmt.Errorf("socket_mode %s: hemd's own user needs read and write", s)
	}
	return os.FileMode(m), nil
}

// listenOptions resolves the settings into the socket's options, and says
// where the group came from when it is the default.
func (x volumeExtra) listenOptions() (vhost.ListenOptions, []string, error) {
	var o vhost.ListenOptions
	var notes []string
	o.UID, o.GID = -1, -1
	mode, err := parseSocketMode(x.SocketMode)
	if err != nil {
		return o, nil, err
	}
	if x.SocketOwner != "" {
		uid, err := lookupUser(x.SocketOwner)
		if err != nil {
			return o, nil, err
		}
		o.UID, o.Chown = uid, true
	}
	group := x.SocketGroup
	if group == "" {
		if g := os.Getenv(socketGroupEnv); g != "" {
			if _, err := lookupGroup(g); err == nil {
				group = g
			} else {
				notes = append(notes, fmt.Sprintf("%s=%s: no such group, the socket keeps hemd's group", socketGroupEnv, g))
			}
		}
	}
	if group != "" {
		gid, err := lookupGroup(group)
		if err != nil {
			return o, nil, err
		}
		o.GID, o.Chown = gid, true
		if mode == 0 {
			mode = 0o660
		}
	}
	o.Mode = mode
	return o, notes, nil
}

func lookupUser(name string) (int, error) {
	if id, err := strconv.Atoi(name); err == nil && id >= 0 {
		return id, nil
	}
	u, err := user.Lookup(name)
	if err != nil {
		return 0, fmt.Errorf("socket_owner %q: %w", name, err)
	}
	return strconv.Atoi(u.Uid)
}

func lookupGroup(name string) (int, error) {
	if id, err := strconv.Atoi(name); err == nil && id >= 0 {
		return id, nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return 0, fmt.Errorf("socket_group %q: %w", name, err)
	}
	return strconv.Atoi(g.Gid)
}

// libvirtQEMUUser is the user Debian's libvirt runs QEMU as.
const libvirtQEMUUser = "libvirt-qemu"

// accessWarnings says why the QEMU that libvirt runs could not connect to
// the socket at path: a socket only root may use while libvirt's QEMU user
// exists, or a directory above the socket that keeps the socket's group out
// (connect needs search permission on every directory). Each is a sentence
// for the log; none means nothing is seen wrong.
func accessWarnings(path string) []string {
	st, err := os.Lstat(path)
	if err != nil {
		return nil
	}
	sys, ok := sysStat(st)
	if !ok {
		return nil
	}
	var out []string
	perm := st.Mode().Perm()
	if u, err := user.Lookup(libvirtQEMUUser); err == nil {
		uid, _ := strconv.Atoi(u.Uid)
		reachable := int(sys.uid) == uid || perm&0o060 == 0o060 && userInGroup(u, int(sys.gid))
		if !reachable {
			out = append(out, fmt.Sprintf("libvirt's QEMU runs as %s, which may not connect to %s (%s): it fails with \"Permission denied\"; set socket_group = %q (mode 0660) for this volume, or %s",
				libvirtQEMUUser, path, vhost.DescribeAccess(path), libvirtQEMUUser, socketGroupEnv))
		}
	}
	if perm&0o060 == 0o060 {
		for dir := filepath.Dir(path); ; dir = filepath.Dir(dir) {
			dst, err := os.Stat(dir)
			if err != nil {
				break
			}
			if ds, ok := sysStat(dst); ok {
				dp := dst.Mode().Perm()
				if dp&0o001 == 0 && !(ds.gid == sys.gid && dp&0o010 != 0) && !(ds.uid == sys.uid && dp&0o100 != 0) {
					out = append(out, fmt.Sprintf("directory %s (%s) keeps the socket's group out: front-ends fail with \"Permission denied\"; give it mode 0711 (RuntimeDirectoryMode=0711)",
						dir, vhost.DescribeAccess(dir)))
					break
				}
			}
			if dir == "/" || dir == "." {
				break
			}
		}
	}
	return out
}

// userInGroup reports whether u is in group gid (primary or supplementary).
func userInGroup(u *user.User, gid int) bool {
	if u.Gid == strconv.Itoa(gid) {
		return true
	}
	ids, err := u.GroupIds()
	if err != nil {
		return false
	}
	for _, id := range ids {
		if id == strconv.Itoa(gid) {
			return true
		}
	}
	return false
}

// ownerOf is a file's owner and group.
type ownerOf struct{ uid, gid uint32 }

func sysStat(fi os.FileInfo) (ownerOf, bool) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return ownerOf{}, false
	}
	return ownerOf{st.Uid, st.Gid}, true
}
