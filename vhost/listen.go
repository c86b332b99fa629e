package vhost

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/user"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Listener is a vhost-user unix socket that one hemd owns: a lock file beside
// the socket keeps a second process from taking it over.
type Listener struct {
	net.Listener
	path string
	lock *os.File
}

// ErrSocketInUse means another process serves the socket path.
var ErrSocketInUse = errors.New("socket is in use by another process")

// ErrSocketMode is a socket mode that would let every local user connect:
// a front-end maps the guest's memory and reads the volume's plaintext.
var ErrSocketMode = errors.New("socket mode lets every local user connect")

// ListenOptions say who may connect to a socket: its mode, owner and group.
// Connecting to a unix socket needs write permission on it (and search
// permission on every directory above it).
type ListenOptions struct {
	// Mode is the socket's permission bits; 0 means 0600. Bits for others
	// are refused (ErrSocketMode).
	Mode os.FileMode
	// UID and GID are the socket's owner and group; -1 keeps the
	// process's. The zero value (root) counts only with Chown set.
	UID, GID int
	Chown    bool
}

// DefaultSocketMode is the mode of a socket whose options name none: only
// hemd's own user may connect.
const DefaultSocketMode os.FileMode = 0o600

// Listen creates the socket at path with mode 0600. A stale socket left by a
// dead process is replaced; a live one is refused with ErrSocketInUse.
func Listen(path string) (*Listener, error) { return ListenWith(path, ListenOptions{}) }

// ListenWith is Listen with the socket's mode, owner and group as o says.
// The socket is never reachable by more than o allows: it is bound with mode
// 0600 (less the umask), given its owner and group, and only then its mode.
func ListenWith(path string, o ListenOptions) (*Listener, error) {
	mode := o.Mode.Perm()
	if mode == 0 {
		mode = DefaultSocketMode
	}
	if mode&0o007 != 0 {
		return nil, fmt.Errorf("listen %s: %w: mode %#o (use a group: socket_group and mode 0660)", path, ErrSocketMode, mode)
	}
	lock, err := os.OpenFile(path+".lock", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", path, err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		b := make([]byte, 32)
		n, _ := lock.ReadAt(b, 0)
		lock.Close()
		holder := strings.TrimSpace(string(b[:n]))
		if holder != "" {
			holder = " (pid " + holder + ")"
		}
		return nil, fmt.Errorf("listen %s: %w%s", path, ErrSocketInUse, holder)
	}
	_ = lock.Truncate(0)
	_, _ = lock.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)

	fail := func(err error) (*Listener, error) {
		lock.Close()
		return nil, fmt.Errorf("listen %s: %w", path, err)
	}
	if st, err := os.Lstat(path); err == nil {
		if st.Mode()&os.ModeSocket == 0 {
			return fail(fmt.Errorf("%s exists and is not a socket", path))
		}
		if err := os.Remove(path); err != nil {
			return fail(err)
		}
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fail(err)
	}
	// The mode of a unix socket's inode is taken from the socket at bind
	// time: set it first, so the path is never reachable by others.
	if err := unix.Fchmod(fd, 0o600); err != nil {
		unix.Close(fd)
		return fail(err)
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		unix.Close(fd)
		return fail(err)
	}
	if o.Chown && (o.UID >= 0 || o.GID >= 0) {
		// Lchown: the path was just bound by this process; should it have
		// been swapped for a link meanwhile, the link is changed, not
		// what it points to.
		if err := os.Lchown(path, o.UID, o.GID); err != nil {
			unix.Close(fd)
			os.Remove(path)
			return fail(fmt.Errorf("give the socket owner %d, group %d (-1: unchanged): %w (a root hemd needs CAP_CHOWN for that)", o.UID, o.GID, err))
		}
	}
	if err := os.Chmod(path, mode); err != nil {
		unix.Close(fd)
		os.Remove(path)
		return fail(err)
	}
	if err := unix.Listen(fd, 8); err != nil {
		unix.Close(fd)
		return fail(err)
	}
	f := os.NewFile(uintptr(fd), path)
	ln, err := net.FileListener(f)
	f.Close()
	if err != nil {
		return fail(err)
	}
	return &Listener{Listener: ln, path: path, lock: lock}, nil
}

// Access describes who may connect to the socket: its mode, owner and
// group as the filesystem has them, e.g. "mode 0660 owner root group
// libvirt-qemu".
func (l *Listener) Access() string { return DescribeAccess(l.path) }

// DescribeAccess describes the mode, owner and group of the file at path.
func DescribeAccess(path string) string {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return err.Error()
	}
	owner, group := strconv.Itoa(int(st.Uid)), strconv.Itoa(int(st.Gid))
	if u, err := user.LookupId(owner); err == nil {
		owner = u.Username
	}
	if g, err := user.LookupGroupId(group); err == nil {
		group = g.Name
	}
	return fmt.Sprintf("mode %#o owner %s group %s", st.Mode&0o777, owner, group)
}

// Path returns the socket path.
func (l *Listener) Path() string { return l.path }

// Close stops listening, removes the socket and releases the lock. The lock
// file stays: removing it would let two processes lock different inodes.
func (l *Listener) Close() error {
	err := l.Listener.Close()
	_ = os.Remove(l.path)
	_ = l.lock.Truncate(0)
	l.lock.Close()
	return err
}
