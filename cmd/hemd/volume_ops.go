package main

// hemd volume attach|detach|resize|modify: operations on the volumes of a
// running hemd serve, asked at its control socket (--control, else
// $HEMD_CONTROL, else the default). resize also grows a volume no hemd
// serves, offline, under the volume's lock.

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/hemd/hemd/hem/volume"
	"github.com/hemd/hemd/vhost/blk"
)

// volumeOps are the volume subcommands that talk to a running hemd serve,
// dispatched from volumeCommand.
var volumeOps = map[string]func(ctx context.Context, g globalFlags, args []string, stdout, stderr io.Writer) error{
	"attach": volumeAttachCommand,
	"detach": volumeDetachCommand,
	"resize": volumeResizeCommand,
	"modify": volumeModifyCommand,
}

// absIfExists makes a path that names an existing file absolute (the server
// runs in another directory); anything else (a volume id) is left alone.
func absIfExists(name string) string {
	if _, err := os.Stat(name); err == nil {
		if abs, err := filepath.Abs(name); err == nil {
			return abs
		}
	}
	return name
}

// askServer sends req to the hemd at the control socket and decodes its
// answer into ans; no hemd there is an error saying how to start one.
func askServer(ctx context.Context, control, what string, req, ans any) error {
	path, _ := controlPath(control)
	if path == controlNone {
		return fmt.Errorf("%s: no control socket (--control none)", what)
	}
	err := controlCall(ctx, path, req, ans)
	if errors.Is(err, errNoControl) {
		return fmt.Errorf("%s: no hemd serve answers at control socket %s (is it running? --control names another)", what, path)
	}
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}

