package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hemd/hemd/vhost"
	"github.com/hemd/hemd/vhost/frontend"
	"golang.org/x/sys/unix"
)

// ioLoop writes and reads back one block of a volume over and over on its
// own front-end until stopped, counting what completed: "the other
// volume's I/O never stops".
type ioLoop struct {
	ok   atomic.Int64
	err  atomic.Pointer[error]
	stop chan struct{}
	done chan struct{}
}

func startIOLoop(t *testing.T, socket string) *ioLoop {
	t.Helper()
	c, err := frontend.Dial(socket)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Setup(frontend.Options{MemSize: 1 << 20}); err != nil {
		c.Close()
		t.Fatal(err)
	}
	l := &ioLoop{stop: make(chan struct{}), done: make(chan struct{})}
	hdr, _ := c.Alloc(16, 16)
	buf, _ := c.Alloc(4096, 4096)
	status, _ := c.Alloc(1, 1)
	fail := func(err error) {
		l.err.Store(&err)
	}
	go func() {
		defer close(l.done)
		defer c.Close()
		q := c.Queues[0]
		for i := uint64(0); ; i++ {
			select {
			case <-l.stop:
				return
			default:
			}
			for _, typ := range []uint32{1, 0} {
				binary.LittleEndian.PutUint32(c.Mem[hdr:], typ)
				binary.LittleEndian.PutUint64(c.Mem[hdr+8:], 8*(i%64))
				if typ == 1 {
					binary.LittleEndian.PutUint64(c.Mem[buf:], i)
				} else {
					clear(c.Mem[buf : buf+8])
				}
				c.Mem[status] = 0xff
				if _, err := q.Add([]frontend.Buf{{Addr: hdr, Len: 16}, {Addr: buf, Len: 4096, Write: typ == 0}, {Addr: status, Len: 1, Write: true}}); err != nil {
					fail(err)
					return
				}
				q.Kick()
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				_, err := q.Wait(ctx, nil)
				cancel()
				if err != nil {
					fail(fmt.Errorf("request %d: %w", i, err))
					return
				}
				if c.Mem[status] != 0 {
					fail(fmt.Errorf("request %d: status %d", i, c.Mem[status]))
					return
				}
				if typ == 0 && binary.LittleEndian.Uint64(c.Mem[buf:]) != i {
					fail(fmt.Errorf("request %d read back %d", i, binary.LittleEndian.Uint64(c.Mem[buf:])))
					return
				}
			}
			l.ok.Add(1)
		}
	}()
	return l
}

// progressing fails the test unless the loop completes more I/O within a
// few seconds and has seen no error.
func (l *ioLoop) progressing(t *testing.T, what string) {
	t.Helper()
	n := l.ok.Load()
	for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(5 * time.Millisecond) {
		if e := l.err.Load(); e != nil {
			t.Fatalf("%s: the other volume's I/O failed: %v", what, *e)
		}
		if l.ok.Load() > n+3 {
			return
		}
	}
	t.Fatalf("%s: the other volume's I/O stopped", what)
}

func (l *ioLoop) end(t *testing.T) int64 {
	t.Helper()
	close(l.stop)
	<-l.done
	if e := l.err.Load(); e != nil {
		t.Fatalf("the other volume's I/O failed: %v", *e)
	}
	return l.ok.Load()
}

// waitLog waits for s in a hemd's output.
func waitLog(t *testing.T, out fmt.Stringer, s string) {
	t.Helper()
	for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		if strings.Contains(out.String(), s) {
			return
		}
	}
	t.Fatalf("hemd did not log %q:\n%s", s, out)
}

// ctlStatus asks the hemd at ctl for its volumes.
func ctlStatus(t *testing.T, ctl string) map[string]volumeStatus {
	t.Helper()
	var rep statusReply
	if err := controlCall(context.Background(), ctl, map[string]string{"op": "status"}, &rep); err != nil {
		t.Fatal(err)
	}
	out := map[string]volumeStatus{}
	for _, v := range rep.Volumes {
		out[v.Socket] = v
	}
	return out
}

