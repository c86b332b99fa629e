package storage

// One writer at a time: a volume is claimed with an open file description
// lock (fcntl F_OFD_SETLK) over the whole file or block device. Such a lock
// belongs to its own open file description, so closing another descriptor
// of the file (as classic POSIX fcntl locks do) never drops it, and the
// kernel drops it when the holder dies, SIGKILL included: a dead hemd never
// blocks its successor. The descriptor is close-on-exec, so no child keeps
// it alive. An exclusive claim (a writer) excludes every other claim; shared
// claims (read-only attachments) go together. The lock is advisory: it binds
// the processes that ask for it, every hemd serve and QEMU's image locking
// (OFD locks on bytes of the image), so QEMU is refused a served volume file
// too.
//
// The holder says who it is in a small JSON record, written under the lock,
// so that a refused process can name it:
//   - a regular file: beside it, FILE.hemd-holder (FILE with symbolic links
//     resolved), so that hemds on other hosts sharing the storage read it too;
//   - a block device: RUNTIME_DIR/holders/blockdev-MAJOR:MINOR (keyed by the
//     device number, /run/hemd for root), as /dev is no place for files.
//
// A holder removes its record when it lets go; a record left by a killed
// holder is told apart by the process start time it carries, and the next
// holder replaces it. Several readers share one record: the last to take the
// lock writes it.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// LockOptions say how a volume is claimed.
type LockOptions struct {
	// Shared claims the volume for reading only: shared with other readers,
	// refused while a writer holds it (and a writer is refused while any
	// reader holds it).
	Shared bool
	// Socket is the vhost-user socket the holder serves, recorded so that a
	// refused process can name it.
	Socket string
	// RuntimeDir holds the records of block devices' holders. Default:
	// /run/hemd for root, $XDG_RUNTIME_DIR/hemd otherwise.
	RuntimeDir string
	// Log gets a warning when the holder record cannot be written (the lock
	// still holds). Nil: no log.
	Log *slog.Logger
}

// Holder is what a volume's holder records about itself.
type Holder struct {
	Program string    `json:"program"`
	PID     int       `json:"pid"`
	Host    string    `json:"host"`
	Socket  string    `json:"socket,omitempty"`
	Shared  bool      `json:"shared,omitempty"` // read-only
	Since   time.Time `json:"since"`            // when it took the volume
	// ProcStart is the holder's start time in clock ticks after boot
	// (/proc/PID/stat field 22): a later process with the same pid has
	// another one.
	ProcStart uint64 `json:"proc_start,omitempty"`
}

// String names the holder: "hemd pid 4242 (socket /run/a.sock, writing
// since 2026-01-02T15:04:05Z)".
func (h *Holder) String() string {
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s pid %d", h.Program, h.PID)
	if host, _ := os.Hostname(); h.Host != "" && h.Host != host {
		fmt.Fprintf(&b, " on host %s", h.Host)
	}
	b.WriteString(" (")
	if h.Socket != "" {
		fmt.Fprintf(&b, "socket %s, ", h.Socket)
	}
	mode := "writing"
	if h.Shared {
		mode = "read-only"
	}
	fmt.Fprintf(&b, "%s since %s)", mode, h.Since.UTC().Format(time.RFC3339))
	return b.String()
}

// ErrInUse means another process holds the volume.
var ErrInUse = errors.New("volume in use")

// InUseError is the refusal of a claim: another process holds the volume.
type InUseError struct {
	// Holder is the recorded holder; nil when none is recorded, or the
	// record is left by a process that has exited.
	Holder *Holder
	// Shared: the volume is held for reading only (told by the lock itself,
	// with or without a record).
	Shared bool
}

func (e *InUseError) Error() string {
	if e.Holder == nil {
		if e.Shared {
			return "in use read-only by another process (it left no holder record)"
		}
		return "in use by another process (it left no holder record)"
	}
	return "in use by " + e.Holder.String()
}

func (e *InUseError) Unwrap() error { return ErrInUse }

// Lock is a claim on a volume: a lock on its file or block device and the
// record of its holder. Its methods are safe for concurrent use.
type Lock struct {
	mu     sync.Mutex
	fd     int // -1 once closed
	path   string
	record string // where the holder record lives
	shared bool
	self   Holder
	held   bool
	log    *slog.Logger
}

// OpenLock opens the lock of the volume at path without taking it.
func OpenLock(path string, o LockOptions) (*Lock, error) {
	return openLock(path, path, o)
}

