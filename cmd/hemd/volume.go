package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hemd/hemd/hem/volume"
	"github.com/hemd/hemd/storage/rbd"
)

// volumeCommand runs `hemd volume create|inspect|import|export`.
func volumeCommand(ctx context.Context, g globalFlags, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return errors.New("usage: hemd volume create|inspect|import|export|attach|detach|resize|modify ...")
	}
	sub, args := args[0], args[1:]
	if op, ok := volumeOps[sub]; ok { // volume_ops.go: through a running hemd serve
		return op(ctx, g, args, stdout, stderr)
	}
	fs := flag.NewFlagSet("volume "+sub, flag.ContinueOnError)
	fs.SetOutput(stderr)
	// A volume is a file, or an RBD image (rbd:POOL/IMAGE) on the cluster
	// these say how to reach.
	var ceph cephSettings
	ceph.flags(fs)
	switch sub {
	case "create":
		size := fs.String("size", "", "volume size (e.g. 10G); default: the snapshot's size")
		key := fs.String("key", "", "KMS key id, ARN or alias (default: the default key)")
		bs := fs.Uint("block-size", 512, "logical block size, 512 or 4096")
		snap := fs.String("snapshot", "", "snapshot to start from (shares its data key): a file, or rbd:POOL/IMAGE@snap-… (an RBD volume is then a clone: no data copied)")
		id := fs.String("id", "", "volume id (default: a new vol- id)")
		if err := parse(fs, args, 1, "PATH"); err != nil {
			return err
		}
		loc, err := locate(fs.Arg(0), ceph)
		if err != nil {
			return fmt.Errorf("volume create: %w", err)
		}
		var parent volume.Location
		if *snap != "" {
			if parent, err = locate(*snap, ceph); err != nil {
				return fmt.Errorf("volume create: --snapshot: %w", err)
			}
		}
		var n int
		if *size != "" {
			var err error
			if n, err = parseSize(*size); err != nil {
				return fmt.Errorf("volume create: --size: %w", err)
			}
		} else if *snap == "" {
			return errors.New("volume create: --size is required (or --snapshot)")
		}
		kms, closeKMS, err := openKMS(ctx, g)
		if err != nil {
			return fmt.Errorf("volume create: %w", err)
		}
		defer closeKMS()
		keyID := *key
		if keyID == "" && *snap == "" {
			if keyID, err = defaultKey(ctx, g, kms); err != nil {
				return fmt.Errorf("volume create: %w", err)
			}
		}
		v, err := volume.CreateAt(ctx, kms, loc, volume.CreateOptions{
			ID: *id, Size: uint64(n), BlockSize: uint32(*bs), KeyID: keyID, ParentAt: parent})
		if err != nil {
			return interrupted(ctx, err, "volume create: interrupted: "+fs.Arg(0)+" was not made")
		}
		defer v.Close()
		g.Log.Info("volume created", "volume", v.Head.VolumeID, "key", v.Head.KeyID, "path", fs.Arg(0))
		fmt.Fprintln(stdout, v.Head.VolumeID)
		return nil
	case "inspect":
		asJSON := fs.Bool("json", false, "print JSON")
		if err := parse(fs, args, 1, "PATH"); err != nil {
			return err
		}
		loc, err := locate(fs.Arg(0), ceph)
		if err != nil {
			return fmt.Errorf("volume inspect: %w", err)
		}
		v, err := volume.OpenAt(loc, true)
		if err != nil {
			return err
		}
		defer v.Close()
		return printHeader(stdout, v, *asJSON)
	case "import":
		from := fs.String("from", "", "raw image to encrypt into the volume (with --resume: default the image the interrupted import recorded)")
		key := fs.String("key", "", "KMS key for a new volume (default: the default key)")
		bs := fs.Uint("block-size", 512, "logical block size of a new volume, 512 or 4096")
		resume := fs.Bool("resume", false, "continue an interrupted import from its last checkpoint (the same image)")
		every := fs.String("checkpoint", "64M", "sync the data and record the progress every SIZE imported")
		if err := parse(fs, args, 1, "PATH"); err != nil {
			return err
		}
		path := fs.Arg(0)
		ckpt, err := parseSize(*every)
		if err != nil {
			return fmt.Errorf("volume import: --checkpoint: %w", err)
		}
		loc, err := locate(path, ceph)
		if err != nil {
			return fmt.Errorf("volume import: %w", err)
		}
		var v *volume.Volume
		if *resume {
			if v, err = volume.OpenAt(loc, false); err != nil {
				return fmt.Errorf("volume import --resume: %w", err)
			}
			defer v.Close()
			if op := v.Head.Operation; *from == "" && op != nil && op.Kind == volume.OpImport {
				*from = op.Source
			}
		}
		if *from == "" {
			return errors.New("volume import: --from is required")
		}
		src, err := os.Open(*from)
		if err != nil {
			return fmt.Errorf("volume import: %w", err)
		}
		defer src.Close()
		st, err := src.Stat()
		if err != nil {
			return err
		}
		source, err := filepath.Abs(*from)
		if err != nil {
			return fmt.Errorf("volume import: %w", err)
		}
		kms, closeKMS, err := openKMS(ctx, g)
		if err != nil {
			return fmt.Errorf("volume import: %w", err)
		}
		defer closeKMS()
		if v == nil {
			if v, err = volume.OpenAt(loc, false); errors.Is(err, os.ErrNotExist) {
				// A new volume the size of the image (rounded up to a block),
				// creating until the import is done.
				keyID := *key
				if keyID == "" {
					if keyID, err = defaultKey(ctx, g, kms); err != nil {
						return fmt.Errorf("volume import: %w", err)
					}
				}
				size := (uint64(st.Size()) + uint64(*bs) - 1) / uint64(*bs) * uint64(*bs)
				pending := &volume.Operation{Kind: volume.OpImport, Source: source, SourceSize: uint64(st.Size())}
				if v, err = volume.CreateAt(ctx, kms, loc, volume.CreateOptions{Size: size, BlockSize: uint32(*bs), KeyID: keyID, Pending: pending}); err != nil {
					return err
				}
				g.Log.Info("volume created", "volume", v.Head.VolumeID, "key", v.Head.KeyID, "path", path, "state", v.Head.State)
			} else if err != nil {
				return err
			}
			defer v.Close()
		}
		bar := newProgressBar(stderr, "import")
		err = v.Import(ctx, kms, src, st.Size(), volume.ImportOptions{Source: source, Resume: *resume, CheckpointEvery: int64(ckpt), Progress: bar.update})
		bar.done()
		if err != nil {
			if ctx.Err() != nil {
				// Interrupted (SIGINT, SIGTERM): say how to go on, and exit 1.
				if serr := v.Head.Servable(path); serr != nil {
					return serr
				}
			}
			return err
		}
		g.Log.Info("volume imported", "volume", v.Head.VolumeID, "from", source, "bytes", st.Size(), "state", v.Head.State)
		fmt.Fprintln(stdout, v.Head.VolumeID)
		return nil
	case "export":
		to := fs.String("to", "", "raw file to write the plaintext to (written beside as TO.partial-*, renamed when complete)")
		if err := parse(fs, args, 1, "PATH"); err != nil {
			return err
		}
		if *to == "" {
			return errors.New("volume export: --to is required")
		}
		loc, err := locate(fs.Arg(0), ceph)
		if err != nil {
			return fmt.Errorf("volume export: %w", err)
		}
		v, err := volume.OpenAt(loc, true)
		if err != nil {
			return err
		}
		defer v.Close()
		if err := v.Head.Servable(fs.Arg(0)); err != nil {
			return fmt.Errorf("volume export: %w", err)
		}
		kms, closeKMS, err := openKMS(ctx, g)
		if err != nil {
			return fmt.Errorf("volume export: %w", err)
		}
		defer closeKMS()
		bar := newProgressBar(stderr, "export")
		err = v.ExportFile(ctx, kms, *to, bar.update)
		bar.done()
		return interrupted(ctx, err, "volume export: interrupted: "+*to+" was not written")
	}
	return fmt.Errorf("volume: unknown subcommand %q", sub)
}