// A volume is attached to a running hemd, served, refused a detach while
// its front-end is connected, detached by force (the session ends), and
// attached and detached again; another volume's I/O goes on throughout.
func TestVolumeAttachDetach(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	ctl := filepath.Join(dir, "control.sock")
	a, b := filepath.Join(dir, "a.img"), filepath.Join(dir, "b.img")
	sparse(t, a, 4<<20)
	sparse(t, b, 8<<20)
	aSock, bSock := filepath.Join(dir, "a.sock"), filepath.Join(dir, "b.sock")
	cfg := filepath.Join(dir, "hemd.toml")
	os.WriteFile(cfg, []byte(fmt.Sprintf("control_socket = %q\n[[volume]]\nsocket = %q\npath = %q\n", ctl, aSock, a)), 0o600)
	_, out := snapServe(t, state, []string{aSock, ctl}, "--config", cfg)
	loop := startIOLoop(t, aSock)
	loop.progressing(t, "before the attach")

	cli := func(args ...string) (string, error) {
		return hemdCLI(t, state, append([]string{"volume"}, append(args, "--control", ctl)...)...)
	}
	o, err := cli("attach", "--socket", bSock, "--volume", b, "--iops", "500", "--queues", "2")
	if err != nil {
		t.Fatalf("attach: %v\n%s\n%s", err, o, out)
	}
	bID := defaultVolumeID(b)
	if !strings.Contains(o, bID+" attached: 8.0 MiB") || !strings.Contains(o, "mode 0600") {
		t.Fatalf("attach said %q", o)
	}
	// The same socket or file again is refused, naming the volume.
	if o, err := cli("attach", "--socket", filepath.Join(dir, "b2.sock"), "--volume", b); err == nil || !strings.Contains(o, bID) || !strings.Contains(o, "already served") {
		t.Fatalf("second attach of the same file: %v\n%s", err, o)
	}
	other := filepath.Join(dir, "c.img")
	sparse(t, other, 1<<20)
	if o, err := cli("attach", "--socket", bSock, "--volume", other); err == nil || !strings.Contains(o, "already serves") {
		t.Fatalf("attach on a served socket: %v\n%s", err, o)
	}
	loop.progressing(t, "after the attach")

	// The new volume serves a front-end, with its limit in force.
	c := dialSetup(t, bSock)
	want := bytes.Repeat([]byte("hotplug!"), 512)
	if st, _ := rw(t, c, 1, 100, want); st != 0 {
		t.Fatalf("write to the attached volume: status %d", st)
	}
	if st, got := rw(t, c, 0, 100, make([]byte, 4096)); st != 0 || !bytes.Equal(got, want) {
		t.Fatalf("read from the attached volume: status %d", st)
	}
	sts := ctlStatus(t, ctl)
	if v := sts[bSock]; v.Volume != bID || !v.Connected || v.IOPS != 500 || v.IOPSBurst != 50 || v.Origin != originAttach || v.SizeBytes != 8<<20 {
		t.Fatalf("status of the attached volume: %+v", v)
	}
	if v := sts[aSock]; v.IOPS != 0 || v.Origin != originConfig {
		t.Fatalf("status of the config's volume: %+v", v)
	}

	// Connected: a detach is refused, naming the volume and the way out.
	o, err = cli("detach", bSock)
	if err == nil || !strings.Contains(o, bID) || !strings.Contains(o, "front-end is connected") || !strings.Contains(o, "--force") {
		t.Fatalf("detach while connected: %v\n%s", err, o)
	}
	// Forced: the session ends and the answer says so.
	o, err = cli("detach", "--force", bID)
	if err != nil || !strings.Contains(o, bID+" detached") || !strings.Contains(o, "session was ended") {
		t.Fatalf("forced detach: %v\n%s", err, o)
	}
	waitLog(t, out, "event=detach-forced")
	if _, err := os.Stat(bSock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket of the detached volume: %v", err)
	}
	// The guest's disk is gone: its next request is not served.
	q := c.Queues[0]
	hdr, _ := c.Alloc(16, 16)
	st, _ := c.Alloc(1, 1)
	q.Add([]frontend.Buf{{Addr: hdr, Len: 16}, {Addr: st, Len: 1, Write: true}})
	q.Kick()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	if u, err := q.Wait(ctx, nil); err == nil {
		t.Fatalf("a request was served after the forced detach: %+v", u)
	}
	cancel()
	loop.progressing(t, "after the forced detach")

	// Attached again, detached again with no front-end: no force needed.
	if o, err := cli("attach", "--socket", bSock, "--volume", b); err != nil {
		t.Fatalf("attach again: %v\n%s", err, o)
	}
	c2 := dialSetup(t, bSock)
	if st, got := rw(t, c2, 0, 100, make([]byte, 4096)); st != 0 || !bytes.Equal(got, want) {
		t.Fatalf("read after attaching again: status %d", st)
	}
	c2.Close()
	for end := time.Now().Add(10 * time.Second); ctlStatus(t, ctl)[bSock].Connected; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("the front-end's disconnect was not seen")
		}
	}
	if o, err := cli("detach", b); err != nil || !strings.Contains(o, bID+" detached") || strings.Contains(o, "session") {
		t.Fatalf("detach: %v\n%s", err, o)
	}
	// Not served (any more): the error names it.
	if o, err := cli("detach", b); err == nil || !strings.Contains(o, "volume "+b+" is not served") {
		t.Fatalf("detach of a volume not served: %v\n%s", err, o)
	}
	if n := loop.end(t); n < 10 {
		t.Fatalf("the other volume did %d writes and reads in all", n)
	}
	if len(ctlStatus(t, ctl)) != 1 {
		t.Fatalf("volumes left: %v", ctlStatus(t, ctl))
	}
}

