package vmtest

import (
	"context"
	"fmt"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// encVolume is an encrypted hemd volume with its own KMS state directory,
// set up as TestEncryptedVolume does.
type encVolume struct {
	state, path, id string
	hemd            Hemd
}

func newEncVolume(t *testing.T, size string) encVolume {
	t.Helper()
	dir := t.TempDir()
	v := encVolume{state: filepath.Join(dir, "state"), path: filepath.Join(dir, "vol.img")}
	cli(t, v.state, "key", "create", "--alias", "alias/vmtest")
	v.id = strings.TrimSpace(cli(t, v.state, "volume", "create", "--size", size, "--key", "alias/vmtest", v.path))
	v.hemd = Hemd{Bin: hemdBin, Env: []string{"HEMD_STATE_DIR=" + v.state, "SOFTHSM2_CONF="}}
	return v
}

// countEvent counts hemd's log lines for event (event=zeroize, ...) on volID.
func countEvent(log []string, event, volID string) int {
	re := regexp.MustCompile(regexp.QuoteMeta(event) + `\b.*volume=` + regexp.QuoteMeta(volID))
	n := 0
	for _, l := range log {
		if re.MatchString(l) {
			n++
		}
	}
	return n
}

// countLines counts hemd's log lines containing s.
func countLines(log []string, s string) int {
	n := 0
	for _, l := range log {
		if strings.Contains(l, s) {
			n++
		}
	}
	return n
}

// waitEvent waits until hemd has logged event on volID at least n times.
func waitEvent(t *testing.T, srv *Served, event, volID string, n int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for countEvent(srv.Log(), event, volID) < n {
		if time.Now().After(deadline) {
			t.Fatalf("hemd logged %s for %s %d times within %v, want %d", event, volID, countEvent(srv.Log(), event, volID), timeout, n)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// soakProgress waits for a soak progress line from line from on whose write
// count exceeds writes, and returns that count and the next line index.
func soakProgress(vm *VM, from int, writes int64, timeout time.Duration) (int64, int) {
	vm.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		m, next := vm.Expect(from, `HEMD-SOAK t=\d+s writes=(\d+) `, time.Until(deadline))
		n, _ := strconv.ParseInt(m[1], 10, 64)
		if n > writes {
			return n, next
		}
		from = next
	}
}

// alive fails the test if the back-end process has exited.
func alive(t *testing.T, srv *Served) {
	t.Helper()
	select {
	case <-srv.done:
		t.Fatalf("hemd (pid %d) exited", srv.cmd.Process.Pid)
	default:
	}
}

// TestLifecycleStopCont: on an encrypted volume, the VM is paused and
// resumed four times while the guest soaks the disk (4 writers, O_DSYNC
// writes, read-backs, every block checked at the end). Each stop makes hemd
// stop the rings and zeroize the data key; each cont unwraps it again through
// the KMS (one more Decrypt in the audit log); no write is lost or torn and
// the front-end session is never dropped.
func TestLifecycleStopCont(t *testing.T) {
	g := BuildGuest(t)
	v := newEncVolume(t, "64M")
	srv := v.hemd.Serve(t, v.path, 2)
	vm := Start(t, g, WithDisk(srv.Socket, 2), WithScript(fmt.Sprintf(
		"agent soak /dev/vda 25 4 %d %d 11\n", 1<<20, 8<<20)))
	q := vm.QMPT()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	writes, at := soakProgress(vm, 0, 0, 2*time.Minute)
	waitEvent(t, srv, "event=attach", v.id, 1, 10*time.Second)
	decrypts := auditCount(t, v.state, "Decrypt")
	zeroized := countEvent(srv.Log(), "event=zeroize", v.id)
	const cycles = 4
	for i := 1; i <= cycles; i++ {
		if err := q.Stop(); err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
		if _, err := q.WaitEvent(ctx, "STOP"); err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
		waitEvent(t, srv, "event=zeroize", v.id, zeroized+i, 10*time.Second)
		time.Sleep(time.Second)
		if st, err := q.Status(); err != nil || st != "paused" {
			t.Fatalf("cycle %d: status after stop %q, %v; want paused", i, st, err)
		}
		if err := q.Cont(); err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
		if _, err := q.WaitEvent(ctx, "RESUME"); err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
		if st, err := q.Status(); err != nil || st != "running" {
			t.Fatalf("cycle %d: status after cont %q, %v; want running", i, st, err)
		}
		// The guest's writes go on after the cont: two progress lines, the
		// second counting writes made after it (the first may count only
		// writes made before the stop).
		before := writes
		writes, at = soakProgress(vm, at, writes, time.Minute)
		writes, at = soakProgress(vm, at, writes, time.Minute)
		t.Logf("cycle %d: soak writes %d → %d after cont", i, before, writes)
	}
	m, _ := vm.Expect(at, `HEMD-RESULT ok soak writes=(\d+) reads=(\d+) blocks=(\d+)`, 2*time.Minute)
	vm.Wait(time.Minute)
	alive(t, srv)

	if n := auditCount(t, v.state, "Decrypt") - decrypts; n < cycles {
		t.Errorf("%d KMS Decrypt(s) for %d conts: the data key was not unwrapped again on each cont", n, cycles)
	}
	if n := countEvent(srv.Log(), "event=zeroize", v.id) - zeroized; n < cycles+1 {
		t.Errorf("%d zeroize events for %d stops and the VM's exit", n, cycles)
	}
	if n := countLines(srv.Log(), "front-end connected"); n != 1 {
		t.Errorf("hemd saw %d front-end connections, want 1 (stop/cont keep the session)", n)
	}
	t.Logf("soak: writes=%s reads=%s blocks=%s; %d stop/cont cycles", m[1], m[2], m[3], cycles)
}

// TestLifecycleReset: a system_reset while the guest soaks the disk. Before
// the soak the guest writes a pattern to region A (fsynced) and a marker
// block; the reset hits with writes in flight on region B; the guest boots
// again in the same QEMU, finds the marker, checks region A and soaks region
// B again. hemd (the same process, the same front-end session) saw the
// device stopped (key zeroized) and started again (key unwrapped again).
func TestLifecycleReset(t *testing.T) {
	const (
		aOff, aLen = 1 << 20, 4 << 20
		bOff, bLen = 8 << 20, 4 << 20
		aSeed      = 21
		mark       = "HEMD-RESET-MARK"
	)
	g := BuildGuest(t)
	v := newEncVolume(t, "64M")
	srv := v.hemd.Serve(t, v.path, 2)
	pid := srv.cmd.Process.Pid
	script := fmt.Sprintf(`
if dd if=/dev/vda bs=4096 count=1 2>/dev/null | grep -q %[1]s; then
  echo "HEMD-SECOND-BOOT"
  agent pattern verify /dev/vda %[2]d 2 %[3]d %[4]d
  agent soak /dev/vda 6 2 %[5]d %[6]d 32
  exit 0
fi
agent pattern write /dev/vda %[2]d 2 %[3]d %[4]d || exit 0
agent marker /dev/vda 0 %[1]s || exit 0
echo "HEMD-REGION-A-WRITTEN"
agent soak /dev/vda 120 4 %[5]d %[6]d 31
`, mark, aSeed, aOff, aLen, bOff, bLen)
	vm := Start(t, g, WithDisk(srv.Socket, 2), WithReboot(), WithScript(script))
	q := vm.QMPT()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	_, at := vm.Expect(0, `HEMD-RESULT ok pattern-write bytes=4194304`, 2*time.Minute)
	_, at = vm.Expect(at, `HEMD-REGION-A-WRITTEN`, time.Minute)
	writes, at := soakProgress(vm, at, 0, time.Minute)
	writes, at = soakProgress(vm, at, writes, time.Minute) // a second of steady writes
	decrypts := auditCount(t, v.state, "Decrypt")
	zeroized := countEvent(srv.Log(), "event=zeroize", v.id)
	attached := countEvent(srv.Log(), "event=attach", v.id)
	if err := q.SystemReset(); err != nil {
		t.Fatal(err)
	}
	if _, err := q.WaitEvent(ctx, "RESET"); err != nil {
		t.Fatal(err)
	}
	t.Logf("system_reset after %d soak writes", writes)
	_, at = vm.Expect(at, `HEMD-BOOTED`, 2*time.Minute)
	_, at = vm.Expect(at, `HEMD-SECOND-BOOT`, time.Minute)
	_, at = vm.Expect(at, `HEMD-RESULT ok pattern-verify bytes=4194304`, time.Minute)
	m, _ := vm.Expect(at, `HEMD-RESULT ok soak writes=(\d+) reads=(\d+)`, time.Minute)

	// Before QEMU exits: the same hemd, the same session, the device
	// stopped and started again.
	alive(t, srv)
	if srv.cmd.Process.Pid != pid {
		t.Fatalf("hemd pid %d, want %d", srv.cmd.Process.Pid, pid)
	}
	log := srv.Log()
	if n := countLines(log, "front-end connected"); n != 1 {
		t.Errorf("hemd saw %d front-end connections, want 1 (a reset keeps the session)", n)
	}
	if n := countLines(log, "front-end disconnected") + countLines(log, "front-end session ended"); n != 0 {
		t.Errorf("the front-end session ended %d time(s) across the reset", n)
	}
	if n := countEvent(log, "event=zeroize", v.id) - zeroized; n < 1 {
		t.Errorf("hemd did not zeroize the key when the reset stopped the device")
	}
	if n := countEvent(log, "event=attach", v.id) - attached; n < 1 {
		t.Errorf("hemd did not attach the key again after the reset")
	}
	if n := auditCount(t, v.state, "Decrypt") - decrypts; n < 1 {
		t.Errorf("no KMS Decrypt after the reset")
	}
	vm.Wait(time.Minute)
	t.Logf("after the reset: region A intact, soak writes=%s reads=%s", m[1], m[2])
}
