// Command hemd is the host encryption module: a vhost-user-blk backend that
// serves AES-256-XTS encrypted volumes to QEMU guests, with data keys wrapped
// by an HSM-backed KMS.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
)

// globalFlags are the settings every subcommand shares.
type globalFlags struct {
	// StateDir holds hemd's state (the embedded SoftHSM2 token, PINs, audit log).
	StateDir string
	// Log is the process logger.
	Log *slog.Logger
	// KMS configures the key management service ([kms] in the config file).
	KMS kmsSettings
}

const usage = `usage: hemd [--state-dir DIR] COMMAND [ARGS]

commands:
  serve      serve volumes to QEMU over vhost-user-blk
  volume     create, inspect, import and export encrypted volumes
  snapshot   create and copy snapshots
  key        manage customer master keys in the KMS
  kms        run the KMS as a network service: kms serve (AWS KMS protocol)
  status     list what a running hemd serve serves: volumes, attach state, keys
  bench      measure a vhost-user-blk back-end (hemd or any other)
  version    print the version

Run 'hemd COMMAND --help' for a command's flags.
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintf(os.Stderr, "hemd: %v\n", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	g := globalFlags{
		StateDir: defaultStateDir(),
		Log:      slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: logLevel()})),
	}
	if v := os.Getenv("HEMD_STATE_DIR"); v != "" {
		g.StateDir = v
	}
	for len(args) > 0 && len(args[0]) > 1 && args[0][0] == '-' {
		switch {
		case args[0] == "--state-dir" && len(args) > 1:
			g.StateDir, args = args[1], args[2:]
		case len(args[0]) > len("--state-dir=") && args[0][:len("--state-dir=")] == "--state-dir=":
			g.StateDir, args = args[0][len("--state-dir="):], args[1:]
		case isHelpFlag(args[0]):
			fmt.Fprint(stdout, usage)
			fmt.Fprintln(stdout, docsLine(""))
			return nil
		default:
			return fmt.Errorf("unknown flag %q\n%s", args[0], usage)
		}
	}
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return errors.New("no command given")
	}
	cmd, rest := args[0], args[1:]
	if cmd != "version" && cmd != "help" {
		// Before anything touches a key: no core dump, no ptrace by others.
		if _, err := noDump(); err != nil {
			return err
		}
		g.Log.Debug("process is non-dumpable: no core dump, no ptrace without CAP_SYS_PTRACE")
	}
	if cmd == "help" || !helpAsked(rest) {
		return dispatch(ctx, g, cmd, rest, stdout, stderr)
	}
	// hemd COMMAND --help: the command's own usage, then the page that
	// explains it. A command of subcommands says its usage when given none.
	bare := subcommands[cmd] && isHelpFlag(rest[0])
	if bare {
		rest = nil
	}
	err := dispatch(ctx, g, cmd, rest, stdout, stderr)
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		err = nil
	case bare:
		if msg := err.Error(); strings.HasPrefix(msg, "usage:") {
			fmt.Fprintln(stderr, msg)
		}
		err = nil
	}
	// stderr: where the flag package prints a command's usage.
	fmt.Fprintln(stderr, docsLine(docsPage(cmd, rest)))
	return err
}

// dispatch runs one command.
func dispatch(ctx context.Context, g globalFlags, cmd string, rest []string, stdout, stderr io.Writer) error {
	switch cmd {
	case "serve":
		return serveCommand(ctx, g, rest, stdout, stderr)
	case "key":
		return keysCommand(ctx, g, rest, stdout, stderr)
	case "kms":
		return kmsCommand(ctx, g, rest, stdout, stderr)
	case "volume":
		return volumeCommand(ctx, g, rest, stdout, stderr)
	case "snapshot":
		return snapshotCommand(ctx, g, rest, stdout, stderr)
	case "bench":
		return benchCommand(ctx, g, rest, stdout, stderr)
	case "status":
		return statusCommand(ctx, rest, stdout, stderr)
	case "version":
		fmt.Fprintln(stdout, "hemd", version)
		return nil
	case "help":
		fmt.Fprint(stdout, usage)
		fmt.Fprintln(stdout, docsLine(""))
		return nil
	}
	return fmt.Errorf("unknown command %q\n%s", cmd, usage)
}

// docPages names the page of hemd's documentation that explains each
// command, relative to the source tree: hemd --help and hemd COMMAND --help
// end with it. A subcommand ("volume import") may have a page of its own;
// else its command's page is named. The test checks that every command of
// usage has one and that each page and heading exists.
var docPages = map[string]string{
	"":               "README.md",
	"help":           "README.md",
	"version":        "README.md",
	"serve":          "docs/operations.md#running-hemd-serve",
	"status":         "docs/operations.md#hemd-status",
	"volume":         "docs/operations.md#volumes-keys-and-snapshots",
	"volume inspect": "docs/volume-format.md",
	"volume import":  "docs/volume-states.md#import-checkpoints-and---resume",
	"volume attach":  "docs/operations-volumes.md#attach-and-detach-hot-plug",
	"volume detach":  "docs/operations-volumes.md#attach-and-detach-hot-plug",
	"volume resize":  "docs/operations-volumes.md#grow-online",
	"volume modify":  "docs/operations-volumes.md#provisioned-performance",
	"snapshot":       "docs/snapshots.md",
	"key":            "docs/kms.md#the-embedded-kms-and-hemd-key",
	"kms":            "docs/kms.md",
	"bench":          "docs/performance.md#hemd-bench",
}

// subcommands are the commands whose first argument is a subcommand.
var subcommands = map[string]bool{"volume": true, "snapshot": true, "key": true, "kms": true}

// docsHome is where the source tree, and with it the documentation, is
// published (as the systemd unit's Documentation= says).
const docsHome = "https://github.com/hemd/hemd/blob/main/"

// docsPage is the page for cmd with args (its subcommand first).
func docsPage(cmd string, args []string) string {
	if len(args) > 0 {
		if p, ok := docPages[cmd+" "+args[0]]; ok {
			return p
		}
	}
	if p, ok := docPages[cmd]; ok {
		return p
	}
	return docPages[""]
}

// docsLine is the last line of a help text: the page that explains it (its
// path in the source tree is the end of the address).
func docsLine(page string) string {
	if page == "" {
		page = docPages[""]
	}
	return "Documentation: " + docsHome + page
}

// helpAsked reports whether -h or --help is among a command's arguments
// (before a "--").
func helpAsked(args []string) bool {
	for _, a := range args {
		if a == "--" {
			return false
		}
		if isHelpFlag(a) {
			return true
		}
	}
	return false
}

func isHelpFlag(a string) bool { return a == "-h" || a == "--help" || a == "-help" }

var version = "dev"

// defaultStateDir is /var/lib/hemd for root and $XDG_STATE_HOME/hemd otherwise.
func defaultStateDir() string {
	if os.Geteuid() == 0 {
		return "/var/lib/hemd"
	}
	if x := os.Getenv("XDG_STATE_HOME"); x != "" {
		return filepath.Join(x, "hemd")
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".local", "state", "hemd")
}

func logLevel() slog.Level {
	var l slog.Level
	if err := l.UnmarshalText([]byte(os.Getenv("HEMD_LOG_LEVEL"))); err != nil {
		return slog.LevelInfo
	}
	return l
}