// modify changes a served volume's limits at once; status and the metrics
// show them, and the throttled time.
func TestVolumeModify(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	ctl, sock, img := filepath.Join(dir, "control.sock"), filepath.Join(dir, "v.sock"), filepath.Join(dir, "v.img")
	msock := filepath.Join(dir, "metrics.sock")
	sparse(t, img, 4<<20)
	snapServe(t, state, []string{sock, ctl}, "--socket", sock, "--volume", img, "--control", ctl, "--iops", "100", "--metrics", "unix:"+msock)
	id := defaultVolumeID(img)
	cli := func(args ...string) (string, error) {
		return hemdCLI(t, state, append([]string{"volume"}, append(args, "--control", ctl)...)...)
	}
	if o, err := cli("modify", id); err == nil || !strings.Contains(o, "give --iops") {
		t.Fatalf("modify without a limit: %v\n%s", err, o)
	}
	if o, err := cli("modify", "--iops-burst", "5", "--throughput", "10", img); err != nil || !strings.Contains(o, id+": 100 IOPS (burst 5), 10 MB/s (burst 1 MB)") {
		t.Fatalf("modify: %v\n%s", err, o)
	}
	if o, err := cli("modify", "--iops", "0", "--iops-burst", "9", id); err == nil || !strings.Contains(o, id) || !strings.Contains(o, "burst without") {
		t.Fatalf("burst without a rate: %v\n%s", err, o)
	}
	// Saturate the limit for a moment: requests wait, and it shows.
	if o, err := cli("modify", "--iops", "50", "--throughput", "0", id); err != nil || !strings.Contains(o, "50 IOPS (burst 5)") {
		t.Fatalf("modify: %v\n%s", err, o)
	}
	c := dialSetup(t, sock)
	for i := 0; i < 10; i++ {
		if st, _ := rw(t, c, 0, 0, make([]byte, 512)); st != 0 {
			t.Fatalf("read %d: status %d", i, st)
		}
	}
	v := ctlStatus(t, ctl)[sock]
	if v.IOPS != 50 || v.Throughput != 0 || v.ThrottledRequests < 4 || v.ThrottledSeconds < 0.05 {
		t.Fatalf("status after 10 reads at 50 IOPS (burst 5): %+v", v)
	}
	body := getUnix(t, msock, "/metrics")
	if metric(body, `hemd_volume_limit{kind="iops",volume="`+id+`"}`) != "50" ||
		metric(body, `hemd_volume_throttled_requests_total{volume="`+id+`"}`) == "" ||
		metric(body, `hemd_volume_connected{volume="`+id+`"}`) != "1" {
		t.Fatalf("metrics:\n%s", body)
	}
	o, err := hemdCLI(t, state, "status", "--control", ctl)
	if err != nil || !regexp.MustCompile(id+`\s+plaintext\s+-\s+\S+\s+4\.0 MiB\s+\S+\s+1\s+10\s+0\s+0\s+yes\s+50iops\s+\d+\.\ds\s+-\s+-`).MatchString(o) {
		t.Fatalf("hemd status: %v\n%s", err, o)
	}
}

