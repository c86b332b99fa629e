package vmtest

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
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
	mem      int // MiB
	smp      int
	disks    []Disk
	script   string
	reboot   bool // let the guest reboot inside the same QEMU
	timeout  time.Duration
	extraArg []string
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

// WithTimeout bounds the VM's whole run.
func WithTimeout(d time.Duration) Option { return func(c *vmConfig) { c.timeout = d } }

// VM is a running QEMU.
type VM struct {
	t       testing.TB
	cmd     *exec.Cmd
	mu      sync.Mutex
	lines   []string
	changed chan struct{}
	exited  chan struct{}
	err     error
	start   time.Time
}

// Start boots the guest with the options, streaming its console into the
// test log. QEMU is killed when the test ends.
func Start(t testing.TB, g *Guest, opts ...Option) *VM {
	t.Helper()
	c := vmConfig{mem: 512, smp: 2, timeout: defaultTimeout()}
	for _, o := range opts {
		o(&c)
	}
	initrd := filepath.Join(t.TempDir(), "initrd.cpio")
	if err := scenarioInitrd(g, c.script, initrd); err != nil {
		t.Fatalf("vmtest: %v", err)
	}
	args := []string{
		"-machine", "q35,accel=tcg", "-cpu", "max", "-m", strconv.Itoa(c.mem), "-smp", strconv.Itoa(c.smp),
		"-nographic", "-no-user-config", "-nodefaults", "-serial", "stdio",
		"-object", fmt.Sprintf("memory-backend-memfd,id=mem,size=%dM,share=on", c.mem), "-numa", "node,memdev=mem",
		"-kernel", g.Kernel, "-initrd", initrd,
		"-append", "console=ttyS0 quiet panic=-1",
	}
	if !c.reboot {
		args = append(args, "-no-reboot")
	}
	for i, d := range c.disks {
		args = append(args,
			"-chardev", fmt.Sprintf("socket,id=c%d,path=%s", i, d.Socket),
			"-device", fmt.Sprintf("vhost-user-blk-pci,chardev=c%d,num-queues=%d", i, d.Queues))
	}
	args = append(args, c.extraArg...)
	t.Logf("vmtest: qemu-system-x86_64 %s", strings.Join(args, " "))
	vm := &VM{t: t, changed: make(chan struct{}, 1), exited: make(chan struct{}), start: time.Now()}
	vm.cmd = exec.Command("qemu-system-x86_64", args...)
	out, err := vm.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	vm.cmd.Stderr = vm.cmd.Stdout
	if err := vm.cmd.Start(); err != nil {
		t.Fatalf("vmtest: starting QEMU: %v", err)
	}
	go vm.read(out)
	timer := time.AfterFunc(c.timeout, func() {
		t.Errorf("vmtest: VM still running after %v: killed", c.timeout)
		vm.cmd.Process.Kill()
	})
	t.Cleanup(func() {
		timer.Stop()
		vm.cmd.Process.Kill()
		<-vm.exited
	})
	return vm
}

func defaultTimeout() time.Duration {
	if d, err := time.ParseDuration(os.Getenv("HEMD_VMTEST_TIMEOUT")); err == nil {
		return d
	}
	return 180 * time.Second
}

var ansi = regexp.MustCompile(`\x1b\[[0-9;?]*[A-Za-z]|\x1bc`)

func (vm *VM) read(r io.Reader) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimRight(ansi.ReplaceAllString(sc.Text(), ""), "\r")
		vm.t.Logf("console %6.1fs: %s", time.Since(vm.start).Seconds(), line)
		vm.mu.Lock()
		vm.lines = append(vm.lines, line)
		vm.mu.Unlock()
		select {
		case vm.changed <- struct{}{}:
		default:
		}
	}
	vm.err = vm.cmd.Wait()
	close(vm.exited)
}

// Expect waits until a console line from line index from on matches re, and
// returns the submatches and the index after that line. A fail marker or a
// kernel panic fails the test at once.
func (vm *VM) Expect(from int, re string, timeout time.Duration) ([]string, int) {
	vm.t.Helper()
	rx := regexp.MustCompile(re)
	deadline := time.After(timeout)
	for {
		vm.mu.Lock()
		lines := vm.lines
		vm.mu.Unlock()
		for i := from; i < len(lines); i++ {
			if m := rx.FindStringSubmatch(lines[i]); m != nil {
				return m, i + 1
			}
			if strings.Contains(lines[i], "HEMD-RESULT fail") || strings.Contains(lines[i], "Kernel panic") {
				vm.t.Fatalf("vmtest: guest failed: %s", lines[i])
			}
			if strings.HasPrefix(lines[i], "HEMD-END") {
				vm.t.Fatalf("vmtest: the scenario ended before %q appeared", re)
			}
		}
		from = len(lines)
		select {
		case <-vm.changed:
		case <-vm.exited:
			vm.mu.Lock()
			n := len(vm.lines)
			vm.mu.Unlock()
			if n > from {
				continue
			}
			vm.t.Fatalf("vmtest: QEMU exited (%v) before %q appeared", vm.err, re)
		case <-deadline:
			vm.t.Fatalf("vmtest: %q did not appear within %v", re, timeout)
		}
	}
}

// Wait waits for QEMU to exit and fails the test if it did not exit cleanly.
func (vm *VM) Wait(timeout time.Duration) {
	vm.t.Helper()
	select {
	case <-vm.exited:
		if vm.err != nil {
			vm.t.Fatalf("vmtest: QEMU: %v", vm.err)
		}
	case <-time.After(timeout):
		vm.t.Fatalf("vmtest: QEMU did not exit within %v", timeout)
	}
}

// Elapsed is the time since QEMU started.
func (vm *VM) Elapsed() time.Duration { return time.Since(vm.start) }

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
