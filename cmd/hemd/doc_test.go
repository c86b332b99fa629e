package main

// The documentation's examples cannot rot: every shell block of README.md and
// docs/*.md is either run here, against a hemd built from this tree, or says
// why it cannot be. How to mark a block: docs/development.md, "Examples that
// are run".

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"
	"unicode"
)

// The markers, each on the line before a fenced block (blank lines between
// are allowed):
//
//	<!-- doctest -->               TestDocExamples runs the block
//	<!-- not-runnable: REASON -->  it does not, and REASON says why
var (
	markerRE    = regexp.MustCompile(`^\s*<!--\s*(doctest|not-runnable)\b(.*?)-->\s*$`)
	anyMarkerRE = regexp.MustCompile(`<!--\s*(doctest|not-runnable)`)
	fenceRE     = regexp.MustCompile("^( *)(`{3,}|~{3,})\\s*([^\\s`]*)")
	// inlineCodeRE is a code span: a marker quoted in prose is no marker.
	inlineCodeRE = regexp.MustCompile("`[^`]*`")
)

// shellLangs are the info strings of the blocks that must carry a marker.
var shellLangs = map[string]bool{"sh": true, "bash": true, "console": true, "shell": true, "zsh": true, "shell-session": true}

// howToMark ends every complaint about an unmarked block: what to add.
const howToMark = `put one of these on the line before the opening fence:
    <!-- doctest -->
        if 'make test' can run the block here: it runs with hemd (built from this tree) first on PATH,
        in a fresh empty directory with a fresh HEMD_STATE_DIR and HEMD_CONTROL, under bash -euo pipefail;
        the runnable blocks of one file run in order in one shell (variables, cd and background jobs carry
        over, background jobs are killed at the end); in a console block the lines starting with "$ " are
        run and the lines after them are the expected output ("..." matches anything);
    <!-- not-runnable: REASON -->
        if it cannot run here, e.g. "needs KVM", "needs device-mapper", "needs a second host",
        "boots a VM: make demo does this".
  (docs/development.md, "Examples that are run", has the details.)`

// docBlock is one fenced block of a Markdown file.
type docBlock struct {
	file   string // relative to the repository root
	line   int    // of the opening fence, from 1
	lang   string // the info string's first word, lower case
	mark   string // "doctest", "not-runnable" or ""
	reason string // of not-runnable
	body   []string
}

func (b docBlock) where() string { return fmt.Sprintf("%s:%d", b.file, b.line) }