// NewLock opens the lock of the file or block device s has open (the same
// inode, whatever became of its path since) without taking it.
func (s *File) NewLock(o LockOptions) (*Lock, error) {
	return openLock("/proc/self/fd/"+strconv.Itoa(s.fd), s.path, o)
}

func openLock(open, path string, o LockOptions) (*Lock, error) {
	// A write lock needs a descriptor open for writing.
	flag := unix.O_RDWR
	if o.Shared {
		flag = unix.O_RDONLY
	}
	fd, err := unix.Open(open, flag|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	l := &Lock{fd: fd, path: path, shared: o.Shared, log: o.Log}
	if l.log == nil {
		l.log = slog.New(slog.DiscardHandler)
	}
	if l.record, err = recordPath(fd, o.RuntimeDir); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	host, _ := os.Hostname()
	l.self = Holder{
		Program: filepath.Base(os.Args[0]), PID: os.Getpid(), Host: host,
		Socket: o.Socket, Shared: o.Shared, ProcStart: procStart(os.Getpid()),
	}
	return l, nil
}

// recordPath is where the holder of the file open at fd records itself.
func recordPath(fd int, runtimeDir string) (string, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return "", err
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		// The name the kernel knows, symbolic links resolved.
		p, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
		if err != nil {
			return "", err
		}
		return p + ".hemd-holder", nil
	case unix.S_IFBLK:
		if runtimeDir == "" {
			runtimeDir = defaultRuntimeDir()
		}
		return filepath.Join(runtimeDir, "holders",
			fmt.Sprintf("blockdev-%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))), nil
	}
	return "", errors.New("not a regular file or block device")
}

// defaultRuntimeDir is /run/hemd for root, $XDG_RUNTIME_DIR/hemd otherwise.
func defaultRuntimeDir() string {
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" && os.Geteuid() != 0 {
		return filepath.Join(d, "hemd")
	}
	if os.Geteuid() == 0 {
		return "/run/hemd"
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("hemd-%d", os.Geteuid()))
}

// RecordPath returns where the holder of this volume records itself.
func (l *Lock) RecordPath() string { return l.record }

// Held reports whether this Lock holds the volume.
func (l *Lock) Held() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.held
}

// ErrBusy is a lock attempt refused because another holder has the lock;
// a lock's try step returns it so that AcquireLoop tries again.
var ErrBusy = errors.New("busy")
var errBusy = ErrBusy

// AcquireLoop is the body of a lock's TryAcquire and Acquire: it calls try
// until try returns anything but ErrBusy, every poll, or, once ctx ends,
// returns inUse's refusal naming the holder.
func AcquireLoop(ctx context.Context, poll time.Duration, try, inUse func() error) error {
	var tick <-chan time.Time
	for {
		err := try()
		if !errors.Is(err, ErrBusy) {
			return err
		}
		if tick == nil {
			t := time.NewTicker(poll)
			defer t.Stop()
			tick = t.C
		}
		select {
		case <-ctx.Done():
			return inUse()
		case <-tick:
		}
	}
}

// try takes the lock if it is free.
func (l *Lock) try() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.fd < 0 {
		return fmt.Errorf("lock %s: closed", l.path)
	}
	if l.held {
		return nil
	}
	typ := int16(unix.F_WRLCK)
	if l.shared {
		typ = unix.F_RDLCK
	}
	if err := l.setlk(typ); err != nil {
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES) {
			return errBusy
		}
		return fmt.Errorf("lock %s: %w", l.path, err)
	}
	l.held = true
	self := l.self
	self.Since = time.Now()
	if err := writeRecord(l.record, &self); err != nil {
		l.log.Warn("holder record not written: a process refused the volume cannot name this one",
			"path", l.path, "record", l.record, "err", err)
	}
	return nil
}

// setlk sets an OFD lock of type typ over the whole file.
func (l *Lock) setlk(typ int16) error {
	lk := unix.Flock_t{Type: typ, Whence: io.SeekStart} // Start 0, Len 0: to the end, however it grows
	for {
		err := unix.FcntlFlock(uintptr(l.fd), unix.F_OFD_SETLK, &lk)
		if err != unix.EINTR {
			return err
		}
	}
}

// TryAcquire takes the lock if no other process holds it (it returns at
// once if this Lock holds it already). Otherwise the error is an
// *InUseError naming the holder.
func (l *Lock) TryAcquire() error {
	err := l.try()
	if errors.Is(err, errBusy) {
		return l.inUse()
	}
	return err
}

// lockPoll is how often Acquire tries again.
const lockPoll = 15 * time.Millisecond

