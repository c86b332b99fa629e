package vmtest

import (
	"encoding/json"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestResizeOnline grows an encrypted volume under a running guest, as EBS
// Elastic Volumes do: hemd volume resize grows the file and both header
// copies and tells QEMU on the vhost-user back-end channel
// (CONFIG_CHANGE_MSG); QEMU reads the new capacity and tells the guest,
// whose /sys/block/vda/size grows without a reboot; an online resize2fs
// then grows the mounted ext4 into the new space, which takes a file larger
// than the old disk; the files written before are intact. A shrink is
// refused.
func TestResizeOnline(t *testing.T) {
	g := e2fsGuest(t, BuildGuest(t))
	v := newEncVolume(t, "64M")
	dir := t.TempDir()
	ctl, sock := filepath.Join(dir, "control.sock"), filepath.Join(dir, "vol.sock")
	h := v.hemd
	h.Args = []string{"--control", ctl}
	h.ServeOn(t, sock, v.path, 2)
	script := `
/usr/sbin/mke2fs -q -F -t ext4 /dev/vda || echo "HEMD-RESULT fail mke2fs"
mount -t ext4 /dev/vda /mnt || echo "HEMD-RESULT fail mount"
dd if=/dev/urandom of=/mnt/before bs=64k count=64 2>/dev/null
md5sum /mnt/before > /tmp/sums
s0=$(cat /sys/block/vda/size)
echo "HEMD-SIZE sectors=$s0 fs=$(df -k /mnt | tail -1 | awk '{print $2}')"
i=0; while [ "$(cat /sys/block/vda/size)" = "$s0" ] && [ $i -lt 3000 ]; do sleep 0.1; i=$((i+1)); done
echo "HEMD-GREW sectors=$(cat /sys/block/vda/size)"
/usr/sbin/resize2fs /dev/vda > /tmp/r2 2>&1 && echo "HEMD-RESIZE2FS ok" || { cat /tmp/r2; echo "HEMD-RESULT fail resize2fs"; }
echo "HEMD-FS fs=$(df -k /mnt | tail -1 | awk '{print $2}')"
dd if=/dev/zero of=/mnt/after bs=1M count=80 conv=fsync 2>/dev/null && echo "HEMD-BIGFILE ok" || echo "HEMD-RESULT fail no room for 80 MiB after the resize"
md5sum -c /tmp/sums >/dev/null && echo "HEMD-RESULT ok files intact" || echo "HEMD-RESULT fail files changed"
umount /mnt
`
	vm := Start(t, g, WithDisk(sock, 2), WithScript(script))
	m, at := vm.Expect(0, `HEMD-SIZE sectors=(\d+) fs=(\d+)`, 3*time.Minute)
	if m[1] != strconv.Itoa((64<<20)/512) {
		t.Fatalf("the guest sees %s sectors before the resize", m[1])
	}
	fsBefore, _ := strconv.Atoi(m[2])

	if out, err := cliErr(v.state, "volume", "resize", "--control", ctl, "--size", "32M", v.path); err == nil || !strings.Contains(out, "cannot shrink") || !strings.Contains(out, v.id) {
		t.Fatalf("shrink: %v\n%s", err, out)
	}
	out := cli(t, v.state, "volume", "resize", "--control", ctl, "--size", "128M", v.path)
	if !strings.Contains(out, v.id+": 64.0 MiB -> 128.0 MiB") || !strings.Contains(out, "the guest was told") {
		t.Fatalf("hemd volume resize: %s", out)
	}
	m, at = vm.Expect(at, `HEMD-GREW sectors=(\d+)`, 2*time.Minute)
	if m[1] != strconv.Itoa((128<<20)/512) {
		t.Fatalf("/sys/block/vda/size after the resize: %s sectors, want %d", m[1], (128<<20)/512)
	}
	_, at = vm.Expect(at, `HEMD-RESIZE2FS ok`, 2*time.Minute)
	m, at = vm.Expect(at, `HEMD-FS fs=(\d+)`, time.Minute)
	if fsAfter, _ := strconv.Atoi(m[1]); fsAfter < 2*fsBefore-8192 {
		t.Fatalf("filesystem of %d KiB after resize2fs, %d before", fsAfter, fsBefore)
	}
	_, at = vm.Expect(at, `HEMD-BIGFILE ok`, 3*time.Minute)
	vm.Expect(at, `HEMD-RESULT ok files intact`, time.Minute)
	vm.Wait(time.Minute)

	var hd map[string]any
	if err := json.Unmarshal([]byte(cli(t, v.state, "volume", "inspect", "--json", v.path)), &hd); err != nil || hd["size_bytes"] != float64(128<<20) {
		t.Fatalf("header after the resize: %v %v", hd["size_bytes"], err)
	}
	if st := hemdStatus(t, v.state, ctl)[v.id]; st.SizeBytes != 128<<20 || st.ResizePending != "" {
		t.Fatalf("hemd status after the resize: %+v", st)
	}
}
