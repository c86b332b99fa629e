package main

// The volumes a hemd serve serves, which come and go while it runs: opened
// and started at start-up (the config) or by hemd volume attach, ended by
// hemd volume detach, by SIGHUP when the config no longer has them, and by
// shutdown. Every volume is served on its own goroutine with its own
// context, so that ending one touches no other.

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/hemd/hemd/hem/datakey"
	"github.com/hemd/hemd/hem/volume"
	"github.com/hemd/hemd/vhost"
)

// volumeSet is what a hemd serve serves.
type volumeSet struct {
	ctx context.Context // hemd serve's: its end ends every volume
	g   globalFlags
	log *slog.Logger
	mon *monitor

	mu   sync.Mutex
	vols []*served // in the order they were attached

	// change: one attach, detach or reload at a time.
	change sync.Mutex

	// cpus is shared by the queues of every volume: they share the CPUs
	// fairly (vhost.CPUShare).
	cpus *vhost.CPUShare

	kmsMu    sync.Mutex
	kms      volume.KMS
	closeKMS func()

	wg sync.WaitGroup // the volumes' serving goroutines
}

func newVolumeSet(ctx context.Context, g globalFlags, mon *monitor) *volumeSet {
	return &volumeSet{ctx: ctx, g: g, log: g.Log, mon: mon, closeKMS: func() {}, cpus: vhost.NewCPUShare(0)}
}

// kmsFor opens the KMS the first time an encrypted volume needs it.
func (vs *volumeSet) kmsFor() (volume.KMS, error) {
	vs.kmsMu.Lock()
	defer vs.kmsMu.Unlock()
	if vs.kms == nil {
		k, c, err := openKMS(vs.ctx, vs.g)
		if err != nil {
			return nil, err
		}
		vs.kms, vs.closeKMS = vs.mon.timeKMS(k), c
	}
	return vs.kms, nil
}

// list returns the volumes served now.
func (vs *volumeSet) list() []*served {
	vs.mu.Lock()
	defer vs.mu.Unlock()
	return append([]*served(nil), vs.vols...)
}

// find returns the served volume that name names: its id, its socket or
// its file (any path to it); nil if none.
func (vs *volumeSet) find(name string) *served {
	all := vs.list()
	if s := findServed(all, name); s != nil {
		return s
	}
	abs, err := filepath.Abs(name)
	if err != nil {
		return nil
	}
	for _, s := range all {
		if sock, err := filepath.Abs(s.cfg.Socket); err == nil && sock == abs {
			return s
		}
	}
	return nil
}

// errVolumeNotServed is the answer for a volume this hemd does not serve.
func errVolumeNotServed(name string) error {
	return &controlError{codeNotServed, fmt.Errorf("volume %s is not served by this hemd (pid %d)", name, os.Getpid())}
}

// open opens v (a volume not served yet) for serving; start starts it.
func (vs *volumeSet) open(ctx context.Context, v volumeConfig, origin string) (*served, error) {
	for _, s := range vs.list() {
		if sameSocket(s.cfg.Socket, v.Socket) {
			return nil, &controlError{codeExists, fmt.Errorf("volume %s: socket %s already serves volume %s", v.ID, v.Socket, s.cfg.ID)}
		}
		if o := findServed([]*served{s}, v.Path); o != nil {
			return nil, &controlError{codeExists, fmt.Errorf("volume %s (%s): already served on socket %s", s.cfg.ID, v.Path, s.cfg.Socket)}
		}
	}
	s, err := openServed(ctx, v, vs.log, vs.kmsFor)
	if err != nil {
		return nil, err
	}
	s.srv.CPUs = vs.cpus
	s.want, s.origin = v, origin
	return s, nil
}

func sameSocket(a, b string) bool {
	aa, err1 := filepath.Abs(a)
	bb, err2 := filepath.Abs(b)
	return err1 == nil && err2 == nil && aa == bb
}

// start serves an opened volume until it is detached or hemd stops.
func (vs *volumeSet) start(s *served) {
	ctx, cancel := context.WithCancel(vs.ctx)
	s.ctx, s.cancel, s.done, s.attached = ctx, cancel, make(chan struct{}), time.Now()
	s.srv.OnDisconnect = func() {
		if s.detachPending.Load() {
			go vs.detachWhenIdle(s)
		}
	}
	vs.mu.Lock()
	vs.vols = append(vs.vols, s)
	vs.mu.Unlock()
	vs.log.Info("serving", "socket", s.cfg.Socket, "volume", s.cfg.Path, "id", s.cfg.ID,
		"size", s.dev.Capacity(), "queues", s.cfg.Queues, "read_only", s.cfg.ReadOnly, "incoming", s.cfg.Incoming,
		"iops", s.cfg.IOPS, "throughput_mb_s", s.cfg.Throughput, "access", s.ln.Access(), "origin", s.origin)
	vs.wg.Add(1)
	go func() {
		defer vs.wg.Done()
		err := s.srv.Serve(ctx, s.ln)
		s.serveErr = err
		close(s.done)
		if err != nil && s.detaching.CompareAndSwap(false, true) {
			// The socket broke (accept failed): the volume can no longer
			// be reached; let go of it so it can be attached again.
			vs.log.Error("volume stopped serving", "volume", s.cfg.ID, "socket", s.cfg.Socket, "err", err)
			vs.remove(s)
			s.ops.Lock()
			s.ops.Unlock()
			s.close(vs.log)
		}
	}()
}

