package vmtest

import (
	"context"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// soakScript runs the guest agent's soak on the first 16 MiB of the disk:
// generation-tagged writes with O_DSYNC and read-backs in a loop, then a
// check of every block against the last generation acknowledged.
func soakScript(seconds, workers int, seed uint64) string {
	return "agent soak /dev/vda " + strconv.Itoa(seconds) + " " + strconv.Itoa(workers) +
		" 0 16777216 " + strconv.FormatUint(seed, 10) + "\nsleep 600\n"
}

// TestLiveMigration moves a guest between two QEMU processes on loopback,
// each on its own hemd serving the same encrypted volume file (shared
// storage), while the guest writes and checks data. The destination hemd
// says so (--incoming): a hemd that does not is refused, naming the source;
// the destination takes the volume when the source hands it off at the
// switchover. The destination's guest memory is the source's, page for
// page (the source hemd's dirty log marked every page it wrote). The destination's guest then finds every block it wrote as it
// left it; the source hemd zeroized the data key (no window of it in its
// memory); the destination hemd unwrapped it through the KMS (a Decrypt in
// the audit log); a hemd that comes later is refused, naming the
// destination.
//
// The source serves with O_DIRECT, so its queues stream (requests in
// flight, completed in any order): the switchover must drain them; the
// destination serves through the page cache, batch by batch.
func TestLiveMigration(t *testing.T) {
	v := newEncVolume(t, "64M")
	src := v.hemd
	src.Args = append(slices.Clip(src.Args), "--direct")
	liveMigration(t, migration{kmsState: v.state, vol: v.path, volID: v.id, src: src, dst: v.hemd,
		wins: keyWindows(t, v.state, v.path)})
}

// migration is what liveMigration moves: a volume, the hemd of each end
// (the destination gets --incoming), the state directory whose audit log
// records the KMS's Decrypts, and the windows of the volume's data key.
type migration struct {
	kmsState, vol, volID string
	src, dst             Hemd
	wins                 [][]byte
}

// liveMigration is TestLiveMigration's scenario; it returns both hemds and
// the destination's VM, still running, for callers that check more.
func liveMigration(t *testing.T, m migration) (src, dst *Served, dstVM *VM) {
	g := BuildGuest(t)
	state, vol, volID, h, wins := m.kmsState, m.vol, m.volID, m.src, m.wins
	src = h.Serve(t, vol, 2)
	if out := h.Refused(t, vol); !strings.Contains(out, "pid "+strconv.Itoa(src.Pid())) || !strings.Contains(out, src.Socket) {
		t.Fatalf("a second hemd on the volume was refused without naming the source (pid %d, %s):\n%s", src.Pid(), src.Socket, out)
	}
	dst = m.dst.Incoming().Serve(t, vol, 2)

	script := soakScript(35, 4, 21)
	addr := FreeTCPAddr(t)
	srcVM := Start(t, g, WithDisk(src.Socket, 2), WithMem(256), WithScript(script))
	// The destination waits stopped (-S) until its memory is compared with
	// the source's.
	dstVM = Start(t, g, WithDisk(dst.Socket, 2), WithMem(256), WithScript(script), WithIncoming("tcp:"+addr), WithArgs("-S"))
	sq, dq := srcVM.QMPT(), dstVM.QMPT()

	// Migrate once the soak is well under way.
	_, at := srcVM.Expect(0, `HEMD-SOAK t=5s`, 2*time.Minute)
	decrypts := auditCount(t, state, "Decrypt")
	if err := sq.SetMigrateParameters(map[string]any{"max-bandwidth": int64(4 << 30), "downtime-limit": 500}); err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	if err := sq.Migrate("tcp:" + addr); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	mi, err := sq.WaitMigration(ctx)
	if err != nil {
		t.Fatalf("migration: %v", err)
	}
	t.Logf("migration completed in %v (QEMU: total %d ms, downtime %d ms, ram %v)", time.Since(began).Round(time.Millisecond), mi.TotalTime, mi.Downtime, mi.RAM)
	// Every page the guest or the source hemd wrote reached the
	// destination (the dirty log marked what hemd wrote), and the source
	// hemd wrote nothing after its rings stopped.
	if n, late := DiffRAM(t, srcVM, dstVM, 256); n > 0 || late > 0 {
		t.Fatalf("%d pages of guest memory differ between source and destination; %d changed on the source after it stopped", n, late)
	}
	if err := dq.Cont(); err != nil {
		t.Fatal(err)
	}
	if st, err := dq.Status(); err != nil || st != "running" {
		t.Fatalf("destination status %q, %v", st, err)
	}
	if st, err := sq.Status(); err != nil || st != "postmigrate" {
		t.Fatalf("source status %q, %v", st, err)
	}
	_ = at

	// The guest, now on the destination, ends its soak: every block it
	// wrote on either host holds its last acknowledged generation.
	res, _ := dstVM.Expect(0, `HEMD-RESULT (ok|fail) soak.*`, 3*time.Minute)
	if !strings.HasPrefix(res[0], "HEMD-RESULT ok") {
		t.Fatalf("guest after migration: %s", res[0])
	}
	t.Logf("guest: %s", res[0])

	// The source logged dirty pages while migrating, stopped its rings and
	// zeroized the key; the destination unwrapped it again.
	if !hasLine(src.Log(), `dirty logging started`) || !hasLine(src.Log(), `dirty log set`) {
		t.Fatal("source hemd was never given a dirty log")
	}
	if !waitLog(src, "event=zeroize", volID, 10*time.Second) {
		t.Fatal("source hemd did not zeroize the data key at the end of migration")
	}
	if !HasEvent(dst.Log(), "event=attach", volID) {
		t.Fatal("destination hemd did not attach the volume")
	}
	if auditCount(t, state, "Decrypt") <= decrypts {
		t.Fatal("no KMS Decrypt for the destination's attach")
	}
	if !HasEvent(src.Log(), "event=hand-off", volID) || !HasEvent(dst.Log(), "event=take-over", volID) {
		t.Fatal("the source did not hand the volume off, or the destination did not take it over")
	}
	if out := h.Refused(t, vol); !strings.Contains(out, "pid "+strconv.Itoa(dst.Pid())) || !strings.Contains(out, dst.Socket) {
		t.Fatalf("a hemd after the migration was refused without naming the destination (pid %d, %s):\n%s", dst.Pid(), dst.Socket, out)
	}
	if found := scanMemory(t, src.Pid(), wins); len(found) > 0 {
		t.Fatalf("key material in the source hemd's memory after migration:\n%s", strings.Join(found, "\n"))
	}
	return src, dst, dstVM
}

func hasLine(log []string, re string) bool {
	r := regexp.MustCompile(re)
	for _, l := range log {
		if r.MatchString(l) {
			return true
		}
	}
	return false
}

// waitLog waits for event about volID in s's log.
func waitLog(s *Served, event, volID string, d time.Duration) bool {
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		if HasEvent(s.Log(), event, volID) {
			return true
		}
	}
	return false
}
