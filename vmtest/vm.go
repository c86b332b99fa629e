package vmtest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Disk is a vhost-user-blk disk given to a VM.
type Disk struct {
	Socket string
	Queues int
}

// vmConfig is what the options set.
type vmConfig struct {
	mem       int // MiB
	smp       int
	disks     []Disk
	script    string
	reboot    bool // let the guest reboot inside the same QEMU
	timeout   time.Duration
	extraArg  []string
	incoming  string // -incoming URI
	reconnect bool   // vhost-user chardevs reconnect to a back-end that comes back
}

// Option configures a VM.
type Option func(*vmConfig)

// WithDisk adds a vhost-user-blk disk on socket with queues virtqueues.
func WithDisk(socket string, queues int) Option {
	return func(c *vmConfig) { c.disks = append(c.disks, Disk{socket, queues}) }
}

// WithScript sets the scenario: a shell script the guest's /init runs.
func WithScript(s string) Option { return func(c *vmConfig) { c.script = s } }

// WithSMP sets the vCPU count.
func WithSMP(n int) Option { return func(c *vmConfig) { c.smp = n } }

// WithReboot lets the guest reboot inside the same QEMU (the device is reset
// and re-initialised by the guest), instead of QEMU exiting.
func WithReboot() Option { return func(c *vmConfig) { c.reboot = true } }

// WithMem sets the guest's memory in MiB (default 512).
func WithMem(mib int) Option { return func(c *vmConfig) { c.mem = mib } }

// WithIncoming starts QEMU waiting for an incoming migration on uri
// ("tcp:127.0.0.1:PORT", or "defer" for a later QMP MigrateIncoming). The
// destination needs the source's device configuration (same options), with
// its own disk sockets.
func WithIncoming(uri string) Option { return func(c *vmConfig) { c.incoming = uri } }

// WithReconnect makes each vhost-user chardev reconnect (every second) when
// its back-end goes away, so a restarted back-end is attached again.
func WithReconnect() Option { return func(c *vmConfig) { c.reconnect = true } }

// WithArgs appends extra QEMU arguments.
func WithArgs(args ...string) Option {
	return func(c *vmConfig) { c.extraArg = append(c.extraArg, args...) }
}

// WithTimeout bounds the VM's whole run.
func WithTimeout(d time.Duration) Option { return func(c *vmConfig) { c.timeout = d } }

// VM is a running QEMU.
type VM struct {
	t        testing.TB // nil when booted by a program (Boot)
	logf     func(format string, args ...any)
	cmd      *exec.Cmd
	con      *Console
	timer    *time.Timer
	timedOut atomic.Bool
	qmpPath  string
	qmpMu    sync.Mutex
	qmp      *QMP
}

// Start boots the guest with the options, streaming its console into the
// test log. QEMU is killed when the test ends; a VM still running after its
// timeout is killed and fails the test.
func Start(t testing.TB, g *Guest, opts ...Option) *VM {
	t.Helper()
	vm, err := Boot(g, t.Logf, t.TempDir(), opts...)
	if err != nil {
		t.Fatalf("vmtest: %v", err)
	}
	vm.t = t
	t.Cleanup(vm.Kill)
	return vm
}

// Boot starts QEMU for programs (the demo): console lines go to logf; dir
// holds the VM's initramfs. The caller kills the VM with Kill.
func Boot(g *Guest, logf func(string, ...any), dir string, opts ...Option) (*VM, error) {
	c := vmConfig{mem: 512, smp: 2, timeout: defaultTimeout()}
	for _, o := range opts {
		o(&c)
	}
	initrd := filepath.Join(dir, "initrd.cpio")
	if err := scenarioInitrd(g, c.script, initrd); err != nil {
		return nil, err
	}
	// The guest's memory is 8 KiB more than c.mem MiB: QEMU before 9.0
	// (Debian 12 has 7.2) loses guest stores during a live migration under
	// TCG when its RAM block is a multiple of 256 KiB long. Its fast path
	// for such blocks clears the migration dirty bits without resetting the
	// vCPUs' TLBs, so a later store through a TLB entry already marked
	// dirty is never logged and the page reaches the destination stale
	// (fixed upstream by 03bfc2188f, "physmem: Fix migration dirty bitmap
	// coherency with TCG memory access"). Any other length takes the page
	// by page path, which resets the TLBs. KVM hosts are not affected.
	memKiB := c.mem<<10 + 8
	args := []string{
		"-machine", "q35,accel=tcg", "-cpu", "max", "-m", strconv.Itoa(memKiB) + "K", "-smp", strconv.Itoa(c.smp),
		"-nographic", "-no-user-config", "-nodefaults", "-serial", "stdio",
		"-object", fmt.Sprintf("memory-backend-memfd,id=mem,size=%dK,share=on", memKiB), "-numa", "node,memdev=mem",
		"-kernel", g.Kernel, "-initrd", initrd,
		"-append", "console=ttyS0 quiet panic=-1",
	}
	if !c.reboot {
		args = append(args, "-no-reboot")
	}
	qmpPath := filepath.Join(dir, "qmp.sock")
	// A chardev, not -qmp unix:PATH: the legacy syntax cannot hold the '='
	// that subtest names put in temp dir paths.
	args = append(args, "-chardev", "socket,id=qmp,path="+qmpPath+",server=on,wait=off", "-mon", "chardev=qmp,mode=control")
	if c.incoming != "" {
		args = append(args, "-incoming", c.incoming)
	}
	reconnect := ""
	if c.reconnect {
		reconnect = ",reconnect=1"
	}
	for i, d := range c.disks {
		args = append(args,
			"-chardev", fmt.Sprintf("socket,id=c%d,path=%s%s", i, d.Socket, reconnect),
			"-device", fmt.Sprintf("vhost-user-blk-pci,chardev=c%d,num-queues=%d", i, d.Queues))
	}
	args = append(args, c.extraArg...)
	logf("vmtest: qemu-system-x86_64 %s", strings.Join(args, " "))
	vm := &VM{logf: logf, qmpPath: qmpPath}
	vm.cmd = exec.Command("qemu-system-x86_64", args...)
	con, err := StartConsole(vm.cmd, logf)
	if err != nil {
		return nil, err
	}
	vm.con = con
	vm.timer = time.AfterFunc(c.timeout, func() {
		vm.timedOut.Store(true)
		vm.cmd.Process.Kill()
	})
	return vm, nil
}

