package vmtest

import (
	"context"
	"os"
	"strconv"
	"testing"
	"time"
)

// PingPong moves one guest between QEMUs again and again: the stress test
// of live migration (go test -tags stress -run MigratePingPong).
type PingPong struct {
	Rounds  int    // migrations
	Compare bool   // start each destination stopped (-S) and DiffRAM it
	Script  string // the guest's scenario: a soak that prints HEMD-SOAK lines
	// Disk returns the disk options of the QEMU of round (0: the first),
	// and what to call once that QEMU is gone (nil: nothing).
	Disk func(round int) (opts []Option, gone func())
}

// PingPongFromEnv is a PingPong of HEMD_PINGPONG_ROUNDS migrations (6 by
// default) that compares guest memory if HEMD_PINGPONG_COMPARE is set.
func PingPongFromEnv(t testing.TB) PingPong {
	p := PingPong{Rounds: 6, Compare: os.Getenv("HEMD_PINGPONG_COMPARE") != ""}
	if v := os.Getenv("HEMD_PINGPONG_ROUNDS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("HEMD_PINGPONG_ROUNDS=%q: a positive number", v)
		}
		p.Rounds = n
	}
	return p
}

// soakWriting is a soak progress line with writes done.
const soakWriting = `HEMD-SOAK t=\d+s writes=[1-9]`

// Run boots the guest and migrates it p.Rounds times, each time to a new
// QEMU on loopback, the previous one killed once the guest's writes go on
// at the destination. It returns the last VM and its console line to read
// on from.
func (p PingPong) Run(t *testing.T, g *Guest) (*VM, int) {
	t.Helper()
	common := []Option{WithMem(256), WithScript(p.Script), WithTimeout(5 * time.Minute)}
	opts, gone := p.Disk(0)
	vm := Start(t, g, append(opts, common...)...)
	_, at := vm.Expect(0, soakWriting, 2*time.Minute)
	for i := 1; i <= p.Rounds; i++ {
		addr := FreeTCPAddr(t)
		dopts, dgone := p.Disk(i)
		dopts = append(append(dopts, common...), WithIncoming("tcp:"+addr))
		if p.Compare {
			dopts = append(dopts, WithArgs("-S"))
		}
		dvm := Start(t, g, dopts...)
		dq := dvm.QMPT()
		for k := 0; ; k++ {
			if st, err := dq.Status(); err == nil && st == "inmigrate" {
				break
			}
			if k == 200 {
				t.Fatalf("round %d: the destination QEMU never waited for the migration", i)
			}
			time.Sleep(50 * time.Millisecond)
		}
		sq := vm.QMPT()
		if err := sq.SetMigrateParameters(map[string]any{"max-bandwidth": int64(4 << 30), "downtime-limit": 500}); err != nil {
			t.Fatal(err)
		}
		if err := sq.Migrate("tcp:" + addr); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		mi, err := sq.WaitMigration(ctx)
		cancel()
		if err != nil {
			t.Fatalf("round %d: migration: %v", i, err)
		}
		if p.Compare {
			if n, late := DiffRAM(t, vm, dvm, 256); n > 0 || late > 0 {
				t.Errorf("round %d: %d pages differ between source and destination, %d changed on the source after it stopped", i, n, late)
			}
			if err := dq.Cont(); err != nil {
				t.Fatal(err)
			}
		}
		// Two progress lines from the destination: its I/O goes on.
		_, at = dvm.Expect(0, soakWriting, time.Minute)
		_, at = dvm.Expect(at, soakWriting, time.Minute)
		t.Logf("round %d: migrated (downtime %d ms), the guest writes on", i, mi.Downtime)
		vm.Kill()
		if gone != nil {
			gone()
		}
		vm, gone = dvm, dgone
	}
	return vm, at
}
