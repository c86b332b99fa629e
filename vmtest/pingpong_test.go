//go:build stress

// Stress tests, not part of make test (about 4 s a migration): run them with
//
//	go test -tags stress -v -run MigratePingPong ./vmtest
//
// HEMD_PINGPONG_ROUNDS sets the number of migrations (6), and
// HEMD_PINGPONG_COMPARE=1 compares the guest memory of source and
// destination after each (the destination started with -S).
//
// They found (2026-12-07) guests crashing after one migration in ten or
// twenty, on files and on RBD alike: pages the guest's vCPUs wrote in the
// last tens of milliseconds before the switchover reached the destination
// stale (their jiffies values behind the source's). That is QEMU 7.2's
// TCG dirty tracking, not hemd: see the comment on the memory size in
// Boot (vm.go). With the workaround, 25 migrations on a file and 6 on RBD
// left no page behind.

package vmtest

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestFileMigratePingPong moves a guest under the soak between hemds on
// one volume file again and again (each to a new hemd --incoming).
func TestFileMigratePingPong(t *testing.T) {
	v := newEncVolume(t, "64M")
	p := PingPongFromEnv(t)
	p.Disk = func(round int) ([]Option, func()) {
		sock := filepath.Join(t.TempDir(), "hemd.sock")
		h := v.hemd
		if round > 0 {
			h = h.Incoming()
		}
		s := h.ServeOn(t, sock, v.path, 2)
		return []Option{WithDisk(sock, 2), WithReconnect()}, func() { s.Stop(t) }
	}
	pingPongSoak(t, p)
}

// TestQEMUMigratePingPong is the same with QEMU's own virtio-blk on a raw
// file: no vhost-user, no hemd.
func TestQEMUMigratePingPong(t *testing.T) {
	img := filepath.Join(t.TempDir(), "raw.img")
	if out, err := exec.Command("truncate", "-s", "64M", img).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	p := PingPongFromEnv(t)
	p.Disk = func(int) ([]Option, func()) {
		return []Option{WithArgs("-drive", "file="+img+",format=raw,if=none,id=d0,cache=none,aio=threads",
			"-device", "virtio-blk-pci,drive=d0,num-queues=2")}, nil
	}
	pingPongSoak(t, p)
}

// pingPongSoak runs p with the soak and checks that the soak found every
// acknowledged write.
func pingPongSoak(t *testing.T, p PingPong) {
	p.Script = soakScript(30+p.Rounds*8, 4, 37)
	vm, at := p.Run(t, BuildGuest(t))
	res, _ := vm.Expect(at, `HEMD-RESULT (ok|fail) soak.*`, 3*time.Minute)
	if !strings.HasPrefix(res[0], "HEMD-RESULT ok") {
		t.Fatalf("guest: %s", res[0])
	}
	t.Logf("guest: %s", res[0])
}
