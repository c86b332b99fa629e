package vmtest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// libvirt, as users run it: a real libvirtd (and virtlogd), started by the
// test since nothing else runs here, creates a TCG domain whose disk is a
// hemd volume, hot-plugs a second one and unplugs it. QEMU runs as
// libvirt's user (libvirt-qemu), not as hemd's (root): it can connect only
// because hemd gives the sockets group libvirt-qemu and mode 0660
// ($HEMD_SOCKET_GROUP, as the shipped units set it, or socket_group) in a
// runtime directory of mode 0711 (RuntimeDirectoryMode=0711).

// libvirtd is a libvirtd and virtlogd the test started.
type libvirtd struct {
	uri string
}

// startLibvirtd starts virtlogd and libvirtd (system mode, its client
// socket in dir) for the test, one such test on the host at a time: the
// qemu driver's state under /run/libvirt and /var/lib/libvirt is the
// host's.
func startLibvirtd(t *testing.T, dir string) *libvirtd {
	t.Helper()
	for _, b := range []string{"libvirtd", "virtlogd", "virsh"} {
		if _, err := exec.LookPath(b); err != nil {
			t.Fatalf("vmtest: %s not found (make test installs libvirt-daemon-system and libvirt-clients): %v", b, err)
		}
	}
	if os.Geteuid() != 0 {
		t.Fatalf("vmtest: the libvirt test runs libvirtd in system mode, as users do: it needs root")
	}
	lock, err := os.OpenFile("/run/lock/hemd-vmtest-libvirt.lock", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lock.Close() })
	sockDir := filepath.Join(dir, "libvirt")
	if err := os.MkdirAll(sockDir, 0o700); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "libvirtd.conf")
	os.WriteFile(conf, []byte(fmt.Sprintf("unix_sock_dir = %q\nunix_sock_rw_perms = \"0700\"\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n", sockDir)), 0o600)
	daemon := func(name string, args ...string) {
		cmd := exec.Command(name, args...)
		log, err := os.Create(filepath.Join(dir, name+".log"))
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stdout, cmd.Stderr = log, log
		if err := cmd.Start(); err != nil {
			t.Fatalf("vmtest: %s: %v", name, err)
		}
		t.Logf("vmtest: %s %s (pid %d)", name, strings.Join(args, " "), cmd.Process.Pid)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		t.Cleanup(func() {
			cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-done:
			case <-time.After(15 * time.Second):
				cmd.Process.Kill()
				<-done
			}
			log.Close()
		})
	}
	daemon("virtlogd")
	daemon("libvirtd", "-f", conf, "--pid-file", filepath.Join(dir, "libvirtd.pid"))
	l := &libvirtd{uri: "qemu:///system?socket=" + filepath.Join(sockDir, "libvirt-sock")}
	for i := 0; ; i++ {
		if _, err := l.virsh("version"); err == nil {
			break
		} else if i == 100 {
			b, _ := os.ReadFile(filepath.Join(dir, "libvirtd.log"))
			t.Fatalf("vmtest: libvirtd does not answer: %v\n%s", err, b)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return l
}

// virsh runs virsh on the test's libvirtd.
func (l *libvirtd) virsh(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "virsh", append([]string{"-c", l.uri}, args...)...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("virsh %s: %v: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

func (l *libvirtd) must(t *testing.T, args ...string) string {
	t.Helper()
	out, err := l.virsh(args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// fileConsole is a guest's serial console that libvirt writes to a file.
type fileConsole struct {
	path string
	seen int // bytes of lines already matched
}

// expect waits for a line matching re after what earlier expects matched
// and returns its submatches; a fail marker fails the test.
func (c *fileConsole) expect(t *testing.T, re string, d time.Duration) []string {
	t.Helper()
	rx := regexp.MustCompile(re)
	for end := time.Now().Add(d); ; time.Sleep(100 * time.Millisecond) {
		b, _ := os.ReadFile(c.path)
		for c.seen < len(b) {
			nl := bytes.IndexByte(b[c.seen:], '\n')
			if nl < 0 {
				break
			}
			line := strings.TrimRight(string(b[c.seen:c.seen+nl]), "\r")
			c.seen += nl + 1
			t.Logf("console: %s", line)
			if strings.Contains(line, "HEMD-RESULT fail") || strings.Contains(line, "Kernel panic") {
				t.Fatalf("guest failed: %s", line)
			}
			if m := rx.FindStringSubmatch(line); m != nil {
				return m
			}
		}
		if time.Now().After(end) {
			t.Fatalf("no %q on the console within %v", re, d)
		}
	}
}

// vhostUserDisk is a libvirt vhostuser disk on socket.
func vhostUserDisk(socket, dev string) string {
	return fmt.Sprintf(`<disk type="vhostuser" device="disk">
  <driver name="qemu" type="raw" queues="2"/>
  <source type="unix" path=%q>
    <reconnect enabled="yes" timeout="1"/>
  </source>
  <target dev=%q bus="virtio"/>
</disk>
`, socket, dev)
}

// TestLibvirt: virsh create of a TCG domain on a hemd volume, I/O, virsh
// attach-device of a second hemd volume (attached in the running hemd),
// I/O on it, virsh detach-device and hemd volume detach.
func TestLibvirt(t *testing.T) {
	g := BuildGuest(t)
	a := newEncVolume(t, "64M")
	// What libvirt's QEMU (libvirt-qemu) reads must be reachable: a
	// directory of mode 0711 as the units give /run/hemd.
	dir, err := os.MkdirTemp("", "hemd-libvirt-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o711); err != nil {
		t.Fatal(err)
	}
	lv := startLibvirtd(t, t.TempDir())

	bPath := filepath.Join(t.TempDir(), "b.img")
	bID := strings.TrimSpace(cli(t, a.state, "volume", "create", "--size", "32M", "--key", "alias/vmtest", bPath))
	ctl, aSock, bSock := filepath.Join(dir, "control.sock"), filepath.Join(dir, "a.sock"), filepath.Join(dir, "b.sock")
	h := a.hemd
	h.Env = append(h.Env, "HEMD_SOCKET_GROUP=libvirt-qemu") // as hemd.service sets it
	h.Args = []string{"--control", ctl}
	srv := h.ServeOn(t, aSock, a.path, 2)
	if st, err := os.Stat(aSock); err != nil || st.Mode().Perm() != 0o660 {
		t.Fatalf("socket %s: %v, mode %v; want 0660 group libvirt-qemu", aSock, err, st.Mode())
	}
	for _, l := range srv.Log() {
		if strings.Contains(l, "front-ends may be refused") {
			t.Fatalf("hemd warns that libvirt's QEMU cannot connect: %s", l)
		}
	}

	script := `
agent pattern write /dev/vda 21 2 0 16777216
agent pattern verify /dev/vda 21 2 0 16777216
echo HEMD-VDA-DONE
i=0; while [ ! -b /dev/vdb ] && [ $i -lt 3000 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/vdb ] || echo "HEMD-RESULT fail vdb never appeared"
echo "HEMD-VDB size=$(cat /sys/block/vdb/size) serial=$(cat /sys/block/vdb/serial 2>/dev/null)"
agent pattern write /dev/vdb 22 2
agent pattern verify /dev/vdb 22 2
echo HEMD-VDB-DONE
i=0; while [ -b /dev/vdb ] && [ $i -lt 3000 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/vdb ] && echo "HEMD-RESULT fail vdb still there" || echo HEMD-VDB-GONE
agent pattern verify /dev/vda 21 2 0 16777216
sleep 600
`
	kernel, initrd, console := filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "initrd.cpio"), filepath.Join(dir, "console.log")
	kb, err := os.ReadFile(g.Kernel)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(kernel, kb, 0o644)
	if err := scenarioInitrd(g, script, initrd); err != nil {
		t.Fatal(err)
	}
	// ACPI: without it (libvirt then passes -no-acpi) the guest cannot take
	// a hot-plugged device, and its PCI rescan stops the first disk. Spare
	// PCIe root ports: q35 plugs a device into an empty one.
	name := fmt.Sprintf("hemd-vmtest-%d", os.Getpid())
	domain := fmt.Sprintf(`<domain type="qemu">
  <name>%s</name>
  <memory unit="MiB">512</memory>
  <vcpu>2</vcpu>
  <memoryBacking>
    <source type="memfd"/>
    <access mode="shared"/>
  </memoryBacking>
  <os>
    <type arch="x86_64" machine="q35">hvm</type>
    <kernel>%s</kernel>
    <initrd>%s</initrd>
    <cmdline>console=ttyS0 quiet panic=-1</cmdline>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <cpu mode="custom" match="exact"><model fallback="allow">qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
%s    <serial type="file">
      <source path=%q/>
    </serial>
    <controller type="pci" index="0" model="pcie-root"/>
    <controller type="pci" index="1" model="pcie-root-port"/>
    <controller type="pci" index="2" model="pcie-root-port"/>
    <controller type="pci" index="3" model="pcie-root-port"/>
    <controller type="usb" model="none"/>
    <memballoon model="none"/>
  </devices>
</domain>
`, name, kernel, initrd, vhostUserDisk(aSock, "vda"), console)
	domXML := filepath.Join(dir, "domain.xml")
	os.WriteFile(domXML, []byte(domain), 0o644)
	qemuLog := filepath.Join("/var/log/libvirt/qemu", name+".log")
	t.Cleanup(func() {
		lv.virsh("destroy", name)
		if t.Failed() {
			b, _ := os.ReadFile(qemuLog)
			t.Logf("%s:\n%s", qemuLog, b)
		}
	})
	lv.must(t, "create", domXML)
	con := &fileConsole{path: console}
	con.expect(t, `HEMD-BOOTED`, 3*time.Minute)
	con.expect(t, `HEMD-RESULT ok pattern-write bytes=16777216`, 3*time.Minute)
	con.expect(t, `HEMD-RESULT ok pattern-verify bytes=16777216`, 3*time.Minute)
	con.expect(t, `HEMD-VDA-DONE`, time.Minute)
	if !waitLog(srv, "event=attach", a.id, 10*time.Second) {
		t.Fatal("hemd did not attach the domain's volume")
	}

	// Hot-plug: attach in hemd (group and mode said explicitly), then virsh
	// attach-device.
	out := cli(t, a.state, "volume", "attach", "--control", ctl, "--socket", bSock, "--volume", bPath, "--queues", "2",
		"--socket-group", "libvirt-qemu", "--socket-mode", "0660")
	if !strings.Contains(out, bID+" attached") || !strings.Contains(out, "mode 0660 owner root group libvirt-qemu") {
		t.Fatalf("hemd volume attach: %s", out)
	}
	diskXML := filepath.Join(dir, "disk-b.xml")
	os.WriteFile(diskXML, []byte(vhostUserDisk(bSock, "vdb")), 0o644)
	lv.must(t, "attach-device", name, diskXML, "--live")
	m := con.expect(t, `HEMD-VDB size=(\d+) serial=(\S*)`, 2*time.Minute)
	if m[1] != fmt.Sprint((32<<20)/512) || m[2] != "vol"+bID[4:] {
		t.Fatalf("the guest sees vdb of %s sectors, serial %q", m[1], m[2])
	}
	con.expect(t, `HEMD-RESULT ok pattern-verify bytes=33554432`, 3*time.Minute)
	con.expect(t, `HEMD-VDB-DONE`, time.Minute)
	if !strings.Contains(lv.must(t, "domblklist", name), bSock) {
		t.Fatal("virsh domblklist does not list the hot-plugged disk")
	}

	// Unplug: virsh detach-device (device_del, then chardev-remove), then
	// hemd volume detach once the front-end is gone.
	lv.must(t, "detach-device", name, diskXML, "--live")
	con.expect(t, `HEMD-VDB-GONE`, 2*time.Minute)
	var detached string
	for end := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		out, err := cliErr(a.state, "volume", "detach", "--control", ctl, bSock)
		if err == nil {
			detached = out
			break
		}
		if time.Now().After(end) {
			t.Fatalf("hemd volume detach after virsh detach-device: %v\n%s", err, out)
		}
	}
	if !strings.Contains(detached, bID+" detached") || strings.Contains(detached, "session") {
		t.Fatalf("hemd volume detach: %s", detached)
	}
	if !waitLog(srv, "event=zeroize", bID, 10*time.Second) {
		t.Fatal("the unplugged volume's data key was not zeroized")
	}
	// The first disk still holds what the guest wrote.
	con.expect(t, `HEMD-RESULT ok pattern-verify bytes=16777216`, 3*time.Minute)
	lv.must(t, "destroy", name)
	if !waitLog(srv, "event=zeroize", a.id, 30*time.Second) {
		t.Fatal("the domain's volume key was not zeroized after virsh destroy")
	}
}
