package vmtest

import (
	"bytes"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/hemd/hemd/vmtest/pattern"
)

var hemdBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "hemd-vmtest")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	hemdBin, err = BuildHemd(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func backends() []Backend { return []Backend{Hemd{Bin: hemdBin}, QSD{}} }

// checkImage checks that the host file holds the pattern the guest wrote.
func checkImage(t *testing.T, image string, seed uint64) {
	t.Helper()
	b, err := os.ReadFile(image)
	if err != nil {
		t.Fatal(err)
	}
	if i := pattern.Check(b, 0, seed); i >= 0 {
		t.Fatalf("backing file: pattern mismatch at byte %d", i)
	}
}

// queuesUsed counts the queues hemd's stats say carried I/O.
func queuesUsed(log []string) int {
	re := regexp.MustCompile(`msg="queue stats" .*queue=(\d+) reads=(\d+) writes=(\d+)`)
	used := map[string]bool{}
	for _, l := range log {
		if m := re.FindStringSubmatch(l); m != nil {
			if r, _ := strconv.Atoi(m[2]); r > 0 {
				used[m[1]] = true
			}
		}
	}
	return len(used)
}

// TestPatternFullDisk: the guest writes a pattern over the whole disk from
// several CPUs and reads it back; the host file holds it.
func TestPatternFullDisk(t *testing.T) {
	g := BuildGuest(t)
	for _, b := range backends() {
		for _, queues := range []int{1, 2, 4} {
			t.Run(fmt.Sprintf("%s/queues=%d", b.Name(), queues), func(t *testing.T) {
				img := SparseFile(t, 64<<20)
				srv := b.Serve(t, img, queues)
				seed := uint64(1000 + queues)
				vm := Start(t, g, WithDisk(srv.Socket, queues), WithSMP(min(queues, 4)), WithScript(fmt.Sprintf(`
agent pattern write /dev/vda %d
echo 3 > /proc/sys/vm/drop_caches
agent pattern verify /dev/vda %d
`, seed, seed)))
				_, at := vm.Expect(0, `HEMD-RESULT ok pattern-write bytes=67108864`, 2*time.Minute)
				vm.Expect(at, `HEMD-RESULT ok pattern-verify bytes=67108864`, 2*time.Minute)
				vm.Wait(time.Minute)
				checkImage(t, img, seed)
				if b.Name() == "hemd" {
					srv.Stop(t)
					if n := queuesUsed(srv.Log()); queues > 1 && n < 2 {
						t.Errorf("%d queues offered but only %d carried reads", queues, n)
					}
				}
			})
		}
	}
}

// TestFilesystemReboot: a filesystem made in the guest, files written, the
// guest rebooted inside the same QEMU (the device is reset), the files
// checked after the reboot.
func TestFilesystemReboot(t *testing.T) {
	g := BuildGuest(t)
	script := `
mount /dev/vda /mnt 2>/dev/null
if [ -f /mnt/phase1 ]; then
  cd /mnt && md5sum -c sums >/dev/null && echo "HEMD-RESULT ok files-after-reboot $(cat /mnt/phase1)" || echo "HEMD-RESULT fail files changed after reboot"
  cd / && umount /mnt
  exit 0
fi
mke2fs -q /dev/vda || { echo "HEMD-RESULT fail mke2fs"; exit 0; }
mount -t ext4 /dev/vda /mnt || { echo "HEMD-RESULT fail mount"; exit 0; }
for i in 1 2 3 4 5 6 7 8; do dd if=/dev/urandom of=/mnt/f$i bs=64k count=$((i*4)) 2>/dev/null; done
cd /mnt && md5sum f* > sums && echo written > phase1 && cd /
umount /mnt
echo "HEMD-RESULT ok files-written"
sync
reboot -f
`
	for _, b := range backends() {
		t.Run(b.Name(), func(t *testing.T) {
			img := SparseFile(t, 64<<20)
			srv := b.Serve(t, img, 2)
			vm := Start(t, g, WithDisk(srv.Socket, 2), WithReboot(), WithScript(script))
			_, at := vm.Expect(0, `HEMD-RESULT ok files-written`, 2*time.Minute)
			_, at = vm.Expect(at, `HEMD-BOOTED`, 2*time.Minute)
			vm.Expect(at, `HEMD-RESULT ok files-after-reboot written`, 2*time.Minute)
			vm.Wait(time.Minute)
		})
	}
}

// TestFlushReachesFile: after the guest's fsync, a reader on the host finds
// the data in the file while the VM still runs, and hemd saw the FLUSH.
func TestFlushReachesFile(t *testing.T) {
	g := BuildGuest(t)
	marker := "HEMD-FLUSH-MARKER-0123456789"
	script := fmt.Sprintf(`
agent marker /dev/vda %d %s
sleep 600
`, 100*4096, marker)
	for _, b := range backends() {
		t.Run(b.Name(), func(t *testing.T) {
			img := SparseFile(t, 16<<20)
			srv := b.Serve(t, img, 1)
			vm := Start(t, g, WithDisk(srv.Socket, 1), WithScript(script))
			vm.Expect(0, `HEMD-RESULT ok marker fsynced`, 2*time.Minute)
			f, err := os.Open(img)
			if err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, len(marker))
			f.ReadAt(buf, 100*4096)
			f.Close()
			if !bytes.Equal(buf, []byte(marker)) {
				t.Fatalf("host reads %q at the flushed block", buf)
			}
			if b.Name() == "hemd" {
				vm.Kill()
				srv.Stop(t)
				flushed := false
				for _, l := range srv.Log() {
					if m := regexp.MustCompile(`msg="queue stats" .*flushes=(\d+)`).FindStringSubmatch(l); m != nil && m[1] != "0" {
						flushed = true
					}
				}
				if !flushed {
					t.Fatal("hemd counted no FLUSH")
				}
			}
		})
	}
}
