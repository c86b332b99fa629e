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
	"sync"
	"sync/atomic"
	"syscall"
	"time"

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
	fs.StringVar(&v.Path, "volume", "", "backing file or block device, or rbd:POOL/IMAGE (Ceph RBD: see --ceph-*)")
	fs.StringVar(&v.ID, "id", "", "serial the guest reads (default derived from the path)")
	fs.IntVar(&v.Queues, "queues", blk.MaxQueues, "most virtqueues offered; QEMU uses one per vCPU unless num-queues says otherwise")
	fs.BoolVar(&v.ReadOnly, "read-only", false, "refuse writes (shares the volume with other read-only hemds, never with a writer)")
	fs.BoolVar(&v.Incoming, "incoming", false, "the destination of a live migration: serve the volume another hemd holds, and take it when that one hands it off at the switchover (waiting up to 30 s)")
	fs.BoolVar(&v.Discard, "discard", false, "let the guest discard (punch holes)")
	fs.BoolVar(&v.Direct, "direct", false, "use O_DIRECT for aligned I/O")
	fs.StringVar(&v.IO, "io", ioUring, "how I/O reaches the kernel: uring (a batch of requests per io_uring submission; sync where the kernel refuses io_uring) or sync (one preadv/pwritev per request)")
	bs := fs.Uint("block-size", 512, "logical block size, 512 or 4096")
	metricsAddr := fs.String("metrics", "", "serve Prometheus /metrics and /status on HOST:PORT or unix:PATH")
	control := fs.String("control", "", "control socket (attach, detach, resize, modify, snapshots of served volumes); default $HEMD_CONTROL, else "+defaultControlPath()+"; none for no control socket")
	fs.Uint64Var(&v.IOPS, "iops", 0, "most reads and writes per second, all queues together (0: unlimited)")
	fs.Uint64Var(&v.Throughput, "throughput", 0, "most MB/s (10^6 bytes) read and written (0: unlimited)")
	fs.Uint64Var(&v.IOPSBurst, "iops-burst", 0, "requests that may go at once after an idle spell (default: a tenth of a second's worth)")
	fs.Uint64Var(&v.ThroughputBurst, "throughput-burst", 0, "MB that may go at once after an idle spell (default: a tenth of a second's worth)")
	fs.StringVar(&v.SocketOwner, "socket-owner", "", "owner of the socket (default: hemd's user)")
	fs.StringVar(&v.SocketGroup, "socket-group", "", "group of the socket, e.g. libvirt-qemu (default: $"+socketGroupEnv+" if that group exists)")
	fs.StringVar(&v.SocketMode, "socket-mode", "", "mode of the socket, octal (default 0660 with a group, else 0600)")
	v.cephSettings.flags(fs) // --ceph-conf, --ceph-id, --ceph-keyring for an rbd:POOL/IMAGE volume (ceph.go)
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
	reload := ""
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
		reload = *cfgPath
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
	return serveVolumes(ctx, g, vols, *metricsAddr, *control, reload)
}

// served is one volume being served.
type served struct {
	cfg   volumeConfig
	io    string      // ioUring, or ioSync (asked for, or io_uring refused)
	store backing     // a file or block device, or an RBD image (ceph.go)
	lock  claim       // one writer (or several readers) at a time
	keys  *volumeKeys // nil for a raw (unencrypted) file
	ln    *vhost.Listener
	srv   *vhost.Server
	dev   *blk.Device
	// data is the store the device serves (the data area of an encrypted
	// volume): it grows with a resize.
	data interface{ Grow(int64) error }

	// want is the volume's settings as asked (config or attach), before
	// openServed filled in what the header says: what SIGHUP compares.
	want volumeConfig
	// ctx is the volume's serving context (ended by a detach).
	ctx context.Context
	// origin says who asked for the volume: originConfig (the config file,
	// which SIGHUP applies again) or originAttach (hemd volume attach).
	origin string
	// attached is when serving began.
	attached time.Time
	// cancel ends the volume's serving; done is closed once it ended.
	cancel context.CancelFunc
	done   chan struct{}
	// serveErr is why serving ended on its own (set before done closes).
	serveErr error

	// detaching: the volume is on its way out; no new operation starts on
	// it. ops guards the operations running on it (resize, modify,
	// snapshot): each holds it shared, a detach exclusively.
	detaching atomic.Bool
	ops       sync.RWMutex
	running   atomic.Int32 // operations holding ops
	// detachPending: the config file no longer has the volume, but its
	// front-end is connected; it is detached when the front-end leaves.
	detachPending atomic.Bool
	// resizePending says why the connected guest was not told of the last
	// resize, until a front-end connects anew (pendingSessions is the
	// session count then); nil when nothing is pending.
	resizePending   atomic.Pointer[string]
	pendingSessions atomic.Int64
	// change serializes resize and modify of this volume.
	change sync.Mutex
}

// Where a served volume came from.
const (
	originConfig = "config"
	originAttach = "attach"
)

