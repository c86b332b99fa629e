package rbdvm

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hemd/hemd/vmtest"
)

// kmsServe runs hemd kms serve on a unix socket with its own state
// directory until the test ends, and returns the endpoint and the state.
func kmsServe(t *testing.T) (endpoint, state string) {
	t.Helper()
	dir := t.TempDir()
	state = filepath.Join(dir, "kms-state")
	sock := filepath.Join(dir, "kms.sock")
	cmd := exec.Command(hemdBin, "kms", "serve", "--listen", "unix:"+sock)
	cmd.Env = append(os.Environ(), "HEMD_STATE_DIR="+state, "SOFTHSM2_CONF=")
	out, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			t.Logf("kms: %s", sc.Text())
		}
	}()
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for i := 0; ; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if i == 200 {
			t.Fatal("hemd kms serve did not make its socket")
		}
		time.Sleep(50 * time.Millisecond)
	}
	return "unix:" + sock, state
}

var soakLine = regexp.MustCompile(`HEMD-SOAK t=(\d+)s writes=(\d+) `)

// latestWrites reads the console from line from on for d and returns the
// write count of the last soak progress line and the index after it.
func latestWrites(vm *vmtest.VM, from int, d time.Duration) (int64, int) {
	w := int64(-1)
	for end := time.Now().Add(d); time.Now().Before(end); {
		m, next, err := vm.ExpectErr(from, soakLine.String(), 200*time.Millisecond)
		if err != nil {
			continue
		}
		w, _ = strconv.ParseInt(m[2], 10, 64)
		from = next
	}
	return w, from
}

// waitWrites waits for a soak progress line from line from on with more
// than writes writes, and returns its count and the index after it.
func waitWrites(t *testing.T, vm *vmtest.VM, from int, writes int64, timeout time.Duration) (int64, int) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		m, next := vm.Expect(from, soakLine.String(), time.Until(deadline))
		n, _ := strconv.ParseInt(m[2], 10, 64)
		if n > writes {
			return n, next
		}
		from = next
	}
}