// parseDoc returns the fenced blocks of a Markdown file and what is wrong
// with their markers.
func parseDoc(file, text string) (blocks []docBlock, problems []string) {
	type pending struct {
		line         int
		mark, reason string
	}
	var (
		mark   *pending
		open   *docBlock
		indent int
		fence  string
	)
	lines := strings.Split(strings.ReplaceAll(text, "\r\n", "\n"), "\n")
	for i, l := range lines {
		n := i + 1
		if open != nil {
			if t := strings.TrimSpace(l); strings.HasPrefix(t, fence) && strings.Trim(t, fence[:1]) == "" {
				blocks = append(blocks, *open)
				open = nil
				continue
			}
			strip := 0
			for strip < indent && strip < len(l) && l[strip] == ' ' {
				strip++
			}
			open.body = append(open.body, l[strip:])
			continue
		}
		if m := markerRE.FindStringSubmatch(l); m != nil {
			if mark != nil {
				problems = append(problems, fmt.Sprintf("%s:%d: a second marker before any fenced block (the first is on line %d)", file, n, mark.line))
			}
			p := &pending{line: n, mark: m[1]}
			rest := strings.TrimSpace(m[2])
			switch {
			case p.mark == "doctest" && rest != "":
				problems = append(problems, fmt.Sprintf("%s:%d: <!-- doctest --> takes nothing after it, found %q", file, n, rest))
			case p.mark == "not-runnable":
				p.reason = strings.TrimSpace(strings.TrimPrefix(rest, ":"))
				if !strings.HasPrefix(rest, ":") || p.reason == "" {
					problems = append(problems, fmt.Sprintf("%s:%d: not-runnable needs its reason: <!-- not-runnable: REASON -->", file, n))
				}
			}
			mark = p
			continue
		}
		if anyMarkerRE.MatchString(inlineCodeRE.ReplaceAllString(l, "")) {
			problems = append(problems, fmt.Sprintf("%s:%d: malformed marker %q: the line must be only <!-- doctest --> or <!-- not-runnable: REASON -->", file, n, strings.TrimSpace(l)))
			continue
		}
		if m := fenceRE.FindStringSubmatch(l); m != nil {
			open = &docBlock{file: file, line: n, lang: strings.ToLower(m[3])}
			indent, fence = len(m[1]), m[2]
			if mark != nil {
				open.mark, open.reason = mark.mark, mark.reason
				mark = nil
			}
			continue
		}
		if mark != nil && strings.TrimSpace(l) != "" {
			problems = append(problems, fmt.Sprintf("%s:%d: the marker is not followed by a fenced block", file, mark.line))
			mark = nil
		}
	}
	if open != nil {
		problems = append(problems, fmt.Sprintf("%s: fence unclosed", open.where()))
	}
	if mark != nil {
		problems = append(problems, fmt.Sprintf("%s:%d: the marker is not followed by a fenced block", file, mark.line))
	}
	for _, b := range blocks {
		switch {
		case b.mark == "" && shellLangs[b.lang]:
			problems = append(problems, fmt.Sprintf("%s: this ```%s block is neither runnable nor marked as not runnable: "+
				"put <!-- doctest --> or <!-- not-runnable: REASON --> on the line before its fence (which one: below)", b.where(), b.lang))
		case b.mark == "doctest" && !shellLangs[b.lang]:
			problems = append(problems, fmt.Sprintf("%s: <!-- doctest --> on a ```%s block: only sh, bash and console blocks are run", b.where(), b.lang))
		case b.mark == "doctest" && b.lang == "console":
			if _, err := consoleCommands(b); err != nil {
				problems = append(problems, fmt.Sprintf("%s: %v", b.where(), err))
			}
		}
	}
	return blocks, problems
}

// consoleCmd is one command of a console block and the output it shows.
type consoleCmd struct {
	line int
	cmd  string
	want []string
}

