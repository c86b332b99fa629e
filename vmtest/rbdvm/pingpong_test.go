//go:build stress

// A stress test, not part of make test (about 15 s a migration): run it with
//
//	go test -tags stress -v -run TestRBDMigratePingPong ./vmtest/rbdvm
//
// HEMD_PINGPONG_ROUNDS sets the number of migrations (6);
// HEMD_PINGPONG_COMPARE=1 compares the guest memory of source and
// destination after each (the destination started with -S).

package rbdvm

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hemd/hemd/vmtest"
)

// TestRBDMigratePingPong: a guest under the soak moves between hemds again
// and again (each migration to a fresh hemd --incoming, the previous source
// stopped), its I/O going on after every switchover; the soak then finds
// every acknowledged write. Migrations this close together catch what one
// migration rarely shows: it found guests corrupted under TCG by QEMU 7.2
// losing their stores (vmtest.Boot gives guests 8 KiB more memory to keep
// QEMU off that path; vmtest/pingpong_test.go).
func TestRBDMigratePingPong(t *testing.T) {
	endpoint, kmsState := kmsServe(t)
	cli(t, kmsState, "key", "create", "--alias", "alias/move")
	host := func(i int) vmtest.Hemd {
		env := append(env(filepath.Join(t.TempDir(), fmt.Sprintf("host-%d", i))), "HEMD_KMS_ENDPOINT="+endpoint)
		return vmtest.Hemd{Bin: hemdBin, Env: env, Args: []string{"--control", "none"}}
	}
	name := imageName(t)
	create := exec.Command(hemdBin, "volume", "create", "--size", "64M", "--key", "alias/move", name)
	create.Env = append(os.Environ(), host(0).Env...)
	if out, err := create.CombinedOutput(); err != nil {
		t.Fatalf("volume create: %v\n%s", err, out)
	}
	p := vmtest.PingPongFromEnv(t)
	p.Script = soakScript(30+p.Rounds*8, 4, 37)
	p.Disk = func(round int) ([]vmtest.Option, func()) {
		sock := filepath.Join(t.TempDir(), "hemd.sock")
		h := host(round)
		if round > 0 {
			h = h.Incoming()
		}
		s := h.ServeOn(t, sock, name, 2)
		return []vmtest.Option{vmtest.WithDisk(sock, 2), vmtest.WithReconnect()}, func() { s.Stop(t) }
	}
	vm, at := p.Run(t, vmtest.BuildGuest(t))
	res, _ := vm.Expect(at, `HEMD-RESULT (ok|fail) soak.*`, 3*time.Minute)
	if !strings.HasPrefix(res[0], "HEMD-RESULT ok") {
		t.Fatalf("guest: %s", res[0])
	}
	t.Logf("guest: %s", res[0])
}