// TestRBDMoveAndFaults is one guest's life on an encrypted RBD volume under
// a write soak (O_DSYNC writes, read-backs, every block checked at the
// end):
//   - live migration between two hemds with their own state directories
//     and one shared KMS (hemd kms serve): the source hands the image's
//     exclusive lock off at the switchover, the destination takes it; a
//     third hemd is refused, naming the holder, before and after; the
//     destination's guest memory is the source's, page for page;
//   - the destination hemd is killed with SIGKILL: its successor breaks
//     the dead lock (the dead client blocklisted), QEMU reconnects and the
//     guest's writes resume within 15 s;
//   - the OSD is stopped for 5 s: the guest's I/O stalls, then resumes;
//
// and the soak finds every write it saw acknowledged, with no I/O error.
func TestRBDMoveAndFaults(t *testing.T) {
	vmtest.RequireQEMU(t)
	g := vmtest.BuildGuest(t)
	ctx := context.Background()
	endpoint, kmsState := kmsServe(t)
	cli(t, kmsState, "key", "create", "--alias", "alias/move")
	remote := func(state string) []string {
		return append(env(state), "HEMD_KMS_ENDPOINT="+endpoint)
	}
	hostA := vmtest.Hemd{Bin: hemdBin, Env: remote(filepath.Join(t.TempDir(), "host-a"))}
	hostB := vmtest.Hemd{Bin: hemdBin, Env: remote(filepath.Join(t.TempDir(), "host-b"))}
	name := imageName(t)
	create := exec.Command(hemdBin, "volume", "create", "--size", "64M", "--key", "alias/move", name)
	create.Env = append(os.Environ(), hostA.Env...)
	out, err := create.Output()
	if err != nil {
		t.Fatalf("volume create: %v", err)
	}
	volID := strings.TrimSpace(string(out))
	decrypts := func() int {
		b, err := os.ReadFile(filepath.Join(kmsState, "audit.log"))
		if err != nil {
			t.Fatal(err)
		}
		return strings.Count(string(b), `"eventName":"Decrypt"`)
	}

	src := hostA.Serve(t, name, 2)
	if out := hostB.Refused(t, name); !strings.Contains(out, "pid "+strconv.Itoa(src.Pid())) || !strings.Contains(out, src.Socket) {
		t.Fatalf("a second hemd was refused without naming the source (pid %d, %s):\n%s", src.Pid(), src.Socket, out)
	}
	dstSock := filepath.Join(t.TempDir(), "dst.sock")
	dst := hostB.Incoming().ServeOn(t, dstSock, name, 2)

	script := soakScript(75, 4, 31)
	addr := vmtest.FreeTCPAddr(t)
	srcVM := vmtest.Start(t, g, vmtest.WithDisk(src.Socket, 2), vmtest.WithMem(256), vmtest.WithScript(script), vmtest.WithTimeout(5*time.Minute))
	dstVM := vmtest.Start(t, g, vmtest.WithDisk(dstSock, 2), vmtest.WithMem(256), vmtest.WithScript(script),
		vmtest.WithIncoming("tcp:"+addr), vmtest.WithReconnect(), vmtest.WithTimeout(5*time.Minute), vmtest.WithArgs("-S"))
	sq, dq := srcVM.QMPT(), dstVM.QMPT()

	// Live migration, once the soak is under way. The destination waits
	// stopped (-S) until its memory is compared with the source's.
	srcVM.Expect(0, `HEMD-SOAK t=5s`, 2*time.Minute)
	before := decrypts()
	if err := sq.SetMigrateParameters(map[string]any{"max-bandwidth": int64(4 << 30), "downtime-limit": 500}); err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	if err := sq.Migrate("tcp:" + addr); err != nil {
		t.Fatal(err)
	}
	mctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	mi, err := sq.WaitMigration(mctx)
	if err != nil {
		t.Fatalf("migration: %v", err)
	}
	t.Logf("migration completed in %v (QEMU: total %d ms, downtime %d ms)", time.Since(began).Round(time.Millisecond), mi.TotalTime, mi.Downtime)
	if n, late := vmtest.DiffRAM(t, srcVM, dstVM, 256); n > 0 || late > 0 {
		t.Fatalf("%d pages of guest memory differ between source and destination; %d changed on the source after it stopped", n, late)
	}
	if err := dq.Cont(); err != nil {
		t.Fatal(err)
	}
	if st, err := dq.Status(); err != nil || st != "running" {
		t.Fatalf("destination status %q, %v", st, err)
	}
	if !waitEvent(src, "event=hand-off", volID, 10*time.Second) || !waitEvent(dst, "event=take-over", volID, 10*time.Second) {
		t.Fatal("the source did not hand the image off, or the destination did not take it over")
	}
	if !waitEvent(src, "event=zeroize", volID, 10*time.Second) || !waitEvent(dst, "event=attach", volID, 10*time.Second) {
		t.Fatal("the source did not zeroize the data key, or the destination did not attach")
	}
	if decrypts() <= before {
		t.Fatal("no KMS Decrypt for the destination's attach")
	}
	w, at := waitWrites(t, dstVM, 0, 0, time.Minute)
	t.Logf("the guest writes on the destination (%d writes)", w)
	if out := hostA.Refused(t, name); !strings.Contains(out, "pid "+strconv.Itoa(dst.Pid())) {
		t.Fatalf("a hemd after the migration was refused without naming the destination (pid %d):\n%s", dst.Pid(), out)
	}

	// SIGKILL the destination hemd; its successor breaks the dead lock.
	w, at = waitWrites(t, dstVM, at, w+200, time.Minute)
	killed := time.Now()
	dst.Kill()
	stalled, at := latestWrites(dstVM, at, time.Second)
	succ := hostB.ServeOn(t, dstSock, name, 2)
	w, at = waitWrites(t, dstVM, at, stalled, 30*time.Second)
	resumed := time.Since(killed)
	t.Logf("SIGKILL: writes stalled at %d, resumed %v after the kill (%d writes)", stalled, resumed.Round(100*time.Millisecond), w)
	if resumed > 15*time.Second {
		t.Fatalf("the guest's writes resumed %v after the SIGKILL; want within 15 s", resumed)
	}
	broke := false
	for _, l := range succ.Log() {
		if strings.Contains(l, "breaking the lock of a dead holder") {
			broke = true
		}
	}
	if !broke {
		t.Fatal("the successor did not break the dead hemd's lock")
	}
	if bl, err := cluster.Ceph(ctx, "osd", "blocklist", "ls"); err != nil || !strings.Contains(string(bl), "127.0.0.1:0/") {
		t.Fatalf("no client blocklisted: %v\n%s", err, bl)
	}

	// The OSD goes away for 5 s: the writes stall, then resume.
	w, at = waitWrites(t, dstVM, at, w+200, time.Minute)
	cluster.StopOSD()
	stopped := time.Now()
	time.Sleep(2 * time.Second) // the writes in flight drain into the stall
	stalled, at = latestWrites(dstVM, at, 3*time.Second)
	if err := cluster.StartOSD(); err != nil {
		t.Fatal(err)
	}
	w, at = waitWrites(t, dstVM, at, stalled, 2*time.Minute)
	t.Logf("OSD stopped for 5 s: writes stalled at %d, resumed %v after the stop (%d writes)", stalled, time.Since(stopped).Round(100*time.Millisecond), w)

	res, _ := dstVM.Expect(at, `HEMD-RESULT (ok|fail) soak.*`, 3*time.Minute)
	if !strings.HasPrefix(res[0], "HEMD-RESULT ok") {
		t.Fatalf("guest: %s", res[0])
	}
	t.Logf("guest: %s", res[0])
	for _, s := range []*vmtest.Served{succ} {
		for _, l := range s.Log() {
			if strings.Contains(l, "io_errors=") && !strings.Contains(l, "io_errors=0") {
				t.Fatalf("I/O errors: %s", l)
			}
		}
	}
}
