package cloudimage

import (
	"bufio"
	"errors"
	"fmt"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"time"
)

// VM is qemu-system-x86_64 booting a cloud image, its serial console read
// line by line and each line stamped with the time it arrived.
type VM struct {
	Started time.Time
	Args    []string

	cmd     *exec.Cmd
	logf    func(string, ...any)
	mu      sync.Mutex
	lines   []Line
	changed chan struct{}
	exited  chan struct{}
	err     error
}

// Line is one line of the serial console, without ANSI escapes.
type Line struct {
	Text string
	At   time.Duration // since QEMU started
}

var ansi = regexp.MustCompile(`\x1b\[[0-9;?]*[A-Za-z]|\x1bc`)

// Start runs qemu-system-x86_64 with args (BootArgs). Every console line
// goes to logf, prefixed with the seconds since QEMU started; nil
// discards them.
func Start(logf func(string, ...any), args []string) (*VM, error) {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	vm := &VM{Args: args, logf: logf, changed: make(chan struct{}, 1), exited: make(chan struct{})}
	vm.cmd = exec.Command("qemu-system-x86_64", args...)
	out, err := vm.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	vm.cmd.Stderr = vm.cmd.Stdout
	vm.Started = time.Now()
	if err := vm.cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting qemu-system-x86_64: %w", err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			at := time.Since(vm.Started)
			text := strings.TrimRight(ansi.ReplaceAllString(sc.Text(), ""), "\r")
			logf("console %6.1fs: %s", at.Seconds(), text)
			vm.mu.Lock()
			vm.lines = append(vm.lines, Line{text, at})
			vm.mu.Unlock()
			select {
			case vm.changed <- struct{}{}:
			default:
			}
		}
		vm.err = vm.cmd.Wait()
		close(vm.exited)
	}()
	return vm, nil
}

// CommandLine is the command that started the VM, for reproducing it.
func (vm *VM) CommandLine() string {
	return "qemu-system-x86_64 " + strings.Join(vm.Args, " ")
}

// Lines returns the console so far.
func (vm *VM) Lines() []Line {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return append([]Line(nil), vm.lines...)
}

// Match is a console line that matched, with its submatches and the index
// of the line after it (where the next Expect may start).
type Match struct {
	Line
	Sub  []string
	Next int
}

// Expect waits for a console line, from line index from on, matching re.
// A kernel panic, QEMU exiting or the timeout ends the wait with an error.
func (vm *VM) Expect(from int, re string, timeout time.Duration) (Match, error) {
	rx := regexp.MustCompile(re)
	deadline := time.After(timeout)
	for {
		vm.mu.Lock()
		lines := vm.lines
		vm.mu.Unlock()
		for i := from; i < len(lines); i++ {
			if m := rx.FindStringSubmatch(lines[i].Text); m != nil {
				return Match{lines[i], m, i + 1}, nil
			}
			if strings.Contains(lines[i].Text, "Kernel panic") {
				return Match{}, fmt.Errorf("the guest panicked: %s", lines[i].Text)
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
			return Match{}, fmt.Errorf("QEMU exited (%v) before %q appeared on the console", vm.err, re)
		case <-deadline:
			return Match{}, fmt.Errorf("%q did not appear on the console within %v", re, timeout)
		}
	}
}

// Wait waits for QEMU to exit (the guest powered off) and returns its error;
// after timeout it kills QEMU.
func (vm *VM) Wait(timeout time.Duration) error {
	select {
	case <-vm.exited:
		if vm.err != nil {
			return fmt.Errorf("QEMU: %w", vm.err)
		}
		return nil
	case <-time.After(timeout):
		vm.Kill()
		return errors.New("the guest did not power off within " + timeout.String())
	}
}

// Kill ends QEMU at once and waits for it.
func (vm *VM) Kill() {
	vm.cmd.Process.Kill()
	<-vm.exited
}
