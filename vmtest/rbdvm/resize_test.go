package rbdvm

import (
	"bytes"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hemd/hemd/vmtest"
)

// TestRBDResizeOnline grows an encrypted volume on RBD under a running
// guest through hemd's control socket: the image and both header copies
// grow, the guest is told (CONFIG_CHANGE_MSG) and sees the new size without
// a reboot, writes past the old end reach the image as ciphertext and read
// back; the header says the new size.
func TestRBDResizeOnline(t *testing.T) {
	vmtest.RequireQEMU(t)
	g := vmtest.BuildGuest(t)
	v := newRBDVolume(t, "32M")
	dir := t.TempDir()
	ctl, sock := filepath.Join(dir, "control.sock"), filepath.Join(dir, "vol.sock")
	h := v.hemd
	h.Args = []string{"--control", ctl}
	h.ServeOn(t, sock, v.name, 2)
	const tail = "HEMD-RBD-TAIL-PAST-THE-OLD-END"
	script := `
s0=$(cat /sys/block/vda/size)
echo "HEMD-SIZE sectors=$s0"
i=0; while [ "$(cat /sys/block/vda/size)" = "$s0" ] && [ $i -lt 3000 ]; do sleep 0.1; i=$((i+1)); done
s1=$(cat /sys/block/vda/size)
echo "HEMD-GREW sectors=$s1"
echo "` + tail + `" | dd of=/dev/vda bs=512 seek=$((s1-8)) conv=sync 2>/dev/null && sync
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda bs=512 skip=$((s1-8)) count=1 2>/dev/null | grep -q "` + tail + `" && echo "HEMD-RESULT ok tail written" || echo "HEMD-RESULT fail tail"
`
	vm := vmtest.Start(t, g, vmtest.WithDisk(sock, 2), vmtest.WithScript(script))
	m, at := vm.Expect(0, `HEMD-SIZE sectors=(\d+)`, 2*time.Minute)
	if m[1] != strconv.Itoa((32<<20)/512) {
		t.Fatalf("the guest sees %s sectors before the resize", m[1])
	}
	out := cli(t, v.state, "volume", "resize", "--control", ctl, "--size", "64M", v.name)
	if !strings.Contains(out, v.id+": 32.0 MiB -> 64.0 MiB") || !strings.Contains(out, "the guest was told") {
		t.Fatalf("hemd volume resize: %s", out)
	}
	m, at = vm.Expect(at, `HEMD-GREW sectors=(\d+)`, 2*time.Minute)
	if m[1] != strconv.Itoa((64<<20)/512) {
		t.Fatalf("/sys/block/vda/size after the resize: %s sectors, want %d", m[1], (64<<20)/512)
	}
	res, _ := vm.Expect(at, `HEMD-RESULT (ok|fail) tail.*`, time.Minute)
	if !strings.HasPrefix(res[0], "HEMD-RESULT ok") {
		t.Fatalf("guest: %s", res[0])
	}
	vm.Wait(time.Minute)
	if hd := inspect(t, v.state, v.name); hd["size_bytes"] != float64(64<<20) {
		t.Fatalf("header after the resize: size_bytes %v", hd["size_bytes"])
	}
	if b := rbdExport(t, v.name); bytes.Contains(b, []byte(tail)) {
		t.Fatal("the RBD image holds the guest's plaintext past the old end")
	} else if int64(len(b)) < 64<<20 {
		t.Fatalf("the RBD image has %d bytes after the resize", len(b))
	}
}
