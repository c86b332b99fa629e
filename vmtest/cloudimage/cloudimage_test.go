package cloudimage

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hemd/hemd/vmtest"
)

const userData = `#cloud-config
bootcmd:
  - echo HEMD-BOOTCMD > /dev/ttyS0
runcmd:
  - [sh, -c, 'echo hemd-cloudinit-file > /var/lib/hemd-cloudinit-marker && sync && echo HEMD-CLOUDINIT-DONE > /dev/ttyS0']
power_state:
  mode: poweroff
  delay: now
  condition: true
  timeout: 60
`

// startVM boots QEMU with args, the console in the test log, and kills it
// when the test ends.
func startVM(t *testing.T, args []string) *VM {
	t.Helper()
	vm, err := Start(t.Logf, args)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s", vm.CommandLine())
	t.Cleanup(vm.Kill)
	return vm
}

func expect(t *testing.T, vm *VM, from int, re string) Match {
	t.Helper()
	m, err := vm.Expect(from, re, 5*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestSeed(t *testing.T) {
	for _, tool := range []string{"mkfs.vfat", "mcopy"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed (apt-get install dosfstools mtools)", tool)
		}
	}
	dir := t.TempDir()
	p, err := Seed(dir, userData, "")
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("mtype", "-i", p, "::user-data").CombinedOutput()
	if err != nil || string(out) != userData {
		t.Fatalf("user-data on the seed: %v: %q", err, out)
	}
	label, err := exec.Command("mlabel", "-s", "-i", p, "::").CombinedOutput()
	if err != nil || !strings.Contains(string(label), "CIDATA") {
		t.Fatalf("seed label: %v: %q", err, label)
	}
}

// TestCloudImageBoot boots the cloud image from a fresh copy on each
// back-end and prints how long each took from QEMU's start to the end of
// cloud-init (its "Cloud-init v. … finished" line):
//   - qsd-raw: the plaintext image served by qemu-storage-daemon;
//   - hemd-encrypted: the image imported into an encrypted volume under an
//     HSM-backed key, served by hemd (see bootEncrypted).
func TestCloudImageBoot(t *testing.T) {
	vmtest.RequireQEMU(t)
	if testing.Short() {
		t.Skip("boots a full cloud image under TCG")
	}
	t0 := time.Now()
	im, err := Build(t.Logf)
	if err != nil {
		t.Fatalf("building the cloud image: %v", err)
	}
	t.Logf("cloud image %s ready in %v", im.Key, time.Since(t0).Round(time.Millisecond))
	var raw, enc time.Duration
	t.Run("qsd-raw", func(t *testing.T) { raw = bootRaw(t, im) })
	t.Run("hemd-encrypted", func(t *testing.T) { enc = bootEncrypted(t, im) })
	secs := func(d time.Duration) string {
		if d == 0 {
			return "-"
		}
		return fmt.Sprintf("%.1f s", d.Seconds())
	}
	t.Logf("boot to cloud-init final: hemd-encrypted %s, qsd-raw %s", secs(enc), secs(raw))
}

// bootRaw boots a plaintext copy of the image on qemu-storage-daemon;
// cloud-init writes a file and powers off, and the host finds the file in
// the image with debugfs. It returns the time to cloud-init's end.
func bootRaw(t *testing.T, im *Image) time.Duration {
	dir := t.TempDir()
	disk := filepath.Join(dir, "root.img")
	if err := im.CopyTo(disk); err != nil {
		t.Fatal(err)
	}
	seed, err := Seed(dir, userData, "")
	if err != nil {
		t.Fatal(err)
	}
	served := vmtest.QSD{}.Serve(t, disk, 2)
	vm := startVM(t, BootArgs(im, served.Socket, 2, seed))
	done := expect(t, vm, 0, `HEMD-CLOUDINIT-DONE`)
	fin := expect(t, vm, done.Next, `Cloud-init v\. .* finished`)
	t.Logf("cloud-init runcmd marker at %.1f s, finished at %.1f s", done.At.Seconds(), fin.At.Seconds())
	if err := vm.Wait(2 * time.Minute); err != nil {
		t.Fatal(err)
	}
	served.Stop(t)
	out, err := exec.Command("debugfs", "-R", "cat /var/lib/hemd-cloudinit-marker", disk).Output()
	if err != nil || strings.TrimSpace(string(out)) != "hemd-cloudinit-file" {
		t.Fatalf("the file cloud-init wrote is not on the root disk: %v: %q", err, out)
	}
	return fin.At
}

// secret is what the guest on the encrypted volume writes, 4096 times: the
// host's volume file must hold none of it.
const secret = "HEMD-CLOUD-PLAINTEXT-5d1c0e7b-the-host-must-never-see-this"

// encryptedUserData has the guest write a file full of the secret, fsync
// it, drop its caches and read it back, then reboot once (power_state runs
// once per instance); on the next boot a per-boot script finds the file
// intact and powers off. Each step prints a marker on the console with the
// boot's id, so that the second marker is seen to come from another boot.
// Before that poweroff the second boot writes files while the host takes
// snapshots (snapshot_test.go).
var encryptedUserData = strings.NewReplacer("@SECRET@", secret, "@LOAD@", loadFiles).Replace(`#cloud-config
write_files:
  - path: /usr/local/sbin/hemd-first-boot
    permissions: '0755'
    content: |
      #!/bin/sh
      set -e
      mkdir -p /var/lib/hemd
      cd /var/lib/hemd
      i=0
      while [ $i -lt 4096 ]; do echo "@SECRET@ $i"; i=$((i+1)); done > secret.txt
      sync secret.txt
      md5sum secret.txt > secret.md5
      sync secret.md5 .
      echo 3 > /proc/sys/vm/drop_caches
      md5sum -c --status secret.md5
      touch rebooted
      sync
      echo "HEMD-WRITTEN $(wc -c < secret.txt) bytes md5 $(cut -c1-12 secret.md5) read back, boot $(cat /proc/sys/kernel/random/boot_id)" > /dev/ttyS0
  - path: /var/lib/cloud/scripts/per-boot/hemd-second-boot
    permissions: '0755'
    content: |
      #!/bin/sh
      [ -f /var/lib/hemd/rebooted ] || exit 0
      cd /var/lib/hemd
      if md5sum -c --status secret.md5 && [ "$(grep -c '@SECRET@' secret.txt)" = 4096 ]; then r=ok; else r=fail; fi
      echo "HEMD-SECOND-BOOT $r md5 $(cut -c1-12 secret.md5), boot $(cat /proc/sys/kernel/random/boot_id)" > /dev/ttyS0
      /usr/local/sbin/hemd-load || echo "HEMD-LOAD-FAIL exit $?" > /dev/ttyS0
      systemctl --no-block poweroff
@LOAD@
runcmd:
  - [sh, -c, '/usr/local/sbin/hemd-first-boot || echo HEMD-FAIL first boot > /dev/ttyS0']
power_state:
  mode: reboot
  delay: now
  condition: true
  timeout: 60
`)

// attachEvent is hemd's log of an attach (not of a refused or failed one).
var attachEvent = regexp.MustCompile(`event=attach\b[^-]`)

// bootEncrypted imports the image into an encrypted volume under an
// HSM-backed key (embedded SoftHSM2 KMS in a fresh state directory), serves
// it with hemd and boots it with encryptedUserData: the guest writes a
// file, reads it back, reboots inside the same QEMU and finds the file
// again. Afterwards the volume file holds none of the file's plaintext,
// hemd's export of the volume has the file, and each boot's attach asked
// the KMS (Decrypt). While the second boot writes files, snapshots of the
// volume are taken and checked (snapshotsUnderLoad). It returns the first
// boot's time to cloud-init's end.
func bootEncrypted(t *testing.T, im *Image) time.Duration {
	dir := t.TempDir()
	bin, err := vmtest.BuildHemd(dir)
	if err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(dir, "state")
	env := []string{"HEMD_STATE_DIR=" + state, "SOFTHSM2_CONF="}
	hemd := func(args ...string) string {
		t.Helper()
		cmd := exec.Command(bin, args...)
		cmd.Env = append(os.Environ(), env...)
		var errb strings.Builder
		cmd.Stderr = &errb
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("hemd %s: %v\n%s", strings.Join(args, " "), err, errb.String())
		}
		return strings.TrimSpace(string(out))
	}
	hemd("key", "create", "--alias", "alias/cloudimage")
	vol := filepath.Join(dir, "root.vol")
	t0 := time.Now()
	volID := hemd("volume", "import", "--from", im.Disk, "--key", "alias/cloudimage", vol)
	t.Logf("imported %s into encrypted volume %s in %v", im.Disk, volID, time.Since(t0).Round(100*time.Millisecond))
	seed, err := Seed(dir, encryptedUserData, "")
	if err != nil {
		t.Fatal(err)
	}
	decrypts := func() int {
		b, err := os.ReadFile(filepath.Join(state, "audit.log"))
		if err != nil {
			t.Fatal(err)
		}
		return strings.Count(string(b), `"eventName":"Decrypt"`)
	}
	before := decrypts()
	ctl, chSock := filepath.Join(dir, "control.sock"), filepath.Join(dir, "ch.sock")
	served := vmtest.Hemd{Bin: bin, Env: env, Args: []string{"--control", ctl}}.Serve(t, vol, 2)
	vm := startVM(t, append(Rebootable(BootArgs(im, served.Socket, 2, seed)), channelArgs(chSock)...))
	written := expect(t, vm, 0, `HEMD-(WRITTEN|FAIL).*boot (\S+)|HEMD-FAIL`)
	if written.Sub[1] != "WRITTEN" {
		t.Fatalf("the guest failed: %s", written.Text)
	}
	fin := expect(t, vm, written.Next, `Cloud-init v\. .* finished`)
	second := expect(t, vm, fin.Next, `HEMD-SECOND-BOOT (\S+) .*boot (\S+)`)
	if second.Sub[1] != "ok" {
		t.Fatalf("after the reboot: %s", second.Text)
	}
	if second.Sub[2] == written.Sub[2] {
		t.Fatalf("the file was checked in the boot that wrote it (boot id %s), not after a reboot", second.Sub[2])
	}
	t.Logf("file written and read back at %.1f s, cloud-init finished at %.1f s, checked after the reboot at %.1f s",
		written.At.Seconds(), fin.At.Seconds(), second.At.Seconds())
	snapshotsUnderLoad(t, vm, second.Next, chSock, bin, env, ctl, vol, dir)
	if err := vm.Wait(2 * time.Minute); err != nil {
		t.Fatal(err)
	}
	served.Stop(t)

	attaches := decrypts() - before
	if attaches < 2 {
		t.Errorf("%d KMS Decrypt(s) while the VM ran; want one attach at least for each of the two boots", attaches)
	}
	var attach, zeroize int
	for _, l := range served.Log() {
		if strings.Contains(l, "volume="+volID) {
			attach += len(attachEvent.FindAllString(l, -1))
			zeroize += strings.Count(l, "event=zeroize")
		}
	}
	if attach < 2 || zeroize < 2 {
		t.Errorf("hemd logged %d attach and %d zeroize events for %s; want 2 or more of each", attach, zeroize, volID)
	}
	n, err := Count(vol, []byte(secret[:30]))
	if err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Fatalf("the volume file holds the guest's plaintext %d times", n)
	}
	// The control: decrypted, the volume has the file.
	plain := filepath.Join(dir, "plain.img")
	hemd("volume", "export", vol, "--to", plain)
	out, err := exec.Command("debugfs", "-R", "cat /var/lib/hemd/secret.txt", plain).Output()
	if err != nil {
		t.Fatalf("debugfs on the exported volume: %v", err)
	}
	if c := strings.Count(string(out), secret); c != 4096 {
		t.Fatalf("the exported volume's /var/lib/hemd/secret.txt has the secret %d times, want 4096", c)
	}
	t.Logf("%d KMS Decrypts while the VM ran (%d attach, %d zeroize events); the volume file holds no plaintext, its export the whole file",
		attaches, attach, zeroize)
	return fin.At
}

