package vmtest

import (
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestHotplugAttachDetach hot-plugs a second encrypted disk into a running
// guest and unplugs it, as EBS attaches and detaches a volume on a running
// instance: hemd volume attach serves it on a new socket of the running
// hemd; QMP chardev-add and device_add (vhost-user-blk-pci on a PCIe root
// port) give it to the guest, which sees /dev/vdb, writes and verifies a
// pattern over it; device_del and chardev-remove take it away, and hemd
// volume detach stops serving it (its data key zeroized). A detach while
// the front-end is still connected is refused. The first disk's soak goes
// on all along: hemd counts its I/O between every step, and the guest finds
// every block it wrote.
func TestHotplugAttachDetach(t *testing.T) {
	g := BuildGuest(t)
	a := newEncVolume(t, "64M")
	dir := t.TempDir()
	bPath := filepath.Join(dir, "b.img")
	bID := strings.TrimSpace(cli(t, a.state, "volume", "create", "--size", "32M", "--key", "alias/vmtest", bPath))
	ctl, aSock, bSock := filepath.Join(dir, "control.sock"), filepath.Join(dir, "a.sock"), filepath.Join(dir, "b.sock")
	h := a.hemd
	h.Args = []string{"--control", ctl}
	srv := h.ServeOn(t, aSock, a.path, 2)

	// The first disk soaks in rounds of 8 s (each with its own seed, each
	// checking every block it wrote) until the hot-plug is over.
	script := `
( s=11; while [ ! -f /soak.stop ]; do agent soak /dev/vda 8 4 0 16777216 $s; s=$((s+1)); done; echo "HEMD-SOAKS-DONE rounds=$((s-11))" ) &
i=0; while [ ! -b /dev/vdb ] && [ $i -lt 3000 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/vdb ] || echo "HEMD-RESULT fail vdb never appeared"
echo "HEMD-VDB size=$(cat /sys/block/vdb/size) serial=$(cat /sys/block/vdb/serial 2>/dev/null)"
agent pattern write /dev/vdb 77 2
echo 3 > /proc/sys/vm/drop_caches
agent pattern verify /dev/vdb 77 2
echo HEMD-VDB-DONE
i=0; while [ -b /dev/vdb ] && [ $i -lt 3000 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/vdb ] && echo "HEMD-RESULT fail vdb still there" || echo HEMD-VDB-GONE
touch /soak.stop
wait
`
	vm := Start(t, g, WithDisk(aSock, 2), WithArgs("-device", "pcie-root-port,id=hp1,chassis=1"),
		WithTimeout(10*time.Minute), WithScript(script))
	_, at := vm.Expect(0, `HEMD-SOAK t=3s`, 3*time.Minute)
	st := hemdStatus(t, a.state, ctl)[a.id]

	// Attach in hemd, then plug into the guest.
	out := cli(t, a.state, "volume", "attach", "--control", ctl, "--socket", bSock, "--volume", bPath, "--queues", "2")
	if !strings.Contains(out, bID+" attached") {
		t.Fatalf("hemd volume attach: %s", out)
	}
	st = ioGoesOn(t, a.state, ctl, a.id, st, "attach")
	q := vm.QMPT()
	qmpDo(t, q, "chardev-add", map[string]any{"id": "hpc1", "backend": map[string]any{"type": "socket",
		"data": map[string]any{"addr": map[string]any{"type": "unix", "data": map[string]any{"path": bSock}}, "server": false}}})
	qmpDo(t, q, "device_add", map[string]any{"driver": "vhost-user-blk-pci", "id": "hpd1", "chardev": "hpc1",
		"num-queues": 2, "bus": "hp1"})
	m, at := vm.Expect(at, `HEMD-VDB size=(\d+) serial=(\S*)`, 2*time.Minute)
	if m[1] != strconv.Itoa((32<<20)/512) || m[2] != "vol"+bID[4:] {
		t.Fatalf("the guest sees vdb of %s sectors, serial %q; want %d, %q", m[1], m[2], (32<<20)/512, "vol"+bID[4:])
	}
	_, at = vm.Expect(at, `HEMD-RESULT ok pattern-write bytes=33554432`, 3*time.Minute)
	_, at = vm.Expect(at, `HEMD-RESULT ok pattern-verify bytes=33554432`, 3*time.Minute)
	_, at = vm.Expect(at, `HEMD-VDB-DONE`, time.Minute)
	if !waitLog(srv, "event=attach", bID, 10*time.Second) {
		t.Fatal("hemd did not attach the hot-plugged volume's key")
	}
	st = ioGoesOn(t, a.state, ctl, a.id, st, "hot-plug and I/O on vdb")

	// Connected: hemd refuses to detach it.
	if out, err := cliErr(a.state, "volume", "detach", "--control", ctl, bSock); err == nil || !strings.Contains(out, "front-end is connected") {
		t.Fatalf("detach while the guest has the disk: %v\n%s", err, out)
	}
	// Unplug from the guest, then detach in hemd.
	qmpDo(t, q, "device_del", map[string]any{"id": "hpd1"})
	waitDeleted(t, q, "hpd1", 2*time.Minute)
	qmpDo(t, q, "chardev-remove", map[string]any{"id": "hpc1"})
	_, at = vm.Expect(at, `HEMD-VDB-GONE`, time.Minute)
	var detached string
	for end := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		out, err := cliErr(a.state, "volume", "detach", "--control", ctl, bSock)
		if err == nil {
			detached = out
			break
		}
		if time.Now().After(end) {
			t.Fatalf("detach after the unplug: %v\n%s", err, out)
		}
	}
	if !strings.Contains(detached, bID+" detached") || strings.Contains(detached, "session") {
		t.Fatalf("hemd volume detach: %s", detached)
	}
	if !waitLog(srv, "event=zeroize", bID, 10*time.Second) {
		t.Fatal("the detached volume's data key was not zeroized")
	}
	if _, ok := hemdStatus(t, a.state, ctl)[bID]; ok {
		t.Fatal("the detached volume is still served")
	}
	ioGoesOn(t, a.state, ctl, a.id, st, "unplug and detach")

	// Every soak round passed (a failed one fails Expect), the last one too.
	m, _ = vm.Expect(at, `HEMD-SOAKS-DONE rounds=(\d+)`, 3*time.Minute)
	vm.Wait(time.Minute)
	ok := 0
	for _, l := range vm.con.Lines() {
		if strings.HasPrefix(l.Text, "HEMD-RESULT ok soak") {
			ok++
		}
	}
	if n, _ := strconv.Atoi(m[1]); n < 1 || ok != n {
		t.Fatalf("%s soak rounds, %d passed", m[1], ok)
	}
	t.Logf("the first disk soaked in %d rounds, each finding every block it wrote", ok)
}
