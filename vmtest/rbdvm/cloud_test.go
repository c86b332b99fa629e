package rbdvm

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hemd/hemd/vmtest"
	"github.com/hemd/hemd/vmtest/cloudimage"
)

// cloudSecret is what the cloud guest writes: the cluster must never see it.
const cloudSecret = "HEMD-RBD-CLOUD-PLAINTEXT-77e0b4d2-the-cluster-must-never-see-this"

var cloudUserData = strings.ReplaceAll(`#cloud-config
runcmd:
  - [sh, -c, 'i=0; while [ $i -lt 1000 ]; do echo "@SECRET@ $i"; i=$((i+1)); done > /var/lib/hemd-rbd-secret && sync && echo HEMD-CLOUDINIT-DONE > /dev/ttyS0']
power_state:
  mode: poweroff
  delay: now
  condition: true
  timeout: 60
`, "@SECRET@", cloudSecret)

// TestRBDCloudImage imports the Debian cloud image into an encrypted
// volume on RBD, boots it from there (systemd, cloud-init from a NoCloud
// seed), lets cloud-init write a file and power off; the cluster holds
// none of the file's plaintext, the volume's export has it.
func TestRBDCloudImage(t *testing.T) {
	vmtest.RequireQEMU(t)
	if testing.Short() {
		t.Skip("boots a full cloud image under TCG")
	}
	im, err := cloudimage.Build(t.Logf)
	if err != nil {
		t.Fatalf("building the cloud image: %v", err)
	}
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	cli(t, state, "key", "create", "--alias", "alias/cloud")
	name := imageName(t)
	t0 := time.Now()
	volID := cli(t, state, "volume", "import", "--from", im.Disk, "--key", "alias/cloud", name)
	t.Logf("imported %s into %s (%s) in %v", im.Disk, name, volID, time.Since(t0).Round(100*time.Millisecond))
	seed, err := cloudimage.Seed(dir, cloudUserData, "")
	if err != nil {
		t.Fatal(err)
	}
	srv := vmtest.Hemd{Bin: hemdBin, Env: env(state), Args: []string{"--control", "none"}}.Serve(t, name, 2)
	vm, err := cloudimage.Start(t.Logf, cloudimage.BootArgs(im, srv.Socket, 2, seed))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(vm.Kill)
	done, err := vm.Expect(0, `HEMD-CLOUDINIT-DONE`, 5*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	fin, err := vm.Expect(done.Next, `Cloud-init v\. .* finished`, 5*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("cloud-init wrote its file at %.1f s and finished at %.1f s", done.At.Seconds(), fin.At.Seconds())
	if err := vm.Wait(2 * time.Minute); err != nil {
		t.Fatal(err)
	}
	srv.Stop(t)
	if !vmtest.HasEvent(srv.Log(), "event=attach", volID) {
		t.Fatal("hemd logged no attach")
	}
	stored := filepath.Join(dir, "stored.img")
	if _, err := cluster.RBD(t.Context(), "export", strings.TrimPrefix(name, "rbd:"), stored); err != nil {
		t.Fatal(err)
	}
	if n, err := cloudimage.Count(stored, []byte(cloudSecret[:32])); err != nil || n != 0 {
		t.Fatalf("the RBD image holds the guest's plaintext %d times (%v)", n, err)
	}
	plain := filepath.Join(dir, "plain.img")
	cli(t, state, "volume", "export", name, "--to", plain)
	out, err := exec.Command("debugfs", "-R", "cat /var/lib/hemd-rbd-secret", plain).Output()
	if err != nil {
		t.Fatalf("debugfs on the export: %v", err)
	}
	if c := strings.Count(string(out), cloudSecret); c != 1000 {
		t.Fatalf("the export's /var/lib/hemd-rbd-secret has the secret %d times, want 1000", c)
	}
}