func TestSparseCopy(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	const size = 64 << 20
	f.Truncate(size)
	f.WriteAt([]byte("head"), 0)
	f.WriteAt([]byte("middle"), 20<<20)
	f.WriteAt([]byte("tail"), size-4)
	f.Close()
	dst := filepath.Join(dir, "dst")
	if err := sparseCopy(src, dst); err != nil {
		t.Fatal(err)
	}
	a, _ := os.ReadFile(src)
	b, err := os.ReadFile(dst)
	if err != nil || string(a) != string(b) {
		t.Fatalf("the copy differs (%v)", err)
	}
	var st unix.Stat_t
	if err := unix.Stat(dst, &st); err != nil {
		t.Fatal(err)
	}
	if st.Blocks*512 > 4<<20 {
		t.Errorf("the copy is not sparse: %d bytes allocated", st.Blocks*512)
	}
}

func TestCount(t *testing.T) {
	dir := t.TempDir()
	needle := []byte("HEMD-NEEDLE")
	// Count reads 4 MiB + len(needle)-1 bytes first: a needle at each
	// offset around the end of that read is found once.
	end := 4<<20 + len(needle) - 1
	b := make([]byte, end+100)
	for at := end - len(needle) - 2; at <= end+2; at++ {
		clear(b)
		copy(b[at:], needle)
		copy(b[len(b)-len(needle):], needle)
		p := filepath.Join(dir, "f")
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		if n, err := Count(p, needle); err != nil || n != 2 {
			t.Errorf("needle at %d and at the end: Count = %d, %v; want 2", at, n, err)
		}
	}
	// A periodic needle is counted without overlaps, as bytes.Count does.
	p := filepath.Join(dir, "g")
	if err := os.WriteFile(p, []byte("xaaaaay"), 0o644); err != nil {
		t.Fatal(err)
	}
	for needle, want := range map[string]int{"aa": 2, "absent": 0, "xaaaaay": 1} {
		if n, err := Count(p, []byte(needle)); err != nil || n != want {
			t.Errorf("Count(%q) = %d, %v; want %d", needle, n, err, want)
		}
	}
}