// remove takes s off the list.
func (vs *volumeSet) remove(s *served) {
	vs.mu.Lock()
	defer vs.mu.Unlock()
	for i, o := range vs.vols {
		if o == s {
			vs.vols = append(vs.vols[:i], vs.vols[i+1:]...)
			return
		}
	}
}

// acquire starts an operation on s (resize, modify, snapshot): false if s
// is on its way out. A detach waits for the operations running (and a
// forced one ends them through s.ctx).
func (s *served) acquire() bool {
	if s.detaching.Load() {
		return false
	}
	s.ops.RLock()
	if s.detaching.Load() {
		s.ops.RUnlock()
		return false
	}
	s.running.Add(1)
	return true
}

// release ends an operation begun with acquire.
func (s *served) release() {
	s.running.Add(-1)
	s.ops.RUnlock()
}

// opContext is ctx, ended also when s is detached.
func (s *served) opContext(ctx context.Context) (context.Context, context.CancelFunc) {
	octx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(s.ctx, cancel)
	return octx, func() { stop(); cancel() }
}

// keyAttached reports whether s's data key is unwrapped now.
func (s *served) keyAttached() bool {
	return s.keys != nil && s.keys.key.State() == datakey.Attached
}

// detachAnswer is what the op "detach" answers.
type detachAnswer struct {
	Volume string `json:"volume"`
	Socket string `json:"socket"`
	Path   string `json:"path"`
	// Forced: the front-end was connected and its session was ended.
	Forced bool `json:"forced"`
	// SessionEnded: a front-end session was ended (forced); KeyZeroized:
	// the volume's data key, unwrapped for it, was wiped.
	SessionEnded bool `json:"session_ended"`
	KeyZeroized  bool `json:"key_zeroized"`
}

// detach stops serving s (vs.change held). A volume whose front-end is
// connected is refused unless force, which ends the session: the guest
// loses the disk, its data key is zeroized.
func (vs *volumeSet) detach(s *served, force bool) (*detachAnswer, error) {
	id := s.cfg.ID
	connected := s.srv.Connected()
	if connected && !force {
		return nil, &controlError{codeInUse, fmt.Errorf("volume %s: its front-end is connected (socket %s): remove the disk from the VM first (QMP device_del and chardev-remove, virsh detach-device), "+
			"or detach --force, which ends the session: the guest loses the disk and its I/O fails", id, s.cfg.Socket)}
	}
	if n := s.running.Load(); n > 0 && !force {
		return nil, &controlError{codeBusy, fmt.Errorf("volume %s: %d operation(s) on it in progress (snapshot or resize): wait for them, or detach --force, which cancels them", id, n)}
	}
	if !s.detaching.CompareAndSwap(false, true) {
		return nil, errVolumeNotServed(id)
	}
	keyWas := s.keyAttached()
	vs.remove(s)
	s.cancel()
	<-s.done
	// Wait for the operations on s (a forced detach cancelled them), then
	// let in-coming ones see it is gone.
	s.ops.Lock()
	s.ops.Unlock() //nolint:staticcheck // an empty critical section: a barrier
	s.close(vs.log)
	ans := &detachAnswer{Volume: id, Socket: s.cfg.Socket, Path: s.cfg.Path, Forced: force && connected,
		SessionEnded: connected, KeyZeroized: keyWas && !s.keyAttached()}
	if connected {
		vs.log.Warn("event=detach-forced: the front-end's session was ended; the guest lost the disk", "volume", id,
			"socket", s.cfg.Socket, "key_zeroized", ans.KeyZeroized)
	}
	vs.log.Info("event=detached", "volume", id, "socket", s.cfg.Socket, "path", s.cfg.Path, "forced", ans.Forced, "origin", s.origin)
	return ans, nil
}

// detachWhenIdle detaches s, which the config no longer has, once its
// front-end is gone.
func (vs *volumeSet) detachWhenIdle(s *served) {
	vs.change.Lock()
	defer vs.change.Unlock()
	if !s.detachPending.Load() || s.detaching.Load() || s.srv.Connected() {
		return
	}
	if _, err := vs.detach(s, false); err != nil {
		vs.log.Error("pending detach failed", "volume", s.cfg.ID, "err", err)
		return
	}
	vs.log.Info("pending detach done: the front-end left", "volume", s.cfg.ID)
}

// stopAll ends every volume (hemd stops): the sessions end, in-flight
// requests complete, keys are zeroized, files flushed.
func (vs *volumeSet) stopAll() {
	vs.change.Lock()
	defer vs.change.Unlock()
	var mine []*served
	for _, s := range vs.list() {
		if s.detaching.CompareAndSwap(false, true) {
			s.cancel()
			mine = append(mine, s)
		}
	}
	vs.wg.Wait()
	for _, s := range mine {
		vs.remove(s)
		s.ops.Lock()
		s.ops.Unlock() //nolint:staticcheck // a barrier
		s.close(vs.log)
	}
	vs.log.Info("stopped", "volumes", len(mine))
}
