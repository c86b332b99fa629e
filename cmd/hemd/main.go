// Command hemd is the host encryption module: a vhost-user-blk backend that
// serves AES-256-XTS encrypted volumes to QEMU guests, with data keys wrapped
// by an HSM-backed KMS.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
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
		case args[0] == "-h" || args[0] == "--help":
			fmt.Fprint(stdout, usage)
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
		return nil
	}
	return fmt.Errorf("unknown command %q\n%s", cmd, usage)
}

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
