package main

// Snapshots of attached volumes: hemd snapshot create asks the hemd that
// serves the volume (over its control socket), which takes a point-in-time
// copy while the guest keeps writing (storage.File.StartCOW: copy before
// write). A volume no hemd serves is copied offline, as before, under a
// shared lock that keeps a writer from starting meanwhile.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/hemd/hemd/hem/volume"
	"github.com/hemd/hemd/storage"
)

// snapshotRequest is the control op "snapshot".
type snapshotRequest struct {
	Op string `json:"op"`
	// Volume is the served volume: its path (absolute: the server runs
	// elsewhere) or its id.
	Volume string `json:"volume"`
	// Target is the snapshot file to create (absolute path); it must not
	// exist.
	Target     string `json:"target"`
	SnapshotID string `json:"snapshot_id,omitempty"` // default: a new snap- id
}

// snapshotAnswer is what the op "snapshot" answers when the snapshot is
// complete (its data and header synced).
type snapshotAnswer struct {
	SnapshotID string `json:"snapshot_id"`
	Volume     string `json:"volume"` // the volume's id
	Target     string `json:"target"`
	// PausedUS is how long the guest's writes were held back, in
	// microseconds: the wait for the writes in flight at the snapshot
	// point.
	PausedUS int64 `json:"paused_us"`
	// ChunkSize is the copy-before-write unit; CopiedOnWrite the chunks a
	// guest write copied before it went ahead (each delayed that write).
	ChunkSize     int64   `json:"chunk_size"`
	CopiedOnWrite int64   `json:"copied_on_write"`
	BytesWritten  int64   `json:"bytes_written"`
	Seconds       float64 `json:"seconds"` // until complete
}

// serveControl starts the control socket of hemd serve for the volumes in
// all: path as configured ("" for $HEMD_CONTROL or the default, "none" for
// no control socket). A default path another hemd serves is passed over
// with a warning (that hemd keeps it); a configured one is an error. stop
// ends the operations in progress and waits for them.
func serveControl(ctx context.Context, log *slog.Logger, path string, vs *volumeSet) (stop func(), err error) {
	path, explicit := controlPath(path)
	if path == controlNone {
		return func() {}, nil
	}
	srv, err := listenControl(path, log)
	if err != nil {
		if !explicit {
			log.Warn("no control socket: another hemd serves the default one; snapshots of this hemd's volumes cannot be point-in-time until it has one (--control, control_socket)",
				"socket", path, "err", err)
			return func() {}, nil
		}
		return nil, err
	}
	srv.handle("snapshot", func(ctx context.Context, raw json.RawMessage) (any, error) {
		var req snapshotRequest
		if err := decodeRequest(raw, &req); err != nil {
			return nil, err
		}
		return snapshotServed(ctx, log, vs.list(), req)
	})
	vs.handleOps(srv)
	log.Info("control socket", "socket", path)
	cctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.serve(cctx)
	}()
	return func() {
		cancel()
		<-done
	}, nil
}

// findServed returns the served volume that name (a path or an id) names.
func findServed(all []*served, name string) *served {
	fi, statErr := os.Stat(name)
	for _, s := range all {
		if s.cfg.ID == name || s.cfg.Path == name { // an RBD image is named as it is served: rbd:POOL/IMAGE
			return s
		}
		if statErr == nil {
			if sfi, err := s.store.Stat(); err == nil && os.SameFile(fi, sfi) {
				return s
			}
		}
	}
	return nil
}

