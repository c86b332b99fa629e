package main

// Control ops on a running hemd serve's volumes: attach, detach, resize,
// modify and status (the control socket is control.go; snapshot is
// snapshot_online.go). Each names its volume by id, socket or file path;
// every error names the volume.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"

	"github.com/hemd/hemd/hem/volume"
	"github.com/hemd/hemd/vhost"
)

// attachRequest is the op "attach": a volume as a [[volume]] of the config
// says it, paths absolute.
type attachRequest struct {
	Op              string `json:"op"`
	Socket          string `json:"socket"`
	Path            string `json:"path"`
	ID              string `json:"id,omitempty"`
	Queues          int    `json:"queues,omitempty"`
	ReadOnly        bool   `json:"read_only,omitempty"`
	Discard         bool   `json:"discard,omitempty"`
	Direct          bool   `json:"direct,omitempty"`
	IO              string `json:"io,omitempty"`
	BlockSize       uint32 `json:"block_size,omitempty"`
	Incoming        bool   `json:"incoming,omitempty"`
	IOPS            uint64 `json:"iops,omitempty"`
	Throughput      uint64 `json:"throughput,omitempty"`
	IOPSBurst       uint64 `json:"iops_burst,omitempty"`
	ThroughputBurst uint64 `json:"throughput_burst,omitempty"`
	SocketOwner     string `json:"socket_owner,omitempty"`
	SocketGroup     string `json:"socket_group,omitempty"`
	SocketMode      string `json:"socket_mode,omitempty"`
}

func (r attachRequest) config() volumeConfig {
	return volumeConfig{
		Socket: r.Socket, Path: r.Path, ID: r.ID, Queues: r.Queues, ReadOnly: r.ReadOnly, Discard: r.Discard,
		Direct: r.Direct, IO: r.IO, BlockSize: r.BlockSize, Incoming: r.Incoming,
		volumeExtra: volumeExtra{IOPS: r.IOPS, Throughput: r.Throughput, IOPSBurst: r.IOPSBurst, ThroughputBurst: r.ThroughputBurst,
			SocketOwner: r.SocketOwner, SocketGroup: r.SocketGroup, SocketMode: r.SocketMode},
	}
}

// attachAnswer is what "attach" answers once the volume is served.
type attachAnswer struct {
	Volume    string `json:"volume"`
	Socket    string `json:"socket"`
	Path      string `json:"path"`
	SizeBytes uint64 `json:"size_bytes"`
	Encrypted bool   `json:"encrypted"`
	Access    string `json:"access"` // the socket's mode, owner and group
}

// volumeRequest names a volume: the ops detach, resize and modify.
type volumeRequest struct {
	Op     string `json:"op"`
	Volume string `json:"volume"` // id, socket or path (absolute)
	// Force (detach): end a connected front-end's session.
	Force bool `json:"force,omitempty"`
	// Size (resize): the new size in bytes; or GrowBy bytes more.
	Size   uint64 `json:"size,omitempty"`
	GrowBy uint64 `json:"grow_by,omitempty"`
	// Limits (modify): those given change; a rate given without its
	// burst gets the default burst.
	IOPS            *uint64 `json:"iops,omitempty"`
	Throughput      *uint64 `json:"throughput,omitempty"`
	IOPSBurst       *uint64 `json:"iops_burst,omitempty"`
	ThroughputBurst *uint64 `json:"throughput_burst,omitempty"`
}

// resizeAnswer is what "resize" answers.
type resizeAnswer struct {
	Volume   string `json:"volume"`
	OldBytes uint64 `json:"old_size_bytes"`
	NewBytes uint64 `json:"new_size_bytes"`
	// GuestTold: the front-end was told (CONFIG_CHANGE_MSG) and acknowledged.
	GuestTold bool `json:"guest_told"`
	// Pending says why the connected guest was not told: it sees the new
	// size when its disk is set up anew. Note is for a volume with no
	// front-end connected.
	Pending string `json:"pending,omitempty"`
	Note    string `json:"note,omitempty"`
}