// serveVolumes serves vols until ctx ends; the control socket (control,
// see serveControl) attaches, detaches, resizes and modifies volumes
// meanwhile, and with a config file (reload) SIGHUP applies its changes.
// Nothing is served unless every volume of vols opened. With metricsAddr,
// the metrics and status endpoint is served too.
func serveVolumes(ctx context.Context, g globalFlags, vols []volumeConfig, metricsAddr, control, reload string) error {
	log := g.Log
	mon := newMonitor()
	vs := newVolumeSet(ctx, g, mon)
	defer vs.closeKMS()
	// SIGHUP re-reads the config file; without one it is ignored (its
	// default action would end hemd and every VM's disk with it).
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	var opened []*served
	for _, v := range vols {
		s, err := vs.open(ctx, v, originConfig)
		if err != nil {
			for _, o := range opened {
				o.close(log)
			}
			return err
		}
		opened = append(opened, s)
	}
	for _, s := range opened {
		vs.start(s)
	}
	defer vs.stopAll()
	mon.vols = vs.list
	if metricsAddr != "" {
		stop, err := mon.serve(ctx, metricsAddr, log)
		if err != nil {
			return err
		}
		defer stop()
	}
	stopControl, err := serveControl(ctx, log, control, vs)
	if err != nil {
		return err
	}
	defer stopControl() // before the volumes close: operations in progress end first
	for {
		select {
		case <-ctx.Done():
			log.Info("stopping")
			return nil
		case <-hup:
			if reload == "" {
				log.Warn("SIGHUP ignored: hemd serve runs without a config file (--config) to read again")
				continue
			}
			vs.reload(ctx, reload)
		}
	}
}

func openServed(ctx context.Context, v volumeConfig, log *slog.Logger, kmsFor func() (volume.KMS, error)) (*served, error) {
	// One writer at a time: a second hemd is refused, naming the holder,
	// unless it is the destination of a live migration (Incoming), whose
	// device takes the lock when the source hands it off.
	sock, err := filepath.Abs(v.Socket) // for whoever is refused, in whatever directory
	if err != nil {
		sock = v.Socket
	}
	// A file or block device, or an RBD image (ceph.go).
	st, lock, err := openBacking(ctx, v, sock, log)
	if err != nil {
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
	s := &served{cfg: v, store: st, lock: lock, io: ioOf(st)}
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
		sec, err := section(st, int64(h.DataOffset), int64(h.SizeBytes))
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
	area := store // the volume's data, before batches wrap it
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
			if st, ok := bt.(interface {
				NewStream(depth int) (*storage.Stream, error)
			}); ok && streamIO(v) {
				store = blk.WithStreams(store, func(d int) (blk.Stream, error) {
					s, err := st.NewStream(d)
					if err != nil {
						return nil, err
					}
					return s, nil
				})
			}
		}
	}
	cfg := blk.Config{
		ID: s.cfg.ID, Store: store, BlockSize: s.cfg.BlockSize, ReadOnly: v.ReadOnly,
		Discard: v.Discard, Queues: v.Queues, Log: vl,
		Claim: lock, Incoming: v.Incoming, Limits: v.limits(),
		Remote: s.io == ioRBD,
	}
	if m, ok := mappedReads(st, area, v.Direct || s.io != ioUring, vl); ok {
		cfg.Mapped = m
	}
	if s.keys != nil {
		cfg.Keys = s.keys
	}
	if g, ok := dataStore(store).(interface{ Grow(int64) error }); ok {
		s.data = g
	}
	dev, err := blk.New(cfg)
	if err != nil {
		return fail(fmt.Errorf("volume %s: %w", s.cfg.ID, err))
	}
	lo, notes, err := v.listenOptions()
	if err != nil {
		return fail(fmt.Errorf("volume %s: %w", s.cfg.ID, err))
	}
	for _, n := range notes {
		vl.Warn(n)
	}
	ln, err := vhost.ListenWith(v.Socket, lo)
	if err != nil {
		return fail(fmt.Errorf("volume %s: %w", s.cfg.ID, err))
	}
	for _, w := range accessWarnings(v.Socket) {
		vl.Warn("front-ends may be refused", "socket", v.Socket, "why", w)
	}
	s.ln, s.dev = ln, dev
	s.srv = &vhost.Server{Device: dev, Log: vl, IdleWarn: idleWarn, IdleHint: ln.Access()}
	if s.io == ioRBD {
		// librbd's threads and, on a small host, the OSDs need the CPU
		// a queue would spin on; librbd completes I/O in hundreds of µs.
		s.srv.PollTime = -1
	}
	return s, nil
}

// idleWarn is how long a volume's socket may go without a front-end before
// hemd says so (QEMU logs a refused connect only in its own log).
const idleWarn = 30 * time.Second

// dataStore is the store under blk's batch wrapper: what grows.
func dataStore(st blk.Store) blk.Store {
	if u, ok := st.(interface{ Unwrap() blk.Store }); ok {
		return u.Unwrap()
	}
	return st
}

// close releases what an opened volume holds: its data key (zeroized), its
// socket, its file (flushed) and its lock.
func (s *served) close(log *slog.Logger) {
	if s.keys != nil {
		s.keys.Detach()
	}
	if s.ln != nil {
		s.ln.Close()
	}
	if err := s.store.Close(); err != nil {
		log.Error("close volume", "volume", s.cfg.ID, "path", s.cfg.Path, "err", err)
	}
	s.lock.Close() // after the flush in store.Close
}

// mappedReads maps a volume's file read-only so that large reads of pages in
// the page cache are served from it (blk.Config.Mapped): volumes read
// through the page cache (not --direct), with io_uring batches (off: not).
func mappedReads(st backing, area blk.Store, off bool, log *slog.Logger) (blk.MappedStore, bool) {
	f, ok := st.(*storage.File)
	m, ok2 := area.(blk.MappedStore)
	if !ok || !ok2 || off || os.Getenv("HEMD_MAPPED_READS") == "off" {
		return nil, false
	}
	if err := f.Map(); err != nil {
		log.Debug("reads not served from a mapping", "err", err)
		return nil, false
	}
	return m, true
}

// streamIO says whether a volume's queues stream (keep requests in flight,
// complete each as the kernel does) rather than serve batch by batch: with
// O_DIRECT, where a transfer waits for the disk and a batch would wait for
// its slowest. Through the page cache a read or write is a copy done at
// submission, and batches, which can hand large reads to kernel threads,
// serve it better (vhost/blk/PERFORMANCE.md).
func streamIO(v volumeConfig) bool { return v.Direct }