// consoleCommands splits a console block into its commands: lines starting
// with "$ " (continued while they end in a backslash), each followed by its
// expected output.
func consoleCommands(b docBlock) ([]consoleCmd, error) {
	var cmds []consoleCmd
	cont := false
	for i, l := range b.body {
		switch {
		case cont:
			c := &cmds[len(cmds)-1]
			c.cmd += "\n" + l
			cont = strings.HasSuffix(l, `\`)
		case strings.HasPrefix(l, "$ "):
			cmds = append(cmds, consoleCmd{line: b.line + 1 + i, cmd: l[2:]})
			cont = strings.HasSuffix(l, `\`)
		case len(cmds) == 0:
			if strings.TrimSpace(l) != "" {
				return nil, fmt.Errorf("console block: output %q before the first \"$ \" command", l)
			}
		default:
			c := &cmds[len(cmds)-1]
			c.want = append(c.want, l)
		}
	}
	if len(cmds) == 0 {
		return nil, errors.New(`console block without a "$ " command`)
	}
	return cmds, nil
}

// outputMatches reports whether got is the output want shows: line by line,
// trailing spaces and blank lines ignored, runs of spaces matching any run
// of spaces (tables), "..." in a line matching any text, and a line of only
// "..." matching any number of lines.
func outputMatches(want []string, got string) bool {
	trim := func(ls []string) []string {
		out := make([]string, len(ls))
		for i, l := range ls {
			out[i] = strings.TrimRightFunc(l, unicode.IsSpace)
		}
		for len(out) > 0 && out[len(out)-1] == "" {
			out = out[:len(out)-1]
		}
		return out
	}
	w, g := trim(want), trim(strings.Split(got, "\n"))
	res := make([]*regexp.Regexp, len(w))
	for i, l := range w {
		var pat strings.Builder
		for j, part := range strings.Split(l, "...") {
			if j > 0 {
				pat.WriteString(".*")
			}
			for k, s := range regexp.MustCompile(` +`).Split(part, -1) {
				if k > 0 {
					pat.WriteString(" +")
				}
				pat.WriteString(regexp.QuoteMeta(s))
			}
		}
		res[i] = regexp.MustCompile("^" + pat.String() + "$")
	}
	var match func(i, j int) bool
	match = func(i, j int) bool {
		if i == len(w) {
			return j == len(g)
		}
		if strings.TrimSpace(w[i]) == "..." {
			for k := j; k <= len(g); k++ {
				if match(i+1, k) {
					return true
				}
			}
			return false
		}
		return j < len(g) && res[i].MatchString(g[j]) && match(i+1, j+1)
	}
	return match(0, 0)
}

// repoRoot is the repository's top directory (the tests run in cmd/hemd).
func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		t.Fatalf("repository root: %v", err)
	}
	return root
}

// docFiles are README.md and docs/*.md, relative to root.
func docFiles(t *testing.T, root string) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(root, "docs", "*.md"))
	if err != nil {
		t.Fatal(err)
	}
	out := []string{"README.md"}
	for _, f := range files {
		out = append(out, filepath.Join("docs", filepath.Base(f)))
	}
	return out
}

func readDoc(t *testing.T, root, file string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, file))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestDocParse(t *testing.T) {
	doc := strings.Join([]string{
		"# t",                              // 1
		"<!-- doctest -->",                 // 2
		"```sh",                            // 3
		"echo run",                         // 4
		"```",                              // 5
		"<!-- not-runnable: needs KVM -->", // 6
		"",                                 // 7
		"```bash",                          // 8
		"qemu-system-x86_64",               // 9
		"```",                              // 10
		"```",                              // 11: output, no marker needed
		"$ not a command block",            // 12
		"```",                              // 13
		"- in a list:",                     // 14
		"  <!-- doctest -->",               // 15
		"  ```console",                     // 16
		"  $ echo a \\",                    // 17
		"  b",                              // 18
		"  a b",                            // 19
		"  ```",                            // 20
	}, "\n")
	blocks, problems := parseDoc("t.md", doc)
	if len(problems) != 0 {
		t.Fatalf("problems in a well-marked file: %q", problems)
	}
	if len(blocks) != 4 {
		t.Fatalf("%d blocks, want 4", len(blocks))
	}
	if b := blocks[0]; b.mark != "doctest" || b.lang != "sh" || b.line != 3 || strings.Join(b.body, "\n") != "echo run" {
		t.Errorf("block 1: %+v", b)
	}
	if b := blocks[1]; b.mark != "not-runnable" || b.reason != "needs KVM" {
		t.Errorf("block 2: %+v", b)
	}
	if b := blocks[2]; b.mark != "" || b.lang != "" {
		t.Errorf("block 3: %+v", b)
	}
	cmds, err := consoleCommands(blocks[3])
	if err != nil || len(cmds) != 1 || cmds[0].cmd != "echo a \\\nb" || strings.Join(cmds[0].want, "|") != "a b" || cmds[0].line != 17 {
		t.Errorf("console block: %+v, %v", cmds, err)
	}

	for _, c := range []struct{ doc, want string }{
		{"```sh\nls\n```", "t.md:1: this ```sh block is neither runnable nor marked"},
		{"text\n```console\n$ ls\n```", "t.md:2: this ```console block is neither runnable"},
		{"<!-- not-runnable -->\n```sh\nls\n```", "t.md:1: not-runnable needs its reason"},
		{"<!-- not-runnable:  -->\n```sh\nls\n```", "t.md:1: not-runnable needs its reason"},
		{"<!-- doctest -->\ntext\n```sh\nls\n```", "t.md:1: the marker is not followed by a fenced block"},
		{"<!-- doctest --> x\n```sh\nls\n```", "t.md:1: malformed marker"},
		{"<!-- doctest -->\n```toml\na = 1\n```", "t.md:2: <!-- doctest --> on a ```toml block"},
		{"<!-- doctest -->\n```console\nls\n```", `t.md:2: console block: output "ls" before the first "$ " command`},
		{"<!-- doctest -->\n```sh\nls\n", "t.md:2: fence unclosed"},
	} {
		_, problems := parseDoc("t.md", c.doc)
		if len(problems) == 0 || !strings.HasPrefix(problems[0], c.want) {
			t.Errorf("%q: problems %q, want one starting %q", c.doc, problems, c.want)
		}
	}
	_, problems = parseDoc("t.md", "```sh\nls\n```")
	if !strings.Contains(problems[0], "<!-- doctest -->") || !strings.Contains(problems[0], "<!-- not-runnable: REASON -->") {
		t.Errorf("the complaint does not say what to add: %s", problems[0])
	}
	_, problems = parseDoc("t.md", "The markers: `<!-- doctest -->` and `<!-- not-runnable: REASON -->`.\n")
	if len(problems) != 0 {
		t.Errorf("markers quoted in prose taken for markers: %q", problems)
	}
}

func TestDocOutputMatches(t *testing.T) {
	for _, c := range []struct {
		want []string
		got  string
		ok   bool
	}{
		{[]string{"a", "b"}, "a\nb\n", true},
		{[]string{"a", "b"}, "a\nc\n", false},
		{[]string{"a"}, "a\nb\n", false},
		{[]string{"a", "..."}, "a\nb\nc\n", true},
		{[]string{"...", "c"}, "a\nb\nc\n", true},
		{[]string{"...", "c"}, "a\nb\n", false},
		{[]string{"vol-... detached"}, "vol-0123 detached   \n\n", true},
		{[]string{"A  B", "x  y"}, "A     B\nx y\n", true},
		{[]string{"A  B"}, "AB\n", false},
		{[]string{"1.5 (x)"}, "1x5 (x)\n", false},
		{nil, "", true},
	} {
		if got := outputMatches(c.want, c.got); got != c.ok {
			t.Errorf("outputMatches(%q, %q) = %v", c.want, c.got, got)
		}
	}
}

// TestDocSession runs blocks the way TestDocExamples does, without hemd:
// state carries over from block to block, console output is checked, a
// failing or hanging block is named, and background jobs do not outlive the
// session.
func TestDocSession(t *testing.T) {
	bin := t.TempDir()
	pidFile := filepath.Join(t.TempDir(), "pid")
	block := func(line int, lang string, body ...string) docBlock {
		return docBlock{file: "t.md", line: line, lang: lang, mark: "doctest", body: body}
	}

	out, failures, err := runDocSession([]docBlock{
		block(3, "sh", "v=carried", "cd .. && mkdir -p sub && cd sub", "sleep 300 &", "echo $! > "+pidFile),
		block(9, "console", "$ echo \"$v to $(basename \"$PWD\")\"", "carried to sub",
			"$ echo \"$HEMD_STATE_DIR\" | grep -c /state$", "1", "$ printf 'x  y\\n'", "x y"),
	}, bin, 20*time.Second)
	if err != nil || len(failures) > 0 {
		t.Fatalf("err %v, failures %q, output:\n%s", err, failures, out)
	}
	if !strings.Contains(out, "=== t.md:3") || !strings.Contains(out, "$ echo") {
		t.Errorf("output does not show the blocks:\n%s", out)
	}
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	if st, err := os.ReadFile("/proc/" + strings.TrimSpace(string(b)) + "/stat"); err == nil {
		f := strings.Fields(string(st[bytes.LastIndexByte(st, ')')+1:]))
		if f[0] != "Z" {
			t.Errorf("the session's background job still runs: %s", st)
		}
	}

	for _, c := range []struct {
		blocks []docBlock
		want   string
	}{
		{[]docBlock{block(3, "sh", "true"), block(9, "bash", "false", "echo after"), block(20, "sh", "echo never")},
			"t.md:9: this runnable block failed (exit status 1)"},
		{[]docBlock{block(3, "sh", "echo a | grep -q b")}, "t.md:3: this runnable block failed"},
		{[]docBlock{block(3, "console", "$ echo a", "b")}, "t.md:4: $ echo a\nshows this output:\nb\nbut printed:\na\n"},
		{[]docBlock{block(3, "sh", "sleep 30")}, "t.md:3: this runnable block failed (timed out after 500ms)"},
	} {
		_, failures, err := runDocSession(c.blocks, bin, 500*time.Millisecond)
		if err != nil || len(failures) != 1 || !strings.HasPrefix(failures[0], c.want) {
			t.Errorf("%+v: err %v, failures %q, want one starting %q", c.blocks, err, failures, c.want)
		}
	}
}

// TestDocBlocksMarked fails for any shell block in README.md or docs/*.md
// that is neither marked runnable nor marked not runnable with a reason.
func TestDocBlocksMarked(t *testing.T) {
	root := repoRoot(t)
	unmarked := false
	for _, f := range docFiles(t, root) {
		_, problems := parseDoc(f, readDoc(t, root, f))
		for _, p := range problems {
			t.Error(p)
			unmarked = unmarked || strings.Contains(p, "neither runnable nor marked")
		}
	}
	if unmarked {
		t.Error("an unmarked block: " + howToMark)
	}
}

// TestDocExamples runs every block marked <!-- doctest -->: the blocks of a
// file in order, in one bash, in a fresh directory, with a hemd built from
// this tree first on PATH.
func TestDocExamples(t *testing.T) {
	root := repoRoot(t)
	bin := filepath.Dir(buildHemd(t)) // go build, into a directory of its own
	for _, f := range docFiles(t, root) {
		blocks, problems := parseDoc(f, readDoc(t, root, f))
		if len(problems) > 0 {
			continue // TestDocBlocksMarked says what is wrong
		}
		var run []docBlock
		for _, b := range blocks {
			if b.mark == "doctest" {
				run = append(run, b)
			}
		}
		if len(run) == 0 {
			continue
		}
		t.Run(f, func(t *testing.T) {
			start := time.Now()
			output, failures, err := runDocSession(run, bin, docSessionTimeout)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%d blocks in %v", len(run), time.Since(start).Round(time.Millisecond))
			if testing.Verbose() { // go test -v -run TestDocExamples shows what the blocks printed
				t.Logf("the session's output:\n%s", output)
			}
			for _, f := range failures {
				t.Error(f)
			}
		})
	}
}

// docSessionTimeout bounds the runnable blocks of one file.
const docSessionTimeout = 60 * time.Second

// runDocSession runs blocks in one bash session, within timeout, and checks
// the output the console blocks show. It returns what the session printed
// and what failed; err is a failure to run the session at all.
func runDocSession(blocks []docBlock, bin string, timeout time.Duration) (output string, failures []string, err error) {
	top, err := os.MkdirTemp("", "hemd-doc-") // short: unix socket paths live in it
	if err != nil {
		return "", nil, err
	}
	defer os.RemoveAll(top)
	dirs := map[string]string{}
	for _, d := range []string{"work", "state", "run", "out"} {
		dirs[d] = filepath.Join(top, d)
		if err := os.Mkdir(dirs[d], 0o700); err != nil {
			return "", nil, err
		}
	}
	status := filepath.Join(top, "status")

	var script strings.Builder
	script.WriteString(`set -euo pipefail
__doctest_cmd() {
	local id=$1 c
	c=$(cat)
	printf '$ %s\n' "$c"
	eval "$c" >"$DOCTEST_OUT/$id" 2>&1
	cat "$DOCTEST_OUT/$id"
}
`)
	type check struct {
		id string
		consoleCmd
	}
	var checks []check
	byWhere := map[string]docBlock{}
	for _, b := range blocks {
		byWhere[b.where()] = b
		fmt.Fprintf(&script, "printf '%%s\\n' %q >\"$DOCTEST_STATUS\"\nprintf '\\n=== %%s\\n' %q\n", b.where(), b.where())
		if b.lang != "console" {
			script.WriteString(strings.Join(b.body, "\n") + "\n")
			continue
		}
		cmds, err := consoleCommands(b)
		if err != nil {
			return "", nil, fmt.Errorf("%s: %w", b.where(), err)
		}
		for _, c := range cmds {
			id := fmt.Sprintf("c%d", len(checks))
			checks = append(checks, check{id, c})
			fmt.Fprintf(&script, "__doctest_cmd %s <<'__DOCTEST_EOF__'\n%s\n__DOCTEST_EOF__\n", id, c.cmd)
		}
	}
	script.WriteString("printf 'done\\n' >\"$DOCTEST_STATUS\"\n")
	scriptPath := filepath.Join(top, "session.sh")
	if err := os.WriteFile(scriptPath, []byte(script.String()), 0o600); err != nil {
		return "", nil, err
	}

	logPath := filepath.Join(top, "session.log")
	logf, err := os.Create(logPath)
	if err != nil {
		return "", nil, err
	}
	defer logf.Close()
	cmd := exec.Command("bash", scriptPath)
	cmd.Dir = dirs["work"]
	cmd.Env = docEnv(bin, dirs, status)
	// A file, not a pipe: the background jobs of a block keep their output
	// open, and Wait would wait for them.
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return "", nil, err
	}
	pgid := cmd.Process.Pid
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	var runErr error
	select {
	case runErr = <-waited:
	case <-time.After(timeout):
		syscall.Kill(-pgid, syscall.SIGKILL)
		<-waited
		runErr = fmt.Errorf("timed out after %v", timeout)
	}
	endGroup(pgid)

	logText, _ := os.ReadFile(logPath)
	output = string(logText)
	st, _ := os.ReadFile(status)
	at := strings.TrimSpace(string(st))
	if runErr != nil || at != "done" {
		b, ok := byWhere[at]
		if !ok {
			return output, nil, fmt.Errorf("the blocks did not run (%v):\n%s", runErr, output)
		}
		return output, []string{fmt.Sprintf("%s: this runnable block failed (%v). Fix the block, or mark it <!-- not-runnable: REASON --> if it cannot run here.\n--- the block ---\n%s\n--- the session's output (hemd on PATH, in a fresh directory) ---\n%s",
			at, runErr, strings.Join(b.body, "\n"), tail(output, 60))}, nil
	}
	for _, c := range checks {
		if len(c.want) == 0 {
			continue
		}
		got, err := os.ReadFile(filepath.Join(dirs["out"], c.id))
		if err != nil {
			return output, failures, err
		}
		if !outputMatches(c.want, string(got)) {
			failures = append(failures, fmt.Sprintf("%s:%d: $ %s\nshows this output:\n%s\nbut printed:\n%s(\"...\" matches any text; runs of spaces match any run of spaces)",
				blocks[0].file, c.line, c.cmd, strings.Join(c.want, "\n"), got))
		}
	}
	return output, failures, nil
}

