package vhost

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// A socket gets the mode, owner and group asked for; a mode that lets every
// local user connect is refused; the default is 0600 whatever the umask.
func TestListenAccess(t *testing.T) {
	dir := t.TempDir()
	old := syscall.Umask(0o077) // as hemd.service's UMask=0077
	defer syscall.Umask(old)

	def := filepath.Join(dir, "default.sock")
	ln, err := Listen(def)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if st, err := os.Stat(def); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("default socket: %v, mode %v", err, st.Mode().Perm())
	}

	grp := filepath.Join(dir, "group.sock")
	gid := os.Getgid()
	ln2, err := ListenWith(grp, ListenOptions{Mode: 0o660, UID: -1, GID: gid, Chown: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ln2.Close()
	st, err := os.Stat(grp)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o660 || int(st.Sys().(*syscall.Stat_t).Gid) != gid {
		t.Fatalf("group socket: mode %v gid %d, want 0660 gid %d", st.Mode().Perm(), st.Sys().(*syscall.Stat_t).Gid, gid)
	}
	if a := ln2.Access(); !strings.HasPrefix(a, "mode 0660 owner ") {
		t.Fatalf("Access() = %q", a)
	}
	// It is a working socket.
	c, err := net.Dial("unix", grp)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()

	for _, mode := range []os.FileMode{0o666, 0o602, 0o604} {
		p := filepath.Join(dir, "open"+strconv.Itoa(int(mode))+".sock")
		if _, err := ListenWith(p, ListenOptions{Mode: mode}); !errors.Is(err, ErrSocketMode) {
			t.Fatalf("mode %#o: %v, want ErrSocketMode", mode, err)
		}
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("mode %#o: a refused socket was created: %v", mode, err)
		}
	}
	// An owner that cannot be set (as an unprivileged user) fails and
	// leaves no socket.
	if os.Geteuid() != 0 {
		p := filepath.Join(dir, "chown.sock")
		if _, err := ListenWith(p, ListenOptions{UID: 0, GID: -1, Chown: true}); err == nil {
			t.Fatal("chown to root accepted for a non-root user")
		}
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("a failed socket was left: %v", err)
		}
	}
}