// Kill stops QEMU and waits for it.
func (vm *VM) Kill() {
	vm.timer.Stop()
	vm.cmd.Process.Kill()
	<-vm.con.Exited()
	vm.closeQMP()
}

func defaultTimeout() time.Duration {
	if d, err := time.ParseDuration(os.Getenv("HEMD_VMTEST_TIMEOUT")); err == nil {
		return d
	}
	return 180 * time.Second
}

// Expect waits until a console line from line index from on matches re, and
// returns the submatches and the index after that line. A fail marker, a
// kernel panic or the end of the scenario fails the test at once.
func (vm *VM) Expect(from int, re string, timeout time.Duration) ([]string, int) {
	vm.t.Helper()
	m, next, err := vm.ExpectErr(from, re, timeout)
	if err != nil {
		vm.t.Fatalf("vmtest: %v", err)
	}
	return m, next
}

// ExpectErr is Expect for programs: it returns what Expect fails on.
func (vm *VM) ExpectErr(from int, re string, timeout time.Duration) ([]string, int, error) {
	m, _, next, err := vm.con.Expect(from, regexp.MustCompile(re), timeout, func(line string) error {
		if strings.Contains(line, "HEMD-RESULT fail") || strings.Contains(line, "Kernel panic") {
			return fmt.Errorf("guest failed: %s", line)
		}
		if strings.HasPrefix(line, "HEMD-END") {
			return fmt.Errorf("the scenario ended before %q appeared", re)
		}
		return nil
	})
	if errors.Is(err, ErrExited) && vm.timedOut.Load() {
		err = fmt.Errorf("VM killed after its timeout before %q appeared", re)
	}
	return m, next, err
}

// Wait waits for QEMU to exit and fails the test if it did not exit cleanly.
func (vm *VM) Wait(timeout time.Duration) {
	vm.t.Helper()
	if err := vm.WaitErr(timeout); err != nil {
		vm.t.Fatalf("vmtest: %v", err)
	}
}

// WaitErr is Wait for programs.
func (vm *VM) WaitErr(timeout time.Duration) error {
	select {
	case <-vm.con.Exited():
		if vm.timedOut.Load() {
			return errors.New("VM killed after its timeout")
		}
		if err := vm.con.Err(); err != nil {
			return fmt.Errorf("QEMU: %w", err)
		}
		return nil
	case <-time.After(timeout):
		return fmt.Errorf("QEMU did not exit within %v", timeout)
	}
}

// Elapsed is the time since QEMU started.
func (vm *VM) Elapsed() time.Duration { return time.Since(vm.con.Started()) }

// scenarioInitrd writes the guest's initramfs for one VM: the base archive
// followed by one holding the scenario script and the agent.
func scenarioInitrd(g *Guest, script, path string) error {
	base, err := os.ReadFile(g.Initrd)
	if err != nil {
		return err
	}
	agent, err := os.ReadFile(g.Agent)
	if err != nil {
		return err
	}
	var c cpioWriter
	c.file("bin/agent", agent, 0o755)
	c.file("scenario.sh", []byte("#!/bin/sh\n"+script), 0o755)
	return os.WriteFile(path, append(base, c.finish()...), 0o644)
}