// docEnv is the environment of a doc session: this tree's hemd first on
// PATH, a fresh state directory and control socket, and none of the caller's
// hemd, AWS or SoftHSM settings.
func docEnv(bin string, dirs map[string]string, status string) []string {
	var env []string
	for _, e := range os.Environ() {
		name, _, _ := strings.Cut(e, "=")
		if strings.HasPrefix(name, "HEMD_") || strings.HasPrefix(name, "AWS_") || strings.HasPrefix(name, "DOCTEST_") ||
			name == "SOFTHSM2_CONF" || name == "PATH" || name == "XDG_RUNTIME_DIR" {
			continue
		}
		env = append(env, e)
	}
	return append(env,
		"PATH="+bin+string(os.PathListSeparator)+os.Getenv("PATH"),
		"HEMD_STATE_DIR="+dirs["state"],
		"HEMD_CONTROL="+filepath.Join(dirs["run"], "control.sock"),
		"XDG_RUNTIME_DIR="+dirs["run"],
		"SOFTHSM2_CONF=",
		"DOCTEST_OUT="+dirs["out"],
		"DOCTEST_STATUS="+status,
	)
}

// endGroup ends what a session left running (hemd serve &): SIGTERM, then
// SIGKILL for what is still there after 5 s.
func endGroup(pgid int) {
	if syscall.Kill(-pgid, syscall.SIGTERM) != nil {
		return
	}
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if !groupRuns(pgid) {
			return
		}
	}
	syscall.Kill(-pgid, syscall.SIGKILL)
}

