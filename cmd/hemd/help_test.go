package main

import (
	"bytes"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// helpEnv is the environment of hemd run as the test binary: no second of
// race-detector sleep at exit (GORACE), a state directory of its own.
func helpEnv(state string) []string {
	return append(os.Environ(), "HEMD_TEST_MAIN=1", "GORACE=atexit_sleep_ms=0", "HEMD_STATE_DIR="+state)
}

// TestHelpPagesExist: every command of hemd's usage has a docs page, and
// every page and heading docPages names exists.
func TestHelpPagesExist(t *testing.T) {
	root := repoRoot(t)
	for _, c := range usageCommands(t) {
		if _, ok := docPages[c]; !ok {
			t.Errorf("command %s has no docs page: add it to docPages in main.go", c)
		}
	}
	for cmd, page := range docPages {
		if msg := checkDocTarget(root, page); msg != "" {
			t.Errorf("docPages[%q] = %s: %s", cmd, page, msg)
		}
	}
}

// TestHelpEndsWithDocsPage runs hemd --help and hemd COMMAND --help for
// every entry of docPages: each exits 0 and ends with its page.
func TestHelpEndsWithDocsPage(t *testing.T) {
	state := t.TempDir()
	for key, page := range docPages {
		args := append(strings.Fields(key), "--help")
		cmd := exec.Command(os.Args[0], args...)
		cmd.Env = helpEnv(state)
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Run(); err != nil {
			t.Errorf("hemd %s: %v\n%s%s", strings.Join(args, " "), err, stdout.String(), stderr.String())
			continue
		}
		out := stderr.String() // a command's usage goes where the flag package prints it
		switch key {
		case "", "help":
			out = stdout.String()
		case "version": // the version on stdout, then the page
			out = stdout.String() + stderr.String()
		}
		lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
		if len(lines) < 2 {
			t.Errorf("hemd %s printed no usage:\n%s", strings.Join(args, " "), out)
			continue
		}
		want := "Documentation: " + docsHome + page
		if last := lines[len(lines)-1]; last != want {
			t.Errorf("hemd %s ends with %q, want %q", strings.Join(args, " "), last, want)
		}
	}
}

// TestHelpOfCommandGroups: hemd volume --help (and the other commands of
// subcommands) shows the command's usage, exits 0 and names its page; -h
// and --help anywhere among a subcommand's arguments do the same.
func TestHelpOfCommandGroups(t *testing.T) {
	state := t.TempDir()
	for _, c := range []struct {
		args      []string
		wantUsage string
		page      string
	}{
		{[]string{"volume", "--help"}, "usage: hemd volume", docPages["volume"]},
		{[]string{"snapshot", "-h"}, "usage: hemd snapshot", docPages["snapshot"]},
		{[]string{"key", "--help"}, "usage: hemd key", docPages["key"]},
		{[]string{"kms", "--help"}, "usage: hemd kms serve", docPages["kms"]},
		{[]string{"volume", "create", "vol.img", "--help"}, "-size", docPages["volume"]},
		{[]string{"volume", "import", "-h"}, "-resume", docPages["volume import"]},
		{[]string{"snapshot", "copy", "--help"}, "-key", docPages["snapshot"]},
		{[]string{"--state-dir", state, "serve", "--help"}, "usage: hemd serve", docPages["serve"]},
	} {
		cmd := exec.Command(os.Args[0], c.args...)
		cmd.Env = helpEnv(state)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		err := cmd.Run()
		out := stderr.String()
		if err != nil {
			t.Errorf("hemd %s: %v\n%s", strings.Join(c.args, " "), err, out)
			continue
		}
		if !strings.Contains(out, c.wantUsage) {
			t.Errorf("hemd %s: no %q in:\n%s", strings.Join(c.args, " "), c.wantUsage, out)
		}
		if !strings.HasSuffix(out, "Documentation: "+docsHome+c.page+"\n") {
			t.Errorf("hemd %s does not end with its page %s:\n%s", strings.Join(c.args, " "), c.page, out)
		}
	}
	// Without --help an error stays an error.
	cmd := exec.Command(os.Args[0], "volume")
	cmd.Env = helpEnv(state)
	if out, err := cmd.CombinedOutput(); err == nil || strings.Contains(string(out), "Documentation:") {
		t.Errorf("hemd volume (no subcommand): err %v, output:\n%s", err, out)
	}
}
