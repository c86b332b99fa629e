package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"

	"github.com/hemd/hemd/hem/volume"
	"github.com/hemd/hemd/storage"
	"github.com/hemd/hemd/vhost"
	"github.com/hemd/hemd/vhost/blk"
)

func serveCommand(ctx context.Context, g globalFlags, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var v volumeConfig
	cfgPath := fs.String("config", "", "TOML config file with one [[volume]] per served volume")
	fs.StringVar(&v.Socket, "socket", "", "vhost-user socket path to create")
	fs.StringVar(&v.Path, "volume", "", "backing file or block device")
	fs.StringVar(&v.ID, "id", "", "serial the guest reads (default derived from the path)")
	fs.IntVar(&v.Queues, "queues", blk.MaxQueues, "most virtqueues offered; QEMU uses one per vCPU unless num-queues says otherwise")
	fs.BoolVar(&v.ReadOnly, "read-only", false, "refuse writes (shares the volume with other read-only hemds, never with a writer)")
	fs.BoolVar(&v.Incoming, "incoming", false, "the destination of a live migration: serve the volume another hemd holds, and take it when that one hands it off at the switchover (waiting up to 30 s)")
	fs.BoolVar(&v.Discard, "discard", false, "let the guest discard (punch holes)")
	fs.BoolVar(&v.Direct, "direct", false, "use O_DIRECT for aligned I/O")
	fs.StringVar(&v.IO, "io", ioUring, "how I/O reaches the kernel: uring (a batch of requests per io_uring submission; sync where the kernel refuses io_uring) or sync (one preadv/pwritev per request)")
	bs := fs.Uint("block-size", 512, "logical block size, 512 or 4096")
	metricsAddr := fs.String("metrics", "", "serve Prometheus /metrics and /status on HOST:PORT or unix:PATH")
	control := fs.String("control", "", "control socket (snapshots of served volumes); default $HEMD_CONTROL, else "+defaultControlPath()+"; none for no control socket")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: hemd serve --socket PATH --volume FILE [--queues N] [--read-only] [--incoming] ...\n       hemd serve --config FILE\n\nflags:")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("serve: unexpected argument %q", fs.Arg(0))
	}
	var vols []volumeConfig
	switch {
	case *cfgPath != "" && (v.Socket != "" || v.Path != ""):
		return errors.New("serve: --config and --socket/--volume exclude each other")
	case *cfgPath != "" && *metricsAddr != "":
		return errors.New("serve: with --config, set metrics in the file")
	case *cfgPath != "":
		c, err := loadConfig(*cfgPath)
		if err != nil {
			return err
		}
		vols = c.Volumes
		g.KMS = c.KMS
		*metricsAddr = c.Metrics
		if *control == "" {
			*control = c.ControlSocket
		}
		if c.StateDir != "" && os.Getenv("HEMD_STATE_DIR") == "" {
			g.StateDir = c.StateDir
		}
	default:
		if v.Socket == "" || v.Path == "" {
			fs.Usage()
			return errors.New("serve: --socket and --volume are required")
		}
		v.BlockSize = uint32(*bs)
		if err := v.fill(); err != nil {
			return fmt.Errorf("serve: %w", err)
		}
		vols = []volumeConfig{v}
	}
	return serveVolumes(ctx, g, vols, *metricsAddr, *control)
}

// served is one volume being served.
type served struct {
	cfg   volumeConfig
	io    string // ioUring, or ioSync (asked for, or io_uring refused)
	store *storage.File
	lock  *storage.Lock // one writer (or several readers) at a time
	keys  *volumeKeys   // nil for a raw (unencrypted) file
	ln    *vhost.Listener
	srv   *vhost.Server
	dev   *blk.Device
}

// serveVolumes opens every volume and its socket, then serves them until ctx
// ends. Nothing is served unless every volume opened. With metricsAddr, the
// metrics and status endpoint is served too; control is the control socket
// (serveControl).
func serveVolumes(ctx context.Context, g globalFlags, vols []volumeConfig, metricsAddr, control string) error {
	log := g.Log
	mon := newMonitor()
	var all []*served
	var kms volume.KMS
	closeKMS := func() {}
	defer func() { closeKMS() }()
	defer func() {
		for _, s := range all {
			if s.keys != nil {
				s.keys.Detach() // zeroize whatever a session left attached
			}
			if s.ln != nil {
				s.ln.Close()
			}
			if err := s.store.Close(); err != nil {
				log.Error("close volume", "path", s.cfg.Path, "err", err)
			}
			s.lock.Close() // after the flush in store.Close
		}
	}()
	for _, v := range vols {
		s, err := openServed(ctx, v, log, func() (volume.KMS, error) {
			if kms == nil {
				k, c, err := openKMS(ctx, g)
				if err != nil {
					return nil, err
				}
				kms, closeKMS = mon.timeKMS(k), c
			}
			return kms, nil
		})
		if err != nil {
			return err
		}
		all = append(all, s)
	}
	mon.vols = all
	if metricsAddr != "" {
		stop, err := mon.serve(ctx, metricsAddr, log)
		if err != nil {
			return err
		}
		defer stop()
	}
	stopControl, err := serveControl(ctx, log, control, all)
	if err != nil {
		return err
	}
	defer stopControl() // before the volumes close: snapshots in progress end first
	var wg sync.WaitGroup
	errs := make([]error, len(all))
	for i, s := range all {
		log.Info("serving", "socket", s.cfg.Socket, "volume", s.cfg.Path, "id", s.cfg.ID,
			"size", s.store.Size(), "queues", s.cfg.Queues, "read_only", s.cfg.ReadOnly, "incoming", s.cfg.Incoming)
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = s.srv.Serve(ctx, s.ln)
		}()
	}
	wg.Wait()
	log.Info("stopped")
	return errors.Join(errs...)
}

