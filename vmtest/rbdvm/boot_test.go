package rbdvm

import (
	"bytes"
	"testing"
	"time"

	"github.com/hemd/hemd/vmtest"
)

// secret is what the guests write: the cluster must never see it.
const secret = "HEMD-RBD-GUEST-PLAINTEXT-3c1f0a9e-the-cluster-must-never-see-this"

var writeScript = `
mke2fs -q /dev/vda || { echo "HEMD-RESULT fail mke2fs"; exit 0; }
mount -t ext4 /dev/vda /mnt || { echo "HEMD-RESULT fail mount"; exit 0; }
i=0; while [ $i -lt 2000 ]; do echo "` + secret + ` $i"; i=$((i+1)); done > /mnt/secret.txt
cd /mnt && md5sum secret.txt > sums && cd /
umount /mnt && sync
echo "HEMD-RESULT ok written"
`

var readScript = `
mount -t ext4 -o ro /dev/vda /mnt || { echo "HEMD-RESULT fail mount"; exit 0; }
cd /mnt && md5sum -c sums >/dev/null && grep -c "` + secret + `" secret.txt | sed 's/^/HEMD-RESULT ok read lines=/' || echo "HEMD-RESULT fail data differs"
`

// TestRBDServe: a guest writes a filesystem on an encrypted volume on RBD;
// a snapshot is taken while hemd still holds the image; a second guest
// reads the filesystem back from a volume cloned from the snapshot; the
// cluster holds no plaintext.
func TestRBDServe(t *testing.T) {
	vmtest.RequireQEMU(t)
	g := vmtest.BuildGuest(t)
	v := newRBDVolume(t, "64M")
	srv := v.hemd.Serve(t, v.name, 2)
	vm := vmtest.Start(t, g, vmtest.WithDisk(srv.Socket, 2), vmtest.WithScript(writeScript))
	vm.Expect(0, `HEMD-RESULT ok written`, 2*time.Minute)
	vm.Wait(time.Minute)
	// A snapshot while hemd holds the image's exclusive lock: librbd has
	// the holder take it.
	snap := cli(t, v.state, "snapshot", "create", v.name)
	srv.Stop(t)
	if !vmtest.HasEvent(srv.Log(), "event=attach", v.id) {
		t.Fatal("hemd logged no attach")
	}
	if b := rbdExport(t, v.name); bytes.Contains(b, []byte("HEMD-RBD-GUEST-PLAINTEXT")) {
		t.Fatal("the RBD image holds the guest's plaintext")
	}
	clone := imageName(t)
	cli(t, v.state, "volume", "create", "--snapshot", snap, clone)
	s2 := v.hemd.Serve(t, clone, 1)
	vm2 := vmtest.Start(t, g, vmtest.WithDisk(s2.Socket, 1), vmtest.WithScript(readScript))
	vm2.Expect(0, `HEMD-RESULT ok read lines=2000`, 2*time.Minute)
	vm2.Wait(time.Minute)
}