// printJSON prints v indented.
func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func volumeAttachCommand(ctx context.Context, g globalFlags, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("volume attach", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var r attachRequest
	control := fs.String("control", "", "control socket of the hemd serve to attach the volume in")
	asJSON := fs.Bool("json", false, "print the answer as JSON")
	fs.StringVar(&r.Socket, "socket", "", "vhost-user socket to create for the volume")
	fs.StringVar(&r.Path, "volume", "", "the volume file or block device")
	fs.StringVar(&r.ID, "id", "", "serial the guest reads, for a raw file (default derived from the path)")
	fs.IntVar(&r.Queues, "queues", 0, fmt.Sprintf("most virtqueues offered (default %d)", blk.MaxQueues))
	fs.BoolVar(&r.ReadOnly, "read-only", false, "refuse writes")
	fs.BoolVar(&r.Discard, "discard", false, "let the guest discard (punch holes)")
	fs.BoolVar(&r.Direct, "direct", false, "O_DIRECT for aligned I/O")
	fs.StringVar(&r.IO, "io", "", "uring (default) or sync")
	bs := fs.Uint("block-size", 0, "logical block size of a raw file, 512 (default) or 4096")
	fs.BoolVar(&r.Incoming, "incoming", false, "the destination of a live migration")
	fs.Uint64Var(&r.IOPS, "iops", 0, "most reads and writes per second (0: unlimited)")
	fs.Uint64Var(&r.Throughput, "throughput", 0, "most MB/s read and written (0: unlimited)")
	fs.Uint64Var(&r.IOPSBurst, "iops-burst", 0, "IOPS bucket size (default a tenth of a second's worth)")
	fs.Uint64Var(&r.ThroughputBurst, "throughput-burst", 0, "throughput bucket size in MB (default a tenth of a second's worth)")
	fs.StringVar(&r.SocketOwner, "socket-owner", "", "owner of the socket")
	fs.StringVar(&r.SocketGroup, "socket-group", "", "group of the socket, e.g. libvirt-qemu")
	fs.StringVar(&r.SocketMode, "socket-mode", "", "mode of the socket, octal (default 0660 with a group, else 0600)")
	if err := parse(fs, args, 0, ""); err != nil {
		return err
	}
	if r.Socket == "" || r.Path == "" {
		return errors.New("volume attach: --socket and --volume are required")
	}
	r.BlockSize = uint32(*bs)
	var err error
	if r.Socket, err = filepath.Abs(r.Socket); err != nil {
		return fmt.Errorf("volume attach: %w", err)
	}
	if r.Path, err = filepath.Abs(r.Path); err != nil {
		return fmt.Errorf("volume attach: %w", err)
	}
	r.Op = "attach"
	var ans attachAnswer
	if err := askServer(ctx, *control, "volume attach "+r.Path, r, &ans); err != nil {
		return err
	}
	if *asJSON {
		return printJSON(stdout, ans)
	}
	kind := "plaintext (raw file)"
	if ans.Encrypted {
		kind = "encrypted"
	}
	fmt.Fprintf(stdout, "%s attached: %s, %s, on %s (%s)\n", ans.Volume, humanBytes(int64(ans.SizeBytes)), kind, ans.Socket, ans.Access)
	return nil
}

func volumeDetachCommand(ctx context.Context, g globalFlags, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("volume detach", flag.ContinueOnError)
	fs.SetOutput(stderr)
	control := fs.String("control", "", "control socket of the hemd serve that serves the volume")
	force := fs.Bool("force", false, "detach even while a front-end is connected: its session ends, the guest loses the disk, the data key is zeroized")
	asJSON := fs.Bool("json", false, "print the answer as JSON")
	if err := parse(fs, args, 1, "VOLUME|SOCKET"); err != nil {
		return err
	}
	name := absIfExists(fs.Arg(0))
	var ans detachAnswer
	if err := askServer(ctx, *control, "volume detach "+fs.Arg(0), volumeRequest{Op: "detach", Volume: name, Force: *force}, &ans); err != nil {
		return err
	}
	if *asJSON {
		return printJSON(stdout, ans)
	}
	fmt.Fprintf(stdout, "%s detached from %s\n", ans.Volume, ans.Socket)
	if ans.SessionEnded {
		z := ""
		if ans.KeyZeroized {
			z = "; its data key was zeroized"
		}
		fmt.Fprintf(stdout, "%s: the front-end was connected: its session was ended (--force), the guest lost the disk%s\n", ans.Volume, z)
	}
	return nil
}

// parseBytes parses a size: bytes, or with K, M, G, T (binary) and an
// optional B or iB; plus says it began with "+" (a growth).
func parseBytes(s string) (n uint64, plus bool, err error) {
	t := strings.TrimSpace(s)
	t, plus = strings.CutPrefix(t, "+")
	u := strings.ToUpper(t)
	u = strings.TrimSuffix(strings.TrimSuffix(u, "IB"), "B")
	mult := uint64(1)
	if u != "" {
		switch u[len(u)-1] {
		case 'K':
			mult = 1 << 10
		case 'M':
			mult = 1 << 20
		case 'G':
			mult = 1 << 30
		case 'T':
			mult = 1 << 40
		}
		if mult > 1 {
			u = u[:len(u)-1]
		}
	}
	v, perr := strconv.ParseUint(u, 10, 64)
	if perr != nil || v == 0 || v > (1<<62)/mult {
		return 0, false, fmt.Errorf("size %q: want a positive number of bytes, or with K, M, G or T (e.g. 20G, +1G)", s)
	}
	return v * mult, plus, nil
}

func volumeResizeCommand(ctx context.Context, g globalFlags, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("volume resize", flag.ContinueOnError)
	fs.SetOutput(stderr)
	control := fs.String("control", "", "control socket of the hemd serve that serves the volume (a volume it does not serve is grown offline)")
	sizeArg := fs.String("size", "", "new size (e.g. 20G), or +SIZE to grow by that much; a volume never shrinks")
	asJSON := fs.Bool("json", false, "print the answer as JSON")
	// A volume no hemd serves may be on RBD: these reach its cluster.
	var ceph cephSettings
	ceph.flags(fs)
	if err := parse(fs, args, 1, "VOLUME"); err != nil {
		return err
	}
	if *sizeArg == "" {
		return errors.New("volume resize: --size is required")
	}
	n, plus, err := parseBytes(*sizeArg)
	if err != nil {
		return fmt.Errorf("volume resize %s: %w", fs.Arg(0), err)
	}
	req := volumeRequest{Op: "resize", Volume: absIfExists(fs.Arg(0)), Size: n}
	if plus {
		req.Size, req.GrowBy = 0, n
	}
	var ans resizeAnswer
	path, _ := controlPath(*control)
	asked := errNoControl
	if path != controlNone {
		asked = controlCall(ctx, path, req, &ans)
	}
	var ce *controlError
	switch {
	case asked == nil:
	case errors.Is(asked, errNoControl) || errors.As(asked, &ce) && ce.code == codeNotServed:
		// No hemd serves it here: grow it offline.
		a, err := resizeOffline(ctx, g.Log, volumeConfig{Path: fs.Arg(0), cephSettings: ceph}, req, path, asked)
		if err != nil {
			return err
		}
		ans = *a
	default:
		return fmt.Errorf("volume resize %s (through the hemd at %s): %w", fs.Arg(0), path, asked)
	}
	if *asJSON {
		return printJSON(stdout, ans)
	}
	fmt.Fprintf(stdout, "%s: %s -> %s\n", ans.Volume, humanBytes(int64(ans.OldBytes)), humanBytes(int64(ans.NewBytes)))
	switch {
	case ans.GuestTold:
		fmt.Fprintf(stdout, "%s: the guest was told; it sees the new size now (grow its filesystem: resize2fs, xfs_growfs)\n", ans.Volume)
	case ans.Pending != "":
		fmt.Fprintf(stdout, "%s: resize pending: %s\n", ans.Volume, ans.Pending)
	case ans.Note != "":
		fmt.Fprintf(stdout, "%s: %s\n", ans.Volume, ans.Note)
	}
	return nil
}

// resizeOffline grows a volume no hemd serves (here), holding its lock: a
// hemd that writes it elsewhere makes it refuse, naming that hemd.
//
// The volume is a file or block device, or an RBD image (v.Path
// rbd:POOL/IMAGE, its cluster in v's ceph settings), held by its exclusive
// lock.
func resizeOffline(ctx context.Context, log *slog.Logger, v volumeConfig, req volumeRequest, control string, asked error) (*resizeAnswer, error) {
	name := v.Path
	st, lk, err := openBacking(ctx, v, "", log)
	if err != nil {
		return nil, fmt.Errorf("volume resize %s: %w", name, err)
	}
	defer lk.Close()
	defer st.Close() // flushed before the lock goes
	if err := lk.TryAcquire(); err != nil {
		why := "no hemd answers at control socket " + control
		if !errors.Is(asked, errNoControl) {
			why = "the hemd at control socket " + control + " does not serve it"
		}
		return nil, fmt.Errorf("volume resize %s: it is %w, and %s: resize it through the control socket of the hemd that serves it (--control)", name, err, why)
	}
	h, herr := volume.Read(st)
	switch {
	case herr == nil:
		size := req.Size
		if req.GrowBy != 0 {
			size = h.SizeBytes + req.GrowBy
		}
		old, nh, err := volume.Resize(headerFile{st}, size)
		if err != nil {
			return nil, fmt.Errorf("volume resize %s: %w", name, err)
		}
		log.Info("event=resized", "volume", nh.VolumeID, "old_bytes", old.SizeBytes, "new_bytes", nh.SizeBytes, "online", false)
		return &resizeAnswer{Volume: nh.VolumeID, OldBytes: old.SizeBytes, NewBytes: nh.SizeBytes,
			Note: "grown offline: no hemd serves it"}, nil
	case errors.Is(herr, volume.ErrNotVolume):
		old := uint64(st.Size())
		size := req.Size
		if req.GrowBy != 0 {
			size = old + req.GrowBy
		}
		switch {
		case size%512 != 0:
			return nil, fmt.Errorf("volume resize %s: size %d is not a multiple of 512", name, size)
		case size < old:
			return nil, fmt.Errorf("volume resize %s: %w: it has %d bytes, %d asked", name, volume.ErrShrink, old, size)
		}
		if err := st.Grow(int64(size)); err != nil {
			return nil, fmt.Errorf("volume resize %s: %w", name, err)
		}
		return &resizeAnswer{Volume: name, OldBytes: old, NewBytes: size, Note: "a raw file, grown offline: no hemd serves it"}, nil
	default:
		return nil, fmt.Errorf("volume resize %s: %w", name, herr)
	}
}

func volumeModifyCommand(ctx context.Context, g globalFlags, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("volume modify", flag.ContinueOnError)
	fs.SetOutput(stderr)
	control := fs.String("control", "", "control socket of the hemd serve that serves the volume")
	asJSON := fs.Bool("json", false, "print the answer as JSON")
	iops := fs.Uint64("iops", 0, "most reads and writes per second (0: unlimited)")
	tp := fs.Uint64("throughput", 0, "most MB/s read and written (0: unlimited)")
	ib := fs.Uint64("iops-burst", 0, "IOPS bucket size (default with --iops: a tenth of a second's worth)")
	tb := fs.Uint64("throughput-burst", 0, "throughput bucket size in MB (default with --throughput: a tenth of a second's worth)")
	if err := parse(fs, args, 1, "VOLUME"); err != nil {
		return err
	}
	req := volumeRequest{Op: "modify", Volume: absIfExists(fs.Arg(0))}
	fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "iops":
			req.IOPS = iops
		case "throughput":
			req.Throughput = tp
		case "iops-burst":
			req.IOPSBurst = ib
		case "throughput-burst":
			req.ThroughputBurst = tb
		}
	})
	if req.IOPS == nil && req.Throughput == nil && req.IOPSBurst == nil && req.ThroughputBurst == nil {
		return errors.New("volume modify: give --iops, --throughput, --iops-burst or --throughput-burst")
	}
	var ans limitsAnswer
	if err := askServer(ctx, *control, "volume modify "+fs.Arg(0), req, &ans); err != nil {
		return err
	}
	if *asJSON {
		return printJSON(stdout, ans)
	}
	fmt.Fprintf(stdout, "%s: %s\n", ans.Volume, describeLimits(ans.IOPS, ans.Throughput, ans.IOPSBurst, ans.ThroughputBurst))
	return nil
}

// describeLimits says what limits are in force.
func describeLimits(iops uint64, mbps float64, iopsBurst uint64, mbBurst float64) string {
	var parts []string
	if iops > 0 {
		parts = append(parts, fmt.Sprintf("%d IOPS (burst %d)", iops, iopsBurst))
	}
	if mbps > 0 {
		parts = append(parts, fmt.Sprintf("%g MB/s (burst %g MB)", mbps, mbBurst))
	}
	if len(parts) == 0 {
		return "unlimited"
	}
	return strings.Join(parts, ", ")
}