// handleOps adds the volume ops to the control server, and guards the
// snapshot op so that a detach waits for (or, forced, cancels) a snapshot
// in progress.
func (vs *volumeSet) handleOps(srv *controlServer) {
	if h, ok := srv.handlers["snapshot"]; ok {
		srv.handle("snapshot", func(ctx context.Context, raw json.RawMessage) (any, error) {
			var req struct {
				Volume string `json:"volume"`
			}
			_ = json.Unmarshal(raw, &req)
			s := vs.find(req.Volume)
			if s == nil || !s.acquire() {
				return h(ctx, raw) // answers NotServed
			}
			defer s.release()
			octx, cancel := s.opContext(ctx)
			defer cancel()
			return h(octx, raw)
		})
	}
	srv.handle("attach", func(ctx context.Context, raw json.RawMessage) (any, error) {
		var req attachRequest
		if err := decodeRequest(raw, &req); err != nil {
			return nil, err
		}
		return vs.attach(ctx, req)
	})
	srv.handle("detach", func(ctx context.Context, raw json.RawMessage) (any, error) {
		var req volumeRequest
		if err := decodeRequest(raw, &req); err != nil {
			return nil, err
		}
		vs.change.Lock()
		defer vs.change.Unlock()
		s := vs.find(req.Volume)
		if s == nil {
			return nil, errVolumeNotServed(req.Volume)
		}
		return vs.detach(s, req.Force)
	})
	srv.handle("resize", func(ctx context.Context, raw json.RawMessage) (any, error) {
		var req volumeRequest
		if err := decodeRequest(raw, &req); err != nil {
			return nil, err
		}
		return vs.withVolume(ctx, req.Volume, func(ctx context.Context, s *served) (any, error) {
			return vs.resize(ctx, s, req)
		})
	})
	srv.handle("modify", func(ctx context.Context, raw json.RawMessage) (any, error) {
		var req volumeRequest
		if err := decodeRequest(raw, &req); err != nil {
			return nil, err
		}
		return vs.withVolume(ctx, req.Volume, func(ctx context.Context, s *served) (any, error) {
			return modify(s, req)
		})
	})
	srv.handle("status", func(ctx context.Context, raw json.RawMessage) (any, error) {
		return statusReply{Volumes: vs.status()}, nil
	})
}

// withVolume runs fn on the served volume name names, as an operation a
// detach waits for.
func (vs *volumeSet) withVolume(ctx context.Context, name string, fn func(context.Context, *served) (any, error)) (any, error) {
	if name == "" {
		return nil, &controlError{codeBadRequest, errors.New("no volume named")}
	}
	s := vs.find(name)
	if s == nil || !s.acquire() {
		return nil, errVolumeNotServed(name)
	}
	defer s.release()
	octx, cancel := s.opContext(ctx)
	defer cancel()
	return fn(octx, s)
}

// status returns every served volume's status.
func (vs *volumeSet) status() []volumeStatus {
	all := vs.list()
	out := make([]volumeStatus, 0, len(all))
	for _, s := range all {
		out = append(out, s.status())
	}
	return out
}

// attach opens and serves the volume req describes.
func (vs *volumeSet) attach(ctx context.Context, req attachRequest) (*attachAnswer, error) {
	switch {
	case req.Socket == "" || !filepath.IsAbs(req.Socket):
		return nil, &controlError{codeBadRequest, fmt.Errorf("attach %s: socket %q is not an absolute path", req.Path, req.Socket)}
	case req.Path == "" || !filepath.IsAbs(req.Path):
		return nil, &controlError{codeBadRequest, fmt.Errorf("attach: volume %q is not an absolute path", req.Path)}
	}
	v := req.config()
	if err := v.fill(); err != nil {
		return nil, &controlError{codeBadRequest, fmt.Errorf("attach %s: %w", req.Path, err)}
	}
	vs.change.Lock()
	defer vs.change.Unlock()
	// The serve context, not the request's: what the volume opens lives on.
	s, err := vs.open(vs.ctx, v, originAttach)
	if err != nil {
		return nil, err
	}
	vs.start(s)
	vs.log.Info("event=attached", "volume", s.cfg.ID, "socket", s.cfg.Socket, "path", s.cfg.Path)
	return &attachAnswer{Volume: s.cfg.ID, Socket: s.cfg.Socket, Path: s.cfg.Path, SizeBytes: s.dev.Capacity(),
		Encrypted: s.keys != nil, Access: s.ln.Access()}, nil
}

// headerStore is a volume's storage as its header is rewritten: a file or
// block device (*storage.File), or an RBD image.
type headerStore interface {
	io.ReaderAt
	io.WriterAt
	Flush() error
	Grow(size int64) error
}

// headerFile is a served volume's storage as volume.Resize writes its
// header: its Sync is the store's Flush.
type headerFile struct{ headerStore }

func (f headerFile) Sync() error { return f.Flush() }