// backendChannel negotiates BACKEND_REQ on c and hands hemd its back-end
// channel; it returns the front-end's end.
func backendChannel(t *testing.T, c *frontend.Client) int {
	t.Helper()
	if _, err := c.Request(vhost.ReqSetProtocolFeatures, binary.LittleEndian.AppendUint64(nil, c.Proto|vhost.ProtoBackendReq), nil, false); err != nil {
		t.Fatal(err)
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fds[0]) })
	if _, err := c.Request(vhost.ReqSetBackendReqFd, nil, []int{fds[1]}, false); err != nil {
		t.Fatal(err)
	}
	unix.Close(fds[1])
	unix.SetsockoptTimeval(fds[0], unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 20})
	return fds[0]
}

// An encrypted volume grows while its front-end runs: the header (both
// copies) says the new size, the front-end is told on the back-end channel
// and reads the new capacity, the new blocks are written and read through
// the cipher, and a shrink is refused. Stopped, it grows offline, and a
// hemd serving it again serves it whole.
func TestVolumeResizeOnline(t *testing.T) {
	if _, err := os.Stat("/usr/lib/softhsm/libsofthsm2.so"); err != nil {
		t.Skip("SoftHSM2 is not installed (make test installs softhsm2)")
	}
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	if out, err := hemdCLI(t, state, "key", "create", "--alias", "alias/grow"); err != nil {
		t.Fatalf("key create: %v\n%s", err, out)
	}
	vol := filepath.Join(dir, "vol.img")
	out, err := hemdCLI(t, state, "volume", "create", "--size", "8M", "--key", "alias/grow", vol)
	if err != nil {
		t.Fatalf("volume create: %v\n%s", err, out)
	}
	id := strings.TrimSpace(out)
	sock, ctl := filepath.Join(dir, "vol.sock"), filepath.Join(dir, "control.sock")
	cmd, hemdOut := snapServe(t, state, []string{sock, ctl}, "--socket", sock, "--volume", vol, "--control", ctl)
	c := dialSetup(t, sock)
	fd := backendChannel(t, c)
	tail := bytes.Repeat([]byte("grown-00"), 512)
	if st, _ := rw(t, c, 1, (8<<20)/512, tail); st == 0 {
		t.Fatal("write past the end accepted before the resize")
	}

	type result struct {
		out string
		err error
	}
	done := make(chan result, 1)
	go func() {
		o, err := hemdCLI(t, state, "volume", "resize", "--size", "12M", "--control", ctl, vol)
		done <- result{o, err}
	}()
	var h [12]byte
	n, err := unix.Read(fd, h[:])
	for err == unix.EINTR { // a blocking read is not restarted after the runtime's signals
		n, err = unix.Read(fd, h[:])
	}
	if err != nil || n != 12 || binary.LittleEndian.Uint32(h[:]) != uint32(vhost.BackendConfigChange) {
		t.Fatalf("back-end channel: %d bytes %x, %v\n%s", n, h[:n], err, hemdOut)
	}
	cfg, err := c.Config(0, 8)
	if err != nil || binary.LittleEndian.Uint64(cfg) != (12<<20)/512 {
		t.Fatalf("capacity after the resize: %v %x", err, cfg)
	}
	reply := append(binary.LittleEndian.AppendUint32(binary.LittleEndian.AppendUint32(binary.LittleEndian.AppendUint32(nil,
		uint32(vhost.BackendConfigChange)), 0x5), 8), make([]byte, 8)...)
	unix.Write(fd, reply)
	r := <-done
	if r.err != nil || !strings.Contains(r.out, id+": 8.0 MiB -> 12.0 MiB") || !strings.Contains(r.out, "the guest was told") {
		t.Fatalf("resize: %v\n%s\n%s", r.err, r.out, hemdOut)
	}
	if st, _ := rw(t, c, 1, (8<<20)/512, tail); st != 0 {
		t.Fatalf("write past the old end after the resize: status %d", st)
	}
	if st, got := rw(t, c, 0, (8<<20)/512, make([]byte, len(tail))); st != 0 || !bytes.Equal(got, tail) {
		t.Fatalf("read past the old end after the resize: status %d", st)
	}
	var hd map[string]any
	o, err := hemdCLI(t, state, "volume", "inspect", "--json", vol)
	if err != nil || json.Unmarshal([]byte(o), &hd) != nil || hd["size_bytes"] != float64(12<<20) {
		t.Fatalf("header after the resize: %v\n%s", err, o)
	}
	if o, err := hemdCLI(t, state, "volume", "resize", "--size", "4M", "--control", ctl, id); err == nil || !strings.Contains(o, id) || !strings.Contains(o, "cannot shrink") {
		t.Fatalf("shrink: %v\n%s", err, o)
	}
	// Growing a served volume offline is refused, naming the holder.
	if o, err := hemdCLI(t, state, "volume", "resize", "--size", "16M", "--control", "none", vol); err == nil || !strings.Contains(o, "in use by") {
		t.Fatalf("offline resize of a served volume: %v\n%s", err, o)
	}
	c.Close()
	cmd.Process.Signal(syscall.SIGTERM)
	cmd.Wait()

	// Offline, by a growth.
	o, err = hemdCLI(t, state, "volume", "resize", "--size", "+4M", "--control", ctl, vol)
	if err != nil || !strings.Contains(o, id+": 12.0 MiB -> 16.0 MiB") || !strings.Contains(o, "offline") {
		t.Fatalf("offline resize: %v\n%s", err, o)
	}
	if st, err := os.Stat(vol); err != nil || st.Size() != 1<<20+16<<20 {
		t.Fatalf("volume file after the offline resize: %v %d", err, st.Size())
	}
	snapServe(t, state, []string{sock}, "--socket", sock, "--volume", vol)
	c = dialSetup(t, sock)
	if cfg, err := c.Config(0, 8); err != nil || binary.LittleEndian.Uint64(cfg) != (16<<20)/512 {
		t.Fatalf("capacity served after the offline resize: %v %x", err, cfg)
	}
	if st, got := rw(t, c, 0, (8<<20)/512, make([]byte, len(tail))); st != 0 || !bytes.Equal(got, tail) {
		t.Fatalf("data written after the online resize: status %d", st)
	}
}

