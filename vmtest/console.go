package vmtest

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

// Console is the serial console of a running QEMU (its stdout and stderr),
// read line by line with ANSI escapes removed, each line stamped with the
// time since QEMU started; and QEMU's exit.
type Console struct {
	start   time.Time
	mu      sync.Mutex
	lines   []ConsoleLine
	changed chan struct{}
	exited  chan struct{}
	err     error // QEMU's exit, set before exited is closed
}

// ConsoleLine is one line of the console.
type ConsoleLine struct {
	Text string
	At   time.Duration // since QEMU started
}

// ErrExited means QEMU exited before the line waited for appeared.
var ErrExited = errors.New("QEMU exited")

var ansi = regexp.MustCompile(`\x1b\[[0-9;?]*[A-Za-z]|\x1bc`)

// StartConsole starts cmd (a QEMU) with its output on a new Console. Every
// line also goes to logf, prefixed with the seconds since QEMU started.
func StartConsole(cmd *exec.Cmd, logf func(string, ...any)) (*Console, error) {
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stderr = cmd.Stdout
	c := &Console{start: time.Now(), changed: make(chan struct{}, 1), exited: make(chan struct{})}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", cmd.Path, err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			at := time.Since(c.start)
			text := strings.TrimRight(ansi.ReplaceAllString(sc.Text(), ""), "\r")
			logf("console %6.1fs: %s", at.Seconds(), text)
			c.mu.Lock()
			c.lines = append(c.lines, ConsoleLine{text, at})
			c.mu.Unlock()
			select {
			case c.changed <- struct{}{}:
			default:
			}
		}
		c.err = cmd.Wait()
		close(c.exited)
	}()
	return c, nil
}

// Started is when QEMU started.
func (c *Console) Started() time.Time { return c.start }

// Lines returns the console so far.
func (c *Console) Lines() []ConsoleLine {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]ConsoleLine(nil), c.lines...)
}

// Exited is closed when QEMU has exited; Err is then its exit status.
func (c *Console) Exited() <-chan struct{} { return c.exited }

// Err is QEMU's exit error, once Exited is closed.
func (c *Console) Err() error { return c.err }

// Expect waits for a line, from line index from on, that matches rx, and
// returns its submatches, the line and the index after it. stop is asked
// about every line that does not match (a kernel panic, a failure marker):
// an error from it ends the wait, with the index after that line. QEMU's
// exit ends the wait with an error wrapping ErrExited, and so does timeout.
func (c *Console) Expect(from int, rx *regexp.Regexp, timeout time.Duration, stop func(string) error) ([]string, ConsoleLine, int, error) {
	deadline := time.After(timeout)
	for {
		c.mu.Lock()
		lines := c.lines
		c.mu.Unlock()
		for i := from; i < len(lines); i++ {
			if m := rx.FindStringSubmatch(lines[i].Text); m != nil {
				return m, lines[i], i + 1, nil
			}
			if err := stop(lines[i].Text); err != nil {
				return nil, ConsoleLine{}, i + 1, err
			}
		}
		from = len(lines)
		select {
		case <-c.changed:
		case <-c.exited:
			c.mu.Lock()
			n := len(c.lines)
			c.mu.Unlock()
			if n > from {
				continue
			}
			return nil, ConsoleLine{}, from, fmt.Errorf("%w (%v) before %q appeared on the console", ErrExited, c.err, rx)
		case <-deadline:
			return nil, ConsoleLine{}, from, fmt.Errorf("%q did not appear on the console within %v", rx, timeout)
		}
	}
}
