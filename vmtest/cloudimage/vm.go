package cloudimage

import (
	"errors"
	"fmt"
	"os/exec"
	"regexp"
	"strings"
	"time"

	"github.com/hemd/hemd/vmtest"
)

// VM is qemu-system-x86_64 booting a cloud image, its serial console read
// line by line and each line stamped with the time it arrived.
type VM struct {
	Started time.Time
	Args    []string

	cmd *exec.Cmd
	con *vmtest.Console
}

// Line is one line of the serial console, without ANSI escapes.
type Line = vmtest.ConsoleLine

// Start runs qemu-system-x86_64 with args (BootArgs). Every console line
// goes to logf, prefixed with the seconds since QEMU started; nil
// discards them.
func Start(logf func(string, ...any), args []string) (*VM, error) {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	vm := &VM{Args: args, cmd: exec.Command("qemu-system-x86_64", args...)}
	con, err := vmtest.StartConsole(vm.cmd, logf)
	if err != nil {
		return nil, err
	}
	vm.con, vm.Started = con, con.Started()
	return vm, nil
}

// CommandLine is the command that started the VM, for reproducing it.
func (vm *VM) CommandLine() string {
	return "qemu-system-x86_64 " + strings.Join(vm.Args, " ")
}

// Lines returns the console so far.
func (vm *VM) Lines() []Line { return vm.con.Lines() }

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
	sub, line, next, err := vm.con.Expect(from, regexp.MustCompile(re), timeout, func(line string) error {
		if strings.Contains(line, "Kernel panic") {
			return fmt.Errorf("the guest panicked: %s", line)
		}
		return nil
	})
	if err != nil {
		return Match{}, err
	}
	return Match{line, sub, next}, nil
}

// Wait waits for QEMU to exit (the guest powered off) and returns its error;
// after timeout it kills QEMU.
func (vm *VM) Wait(timeout time.Duration) error {
	select {
	case <-vm.con.Exited():
		if err := vm.con.Err(); err != nil {
			return fmt.Errorf("QEMU: %w", err)
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
	<-vm.con.Exited()
}