// snapshotServed takes a point-in-time snapshot of a served volume.
func snapshotServed(ctx context.Context, log *slog.Logger, all []*served, req snapshotRequest) (*snapshotAnswer, error) {
	switch {
	case req.Volume == "":
		return nil, &controlError{codeBadRequest, errors.New("snapshot: no volume named")}
	case req.Target == "" || !filepath.IsAbs(req.Target):
		return nil, &controlError{codeBadRequest, fmt.Errorf("snapshot of %s: target %q is not an absolute path", req.Volume, req.Target)}
	}
	s := findServed(all, req.Volume)
	if s == nil {
		return nil, &controlError{codeNotServed, fmt.Errorf("volume %s is not served by this hemd (pid %d)", req.Volume, os.Getpid())}
	}
	id := s.cfg.ID
	h, err := volume.Read(s.store)
	if errors.Is(err, volume.ErrNotVolume) {
		return nil, fmt.Errorf("volume %s (%s) is a raw file without a hemd header: only hemd volumes have snapshots", id, s.cfg.Path)
	}
	if err != nil {
		return nil, fmt.Errorf("volume %s: %w", id, err)
	}
	// Only the hemd that writes the volume sees every write: not a live
	// migration's destination before the switchover, nor its source after.
	if s.lock != nil && !s.lock.Held() {
		return nil, fmt.Errorf("volume %s: this hemd does not hold it now (a live migration's destination before the switchover, or its source after): snapshot it through the hemd that runs it", id)
	}
	start := time.Now()
	snap, err := volume.NewSnapshotFile(h, s.cfg.Path, req.Target, req.SnapshotID)
	if err != nil {
		return nil, fmt.Errorf("snapshot of %s: %w", id, err)
	}
	snapID := snap.Head.VolumeID
	cow, err := s.store.StartCOW(int64(h.DataOffset), int64(h.SizeBytes), snap.DataWriter(), storage.COWOptions{DstZeroed: true})
	if err != nil {
		return nil, snap.Abandon(fmt.Errorf("snapshot %s of %s: %w", snapID, id, err))
	}
	err = cow.Run(ctx)
	if err == nil && s.lock != nil && !s.lock.Held() {
		err = errors.New("the volume was handed off to a live migration's destination during the snapshot, which may miss that host's writes: take it again there")
	}
	if err == nil {
		err = snap.Complete()
	}
	if err != nil {
		return nil, snap.Abandon(fmt.Errorf("snapshot %s of %s: %w", snapID, id, err))
	}
	snap.Close()
	st := cow.Stats()
	ans := &snapshotAnswer{
		SnapshotID: snapID, Volume: h.VolumeID, Target: req.Target,
		PausedUS: st.Paused.Microseconds(), ChunkSize: st.Chunk, CopiedOnWrite: st.CopiedByWrites,
		BytesWritten: st.Written, Seconds: time.Since(start).Seconds(),
	}
	log.Info("snapshot created", "snapshot", snapID, "volume", h.VolumeID, "path", req.Target, "online", true,
		"paused_us", ans.PausedUS, "copied_on_write", st.CopiedByWrites, "chunk", st.Chunk, "bytes", st.Written,
		"took", time.Since(start).Round(time.Millisecond))
	return ans, nil
}

// snapshotThroughServer runs hemd snapshot create VOL SNAP through the hemd
// that serves VOL, if one does (asked at the control socket: the flag,
// $HEMD_CONTROL or the default). served reports that it did (err says how
// it went). Otherwise the caller copies the volume offline, holding a
// shared lock on it until release: a hemd that writes the volume holds it
// exclusively, so the copy is refused (naming the holder) rather than torn,
// and no writer starts during the copy.
func snapshotThroughServer(ctx context.Context, log *slog.Logger, control, vol, target, id string, stdout io.Writer) (served bool, release func(), err error) {
	release = func() {}
	path, _ := controlPath(control)
	name := vol
	if abs, err := filepath.Abs(vol); err == nil {
		if _, serr := os.Stat(abs); serr == nil {
			name = abs
		}
	}
	absTarget, err := filepath.Abs(target)
	if err != nil {
		return true, release, fmt.Errorf("snapshot create: %w", err)
	}
	var ans snapshotAnswer
	var asked error
	if path != controlNone {
		asked = controlCall(ctx, path, snapshotRequest{Op: "snapshot", Volume: name, Target: absTarget, SnapshotID: id}, &ans)
		var ce *controlError
		switch {
		case asked == nil:
			log.Info("snapshot created", "snapshot", ans.SnapshotID, "volume", ans.Volume, "online", true,
				"paused_us", ans.PausedUS, "copied_on_write", ans.CopiedOnWrite, "control", path)
			fmt.Fprintln(stdout, ans.SnapshotID)
			return true, release, nil
		case errors.Is(asked, errNoControl), errors.As(asked, &ce) && ce.code == codeNotServed:
			// Not served there: offline.
		case ctx.Err() != nil:
			return true, release, interrupted(ctx, ctx.Err(), "snapshot create: interrupted: "+target+" was not made")
		default:
			return true, release, fmt.Errorf("snapshot create: %s (through the hemd at %s): %w", vol, path, asked)
		}
	}
	lk, err := storage.OpenLock(vol, storage.LockOptions{Shared: true, Log: log})
	if err != nil {
		return false, release, nil // the offline path says what is wrong with vol
	}
	if err := lk.TryAcquire(); err != nil {
		lk.Close()
		why := "no hemd answers at its control socket " + path
		if asked != nil && !errors.Is(asked, errNoControl) {
			why = "the hemd at control socket " + path + " does not serve it"
		}
		return true, release, fmt.Errorf("snapshot create: volume %s is %w, and %s: a copy now would not be a point in time; "+
			"run hemd snapshot create --control SOCKET with the control socket of the hemd that serves it", vol, err, why)
	}
	return false, func() { lk.Close() }, nil
}