// interrupted turns the error of a command stopped by a signal into one
// that says so: a bare context.Canceled would exit 0 without a word.
func interrupted(ctx context.Context, err error, msg string) error {
	if err != nil && ctx.Err() != nil && errors.Is(err, context.Canceled) {
		return errors.New(msg)
	}
	return err
}

// snapshotCommand runs `hemd snapshot create|copy`.
func snapshotCommand(ctx context.Context, g globalFlags, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return errors.New("usage: hemd snapshot create VOLUME SNAPSHOT | hemd snapshot create rbd:POOL/IMAGE [SNAPSHOT-ID] | hemd snapshot copy [--key KEY] SRC DST")
	}
	sub, args := args[0], args[1:]
	fs := flag.NewFlagSet("snapshot "+sub, flag.ContinueOnError)
	fs.SetOutput(stderr)
	id := fs.String("id", "", "snapshot id (default: a new snap- id)")
	var ceph cephSettings
	ceph.flags(fs)
	switch sub {
	case "create":
		control := fs.String("control", "", "control socket of the hemd serving VOLUME (default $HEMD_CONTROL, else "+defaultControlPath()+"): a served volume is snapshotted there, point in time")
		if len(args) > 0 && isRBD(args[0]) {
			return snapshotRBD(ctx, g, fs, ceph, args, *id, stdout)
		}
		if err := parse(fs, args, 2, "VOLUME SNAPSHOT"); err != nil {
			return err
		}
		online, release, err := snapshotThroughServer(ctx, g.Log, *control, fs.Arg(0), fs.Arg(1), *id, stdout)
		if online {
			return err
		}
		defer release() // offline, as below, with no writer meanwhile
		v, err := volume.Open(fs.Arg(0), true)
		if err != nil {
			return err
		}
		defer v.Close()
		s, err := v.Snapshot(ctx, fs.Arg(1), *id)
		if err != nil {
			return interrupted(ctx, err, "snapshot create: interrupted: "+fs.Arg(1)+" was not made")
		}
		defer s.Close()
		g.Log.Info("snapshot created", "snapshot", s.Head.VolumeID, "volume", v.Head.VolumeID, "key", s.Head.KeyID)
		fmt.Fprintln(stdout, s.Head.VolumeID)
		return nil
	case "copy":
		key := fs.String("key", "", "KMS key for the copy (default: the source's key)")
		if err := parse(fs, args, 2, "SRC DST"); err != nil {
			return err
		}
		src, err := locate(fs.Arg(0), ceph)
		if err != nil {
			return fmt.Errorf("snapshot copy: %w", err)
		}
		dst, err := locate(fs.Arg(1), ceph)
		if err != nil {
			return fmt.Errorf("snapshot copy: %w", err)
		}
		v, err := volume.OpenAt(src, true)
		if err != nil {
			return err
		}
		defer v.Close()
		kms, closeKMS, err := openKMS(ctx, g)
		if err != nil {
			return fmt.Errorf("snapshot copy: %w", err)
		}
		defer closeKMS()
		bar := newProgressBar(stderr, "copy")
		s, err := v.CopySnapshotTo(ctx, kms, dst, *key, *id, bar.update)
		bar.done()
		if err != nil {
			return interrupted(ctx, err, "snapshot copy: interrupted: "+fs.Arg(1)+" was not made")
		}
		s.Close()
		// On RBD the copy gets an RBD snapshot of its id, to clone volumes
		// from: it is named rbd:POOL/IMAGE@snap-….
		name, err := rbdSnapshotCopy(dst, s.Head.VolumeID)
		if err != nil {
			return fmt.Errorf("snapshot copy: %s holds snapshot %s, but: %w", fs.Arg(1), s.Head.VolumeID, err)
		}
		g.Log.Info("snapshot copied", "snapshot", s.Head.VolumeID, "from", v.Head.VolumeID, "key", s.Head.KeyID, "to", name)
		if isRBD(fs.Arg(1)) {
			fmt.Fprintln(stdout, name) // what volume create --snapshot takes
		} else {
			fmt.Fprintln(stdout, s.Head.VolumeID)
		}
		return nil
	}
	return fmt.Errorf("snapshot: unknown subcommand %q", sub)
}

