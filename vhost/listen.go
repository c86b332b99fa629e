package vhost

import (
	"errors"
	"fmt"
	"net"
	"os"
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

// Listen creates the socket at path with mode 0600. A stale socket left by a
// dead process is replaced; a live one is refused with ErrSocketInUse.
func Listen(path string) (*Listener, error) {
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
	if err := os.Chmod(path, 0o600); err != nil {
		unix.Close(fd)
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