// groupRuns reports whether a process of group pgid still runs. Orphans go
// to init, which may leave them as zombies: kill(-pgid, 0) would find those.
func groupRuns(pgid int) bool {
	procs, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		// pid (comm) state ppid pgrp ...: comm may hold spaces and parens.
		f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
		if len(f) > 2 && f[0] != "Z" && f[2] == fmt.Sprint(pgid) {
			return true
		}
	}
	return false
}

func tail(s string, n int) string {
	ls := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(ls) > n {
		ls = append([]string{"..."}, ls[len(ls)-n:]...)
	}
	return strings.Join(ls, "\n")
}

// headingSlugs are the anchors GitHub gives a Markdown file's headings.
func headingSlugs(text string) map[string]bool {
	linkRE := regexp.MustCompile(`\[([^\]]*)\]\([^)]*\)`)
	slugs := map[string]bool{}
	seen := map[string]int{}
	inFence := ""
	for _, l := range strings.Split(text, "\n") {
		if m := fenceRE.FindStringSubmatch(l); m != nil {
			switch {
			case inFence == "":
				inFence = m[2]
			case strings.HasPrefix(strings.TrimSpace(l), inFence) && strings.Trim(strings.TrimSpace(l), inFence[:1]) == "":
				inFence = ""
			}
			continue
		}
		if inFence != "" || !strings.HasPrefix(l, "#") {
			continue
		}
		h := strings.TrimLeft(l, "#")
		if h == "" || h[0] != ' ' {
			continue
		}
		h = strings.TrimSpace(strings.TrimRight(strings.TrimSpace(h), "#"))
		h = linkRE.ReplaceAllString(h, "$1")
		var s strings.Builder
		for _, r := range strings.ToLower(h) {
			switch {
			case unicode.IsLetter(r), unicode.IsDigit(r), r == '_', r == '-':
				s.WriteRune(r)
			case r == ' ':
				s.WriteRune('-')
			}
		}
		slug := s.String()
		if n := seen[slug]; n > 0 {
			slugs[fmt.Sprintf("%s-%d", slug, n)] = true
		} else {
			slugs[slug] = true
		}
		seen[slug]++
	}
	return slugs
}

