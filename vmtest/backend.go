package vmtest

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Backend serves a disk image over vhost-user-blk.
type Backend interface {
	Name() string
	// Serve serves image on a new socket with queues virtqueues until the
	// test ends, and returns the socket.
	Serve(t testing.TB, image string, queues int) *Served
}

// Served is a running back-end.
type Served struct {
	Socket string
	cmd    *exec.Cmd
	mu     sync.Mutex
	log    []string
	done   chan struct{}
}

// Log returns the back-end's output so far.
func (s *Served) Log() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.log...)
}

// HasEvent reports whether a line of log (a back-end's, Served.Log) is
// event ("event=attach", ...) about the volume volID.
func HasEvent(log []string, event, volID string) bool {
	re := regexp.MustCompile(regexp.QuoteMeta(event) + `\b.*volume=` + regexp.QuoteMeta(volID))
	for _, l := range log {
		if re.MatchString(l) {
			return true
		}
	}
	return false
}

// Stop sends SIGTERM and waits for the back-end to exit.
func (s *Served) Stop(t testing.TB) {
	t.Helper()
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(15 * time.Second):
		t.Errorf("vmtest: back-end did not stop on SIGTERM")
		s.cmd.Process.Kill()
		<-s.done
	}
}

// start runs a back-end command, streams its output into the test log and
// waits for its socket.
func start(t testing.TB, name, socket string, env []string, bin string, args ...string) *Served {
	t.Helper()
	s := &Served{Socket: socket, done: make(chan struct{})}
	s.cmd = exec.Command(bin, args...)
	s.cmd.Env = append(os.Environ(), env...)
	out, err := s.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	s.cmd.Stderr = s.cmd.Stdout
	t.Logf("vmtest: %s %s", bin, strings.Join(args, " "))
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("vmtest: starting %s: %v", name, err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			t.Logf("%s: %s", name, sc.Text())
			s.mu.Lock()
			s.log = append(s.log, sc.Text())
			s.mu.Unlock()
		}
		io.Copy(io.Discard, out)
		s.cmd.Wait()
		close(s.done)
	}()
	t.Cleanup(func() {
		s.cmd.Process.Kill()
		<-s.done
	})
	for i := 0; i < 400; i++ {
		if _, err := os.Stat(socket); err == nil {
			return s
		}
		select {
		case <-s.done:
			t.Fatalf("vmtest: %s exited before its socket appeared", name)
		case <-time.After(25 * time.Millisecond):
		}
	}
	t.Fatalf("vmtest: %s socket %s did not appear", name, socket)
	return nil
}

// QSD is qemu-storage-daemon's vhost-user-blk export of a raw file.
type QSD struct{}

func (QSD) Name() string { return "qsd" }

func (QSD) Serve(t testing.TB, image string, queues int) *Served {
	t.Helper()
	bin, err := exec.LookPath("qemu-storage-daemon")
	if err != nil {
		t.Fatalf("vmtest: qemu-storage-daemon not installed (make test installs qemu-system-x86): %v", err)
	}
	sock := filepath.Join(t.TempDir(), "qsd.sock")
	return start(t, "qsd", sock, nil, bin,
		"--blockdev", "driver=file,node-name=f0,filename="+image+",cache.direct=off",
		"--export", fmt.Sprintf("type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=%s,writable=on,num-queues=%d", sock, queues))
}

// Hemd is hemd serve, built from this tree.
type Hemd struct {
	Bin  string
	Args []string // extra flags for hemd serve
	Env  []string // extra environment (HEMD_STATE_DIR=...)
}

func (Hemd) Name() string { return "hemd" }

func (h Hemd) Serve(t testing.TB, image string, queues int) *Served {
	t.Helper()
	return h.ServeOn(t, filepath.Join(t.TempDir(), "hemd.sock"), image, queues)
}

// ServeOn serves image on the socket path sock: a restarted hemd takes the
// socket of the one that died, and QEMU (reconnect=1) finds it there.
func (h Hemd) ServeOn(t testing.TB, sock, image string, queues int) *Served {
	t.Helper()
	args := append([]string{"serve", "--socket", sock, "--volume", image, "--queues", fmt.Sprint(queues)}, h.Args...)
	return start(t, "hemd", sock, h.Env, h.Bin, args...)
}

// Incoming returns h serving as the destination of a live migration
// (hemd serve --incoming): it takes the volume when the source hands it off.
func (h Hemd) Incoming() Hemd {
	h.Args = append(append([]string(nil), h.Args...), "--incoming")
	return h
}

// Refused runs hemd serve on image, which another hemd holds, and returns
// its error output; the test fails if it serves.
func (h Hemd) Refused(t testing.TB, image string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sock := filepath.Join(t.TempDir(), "refused.sock")
	args := append([]string{"serve", "--socket", sock, "--volume", image}, h.Args...)
	cmd := exec.CommandContext(ctx, h.Bin, args...)
	cmd.Env = append(os.Environ(), h.Env...)
	out, err := cmd.CombinedOutput()
	if err == nil || ctx.Err() != nil {
		t.Fatalf("vmtest: a second hemd served %s (%v):\n%s", image, err, out)
	}
	return string(out)
}

// Pid is the back-end's process id.
func (s *Served) Pid() int { return s.cmd.Process.Pid }

// Kill sends SIGKILL, as a crash would, and waits for the process to end.
func (s *Served) Kill() {
	s.cmd.Process.Kill()
	<-s.done
}

// BuildHemd builds hemd from the repository into dir.
func BuildHemd(dir string) (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "hemd")
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/hemd")
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building hemd: %v: %s", err, b)
	}
	return bin, nil
}

// SparseFile creates a sparse file of size bytes.
func SparseFile(t testing.TB, size int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.img")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	return p
}
