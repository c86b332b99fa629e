package vmtest

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// cli runs hemd with its state (embedded SoftHSM2 token, audit log) in
// state, and fails the test on error.
func cli(t *testing.T, state string, args ...string) string {
	t.Helper()
	out, err := cliErr(state, args...)
	if err != nil {
		t.Fatalf("hemd %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func cliErr(state string, args ...string) (string, error) {
	cmd := exec.Command(hemdBin, args...)
	// SOFTHSM2_CONF= lets hemd point SoftHSM2 at the state dir's token
	// (a test that opened the KMS in-process set it for itself).
	cmd.Env = append(os.Environ(), "HEMD_STATE_DIR="+state, "SOFTHSM2_CONF=")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		return out.String() + errb.String(), err
	}
	return out.String(), nil
}

// auditCount counts the audit records of op.
func auditCount(t *testing.T, state, op string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(state, "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	return bytes.Count(b, []byte(`"eventName":"`+op+`"`))
}

func inspect(t *testing.T, state, path string) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal([]byte(cli(t, state, "volume", "inspect", "--json", path)), &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// secret is what the guest writes: it must never appear on the host.
const secret = "HEMD-GUEST-PLAINTEXT-7f3a9c1e-the-host-must-never-see-this"

// writeScript makes a filesystem, writes a file full of the secret, and
// reboots; after the reboot it checks the file. readScript checks it only.
var (
	writeScript = `
mount /dev/vda /mnt 2>/dev/null
if [ -f /mnt/phase1 ]; then
  cd /mnt && md5sum -c sums >/dev/null && echo "HEMD-RESULT ok read-after-reboot" || echo "HEMD-RESULT fail file changed after reboot"
  exit 0
fi
mke2fs -q /dev/vda || { echo "HEMD-RESULT fail mke2fs"; exit 0; }
mount -t ext4 /dev/vda /mnt || { echo "HEMD-RESULT fail mount"; exit 0; }
i=0; while [ $i -lt 2000 ]; do echo "` + secret + ` $i"; i=$((i+1)); done > /mnt/secret.txt
cd /mnt && md5sum secret.txt > sums && echo 1 > phase1 && cd /
umount /mnt && sync
echo "HEMD-RESULT ok written $(md5sum < /dev/null | cut -c1-4)"
reboot -f
`
	readScript = `
mount -t ext4 -o ro /dev/vda /mnt || { echo "HEMD-RESULT fail mount"; exit 0; }
cd /mnt && md5sum -c sums >/dev/null && grep -c "` + secret + `" secret.txt | sed 's/^/HEMD-RESULT ok read lines=/' || echo "HEMD-RESULT fail data differs"
`
)

// TestEncryptedVolume is the EBS flow on one host, with real VMs:
//   - a volume created under an HSM-backed key; the guest writes a file and
//     reads it back after a reboot; the host file holds no plaintext;
//   - a second VM attaches after the first stopped: a second KMS Decrypt;
//   - a snapshot, a volume from it, a copy under another key: the guest reads
//     the same data from each, and the copy's wrapped key differs;
//   - a disabled key: the attach fails closed with the key named.
func TestEncryptedVolume(t *testing.T) {
	g := BuildGuest(t)
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	cli(t, state, "key", "create", "--alias", "alias/vmtest")
	vol := filepath.Join(dir, "vol.img")
	volID := strings.TrimSpace(cli(t, state, "volume", "create", "--size", "64M", "--key", "alias/vmtest", vol))
	h := Hemd{Bin: hemdBin, Env: []string{"HEMD_STATE_DIR=" + state, "SOFTHSM2_CONF="}}

	// First VM: write, reboot, read.
	srv := h.Serve(t, vol, 2)
	decrypts := auditCount(t, state, "Decrypt")
	vm := Start(t, g, WithDisk(srv.Socket, 2), WithReboot(), WithScript(writeScript))
	_, at := vm.Expect(0, `HEMD-RESULT ok written`, 2*time.Minute)
	vm.Expect(at, `HEMD-RESULT ok read-after-reboot`, 2*time.Minute)
	vm.Wait(time.Minute)
	b, err := os.ReadFile(vol)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(b, []byte("HEMD-GUEST-PLAINTEXT")) {
		t.Fatal("the volume file holds the guest's plaintext")
	}
	first := auditCount(t, state, "Decrypt") - decrypts
	if first < 1 {
		t.Fatalf("no KMS Decrypt for the first attach")
	}
	if !HasEvent(srv.Log(), "event=attach", volID) || !HasEvent(srv.Log(), "event=zeroize", volID) {
		t.Fatal("hemd logged no attach and zeroize events for the volume")
	}

	// Second VM on the same hemd after the first stopped: a fresh Decrypt.
	before := auditCount(t, state, "Decrypt")
	vm2 := Start(t, g, WithDisk(srv.Socket, 1), WithScript(readScript))
	vm2.Expect(0, `HEMD-RESULT ok read lines=2000`, 2*time.Minute)
	vm2.Wait(time.Minute)
	if auditCount(t, state, "Decrypt") <= before {
		t.Fatal("the second attach did not ask the KMS again")
	}
	srv.Stop(t)

	// Snapshot → volume: same key, same data.
	snap := filepath.Join(dir, "snap.img")
	cli(t, state, "snapshot", "create", vol, snap)
	vol2 := filepath.Join(dir, "vol2.img")
	cli(t, state, "volume", "create", "--snapshot", snap, vol2)
	if a, b := inspect(t, state, vol), inspect(t, state, vol2); a["wrapped_dek"] != b["wrapped_dek"] || b["parent_snapshot"] == "" {
		t.Fatal("the volume from the snapshot does not share the snapshot's key")
	}
	s2 := h.Serve(t, vol2, 1)
	vm3 := Start(t, g, WithDisk(s2.Socket, 1), WithScript(readScript))
	vm3.Expect(0, `HEMD-RESULT ok read lines=2000`, 2*time.Minute)
	vm3.Wait(time.Minute)
	s2.Stop(t)

	// Snapshot copy under another key → volume: same data, another key.
	cli(t, state, "key", "create", "--alias", "alias/vmtest-2")
	snap2 := filepath.Join(dir, "snap2.img")
	cli(t, state, "snapshot", "copy", "--key", "alias/vmtest-2", snap, snap2)
	a, c := inspect(t, state, snap), inspect(t, state, snap2)
	if a["wrapped_dek"] == c["wrapped_dek"] || a["key_id"] == c["key_id"] {
		t.Fatal("the snapshot copy kept the source's key")
	}
	vol3 := filepath.Join(dir, "vol3.img")
	cli(t, state, "volume", "create", "--snapshot", snap2, vol3)
	s3 := h.Serve(t, vol3, 1)
	vm4 := Start(t, g, WithDisk(s3.Socket, 1), WithScript(readScript))
	vm4.Expect(0, `HEMD-RESULT ok read lines=2000`, 2*time.Minute)
	vm4.Wait(time.Minute)
	s3.Stop(t)

	// A disabled key: QEMU cannot realize the disk, hemd names the key.
	cli(t, state, "key", "disable", "alias/vmtest")
	s4 := h.Serve(t, vol, 1)
	vm5 := Start(t, g, WithDisk(s4.Socket, 1), WithScript(readScript))
	if err := vm5.WaitErr(time.Minute); err == nil {
		t.Fatal("QEMU started a guest on a volume whose key is disabled")
	}
	keyARN := inspect(t, state, vol)["key_id"].(string)
	refused := false
	for _, l := range s4.Log() {
		if strings.Contains(l, "event=attach-refused") && strings.Contains(l, keyARN) && strings.Contains(l, "Disabled") {
			refused = true
		}
	}
	if !refused {
		t.Fatalf("hemd did not log the refused attach naming key %s", keyARN)
	}
	t.Logf("attach refused as expected; first attach made %d Decrypt call(s)", first)
}