func openServed(ctx context.Context, v volumeConfig, log *slog.Logger, kmsFor func() (volume.KMS, error)) (*served, error) {
	st, err := storage.Open(v.Path, storage.Options{ReadOnly: v.ReadOnly, Direct: v.Direct, Discard: v.Discard})
	if err != nil {
		return nil, fmt.Errorf("volume %s: %w", v.Path, err)
	}
	// One writer at a time: a second hemd is refused, naming the holder,
	// unless it is the destination of a live migration (Incoming), whose
	// device takes the lock when the source hands it off.
	sock, err := filepath.Abs(v.Socket) // for whoever is refused, in whatever directory
	if err != nil {
		sock = v.Socket
	}
	lock, err := st.NewLock(storage.LockOptions{Shared: v.ReadOnly, Socket: sock, Log: log})
	if err != nil {
		st.Close()
		return nil, fmt.Errorf("volume %s: %w", v.Path, err)
	}
	fail := func(err error) (*served, error) {
		st.Close()
		lock.Close()
		return nil, err
	}
	if !v.Incoming {
		if err := lock.TryAcquire(); err != nil {
			hint := "one writer at a time: only a live migration's destination (hemd serve --incoming) may open it now"
			if v.ReadOnly {
				hint = "read-only hemds share a volume, but not with a writer"
			}
			return fail(fmt.Errorf("volume %s: %w; %s", v.Path, err, hint))
		}
	}
	s := &served{cfg: v, store: st, lock: lock, io: ioSync}
	var store blk.Store = st
	h, herr := volume.Read(st)
	switch {
	case herr == nil:
		if err := h.Servable(v.Path); err != nil { // creating or error: half made
			return fail(err)
		}
		// An encrypted volume: the guest sees the data area, through XTS.
		if v.ID != "" && v.ID != defaultVolumeID(v.Path) && v.ID != h.VolumeID {
			return fail(fmt.Errorf("volume %s: config says id %s", h.VolumeID, v.ID))
		}
		s.cfg.ID, s.cfg.BlockSize = h.VolumeID, h.BlockSize
		sec, err := storage.NewSection(st, int64(h.DataOffset), int64(h.SizeBytes))
		if err != nil {
			return fail(fmt.Errorf("volume %s: %w", h.VolumeID, err))
		}
		store = sec
		kms, err := kmsFor()
		if err != nil {
			return fail(fmt.Errorf("volume %s: %w", h.VolumeID, err))
		}
		s.keys = newVolumeKeys(h, kms, log)
	case errors.Is(herr, volume.ErrNotVolume):
		log.Warn("serving a raw file unencrypted: it has no hemd volume header", "path", v.Path)
	default:
		return fail(fmt.Errorf("volume %s: %w", v.Path, herr))
	}
	vl := log.With("volume", s.cfg.ID)
	if bt, ok := store.(interface {
		NewBatch(depth int, sync bool) *storage.Batch
	}); ok && v.IO == ioUring {
		if b := bt.NewBatch(1, false); !b.Uring() {
			vl.Warn("io_uring refused by the kernel: one system call per request", "err", b.Why())
			b.Close()
		} else {
			b.Close()
			store = blk.WithBatches(store, func(d int) blk.Batch { return bt.NewBatch(d, false) })
			s.io = ioUring
		}
	}
	cfg := blk.Config{
		ID: s.cfg.ID, Store: store, BlockSize: s.cfg.BlockSize, ReadOnly: v.ReadOnly,
		Discard: v.Discard, Queues: v.Queues, Log: vl,
		Claim: lock, Incoming: v.Incoming,
	}
	if s.keys != nil {
		cfg.Keys = s.keys
	}
	dev, err := blk.New(cfg)
	if err != nil {
		return fail(fmt.Errorf("volume %s: %w", s.cfg.ID, err))
	}
	ln, err := vhost.Listen(v.Socket)
	if err != nil {
		return fail(fmt.Errorf("volume %s: %w", s.cfg.ID, err))
	}
	s.ln, s.srv, s.dev = ln, &vhost.Server{Device: dev, Log: vl}, dev
	return s, nil
}