// A resize the connected guest cannot be told of (no back-end channel) is
// pending until a front-end connects anew; status and metrics say so.
func TestVolumeResizePending(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	ctl, sock, img := filepath.Join(dir, "control.sock"), filepath.Join(dir, "v.sock"), filepath.Join(dir, "v.img")
	sparse(t, img, 4<<20)
	snapServe(t, state, []string{sock, ctl}, "--socket", sock, "--volume", img, "--control", ctl)
	id := defaultVolumeID(img)
	c := dialSetup(t, sock)
	o, err := hemdCLI(t, state, "volume", "resize", "--size", "6M", "--control", ctl, img)
	if err != nil || !strings.Contains(o, id+": 4.0 MiB -> 6.0 MiB") || !strings.Contains(o, "resize pending") || !strings.Contains(o, "BACKEND_REQ") {
		t.Fatalf("resize: %v\n%s", err, o)
	}
	if v := ctlStatus(t, ctl)[sock]; v.ResizePending == "" || v.SizeBytes != 6<<20 {
		t.Fatalf("status: %+v", v)
	}
	o, _ = hemdCLI(t, state, "status", "--control", ctl)
	if !regexp.MustCompile(`\syes\s+-\s+\S+\s+resize\s`).MatchString(o) || !strings.Contains(o, id+": resize pending: the guest was not told") {
		t.Fatalf("hemd status:\n%s", o)
	}
	if st, err := os.Stat(img); err != nil || st.Size() != 6<<20 {
		t.Fatalf("raw file after the resize: %v", err)
	}
	c.Close()
	c = dialSetup(t, sock)
	if v := ctlStatus(t, ctl)[sock]; v.ResizePending != "" {
		t.Fatalf("still pending with a new front-end: %+v", v)
	}
	if cfg, err := c.Config(0, 8); err != nil || binary.LittleEndian.Uint64(cfg) != (6<<20)/512 {
		t.Fatalf("the new front-end reads %x, %v", cfg, err)
	}
}