// checkDocTarget says what is wrong with a link to target (a path relative
// to root, maybe with #anchor), or "".
func checkDocTarget(root, target string) string {
	path, anchor, _ := strings.Cut(target, "#")
	b, err := os.ReadFile(filepath.Join(root, path))
	if err != nil {
		if st, serr := os.Stat(filepath.Join(root, path)); serr == nil && st.IsDir() {
			return ""
		}
		return fmt.Sprintf("%s does not exist", path)
	}
	if anchor != "" && strings.HasSuffix(path, ".md") && !headingSlugs(string(b))[anchor] {
		return fmt.Sprintf("%s has no heading #%s", path, anchor)
	}
	return ""
}

// TestDocLinks checks every relative link of README.md and docs/*.md: the
// file exists and, for a Markdown file, so does the heading it names. A page
// linked before it is written fails here.
func TestDocLinks(t *testing.T) {
	root := repoRoot(t)
	linkRE := regexp.MustCompile(`\]\(([^)\s]+)\)`)
	codeRE := regexp.MustCompile("`[^`]*`")
	for _, f := range docFiles(t, root) {
		text := readDoc(t, root, f)
		blocks, _ := parseDoc(f, text)
		inBlock := map[int]bool{}
		for _, b := range blocks {
			for i := 0; i <= len(b.body)+1; i++ {
				inBlock[b.line+i] = true
			}
		}
		for i, l := range strings.Split(text, "\n") {
			if inBlock[i+1] {
				continue
			}
			for _, m := range linkRE.FindAllStringSubmatch(codeRE.ReplaceAllString(l, ""), -1) {
				target := m[1]
				if strings.Contains(target, "://") || strings.HasPrefix(target, "mailto:") {
					continue
				}
				if strings.HasPrefix(target, "#") {
					target = f + target
				} else {
					target = filepath.ToSlash(filepath.Join(filepath.Dir(f), target))
				}
				if msg := checkDocTarget(root, target); msg != "" {
					t.Errorf("%s:%d: link (%s): %s", f, i+1, m[1], msg)
				}
			}
		}
	}
}

