package vmtest

import (
	"errors"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"
)

// The console finds lines across writes, strips ANSI escapes, stops on what
// the caller calls a failure, and tells QEMU's exit and a timeout apart.
// A shell stands in for QEMU: no VM is needed.
func TestConsole(t *testing.T) {
	con, err := StartConsole(exec.Command("sh", "-c", `printf 'boot\n\033[1mready 42\033[0m\r\n'; sleep 0.2; echo 'Kernel panic - not syncing'; echo after; exit 3`), t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	none := func(string) error { return nil }
	m, line, next, err := con.Expect(0, regexp.MustCompile(`ready (\d+)`), 5*time.Second, none)
	if err != nil || m[1] != "42" || line.Text != "ready 42" || next != 2 {
		t.Fatalf("Expect ready: %q %+v %d %v", m, line, next, err)
	}
	panicked := errors.New("panic")
	_, _, next, err = con.Expect(next, regexp.MustCompile(`never`), 5*time.Second, func(l string) error {
		if strings.HasPrefix(l, "Kernel panic") {
			return panicked
		}
		return nil
	})
	if !errors.Is(err, panicked) || next != 3 {
		t.Fatalf("Expect past a panic line: next %d, %v", next, err)
	}
	_, _, _, err = con.Expect(next, regexp.MustCompile(`never`), 5*time.Second, none)
	if !errors.Is(err, ErrExited) || !strings.Contains(err.Error(), "exit status 3") {
		t.Fatalf("Expect after exit: %v", err)
	}
	if got := len(con.Lines()); got != 4 {
		t.Fatalf("%d lines, want 4", got)
	}

	slow, err := StartConsole(exec.Command("sleep", "1"), t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { <-slow.Exited() }()
	_, _, _, err = slow.Expect(0, regexp.MustCompile(`x`), 50*time.Millisecond, none)
	if err == nil || errors.Is(err, ErrExited) || !strings.Contains(err.Error(), "did not appear") {
		t.Fatalf("Expect with a timeout: %v", err)
	}
}
