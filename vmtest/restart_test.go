package vmtest

import (
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestBackendKillRestart kills hemd with SIGKILL again and again while the
// guest writes with O_DSYNC and reads back; each time a new hemd takes the
// socket, QEMU (reconnect=1) reconnects and hands it the inflight region,
// and the new hemd serves again what the dead one had taken but not
// completed. The guest's soak then finds every write it saw acknowledged.
func TestBackendKillRestart(t *testing.T) {
	const kills = 6
	g := BuildGuest(t)
	v := newEncVolume(t, "64M")
	vol, volID, h := v.path, v.id, v.hemd
	// O_DIRECT: the queues stream, so each kill leaves many requests in
	// flight, out of order, for the next hemd to resubmit.
	h.Args = append(slices.Clip(h.Args), "--direct")
	sock := filepath.Join(t.TempDir(), "hemd.sock")
	srv := h.ServeOn(t, sock, vol, 2)
	vm := Start(t, g, WithDisk(sock, 2), WithReconnect(), WithScript(soakScript(40, 8, 5)))

	_, at := vm.Expect(0, `HEMD-SOAK t=3s`, 2*time.Minute)
	resubmitted, reconnects := 0, 0
	resubRe := regexp.MustCompile(`resubmit=(\d+)`)
	for i := 0; i < kills; i++ {
		// Let the guest make progress between kills, on the new hemd too.
		_, at = vm.Expect(at, `HEMD-SOAK t=\d+s writes=\d+`, time.Minute)
		time.Sleep(time.Duration(700+300*i) * time.Millisecond)
		srv.Kill()
		srv = h.ServeOn(t, sock, vol, 2)
		if !waitLog(srv, "event=attach", volID, 30*time.Second) {
			t.Fatalf("kill %d: QEMU did not reconnect and restart the device on the new hemd", i+1)
		}
		reconnects++
		n := 0
		for _, l := range srv.Log() {
			if m := resubRe.FindStringSubmatch(l); m != nil {
				k, _ := strconv.Atoi(m[1])
				n += k
			}
		}
		t.Logf("kill %d: the new hemd resubmitted %d request(s)", i+1, n)
		resubmitted += n
	}
	res, _ := vm.Expect(at, `HEMD-RESULT (ok|fail) soak.*`, 3*time.Minute)
	if !strings.HasPrefix(res[0], "HEMD-RESULT ok") {
		t.Fatalf("guest after %d kills: %s", kills, res[0])
	}
	t.Logf("guest: %s", res[0])
	t.Logf("%d SIGKILLs, %d reconnects, %d request(s) resubmitted in all", kills, reconnects, resubmitted)
	if reconnects != kills {
		t.Fatalf("%d reconnects for %d kills", reconnects, kills)
	}
}