// SIGHUP applies the config file's changes: a new volume is attached, a
// changed limit applied, a removed volume with a front-end connected is
// detached once it disconnects; a broken file changes nothing.
func TestServeSighupReload(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	ctl := filepath.Join(dir, "control.sock")
	vol := func(n string, extra string) string {
		sock, img := filepath.Join(dir, n+".sock"), filepath.Join(dir, n+".img")
		if _, err := os.Stat(img); err != nil {
			sparse(t, img, 4<<20)
		}
		return fmt.Sprintf("[[volume]]\nsocket = %q\npath = %q\n%s", sock, img, extra)
	}
	cfg := filepath.Join(dir, "hemd.toml")
	write := func(body string) {
		t.Helper()
		if err := os.WriteFile(cfg, []byte(fmt.Sprintf("control_socket = %q\n", ctl)+body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	aSock, bSock := filepath.Join(dir, "a.sock"), filepath.Join(dir, "b.sock")
	write(vol("a", ""))
	cmd, out := snapServe(t, state, []string{aSock, ctl}, "--config", cfg)
	loop := startIOLoop(t, aSock)
	hup := func(wantLog string) {
		t.Helper()
		n := strings.Count(out.String(), wantLog)
		cmd.Process.Signal(syscall.SIGHUP)
		for end := time.Now().Add(10 * time.Second); strings.Count(out.String(), wantLog) == n; time.Sleep(10 * time.Millisecond) {
			if time.Now().After(end) {
				t.Fatalf("no %q after SIGHUP:\n%s", wantLog, out)
			}
		}
	}
	write(vol("a", "iops = 200\n") + vol("b", "throughput = 20\n"))
	hup("config applied (SIGHUP)")
	sts := ctlStatus(t, ctl)
	if sts[aSock].IOPS != 200 || sts[bSock].Throughput != 20 || sts[bSock].Origin != originConfig {
		t.Fatalf("after adding b and limiting a: %+v", sts)
	}
	loop.progressing(t, "after the first SIGHUP")
	// A broken file changes nothing.
	os.WriteFile(cfg, []byte("[[volume]\n"), 0o600)
	hup("SIGHUP: config not applied")
	if len(ctlStatus(t, ctl)) != 2 {
		t.Fatal("a broken config changed the volumes")
	}
	// b removed while its front-end is connected: pending until it leaves.
	c := dialSetup(t, bSock)
	write(vol("a", "iops = 200\n"))
	hup("config applied (SIGHUP)")
	if v := ctlStatus(t, ctl)[bSock]; !v.DetachPending || !v.Connected {
		t.Fatalf("b after its removal from the config: %+v", v)
	}
	if st, _ := rw(t, c, 0, 0, make([]byte, 512)); st != 0 {
		t.Fatalf("b's front-end is no longer served while the detach is pending: status %d", st)
	}
	c.Close()
	waitLog(t, out, "pending detach done")
	if _, ok := ctlStatus(t, ctl)[bSock]; ok {
		t.Fatal("b still served after its front-end left")
	}
	if _, err := os.Stat(bSock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("b's socket: %v", err)
	}
	// a's queues changed: attached again (no front-end would be needed;
	// a's is connected, so it is refused and said).
	write(vol("a", "iops = 200\nqueues = 2\n"))
	hup("settings changed but not applied")
	if !strings.Contains(out.String(), "changed=queues") {
		t.Fatalf("the log does not name the setting:\n%s", out)
	}
	loop.progressing(t, "after the last SIGHUP")
	loop.end(t)
}

// The socket's owner, group and mode come from the volume's settings;
// bad ones are refused naming the volume.
func TestVolumeSocketAccess(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	ctl := filepath.Join(dir, "control.sock")
	img := filepath.Join(dir, "v.img")
	sparse(t, img, 1<<20)
	grp, err := user.LookupGroupId(strconv.Itoa(os.Getgid()))
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "v.sock")
	snapServe(t, state, []string{sock, ctl}, "--socket", sock, "--volume", img, "--control", ctl, "--socket-group", grp.Name)
	st, err := os.Stat(sock)
	if err != nil || st.Mode().Perm() != 0o660 || int(st.Sys().(*syscall.Stat_t).Gid) != os.Getgid() {
		t.Fatalf("socket with a group: %v mode %v", err, st.Mode())
	}
	img2 := filepath.Join(dir, "w.img")
	sparse(t, img2, 1<<20)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--socket-mode", "0666"}, "lets every local user connect"},
		{[]string{"--socket-mode", "rw"}, "want octal"},
		{[]string{"--socket-group", "no-such-group-hemd"}, "no-such-group-hemd"},
	} {
		o, err := hemdCLI(t, state, append([]string{"volume", "attach", "--control", ctl, "--socket", filepath.Join(dir, "w.sock"), "--volume", img2}, tc.args...)...)
		if err == nil || !strings.Contains(o, tc.want) || !strings.Contains(o, img2) {
			t.Errorf("attach %v: %v\n%s", tc.args, err, o)
		}
	}
	o, err := hemdCLI(t, state, "volume", "attach", "--control", ctl, "--socket", filepath.Join(dir, "w.sock"), "--volume", img2, "--socket-mode", "0640")
	if err != nil || !strings.Contains(o, "mode 0640") {
		t.Fatalf("attach with mode 0640: %v\n%s", err, o)
	}
}

func TestVolumeSettings(t *testing.T) {
	for s, want := range map[string]os.FileMode{"": 0, "0600": 0o600, "660": 0o660, "0o640": 0o640} {
		if m, err := parseSocketMode(s); err != nil || m != want {
			t.Errorf("mode %q: %v %v", s, m, err)
		}
	}
	for _, s := range []string{"0666", "0606", "0400", "999", "rw-rw----"} {
		if _, err := parseSocketMode(s); err == nil {
			t.Errorf("mode %q accepted", s)
		}
	}
	a := volumeConfig{Socket: "/s", Path: "/p", Queues: 2}
	b := a
	b.IOPS, b.ThroughputBurst = 5, 7
	if !sameButLimits(a, b) || configDiff(a, b) != "iops,throughput_burst" {
		t.Fatalf("limits only: same %v diff %q", sameButLimits(a, b), configDiff(a, b))
	}
	b.Queues, b.SocketGroup = 4, "kvm"
	if sameButLimits(a, b) || configDiff(a, b) != "queues,iops,throughput_burst,socket_group" {
		t.Fatalf("queues and group: same %v diff %q", sameButLimits(a, b), configDiff(a, b))
	}
	// The config file's keys reach the embedded settings.
	p := filepath.Join(t.TempDir(), "c.toml")
	os.WriteFile(p, []byte("[[volume]]\nsocket = \"/s\"\npath = \"/p\"\niops = 3000\nthroughput = 125\niops_burst = 6000\nsocket_group = \"kvm\"\nsocket_mode = \"0660\"\n"), 0o600)
	c, err := loadConfig(p)
	if err != nil {
		t.Fatal(err)
	}
	if v := c.Volumes[0]; v.IOPS != 3000 || v.Throughput != 125 || v.IOPSBurst != 6000 || v.SocketGroup != "kvm" || v.SocketMode != "0660" ||
		v.limits().BPS != 125_000_000 || v.limits().BPSBurst != 0 {
		t.Fatalf("config: %+v", v)
	}
	os.WriteFile(p, []byte("[[volume]]\nsocket = \"/s\"\npath = \"/p\"\niops_burst = 5\n"), 0o600)
	if _, err := loadConfig(p); err == nil || !strings.Contains(err.Error(), "burst without") {
		t.Fatalf("burst without a rate: %v", err)
	}
}