// resize grows a served volume: its storage, then its header (both copies,
// each synced), then the device; then the front-end is told on the back-end
// channel so that the guest sees the new capacity.
func (vs *volumeSet) resize(ctx context.Context, s *served, req volumeRequest) (*resizeAnswer, error) {
	s.change.Lock()
	defer s.change.Unlock()
	id := s.cfg.ID
	old := s.dev.Capacity()
	size := req.Size
	switch {
	case req.Size != 0 && req.GrowBy != 0:
		return nil, &controlError{codeBadRequest, fmt.Errorf("resize %s: a size or a growth, not both", id)}
	case req.GrowBy != 0:
		size = old + req.GrowBy
	case req.Size == 0:
		return nil, &controlError{codeBadRequest, fmt.Errorf("resize %s: no size", id)}
	}
	switch {
	case s.cfg.ReadOnly:
		return nil, fmt.Errorf("volume %s: served read-only: a read-only hemd does not grow it; resize it through the hemd that writes it, or offline", id)
	case s.lock != nil && !s.lock.Held():
		return nil, fmt.Errorf("volume %s: this hemd does not hold it now (a live migration's destination before the switchover, or its source after): resize it through the hemd that runs it", id)
	case size < old:
		return nil, fmt.Errorf("volume %s: %w: it has %d bytes, %d asked; shrinking would cut off what the guest keeps at its end", id, volume.ErrShrink, old, size)
	case s.data == nil:
		return nil, fmt.Errorf("volume %s: its storage cannot grow", id)
	}
	if s.keys != nil {
		if _, nh, err := volume.Resize(headerFile{s.store}, size); err != nil {
			return nil, err
		} else if nh.SizeBytes != size {
			return nil, fmt.Errorf("volume %s: header says %d bytes after the resize to %d", id, nh.SizeBytes, size)
		}
	} else if size%uint64(s.cfg.BlockSize) != 0 {
		return nil, fmt.Errorf("volume %s: size %d is not a multiple of the block size %d", id, size, s.cfg.BlockSize)
	}
	if err := s.data.Grow(int64(size)); err != nil {
		return nil, fmt.Errorf("volume %s: %w", id, err)
	}
	if err := s.dev.Resize(size); err != nil {
		return nil, err
	}
	ans := &resizeAnswer{Volume: id, OldBytes: old, NewBytes: size}
	if size == old {
		ans.Note = "the volume already had that size"
		return ans, nil
	}
	sessions := s.srv.Sessions.Load()
	err := s.srv.NotifyConfigChange(ctx)
	switch {
	case err == nil:
		ans.GuestTold = true
		s.resizePending.Store(nil)
	case errors.Is(err, vhost.ErrNoFrontEnd):
		ans.Note = "no front-end is connected: the next one reads the new size when it sets the disk up"
		s.resizePending.Store(nil)
	default:
		why := fmt.Sprintf("the guest was not told: %v; it sees the new size when its disk is set up anew", err)
		ans.Pending = why
		s.pendingSessions.Store(sessions)
		s.resizePending.Store(&why)
	}
	vs.log.Info("event=resized", "volume", id, "old_bytes", old, "new_bytes", size, "guest_told", ans.GuestTold, "pending", ans.Pending)
	return ans, nil
}

// pending returns why the last resize is not seen by the guest yet, "" if
// it is (or no front-end was connected): a front-end session begun since
// sets the disk up with the new size.
func (s *served) pending() string {
	p := s.resizePending.Load()
	if p == nil {
		return ""
	}
	if s.srv.Sessions.Load() > s.pendingSessions.Load() {
		s.resizePending.CompareAndSwap(p, nil)
		return ""
	}
	return *p
}

// modify changes a served volume's performance limits at once.
func modify(s *served, req volumeRequest) (*limitsAnswer, error) {
	s.change.Lock()
	defer s.change.Unlock()
	if req.IOPS == nil && req.Throughput == nil && req.IOPSBurst == nil && req.ThroughputBurst == nil {
		return nil, &controlError{codeBadRequest, fmt.Errorf("modify %s: no limit given (iops, throughput, iops_burst, throughput_burst)", s.cfg.ID)}
	}
	const most = 1 << 40 / bytesPerMB
	for _, v := range []*uint64{req.Throughput, req.ThroughputBurst} {
		if v != nil && *v > most {
			return nil, &controlError{codeBadRequest, fmt.Errorf("modify %s: %d MB/s out of range (at most %d)", s.cfg.ID, *v, most)}
		}
	}
	l := s.dev.Limits()
	if req.IOPS != nil {
		l.IOPS, l.IOPSBurst = *req.IOPS, 0
	}
	if req.Throughput != nil {
		l.BPS, l.BPSBurst = *req.Throughput*bytesPerMB, 0
	}
	if req.IOPSBurst != nil {
		l.IOPSBurst = *req.IOPSBurst
	}
	if req.ThroughputBurst != nil {
		l.BPSBurst = *req.ThroughputBurst * bytesPerMB
	}
	if err := s.dev.SetLimits(l); err != nil {
		return nil, &controlError{codeBadRequest, err}
	}
	return limitsOf(s), nil
}

// limitsAnswer is what "modify" answers: the limits now in force.
type limitsAnswer struct {
	Volume          string  `json:"volume"`
	IOPS            uint64  `json:"iops"`
	Throughput      float64 `json:"throughput"` // MB/s
	IOPSBurst       uint64  `json:"iops_burst"`
	ThroughputBurst float64 `json:"throughput_burst"` // MB
}

// limitsOf returns the limits in force on s.
func limitsOf(s *served) *limitsAnswer {
	l := s.dev.Limits()
	return &limitsAnswer{Volume: s.cfg.ID, IOPS: l.IOPS, Throughput: float64(l.BPS) / bytesPerMB,
		IOPSBurst: l.IOPSBurst, ThroughputBurst: float64(l.BPSBurst) / bytesPerMB}
}
