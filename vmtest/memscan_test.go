package vmtest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hemd/hemd/hem"
	"github.com/hemd/hemd/kmsclient/hsm"
)

// windows returns the 16-byte windows to look for: the data key's four
// quarters and the first round keys of the three XTS key schedules.
func windows(t *testing.T, dek []byte) [][]byte {
	t.Helper()
	var out [][]byte
	for i := 0; i+16 <= len(dek); i += 16 {
		out = append(out, dek[i:i+16])
	}
	sched := make([]byte, hem.ScheduleSize)
	x, err := hem.NewXTSIn(sched, dek, 512)
	if err != nil {
		t.Fatal(err)
	}
	third := hem.ScheduleSize / 3
	for s := 0; s < 3; s++ {
		for r := 0; r < 4; r++ {
			w := append([]byte(nil), sched[s*third+16*r:s*third+16*r+16]...)
			out = append(out, w)
		}
	}
	x.Wipe()
	return out
}

// scanMemory reads every readable mapping of process pid and reports which
// windows it holds, and where.
func scanMemory(t *testing.T, pid int, wins [][]byte) []string {
	t.Helper()
	maps, err := os.Open(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer maps.Close()
	mem, err := os.Open(fmt.Sprintf("/proc/%d/mem", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	var found []string
	scanned := 0
	sc := bufio.NewScanner(maps)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 || f[1][0] != 'r' || strings.Contains(sc.Text(), "[vvar") || strings.Contains(sc.Text(), "[vsyscall]") {
			continue
		}
		r := strings.SplitN(f[0], "-", 2)
		lo, _ := strconv.ParseUint(r[0], 16, 64)
		hi, _ := strconv.ParseUint(r[1], 16, 64)
		for off := lo; off < hi; off += 1 << 20 {
			n := min(hi-off, 1<<20)
			buf := make([]byte, n+15)
			k, _ := mem.ReadAt(buf[:n], int64(off))
			scanned += k
			for i, w := range wins {
				if j := bytes.Index(buf[:k], w); j >= 0 {
					found = append(found, fmt.Sprintf("window %d at %#x in %s", i, off+uint64(j), sc.Text()))
				}
			}
		}
	}
	t.Logf("scanned %d MiB of hemd's memory", scanned>>20)
	return found
}

// TestNoKeyInMemoryAfterStop: after the VM stops, no 16-byte window of the
// data key or of its first round keys is anywhere in hemd's memory.
func TestNoKeyInMemoryAfterStop(t *testing.T) {
	g := BuildGuest(t)
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	cli(t, state, "key", "create", "--alias", "alias/scan")
	vol := filepath.Join(dir, "vol.img")
	cli(t, state, "volume", "create", "--size", "32M", "--key", "alias/scan", vol)
	h := inspect(t, state, vol)
	wins := keyWindows(t, state, vol)

	srv := Hemd{Bin: hemdBin, Env: []string{"HEMD_STATE_DIR=" + state, "SOFTHSM2_CONF="}}.Serve(t, vol, 1)
	pid := srv.cmd.Process.Pid
	vm := Start(t, g, WithDisk(srv.Socket, 1), WithScript(`
agent pattern write /dev/vda 7
agent pattern verify /dev/vda 7
sleep 600
`))
	_, at := vm.Expect(0, `HEMD-RESULT ok pattern-write`, 2*time.Minute)
	vm.Expect(at, `HEMD-RESULT ok pattern-verify`, 2*time.Minute)
	// While attached the key schedule is in hemd's memory: the scan works.
	if found := scanMemory(t, pid, wins); len(found) == 0 {
		t.Fatal("scan found no key material while the VM runs: the scan cannot see it")
	}
	vm.Kill() // the VM stops: QEMU closes the socket
	deadline := time.Now().Add(10 * time.Second)
	for !HasEvent(srv.Log(), "event=zeroize", h["volume_id"].(string)) || strings.Contains(lastEvent(srv.Log()), "event=attach ") {
		if time.Now().After(deadline) {
			t.Fatal("hemd did not zeroize after the VM stopped")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if found := scanMemory(t, pid, wins); len(found) > 0 {
		t.Fatalf("key material in hemd's memory after the VM stopped:\n%s", strings.Join(found, "\n"))
	}
}

// keyWindows unwraps the data key of the volume at vol itself, through the
// KMS in state, and returns the windows to look for in hemd's memory
// (hsm.Open points SOFTHSM2_CONF at the state dir: undone when the test
// ends).
func keyWindows(t *testing.T, state, vol string) [][]byte {
	t.Helper()
	h := inspect(t, state, vol)
	t.Setenv("SOFTHSM2_CONF", "")
	k, err := hsm.Open(hsm.Config{}, state)
	if err != nil {
		t.Fatal(err)
	}
	blob, _ := base64.StdEncoding.DecodeString(h["wrapped_dek"].(string))
	dek := make([]byte, 64)
	ectx := map[string]string{}
	for key, v := range h["encryption_context"].(map[string]any) {
		ectx[key] = v.(string)
	}
	if _, err := k.Decrypt(context.Background(), blob, ectx, dek); err != nil {
		t.Fatal(err)
	}
	k.Close()
	return windows(t, dek)
}

func lastEvent(log []string) string {
	for i := len(log) - 1; i >= 0; i-- {
		if strings.Contains(log[i], "event=") {
			return log[i]
		}
	}
	return ""
}