// snapshotRBD runs hemd snapshot create rbd:POOL/IMAGE [SNAPSHOT]: an RBD
// snapshot named by the snapshot id (SNAPSHOT: rbd:POOL/IMAGE@snap-… or
// snap-…; default --id or a new id), point in time whether a hemd serves
// the volume or not, no data copied. It prints the snapshot's name,
// rbd:POOL/IMAGE@snap-…, what volume create --snapshot takes.
func snapshotRBD(ctx context.Context, g globalFlags, fs *flag.FlagSet, ceph cephSettings, args []string, idFlag string, stdout io.Writer) error {
	target := ""
	if err := parse(fs, args, 1, "rbd:POOL/IMAGE"); err != nil {
		if err2 := parse(fs, args, 2, "rbd:POOL/IMAGE [SNAPSHOT]"); err2 != nil {
			return err2
		}
		target = fs.Arg(1)
	}
	n, err := rbd.ParseName(fs.Arg(0))
	if err != nil {
		return fmt.Errorf("snapshot create: %w", err)
	}
	if n.Snap != "" {
		return fmt.Errorf("snapshot create: %s is a snapshot already", n)
	}
	snapID, err := rbdTarget(n, target, idFlag)
	if err != nil {
		return fmt.Errorf("snapshot create: %w", err)
	}
	sn, h, err := rbdSnapshot(ctx, n, ceph.cluster(), snapID)
	if err != nil {
		return fmt.Errorf("snapshot create: %w", err)
	}
	g.Log.Info("snapshot created", "snapshot", snapID, "volume", h.VolumeID, "name", sn.String(), "key", h.KeyID)
	fmt.Fprintln(stdout, sn.String())
	return nil
}