// Acquire takes the lock, trying again every 15 ms until the holder lets go
// or ctx ends (it tries at least once, and returns at once if this Lock
// holds it already). When ctx ends first, the error is an *InUseError
// naming the holder.
func (l *Lock) Acquire(ctx context.Context) error {
	return AcquireLoop(ctx, lockPoll, l.try, l.inUse)
}

// inUse reads the holder's record for the refusal. A holder that has just
// taken the lock may not have written its record yet, so a missing or stale
// record is read again a few times.
func (l *Lock) inUse() error {
	for i := 0; ; i++ {
		h, err := readRecord(l.record)
		if err == nil && h.alive() {
			return &InUseError{Holder: h, Shared: h.Shared}
		}
		if i == 5 {
			return &InUseError{Shared: l.heldShared()}
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// heldShared reports whether the locks that conflict with a writer's are
// all shared (F_OFD_GETLK names one of them).
func (l *Lock) heldShared() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.fd < 0 {
		return false
	}
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: io.SeekStart}
	if err := unix.FcntlFlock(uintptr(l.fd), unix.F_OFD_GETLK, &lk); err != nil {
		return false
	}
	return lk.Type == unix.F_RDLCK
}

// Release lets go of the lock (removing this holder's record first). It
// does nothing if the lock is not held.
func (l *Lock) Release() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.release()
}

func (l *Lock) release() {
	if !l.held {
		return
	}
	if h, err := readRecord(l.record); err == nil && h.PID == l.self.PID && h.Host == l.self.Host && h.ProcStart == l.self.ProcStart {
		os.Remove(l.record)
	}
	if err := l.setlk(unix.F_UNLCK); err != nil {
		// Not seen in practice; closing the descriptor would drop it.
		l.log.Error("unlock volume", "path", l.path, "err", err)
		return
	}
	l.held = false
}

// Close releases the lock and closes its descriptor.
func (l *Lock) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.fd < 0 {
		return nil
	}
	l.release()
	err := unix.Close(l.fd)
	l.fd, l.held = -1, false
	if err != nil {
		return fmt.Errorf("close lock %s: %w", l.path, err)
	}
	return nil
}

// writeRecord replaces the record at path with h, atomically (a reader sees
// the old record or the new one).
func writeRecord(path string, h *Holder) error {
	b, err := json.Marshal(h)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	// A new file (O_EXCL: never through a link someone put there), renamed
	// over the record (a rename replaces a link, never its target).
	tmp := fmt.Sprintf("%s.%d.tmp", path, os.Getpid())
	os.Remove(tmp) // left by a process that died writing it
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	_, err = f.Write(append(b, '\n'))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

// readRecord reads the holder record at path.
func readRecord(path string) (*Holder, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var h Holder
	if err := json.Unmarshal(b, &h); err != nil {
		return nil, fmt.Errorf("holder record %s: %w", path, err)
	}
	if h.PID <= 0 {
		return nil, fmt.Errorf("holder record %s: no pid", path)
	}
	return &h, nil
}

// alive reports whether the recorded holder may still run: on this host,
// its pid runs with the recorded start time; on another host, it cannot be
// told and is taken as alive.
func (h *Holder) alive() bool {
	if host, _ := os.Hostname(); h.Host != host {
		return true
	}
	ps := procStart(h.PID)
	return ps != 0 && (h.ProcStart == 0 || ps == h.ProcStart)
}

// procStart returns process pid's start time in clock ticks after boot, or
// 0 if it does not run.
func procStart(pid int) uint64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	// The command name (field 2) may hold spaces and parentheses: count
	// fields after its closing parenthesis, which is field 2's end.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	f := bytes.Fields(b[i+1:])
	// f[0] is field 3 (state); starttime is field 22.
	if len(f) < 20 {
		return 0
	}
	v, err := strconv.ParseUint(string(f[19]), 10, 64)
	if err != nil {
		return 0
	}
	return v
}

// Alive reports whether the recorded holder may still run (see alive): a
// claim that is not a lock on a file (an RBD image's exclusive lock) tells
// a dead holder from a live one with it.
func (h *Holder) Alive() bool { return h.alive() }

// Self returns the record of this process as a holder.
func Self(socket string, shared bool) Holder {
	host, _ := os.Hostname()
	return Holder{Program: filepath.Base(os.Args[0]), PID: os.Getpid(), Host: host,
		Socket: socket, Shared: shared, ProcStart: procStart(os.Getpid()), Since: time.Now()}
}
