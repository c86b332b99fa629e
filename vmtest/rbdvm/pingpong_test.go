//go:build repro

// A reproducer of an open bug, not part of make test (it fails): run it with
//
//	go test -tags repro -v -run TestRBDMigratePingPong ./vmtest/rbdvm
//
// storage/rbd/TODO.md ("Guest memory corrupt after live migrations").

package rbdvm

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hemd/hemd/vmtest"
)

// pingPongRounds is how many times TestRBDMigratePingPong moves the guest.
const pingPongRounds = 6

// TestRBDMigratePingPong: a guest under the soak moves between hemds again
// and again (each migration to a fresh hemd --incoming, the previous source
// stopped), its I/O going on after every switchover; the soak then finds
// every acknowledged write. Migrations this close together catch what one
// migration rarely shows: today the guest's memory is corrupt after one of
// the first few switchovers (storage/rbd/TODO.md).
func TestRBDMigratePingPong(t *testing.T) {
	g := vmtest.BuildGuest(t)
	ctx := context.Background()
	endpoint, kmsState := kmsServe(t)
	cli(t, kmsState, "key", "create", "--alias", "alias/move")
	host := func(i int) vmtest.Hemd {
		env := append(env(filepath.Join(t.TempDir(), fmt.Sprintf("host-%d", i))), "HEMD_KMS_ENDPOINT="+endpoint)
		return vmtest.Hemd{Bin: hemdBin, Env: env, Args: []string{"--control", "none"}}
	}
	name := imageName(t)
	h0 := host(0)
	create := exec.Command(hemdBin, "volume", "create", "--size", "64M", "--key", "alias/move", name)
	create.Env = append(os.Environ(), h0.Env...)
	if out, err := create.CombinedOutput(); err != nil {
		t.Fatalf("volume create: %v\n%s", err, out)
	}
	src := h0.Serve(t, name, 2)
	script := soakScript(30+pingPongRounds*8, 4, 37)
	vm := vmtest.Start(t, g, vmtest.WithDisk(src.Socket, 2), vmtest.WithMem(256), vmtest.WithScript(script), vmtest.WithTimeout(5*time.Minute))
	vm.Expect(0, `HEMD-SOAK t=3s`, 2*time.Minute)
	at := 0
	for i := 1; i <= pingPongRounds; i++ {
		dstSock := filepath.Join(t.TempDir(), "dst.sock")
		dst := host(i).Incoming().ServeOn(t, dstSock, name, 2)
		addr := vmtest.FreeTCPAddr(t)
		dvm := vmtest.Start(t, g, vmtest.WithDisk(dstSock, 2), vmtest.WithMem(256), vmtest.WithScript(script),
			vmtest.WithIncoming("tcp:"+addr), vmtest.WithReconnect(), vmtest.WithTimeout(5*time.Minute))
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
		mctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		mi, err := sq.WaitMigration(mctx)
		cancel()
		if err != nil {
			t.Fatalf("round %d: migration: %v", i, err)
		}
		// Two progress lines from the destination: its I/O goes on.
		_, at = waitWrites(t, dvm, 0, 0, time.Minute)
		_, at = waitWrites(t, dvm, at, 0, time.Minute)
		t.Logf("round %d: migrated (downtime %d ms), the guest writes on", i, mi.Downtime)
		vm.Kill()
		src.Stop(t)
		vm, src = dvm, dst
	}
	res, _ := vm.Expect(at, `HEMD-RESULT (ok|fail) soak.*`, 3*time.Minute)
	if !strings.HasPrefix(res[0], "HEMD-RESULT ok") {
		t.Fatalf("guest: %s", res[0])
	}
	t.Logf("guest: %s", res[0])
}
