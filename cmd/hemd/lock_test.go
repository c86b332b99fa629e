package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hemd/hemd/vhost/frontend"
)

// syncBuffer is a hemd's output, read while hemd writes it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// serveHemd starts hemd serve on socket with args and waits for the socket.
func serveHemd(t *testing.T, socket string, args ...string) (*exec.Cmd, *syncBuffer) {
	t.Helper()
	cmd := exec.Command(os.Args[0], append([]string{"serve", "--socket", socket}, args...)...)
	cmd.Env = append(os.Environ(), "HEMD_TEST_MAIN=1")
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	exited := make(chan struct{})
	go func() {
		for i := 0; i < 400; i++ {
			if _, err := os.Stat(socket); err == nil {
				close(exited)
				return
			}
			time.Sleep(25 * time.Millisecond)
		}
		close(exited)
	}()
	<-exited
	if _, err := os.Stat(socket); err != nil {
		t.Fatalf("hemd serve %v: no socket: %v\n%s", args, err, out)
	}
	return cmd, out
}

// refused runs hemd serve with args, whose socket is socket, expects it to
// exit with an error naming the holder's pid and socket, and leave no socket
// behind.
func refused(t *testing.T, socket string, holderPid int, holderSocket string, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], append([]string{"serve"}, args...)...)
	cmd.Env = append(os.Environ(), "HEMD_TEST_MAIN=1")
	out, err := cmd.CombinedOutput()
	if err == nil || ctx.Err() != nil {
		t.Fatalf("hemd serve %v was not refused (%v):\n%s", args, err, out)
	}
	for _, want := range []string{"in use by", "pid " + strconv.Itoa(holderPid), "socket " + holderSocket} {
		if !strings.Contains(string(out), want) {
			t.Fatalf("hemd serve %v: error does not say %q:\n%s", args, want, out)
		}
	}
	if _, err := os.Stat(socket); !os.IsNotExist(err) {
		t.Fatalf("refused hemd left its socket %s: %v", socket, err)
	}
}

// waitOutput waits for s in a hemd's output.
func waitOutput(t *testing.T, out *syncBuffer, s string) {
	t.Helper()
	for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		if strings.Contains(out.String(), s) {
			return
		}
	}
	t.Fatalf("hemd did not log %q:\n%s", s, out)
}

// rw does one request on queue 0: OUT writes data at sector, IN reads
// len(data) bytes there; it returns the status and what was read.
func rw(t *testing.T, c *frontend.Client, typ uint32, sector uint64, data []byte) (byte, []byte) {
	t.Helper()
	hdr, _ := c.Alloc(16, 16)
	binary.LittleEndian.PutUint32(c.Mem[hdr:], typ)
	binary.LittleEndian.PutUint64(c.Mem[hdr+8:], sector)
	buf, _ := c.Alloc(uint64(len(data)), 4096)
	copy(c.Mem[buf:], data)
	status, _ := c.Alloc(1, 1)
	c.Mem[status] = 0xff
	q := c.Queues[0]
	if _, err := q.Add([]frontend.Buf{{Addr: hdr, Len: 16}, {Addr: buf, Len: uint32(len(data)), Write: typ == 0},
		{Addr: status, Len: 1, Write: true}}); err != nil {
		t.Fatal(err)
	}
	q.Kick()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := q.Wait(ctx, nil); err != nil {
		t.Fatalf("request %d at sector %d: %v", typ, sector, err)
	}
	return c.Mem[status], append([]byte(nil), c.Mem[buf:buf+uint64(len(data))]...)
}