// configKeys lists the keys of a config struct type the way the
// configuration reference names them: "state_dir", "[kms] module",
// "[[volume]] socket", "[[kms.principal]] name".
func configKeys(typ reflect.Type, table string, array bool) []string {
	var keys []string
	for i := 0; i < typ.NumField(); i++ {
		f := typ.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
		if name == "-" || (!f.IsExported() && !f.Anonymous) {
			continue
		}
		ft := f.Type
		if f.Anonymous && name == "" {
			keys = append(keys, configKeys(ft, table, array)...)
			continue
		}
		if name == "" {
			name = f.Name
		}
		sub := name
		if table != "" {
			sub = table + "." + name
		}
		switch {
		case ft.Kind() == reflect.Struct:
			keys = append(keys, configKeys(ft, sub, false)...)
		case ft.Kind() == reflect.Slice && ft.Elem().Kind() == reflect.Struct:
			keys = append(keys, configKeys(ft.Elem(), sub, true)...)
		case table == "":
			keys = append(keys, name)
		case array:
			keys = append(keys, "[["+table+"]] "+name)
		default:
			keys = append(keys, "["+table+"] "+name)
		}
	}
	return keys
}

// docSection is the text under the heading "## title" of a Markdown file,
// up to the next heading of that level or above.
func docSection(text, title string) string {
	i := strings.Index(text, "\n## "+title+"\n")
	if i < 0 {
		return ""
	}
	rest := text[i+len(title)+5:]
	if j := strings.Index(rest, "\n## "); j >= 0 {
		rest = rest[:j]
	}
	if j := strings.Index(rest, "\n# "); j >= 0 {
		rest = rest[:j]
	}
	return rest
}