// parse parses flags anywhere among the arguments (hemd volume export PATH
// --to RAW) and wants exactly n positional arguments, left in fs.Args().
func parse(fs *flag.FlagSet, args []string, n int, names string) error {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return err
		}
		if fs.NArg() == 0 {
			break
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
	if len(pos) != n {
		return fmt.Errorf("%s: want %s, got %d argument(s)", fs.Name(), names, len(pos))
	}
	return fs.Parse(append([]string{"--"}, pos...))
}

// inspectJSON is the JSON of volume inspect: the header's own JSON
// (wrapped_dek in base64, state, operation), and for a volume that is not
// available whether its operation is still running.
type inspectJSON struct {
	*volume.Header
	Running *bool `json:"operation_running,omitempty"`
}

func printHeader(w io.Writer, v *volume.Volume, asJSON bool) error {
	h := v.Head
	running := !h.Available() && v.InUse()
	if asJSON {
		out := inspectJSON{Header: h}
		if !h.Available() {
			out.Running = &running
		}
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(out)
	}
	var ctx []string
	for k, v := range h.EncryptionContext {
		ctx = append(ctx, k+"="+v)
	}
	fmt.Fprintf(w, "volume id:          %s\nstate:              %s\nsize:               %d bytes\nblock size:         %d\ndata unit size:     %d\n"+
		"cipher:             %s\ndata offset:        %d\nkey id:             %s\nencryption context: %s\n"+
		"wrapped data key:   %d bytes\nparent snapshot:    %s\ncreated:            %s\n",
		h.VolumeID, h.State, h.SizeBytes, h.BlockSize, h.DataUnitSize, h.Cipher, h.DataOffset, h.KeyID,
		strings.Join(ctx, ","), len(h.WrappedDEK), orNone(h.ParentSnapshot), h.Created.Format(time.RFC3339))
	if op := h.Operation; op != nil {
		fmt.Fprintf(w, "operation:          %s from %s (%d bytes), started %s\n", op.Kind, op.Source, op.SourceSize, op.Started.Format(time.RFC3339))
		if op.Kind == volume.OpImport {
			fmt.Fprintf(w, "imported:           %d of %d bytes (%d %%) at the last checkpoint\n", op.Done, op.SourceSize, op.Percent())
		}
		if op.Error != "" {
			fmt.Fprintf(w, "failed:             %s\n", op.Error)
		}
		if running {
			fmt.Fprintln(w, "running:            yes (another process holds the volume)")
		} else {
			fmt.Fprintf(w, "running:            no\nnot served:         %v\n", h.Servable(v.Path()))
		}
	}
	return nil
}

func orNone(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// progressBar draws a progress bar on a terminal and nothing elsewhere.
type progressBar struct {
	w     io.Writer
	label string
	on    bool
	last  time.Time
}

func newProgressBar(w io.Writer, label string) *progressBar {
	return &progressBar{w: w, label: label, on: isTerminal(w)}
}

func (p *progressBar) update(done, total int64) {
	if !p.on || total <= 0 || (time.Since(p.last) < 100*time.Millisecond && done < total) {
		return
	}
	p.last = time.Now()
	const width = 40
	n := int(done * width / total)
	fmt.Fprintf(p.w, "\r%s [%s%s] %3d%% %d/%d MiB", p.label, strings.Repeat("#", n), strings.Repeat(" ", width-n),
		done*100/total, done>>20, total>>20)
}

func (p *progressBar) done() {
	if p.on {
		fmt.Fprintln(p.w)
	}
}