func dialSetup(t *testing.T, socket string) *frontend.Client {
	t.Helper()
	c, err := frontend.Dial(socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.Setup(frontend.Options{MemSize: 4 << 20, Log: true}); err != nil {
		t.Fatal(err)
	}
	return c
}

// migrateOut does what QEMU does to a migration's source up to the
// switchover: share a dirty log, turn dirty logging on, stop the rings.
func migrateOut(t *testing.T, c *frontend.Client) uint32 {
	t.Helper()
	if _, err := c.SetLogBase(len(c.Mem) / 4096 / 8); err != nil {
		t.Fatal(err)
	}
	if err := c.SetLogAll(true); err != nil {
		t.Fatal(err)
	}
	base, err := c.StopQueue(0)
	if err != nil {
		t.Fatal(err)
	}
	return base
}

// Two hemds on one volume: the second writer is refused, naming the first's
// pid and socket, and so is a read-only one while a writer holds it;
// read-only hemds share the volume, and a writer is refused while one
// reads. A SIGKILLed holder does not block the next hemd.
func TestServeOneWriter(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	sparse(t, img, 4<<20)
	sock := func(n string) string { return filepath.Join(dir, n+".sock") }

	a, _ := serveHemd(t, sock("a"), "--volume", img)
	refused(t, sock("b"), a.Process.Pid, sock("a"), "--socket", sock("b"), "--volume", img)
	refused(t, sock("c"), a.Process.Pid, sock("a"), "--socket", sock("c"), "--volume", img, "--read-only")
	// Through a config file, too.
	cfg := filepath.Join(dir, "hemd.toml")
	os.WriteFile(cfg, []byte("[[volume]]\nsocket = \""+sock("d")+"\"\npath = \""+img+"\"\n"), 0o600)
	refused(t, sock("d"), a.Process.Pid, sock("a"), "--config", cfg)

	// SIGKILL: the next hemd takes the volume at once.
	a.Process.Signal(syscall.SIGKILL)
	a.Wait()
	b, _ := serveHemd(t, sock("b"), "--volume", img)
	refused(t, sock("e"), b.Process.Pid, sock("b"), "--socket", sock("e"), "--volume", img)
	b.Process.Signal(syscall.SIGTERM)
	b.Wait()
	if _, err := os.Stat(img + ".hemd-holder"); !os.IsNotExist(err) {
		t.Fatalf("holder record left after SIGTERM: %v", err)
	}

	// Readers share; a writer is refused, naming a reader.
	serveHemd(t, sock("r1"), "--volume", img, "--read-only")
	r2, _ := serveHemd(t, sock("r2"), "--volume", img, "--read-only")
	refused(t, sock("w"), r2.Process.Pid, sock("r2"), "--socket", sock("w"), "--volume", img)
	c := dialSetup(t, sock("r1"))
	if st, got := rw(t, c, 0, 0, make([]byte, 512)); st != 0 || !bytes.Equal(got, make([]byte, 512)) {
		t.Fatalf("read on a shared read-only volume: status %d", st)
	}
}

// A live migration between two hemds on one volume: the destination
// (--incoming) serves its socket while the source holds the volume, and
// takes it when the source hands it off at the switchover (rings stopped
// while dirty logging); it then reads what the source wrote, and a third
// hemd is refused naming the destination.
func TestServeIncomingTakesOver(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	sparse(t, img, 4<<20)
	sa, sb := filepath.Join(dir, "a.sock"), filepath.Join(dir, "b.sock")
	a, aout := serveHemd(t, sa, "--volume", img)
	src := dialSetup(t, sa)
	if st, _ := rw(t, src, 1, 8, bytes.Repeat([]byte("src1"), 128)); st != 0 {
		t.Fatalf("write on the source: %d", st)
	}
	b, bout := serveHemd(t, sb, "--volume", img, "--incoming")
	waitOutput(t, bout, "incoming=true")
	refused(t, filepath.Join(dir, "c.sock"), a.Process.Pid, sa, "--socket", filepath.Join(dir, "c.sock"), "--volume", img)

	if _, err := src.SetLogBase(len(src.Mem) / 4096 / 8); err != nil {
		t.Fatal(err)
	}
	if err := src.SetLogAll(true); err != nil {
		t.Fatal(err)
	}
	// Written while migrating: the destination must see it.
	if st, _ := rw(t, src, 1, 9, bytes.Repeat([]byte("src2"), 128)); st != 0 {
		t.Fatalf("write on the source while migrating: %d", st)
	}
	if _, err := src.StopQueue(0); err != nil {
		t.Fatal(err)
	}
	waitOutput(t, aout, "event=hand-off")

	dst := dialSetup(t, sb)
	st, got := rw(t, dst, 0, 8, make([]byte, 1024))
	if st != 0 || !bytes.Equal(got, append(bytes.Repeat([]byte("src1"), 128), bytes.Repeat([]byte("src2"), 128)...)) {
		t.Fatalf("destination read status %d, not what the source wrote", st)
	}
	if st, _ := rw(t, dst, 1, 10, bytes.Repeat([]byte("dst!"), 128)); st != 0 {
		t.Fatalf("write on the destination: %d", st)
	}
	waitOutput(t, bout, "event=take-over")
	refused(t, filepath.Join(dir, "c.sock"), b.Process.Pid, sb, "--socket", filepath.Join(dir, "c.sock"), "--volume", img)
}

// A failed migration: the source handed the volume off at the switchover,
// the destination never started, and the source runs again: it takes the
// volume back and serves it; a third hemd is refused naming the source.
func TestServeFailedMigrationSourceResumes(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	sparse(t, img, 4<<20)
	sa, sb := filepath.Join(dir, "a.sock"), filepath.Join(dir, "b.sock")
	a, aout := serveHemd(t, sa, "--volume", img)
	serveHemd(t, sb, "--volume", img, "--incoming")
	src := dialSetup(t, sa)
	base := migrateOut(t, src)
	waitOutput(t, aout, "event=hand-off")

	// QEMU turns dirty logging off and runs the VM again.
	if err := src.SetLogAll(false); err != nil {
		t.Fatal(err)
	}
	if err := src.Queues[0].Restart(uint16(base)); err != nil {
		t.Fatal(err)
	}
	if st, _ := rw(t, src, 1, 8, bytes.Repeat([]byte("back"), 128)); st != 0 {
		t.Fatalf("write on the resumed source: %d\n%s", st, aout)
	}
	waitOutput(t, aout, "event=take-over")
	refused(t, filepath.Join(dir, "c.sock"), a.Process.Pid, sa, "--socket", filepath.Join(dir, "c.sock"), "--volume", img)
}
