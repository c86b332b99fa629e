package cloudimage

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
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

// console is QEMU with its serial console read line by line.
type console struct {
	t      *testing.T
	cmd    *exec.Cmd
	start  time.Time
	mu     sync.Mutex
	lines  []string
	change chan struct{}
	exited chan struct{}
	err    error
}

var ansi = regexp.MustCompile(`\x1b\[[0-9;?]*[A-Za-z]|\x1bc`)

func startQEMU(t *testing.T, args []string) *console {
	t.Logf("qemu-system-x86_64 %s", strings.Join(args, " "))
	c := &console{t: t, change: make(chan struct{}, 1), exited: make(chan struct{})}
	c.cmd = exec.Command("qemu-system-x86_64", args...)
	out, err := c.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	c.cmd.Stderr = c.cmd.Stdout
	c.start = time.Now()
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := strings.TrimRight(ansi.ReplaceAllString(sc.Text(), ""), "\r")
			t.Logf("console %6.1fs: %s", time.Since(c.start).Seconds(), line)
			c.mu.Lock()
			c.lines = append(c.lines, line)
			c.mu.Unlock()
			select {
			case c.change <- struct{}{}:
			default:
			}
		}
		c.err = c.cmd.Wait()
		close(c.exited)
	}()
	t.Cleanup(func() {
		c.cmd.Process.Kill()
		<-c.exited
	})
	return c
}

// expect waits for a console line matching re and returns the time since
// QEMU started.
func (c *console) expect(re string, timeout time.Duration) time.Duration {
	c.t.Helper()
	rx := regexp.MustCompile(re)
	deadline := time.After(timeout)
	from := 0
	for {
		c.mu.Lock()
		lines := c.lines
		c.mu.Unlock()
		for ; from < len(lines); from++ {
			if rx.MatchString(lines[from]) {
				return time.Since(c.start)
			}
			if strings.Contains(lines[from], "Kernel panic") {
				c.t.Fatalf("guest panicked: %s", lines[from])
			}
		}
		select {
		case <-c.change:
		case <-c.exited:
			c.mu.Lock()
			n := len(c.lines)
			c.mu.Unlock()
			if n > from {
				continue
			}
			c.t.Fatalf("QEMU exited (%v) before %q appeared", c.err, re)
		case <-deadline:
			c.t.Fatalf("%q did not appear within %v", re, timeout)
		}
	}
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
	dir := t.TempDir()
	disk := filepath.Join(dir, "root.img")
	if err := im.CopyTo(disk); err != nil {
		t.Fatal(err)
	}
	seed, err := Seed(dir, userData, "")
	if err != nil {
		t.Fatal(err)
	}
	served := vmtest.QSD{}.Serve(t, disk, 1)
	vm := startQEMU(t, BootArgs(im, served.Socket, 1, seed))
	const timeout = 5 * time.Minute
	boot := vm.expect(`^HEMD-CLOUDINIT-DONE`, timeout)
	t.Logf("boot time under TCG (QEMU start → cloud-init runcmd marker): %v", boot.Round(100*time.Millisecond))
	fin := vm.expect(`Cloud-init v\. .* finished`, timeout)
	t.Logf("cloud-init finished at %v", fin.Round(100*time.Millisecond))
	select {
	case <-vm.exited:
		if vm.err != nil {
			t.Fatalf("QEMU: %v", vm.err)
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("the guest did not power off")
	}
	t.Logf("QEMU exited after %v", time.Since(vm.start).Round(100*time.Millisecond))
	served.Stop(t)
	out, err := exec.Command("debugfs", "-R", "cat /var/lib/hemd-cloudinit-marker", disk).Output()
	if err != nil || strings.TrimSpace(string(out)) != "hemd-cloudinit-file" {
		t.Fatalf("the file cloud-init wrote is not on the root disk: %v: %q", err, out)
	}
	if _, err := os.Stat(im.Disk); err != nil {
		t.Fatal(err)
	}
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