// TestDocConfigKeys: every key of hemd's config file is in the configuration
// reference of docs/operations.md.
func TestDocConfigKeys(t *testing.T) {
	root := repoRoot(t)
	ref := docSection(readDoc(t, root, "docs/operations.md"), "Configuration reference")
	if ref == "" {
		t.Fatal(`docs/operations.md has no "## Configuration reference"`)
	}
	keys := configKeys(reflect.TypeOf(fileConfig{}), "", false)
	if len(keys) < 10 {
		t.Fatalf("only %d config keys found: %q", len(keys), keys)
	}
	for _, k := range keys {
		if !strings.Contains(ref, "`"+k+"`") {
			t.Errorf("config key %s is not in docs/operations.md, \"Configuration reference\": add a row | `%s` | default | what it does |", k, k)
		}
	}
}

// flagNames are the flags a command's --help lists.
func flagNames(t *testing.T, help string) []string {
	t.Helper()
	var names []string
	for _, m := range regexp.MustCompile(`(?m)^  -([a-z0-9-]+)`).FindAllStringSubmatch(help, -1) {
		names = append(names, m[1])
	}
	if len(names) == 0 {
		t.Fatalf("no flags in:\n%s", help)
	}
	sort.Strings(names)
	return names
}

// TestDocCommands: every command of hemd's usage is in README.md's table of
// commands, and every flag of hemd serve and hemd status in
// docs/operations.md, every flag of hemd bench in docs/performance.md.
func TestDocCommands(t *testing.T) {
	root := repoRoot(t)
	readme := readDoc(t, root, "README.md")
	cmds := usageCommands(t)
	for _, c := range cmds {
		if !strings.Contains(readme, "| `hemd "+c) {
			t.Errorf("command %s is not in README.md's table of commands: add a row | `hemd %s …` | what it does | the docs page |", c, c)
		}
	}
	g := globalFlags{Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	for _, c := range []struct {
		cmd  string
		page string
		run  func(stderr io.Writer) error
	}{
		{"serve", "docs/operations.md", func(w io.Writer) error {
			return serveCommand(context.Background(), g, []string{"--help"}, io.Discard, w)
		}},
		{"status", "docs/operations.md", func(w io.Writer) error {
			return statusCommand(context.Background(), []string{"--help"}, io.Discard, w)
		}},
		{"bench", "docs/performance.md", func(w io.Writer) error {
			return benchCommand(context.Background(), g, []string{"--help"}, io.Discard, w)
		}},
	} {
		var help bytes.Buffer
		if err := c.run(&help); err != nil {
			t.Fatalf("hemd %s --help: %v", c.cmd, err)
		}
		page := readDoc(t, root, c.page)
		for _, f := range flagNames(t, help.String()) {
			if !strings.Contains(page, "`--"+f) {
				t.Errorf("hemd %s --%s is not in %s: say what it does there, as `--%s`", c.cmd, f, c.page, f)
			}
		}
	}
}

// usageCommands are the commands hemd's usage lists.
func usageCommands(t *testing.T) []string {
	t.Helper()
	_, list, ok := strings.Cut(usage, "commands:\n")
	if !ok {
		t.Fatal("usage has no commands: list")
	}
	var cmds []string
	for _, l := range strings.Split(list, "\n") {
		if strings.HasPrefix(l, "  ") && strings.TrimSpace(l) != "" {
			cmds = append(cmds, strings.Fields(l)[0])
		}
	}
	if len(cmds) < 5 {
		t.Fatalf("only %d commands in usage: %q", len(cmds), cmds)
	}
	return cmds
}
