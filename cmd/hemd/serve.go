package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"sync"

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
	fs.BoolVar(&v.ReadOnly, "read-only", false, "refuse writes")
	fs.BoolVar(&v.Discard, "discard", false, "let the guest discard (punch holes)")
	fs.BoolVar(&v.Direct, "direct", false, "use O_DIRECT for aligned I/O")
	bs := fs.Uint("block-size", 512, "logical block size, 512 or 4096")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: hemd serve --socket PATH --volume FILE [--queues N] [--read-only] ...\n       hemd serve --config FILE\n\nflags:")
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
	case *cfgPath != "":
		c, err := loadConfig(*cfgPath)
		if err != nil {
			return err
		}
		vols = c.Volumes
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
	return serveVolumes(ctx, g.Log, vols)
}

// served is one volume being served.
type served struct {
	cfg   volumeConfig
	store *storage.File
	ln    *vhost.Listener
	srv   *vhost.Server
}

// serveVolumes opens every volume and its socket, then serves them until ctx
// ends. Nothing is served unless every volume opened.
func serveVolumes(ctx context.Context, log *slog.Logger, vols []volumeConfig) error {
	var all []*served
	defer func() {
		for _, s := range all {
			if s.ln != nil {
				s.ln.Close()
			}
			if err := s.store.Close(); err != nil {
				log.Error("close volume", "path", s.cfg.Path, "err", err)
			}
		}
	}()
	for _, v := range vols {
		s, err := openServed(v, log)
		if err != nil {
			return err
		}
		all = append(all, s)
	}
	var wg sync.WaitGroup
	errs := make([]error, len(all))
	for i, s := range all {
		log.Info("serving", "socket", s.cfg.Socket, "volume", s.cfg.Path, "id", s.cfg.ID,
			"size", s.store.Size(), "queues", s.cfg.Queues, "read_only", s.cfg.ReadOnly)
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

func openServed(v volumeConfig, log *slog.Logger) (*served, error) {
	st, err := storage.Open(v.Path, storage.Options{ReadOnly: v.ReadOnly, Direct: v.Direct, Discard: v.Discard})
	if err != nil {
		return nil, fmt.Errorf("volume %s: %w", v.ID, err)
	}
	vl := log.With("volume", v.ID)
	dev, err := blk.New(blk.Config{
		ID: v.ID, Store: st, BlockSize: v.BlockSize, ReadOnly: v.ReadOnly,
		Discard: v.Discard, Queues: v.Queues, Log: vl,
	})
	if err != nil {
		st.Close()
		return nil, fmt.Errorf("volume %s: %w", v.ID, err)
	}
	ln, err := vhost.Listen(v.Socket)
	if err != nil {
		st.Close()
		return nil, fmt.Errorf("volume %s: %w", v.ID, err)
	}
	return &served{cfg: v, store: st, ln: ln, srv: &vhost.Server{Device: dev, Log: vl}}, nil
}
