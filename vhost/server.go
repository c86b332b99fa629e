// Package vhost is the back-end side of the vhost-user protocol: it serves one
// virtio device over a unix socket to a front-end such as QEMU, maps the
// guest's memory, and runs one goroutine per virtqueue that hands descriptor
// chains to the device.
package vhost

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hemd/hemd/hem/shield"
	"github.com/hemd/hemd/vhost/guestmem"
	"github.com/hemd/hemd/vhost/virtq"
	"golang.org/x/sys/unix"
)

// Device is a virtio device served over vhost-user.
type Device interface {
	// Features returns the virtio feature bits the device offers, transport
	// bits (VERSION_1, INDIRECT_DESC, EVENT_IDX) included.
	Features() uint64
	// Config returns the device configuration space.
	Config() []byte
	// SetConfig writes data at offset in the configuration space.
	SetConfig(offset uint32, data []byte) error
	// MaxQueues returns the most queues the device serves.
	MaxQueues() int
	// Start is called when the front-end starts the device: before the first
	// ring runs, with the negotiated features. An error keeps every ring
	// stopped.
	Start(ctx context.Context, features uint64) error
	// Stop is called when the last ring stops, on reset, and when the
	// front-end goes away. In-flight requests have completed by then.
	Stop()
	// Handler returns the request handler of queue i. It is called each time
	// the queue starts and used by that queue's goroutine only.
	Handler(i int) Handler
}

// Checker is a Device that can refuse a front-end before it sees the device:
// Check runs once per session, before the first GET_CONFIG is answered. An
// error ends the session, and QEMU then fails to realize the device (the
// guest never sees the disk).
type Checker interface {
	Check(ctx context.Context) error
}

// HandOffer is a Device that lets go of its backing store when a live
// migration's switchover stops it (every ring stopped while VHOST_F_LOG_ALL
// is on), so that the destination's back-end can take it over. HandOff is
// called right after Stop; a later Start (a failed migration: the source
// runs again) takes the store back or fails closed.
type HandOffer interface {
	HandOff()
}

// Interrupter is a Device whose handlers may wait for something other than
// I/O (a throttled queue waits for its tokens): Interrupt(i) is called right
// before queue i's goroutine is asked to stop, so that a handler waiting
// ends its wait and the stop is not held up by it.
type Interrupter interface {
	Interrupt(queue int)
}

// Handler serves the requests of one queue.
type Handler interface {
	// Handle serves one chain and returns how many bytes it wrote into it.
	Handle(c *virtq.Chain) uint32
}

// BatchHandler is a Handler that serves the chains of one avail batch
// together (one system call for all their I/O, say). The runner uses it when
// a handler has it; it may also implement io.Closer, called when the ring
// stops.
type BatchHandler interface {
	Handler
	// HandleBatch serves cs and sets written[i] to the bytes written into
	// cs[i]. Every chain is complete when it returns.
	HandleBatch(cs []*virtq.Chain, written []uint32)
}

// EarlyBatchHandler is a BatchHandler that completes a batch in parts: it
// calls done(n) once the first n chains are complete (written set; n grows
// from one call to the next), and the runner puts them on the used ring at
// once, so that the driver refills the ring while the rest is served.
type EarlyBatchHandler interface {
	BatchHandler
	HandleBatchEarly(cs []*virtq.Chain, written []uint32, done func(n int))
}

// StreamHandler is a Handler that keeps many requests in flight and
// completes each as its storage finishes it, in any order (a split virtqueue
// allows used entries out of order): the runner hands it chains while it has
// room and reaps completions in between, so the ring is never held up by the
// slowest request of a batch. It may also implement io.Closer, called when
// the ring stops, after every chain was completed.
type StreamHandler interface {
	Handler
	// Streaming reports whether the handler streams on this start of its
	// queue (it asks its storage); false: the runner serves chains as a
	// BatchHandler or one by one.
	Streaming() bool
	// Room reports whether Start may be called now.
	Room() bool
	// Start takes c: the handler owns it until it passes it to complete,
	// maybe before Start returns.
	Start(c *virtq.Chain, complete func(c *virtq.Chain, written uint32))
	// Submit hands the started requests to storage without waiting.
	Submit()
	// Reap passes every finished chain to complete. With wait it first
	// waits until one is finished, unless none is in flight.
	Reap(wait bool, complete func(c *virtq.Chain, written uint32))
	// InFlight returns how many chains the handler holds.
	InFlight() int
	// Ready reports whether Reap would complete a chain now.
	Ready() bool
	// Sleep waits until a request in flight finishes or an fd of fds is
	// readable, passes the finished chains to complete, and sets ready[i]
	// for each fd found readable (it reads none). The runner sleeps there
	// on its stop and kick fds.
	Sleep(fds []int, ready []bool, complete func(c *virtq.Chain, written uint32))
}

// Server serves a Device to one front-end at a time over a Listener.
type Server struct {
	Device Device
	Log    *slog.Logger
	// Sessions counts front-end connections served so far.
	Sessions atomic.Int64
	// Resubmitted counts requests served again after a restart: taken by a
	// previous back-end process, never completed (inflight tracking).
	Resubmitted atomic.Int64
	// MessageTimeout bounds the time from a message's first byte to its
	// last (DefaultMessageTimeout if zero); a connection that overruns it
	// is closed. A connection may idle between messages.
	MessageTimeout time.Duration
	// IdleWarn, if set, is how long after Serve starts a socket no
	// front-end has connected to is logged as such, once, with IdleHint
	// (who may connect, say): a QEMU that cannot connect (permission
	// denied) says so only in its own log.
	IdleWarn time.Duration
	IdleHint string
	// PollTime is how long a queue's goroutine, having served all it found,
	// keeps looking at the ring before it asks the driver for a kick and
	// sleeps (as QEMU's iothreads poll, poll-max-ns): a request that comes
	// meanwhile costs neither side a system call. Zero is DefaultPollTime;
	// negative turns polling off.
	PollTime time.Duration
	// CPUs is shared by the queues of every Server of the process (one per
	// volume), so that they share the CPUs fairly; nil gives this Server a
	// share of its own, of GOMAXPROCS CPUs.
	CPUs *CPUShare
	// OnDisconnect, if set, is called after each front-end session ended.
	OnDisconnect func()

	mu  sync.Mutex
	cur *session // the session being served, nil if none
}

// Connected reports whether a front-end is connected now.
func (s *Server) Connected() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cur != nil
}

// NotifyConfigChange tells the connected front-end that the device's config
// space changed (a volume grew), on the back-end channel, and waits for its
// answer when REPLY_ACK was negotiated. The error says why the guest could
// not be told: ErrNoFrontEnd, ErrNoBackendChannel, ErrNotStarted (sent
// anyway: QEMU drops it), or the channel's failure.
func (s *Server) NotifyConfigChange(ctx context.Context) error {
	s.mu.Lock()
	ss := s.cur
	s.mu.Unlock()
	if ss == nil {
		return ErrNoFrontEnd
	}
	if ss.proto.Load()&(ProtoBackendReq|ProtoConfig) != ProtoBackendReq|ProtoConfig {
		return ErrNoBackendChannel
	}
	ack := ss.proto.Load()&ProtoReplyAck != 0
	if err := ss.backend.send(ctx, BackendConfigChange, ack); err != nil {
		return err
	}
	if !ss.running.Load() {
		return ErrNotStarted
	}
	return nil
}

// Serve accepts front-ends until ctx is done. A second front-end that connects
// while one is served is turned away; after a front-end leaves the next one
// is served. Serve returns nil when ctx ends it.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	log := s.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cpus := s.CPUs
	if cpus == nil {
		cpus = NewCPUShare(0)
	}
	var (
		wg     sync.WaitGroup
		slot   = make(chan struct{}, 1) // held by the session being served
		accErr = make(chan error, 1)
	)
	go func() {
		<-ctx.Done()
		ln.Close()
	}()
	if s.IdleWarn > 0 {
		t := time.AfterFunc(s.IdleWarn, func() {
			if s.Sessions.Load() == 0 && ctx.Err() == nil {
				log.Warn("no front-end has connected", "since", s.IdleWarn, "access", s.IdleHint)
			}
		})
		defer t.Stop()
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			accErr <- err
			break
		}
		uc, ok := c.(*net.UnixConn)
		if !ok {
			c.Close()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			// A front-end that reconnects may arrive while its old session
			// still drains: wait for it a little before turning one away.
			t := time.NewTimer(handoverWait)
			defer t.Stop()
			select {
			case slot <- struct{}{}:
			case <-t.C:
				log.Warn("front-end refused: another one is connected")
				uc.Close()
				return
			case <-ctx.Done():
				uc.Close()
				return
			}
			defer func() { <-slot }()
			n := s.Sessions.Add(1)
			sl := log.With("session", n)
			sl.Info("front-end connected")
			ss := newSession(s.Device, uc, sl, s.MessageTimeout)
			ss.resubmitted = &s.Resubmitted
			ss.pollTime = s.PollTime
			if ss.pollTime == 0 {
				ss.pollTime = DefaultPollTime
			}
			ss.cpus = cpus
			s.mu.Lock()
			s.cur = ss
			s.mu.Unlock()
			err := ss.serve(ctx)
			s.mu.Lock()
			s.cur = nil
			s.mu.Unlock()
			switch {
			case err != nil && ctx.Err() == nil:
				sl.Warn("front-end session ended", "err", err)
			case ctx.Err() != nil:
				sl.Info("front-end session ended: the volume is detached or hemd stops")
			default:
				sl.Info("front-end disconnected")
			}
			if s.OnDisconnect != nil {
				s.OnDisconnect()
			}
		}()
	}
	err := <-accErr
	wg.Wait()
	if ctx.Err() != nil {
		return nil
	}
	return fmt.Errorf("accept: %w", err)
}

// handoverWait is how long a new front-end waits for the current session to
// end before it is refused.
const handoverWait = 3 * time.Second

// protocolFeatures are the vhost-user protocol features offered.
const protocolFeatures = ProtoMQ | ProtoLogShmfd | ProtoReplyAck | ProtoConfig |
	ProtoInflightShmfd | ProtoResetDevice | ProtoConfigureMemSlots | ProtoBackendReq

// vring is the back-end's state of one queue.
type vring struct {
	num     uint16
	addr    vringAddr
	addrSet bool
	base    uint16
	kick    int // -1: none; polling when kickSet
	call    int // -1: none
	errFd   int
	kickSet bool // SET_VRING_KICK received: the ring is started
	enabled bool
	q       *virtq.Queue // live ring state while started
	run     *runner
	// iq tracks the ring's requests in the inflight region; resubmit holds
	// what a previous back-end left in flight, served first at start.
	iq       *inflightQueue
	resubmit []uint16
}

// session is one front-end connection. Its fields are touched only by the
// session goroutine; each running queue has its own goroutine (runner).
type session struct {
	dev     Device
	c       *conn
	raw     *net.UnixConn
	log     *slog.Logger
	ctx     context.Context
	offered uint64

	owner    bool
	features uint64
	// proto is written by the session goroutine only, and read by
	// NotifyConfigChange too.
	proto   atomic.Uint64
	mem     *guestmem.Table
	rings   []*vring
	started bool // Device.Start succeeded
	// running mirrors started for other goroutines (NotifyConfigChange).
	running atomic.Bool
	checked bool // Checker.Check passed
	// backend is the back-end channel (SET_BACKEND_REQ_FD).
	backend  *backendChannel
	fatal    chan error
	dlog     dirtyLog
	inflight *inflightArea
	// resubmitted counts requests served again (Server.Resubmitted).
	resubmitted *atomic.Int64
	pollTime    time.Duration // Server.PollTime, its default filled in
	cpus        *CPUShare     // Server.CPUs, its default filled in
}

func newSession(dev Device, c *net.UnixConn, log *slog.Logger, whole time.Duration) *session {
	s := &session{
		dev:     dev,
		c:       newConn(c, whole),
		raw:     c,
		log:     log,
		offered: dev.Features() | FeatProtocolFeatures | FeatLogAll,
		fatal:   make(chan error, 1),
		backend: newBackendChannel(),

		resubmitted: new(atomic.Int64),
	}
	s.rings = make([]*vring, dev.MaxQueues())
	for i := range s.rings {
		s.rings[i] = &vring{kick: -1, call: -1, errFd: -1}
	}
	return s
}

// serve runs the session until the front-end goes away, ctx ends, a message
// is broken or a ring is corrupt.
func (s *session) serve(ctx context.Context) (err error) {
	s.ctx = ctx
	stop := context.AfterFunc(ctx, func() { s.raw.Close() })
	defer stop()
	defer s.teardown()
	// A fault on shared memory, here or in a queue's goroutine, ends this
	// session only; the mappings are named before teardown unmaps them.
	defer func() {
		if fe := (*FaultError)(nil); errors.As(err, &fe) {
			s.describeFault(fe)
			s.log.Error("front-end shrank shared memory under hemd: session ended",
				"region", fe.Region, "addr", fmt.Sprintf("%#x", fe.Addr), "where", fe.Where)
		}
	}()
	return guarded("control", s.loop)
}

// loop reads and handles messages until the session ends.
func (s *session) loop() error {
	for {
		m, err := s.c.read()
		if err != nil {
			if m != nil {
				closeFds(m.fds)
			}
			select {
			case ferr := <-s.fatal:
				return ferr
			default:
			}
			if errors.Is(err, net.ErrClosed) || errors.Is(err, errClosed) || isEOF(err) {
				return nil
			}
			return err
		}
		if err := s.handle(m); err != nil {
			return fmt.Errorf("%s: %w", m.Request, err)
		}
	}
}

func isEOF(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, unix.ECONNRESET)
}

// handle is the pipeline of one message: size and fds checked, dispatched,
// acknowledged when the front-end asked for it. An error ends the session.
func (s *session) handle(m *message) error {
	s.log.Debug("request", "req", m.Request, "size", m.Size, "fds", len(m.fds))
	defer closeFds(m.fds) // handlers that keep an fd set its slot to -1
	err := m.check()
	var reply []byte
	if err == nil {
		reply, err = s.dispatch(m)
	}
	if reply != nil && err == nil {
		return s.c.reply(m.Request, reply)
	}
	if m.needReply() && s.proto.Load()&ProtoReplyAck != 0 && !hasReply(m.Request) {
		status := uint64(0)
		if err != nil {
			status = 1
		}
		if rerr := s.c.reply(m.Request, u64(status)); rerr != nil && err == nil {
			err = rerr
		}
	}
	return err
}

// hasReply reports whether the request has a reply of its own.
func hasReply(r Request) bool {
	switch r {
	case ReqGetFeatures, ReqGetProtocolFeatures, ReqGetVringBase, ReqGetQueueNum,
		ReqGetConfig, ReqGetMaxMemSlots, ReqGetInflightFd, ReqGetStatus, ReqSetLogBase:
		return true
	}
	return false
}

func (s *session) ring(idx uint32) (*vring, int, error) {
	if idx >= uint32(len(s.rings)) {
		return nil, 0, fmt.Errorf("%w: %d, device has %d", ErrQueueIndex, idx, len(s.rings))
	}
	return s.rings[idx], int(idx), nil
}

func (s *session) dispatch(m *message) ([]byte, error) {
	switch m.Request {
	case ReqGetFeatures:
		return u64(s.offered), nil
	case ReqSetFeatures:
		f := m.u64()
		if f&^s.offered != 0 {
			return nil, fmt.Errorf("%w: %#x", ErrFeatures, f&^s.offered)
		}
		if on := f&FeatLogAll != 0; on != (s.features&FeatLogAll != 0) {
			if on {
				s.log.Info("dirty logging started")
			} else {
				s.log.Info("dirty logging stopped")
			}
		}
		s.features = f
		s.dlog.setLogAll(f&FeatLogAll != 0)
		return nil, nil
	case ReqGetProtocolFeatures:
		return u64(protocolFeatures), nil
	case ReqSetProtocolFeatures:
		f := m.u64()
		if f&^uint64(protocolFeatures) != 0 {
			return nil, fmt.Errorf("%w: protocol %#x", ErrFeatures, f&^uint64(protocolFeatures))
		}
		s.proto.Store(f)
		return nil, nil
	case ReqSetBackendReqFd:
		// QEMU sends it before SET_OWNER (vhost_user_backend_init).
		if s.proto.Load()&ProtoBackendReq == 0 {
			return nil, fmt.Errorf("%w: BACKEND_REQ not negotiated", ErrUnknownRequest)
		}
		s.backend.set(m.fds[0])
		m.fds[0] = -1
		return nil, nil
	case ReqSetOwner:
		s.owner = true
		return nil, nil
	case ReqResetOwner, ReqResetDevice:
		s.reset()
		return nil, nil
	case ReqGetQueueNum:
		return u64(uint64(len(s.rings))), nil
	case ReqGetMaxMemSlots:
		return u64(guestmem.MaxRegions), nil
	case ReqGetConfig:
		c, err := m.config()
		if err != nil {
			return nil, err
		}
		if ch, ok := s.dev.(Checker); ok && !s.checked {
			if err := ch.Check(s.ctx); err != nil {
				return nil, fmt.Errorf("device refused: %w", err)
			}
			s.checked = true
		}
		cfg := s.dev.Config()
		c.Data = make([]byte, c.Size)
		if int(c.Offset) < len(cfg) {
			copy(c.Data, cfg[c.Offset:])
		}
		return c.encode(), nil
	case ReqSetConfig:
		c, err := m.config()
		if err != nil {
			return nil, err
		}
		return nil, s.dev.SetConfig(c.Offset, c.Data)
	}
	if !s.owner {
		return nil, ErrNotOwner
	}
	switch m.Request {
	case ReqSetMemTable:
		regions, err := m.memTable()
		if err != nil {
			return nil, err
		}
		t, err := guestmem.NewTable(regions, m.fds)
		if err != nil {
			return nil, err
		}
		return nil, s.swapMem(t, s.mem.Unmap)
	case ReqAddMemReg:
		t, err := s.mem.With(decodeRegion(m.payload[8:]), m.fds[0])
		if err != nil {
			return nil, err
		}
		return nil, s.swapMem(t, func() {})
	case ReqRemMemReg:
		t, unmap, err := s.mem.Without(decodeRegion(m.payload[8:]))
		if err != nil {
			return nil, err
		}
		return nil, s.swapMem(t, unmap)
	case ReqSetLogBase:
		if s.proto.Load()&ProtoLogShmfd == 0 {
			return nil, fmt.Errorf("%w: LOG_SHMFD not negotiated", ErrUnknownRequest)
		}
		size, off := m.u64(), binary.LittleEndian.Uint64(m.payload[8:])
		if err := s.dlog.set(m.fds[0], size, off); err != nil {
			return nil, err
		}
		s.log.Info("dirty log set", "bytes", size, "logging", s.dlog.on.Load())
		return u64(0), nil
	case ReqSetLogFd:
		// An eventfd to tell the front-end the log changed: QEMU reads the
		// log when it syncs, so nothing is signalled.
		return nil, nil
	case ReqGetInflightFd:
		return nil, s.getInflight(m)
	case ReqSetInflightFd:
		return nil, s.setInflight(m)
	case ReqSetVringNum:
		st := m.vringState()
		r, _, err := s.ring(st.Index)
		if err != nil {
			return nil, err
		}
		if r.kickSet {
			return nil, ErrRingRunning
		}
		if st.Num == 0 || st.Num&(st.Num-1) != 0 || st.Num > virtq.MaxSize {
			return nil, fmt.Errorf("%w: %d", virtq.ErrBadSize, st.Num)
		}
		r.num = uint16(st.Num)
		return nil, nil
	case ReqSetVringBase:
		st := m.vringState()
		r, _, err := s.ring(st.Index)
		if err != nil {
			return nil, err
		}
		if r.kickSet {
			return nil, ErrRingRunning
		}
		if st.Num > 0xffff {
			return nil, fmt.Errorf("%w: base %d", ErrPayloadSize, st.Num)
		}
		r.base = uint16(st.Num)
		return nil, nil
	case ReqSetVringAddr:
		a := m.vringAddr()
		r, i, err := s.ring(a.Index)
		if err != nil {
			return nil, err
		}
		r.addr, r.addrSet = a, true
		if r.q != nil {
			return nil, s.paused(i, func() error { return r.q.Rebind(s.mem, a.Addrs) })
		}
		return nil, s.maybeStart(i)
	case ReqGetVringBase:
		st := m.vringState()
		r, i, err := s.ring(st.Index)
		if err != nil {
			return nil, err
		}
		s.stopRing(i)
		return vringState{Index: st.Index, Num: uint32(r.base)}.encode(), nil
	case ReqSetVringKick, ReqSetVringCall, ReqSetVringErr:
		return nil, s.setVringFd(m)
	case ReqSetVringEnable:
		st := m.vringState()
		r, i, err := s.ring(st.Index)
		if err != nil {
			return nil, err
		}
		if st.Num > 1 {
			return nil, fmt.Errorf("%w: enable %d", ErrPayloadSize, st.Num)
		}
		r.enabled = st.Num == 1
		if !r.enabled {
			s.pause(i)
			return nil, nil
		}
		return nil, s.maybeStart(i)
	}
	return nil, ErrUnknownRequest
}

func (s *session) setVringFd(m *message) error {
	v := m.u64()
	if v&^uint64(vringIndexMask|vringNoFd) != 0 {
		return fmt.Errorf("%w: vring fd payload %#x", ErrPayloadSize, v)
	}
	r, i, err := s.ring(uint32(v & vringIndexMask))
	if err != nil {
		return err
	}
	fd := -1
	if v&vringNoFd == 0 {
		if len(m.fds) != 1 {
			return fmt.Errorf("%w: no fd and no polling bit", ErrFdCount)
		}
		// hemd writes call fds from a queue's goroutine and from the
		// session's: a pipe the front-end keeps full would block them.
		if !isEventfd(m.fds[0]) {
			return fmt.Errorf("%w: %v fd of queue %d is not an eventfd", ErrFdKind, m.Request, i)
		}
		// Nor may an eventfd whose counter the front-end filled block a
		// write (QEMU's own are non-blocking already).
		if err := unix.SetNonblock(m.fds[0], true); err != nil {
			return fmt.Errorf("%v fd of queue %d: %w", m.Request, i, err)
		}
		fd, m.fds[0] = m.fds[0], -1
	} else if len(m.fds) != 0 {
		return fmt.Errorf("%w: fd sent with the no-fd bit", ErrFdCount)
	}
	var slot *int
	switch m.Request {
	case ReqSetVringKick:
		slot = &r.kick
	case ReqSetVringCall:
		slot = &r.call
	default:
		slot = &r.errFd
	}
	swap := func() error {
		if *slot >= 0 {
			unix.Close(*slot)
		}
		*slot = fd
		return nil
	}
	if m.Request == ReqSetVringErr {
		return swap()
	}
	if err := s.paused(i, swap); err != nil {
		return err
	}
	if m.Request == ReqSetVringCall && fd >= 0 && r.q != nil {
		// The ring ran before this fd came (QEMU enables a ring, then
		// unmasks its interrupt with a new call fd): what it completed
		// meanwhile went to the old fd, or to none. An extra interrupt
		// makes the driver look at its used ring.
		signal(fd)
	}
	if m.Request == ReqSetVringKick {
		r.kickSet = true
		if s.features&FeatProtocolFeatures == 0 {
			r.enabled = true
		}
		return s.maybeStart(i)
	}
	return nil
}

// isEventfd reports whether fd is an eventfd (the kind the protocol's
// kick, call and error fds are).
func isEventfd(fd int) bool {
	var buf [32]byte
	n, err := unix.Readlink("/proc/self/fd/"+strconv.Itoa(fd), buf[:])
	return err == nil && string(buf[:n]) == "anon_inode:[eventfd]"
}

// swapMem installs a new memory table; release frees the old one once no
// ring uses it.
func (s *session) swapMem(t *guestmem.Table, release func()) error {
	for i, r := range s.rings {
		if r.run != nil {
			s.pause(i)
		}
	}
	s.mem = t
	release()
	var err error
	for i, r := range s.rings {
		if r.q != nil {
			if rerr := r.q.Rebind(t, r.addr.Addrs); rerr != nil && err == nil {
				err = fmt.Errorf("queue %d: %w", i, rerr)
			}
		}
	}
	if err != nil {
		return err
	}
	// Every ring that can run now does: those paused for the swap, and
	// those kicked and enabled before the first table arrived.
	return s.startReady()
}

// startReady starts every ring that is kicked, enabled and fully described
// but not running. A front-end may send a ring's description in any order;
// the ring starts once the last piece arrives.
func (s *session) startReady() error {
	for i := range s.rings {
		if err := s.maybeStart(i); err != nil {
			return err
		}
	}
	return nil
}

// paused runs fn with ring i's goroutine stopped, then restarts it.
func (s *session) paused(i int, fn func() error) error {
	if s.rings[i].run == nil {
		return fn()
	}
	s.pause(i)
	if err := fn(); err != nil {
		return err
	}
	return s.maybeStart(i)
}

// maybeStart starts ring i's goroutine if the ring is started, enabled and
// fully described.
func (s *session) maybeStart(i int) error {
	r := s.rings[i]
	if r.run != nil || !r.kickSet || !r.enabled || !r.addrSet || r.num == 0 || s.mem == nil {
		return nil
	}
	fresh := r.q == nil
	if r.q == nil {
		q, err := virtq.New(s.mem, r.num, r.addr.Addrs, r.base,
			s.features&FeatEventIdx != 0, s.features&FeatIndirectDesc != 0)
		if err != nil {
			return fmt.Errorf("queue %d: %w", i, err)
		}
		// The used index lives in guest memory: after a back-end restart
		// it is ahead of nothing we remember.
		q.SyncUsed()
		if err := s.recoverInflight(i, r, q); err != nil {
			return fmt.Errorf("queue %d: %w", i, err)
		}
		r.q = q
	}
	if !s.started {
		var err error
		shield.Run(func() { err = s.dev.Start(s.ctx, s.features) })
		if err != nil {
			// Fail closed: the ring stays stopped and the guest gets no I/O.
			s.log.Error("device start failed; rings stay stopped", "queue", i, "err", err)
			return nil
		}
		s.started = true
		s.running.Store(true)
	}
	io := ringIO{
		idx: i, kick: r.kick, call: r.call,
		dlog: &s.dlog, logUsed: r.addr.Flags&vringFLog != 0, usedGPA: r.addr.Log,
		inflight: r.iq, resubmit: r.resubmit, poll: max(s.pollTime, 0), cpus: s.cpus,
	}
	run, err := startRunner(r.q, s.dev.Handler(i), io, s.log, s.onFatal)
	if err != nil {
		return fmt.Errorf("queue %d: %w", i, err)
	}
	r.run = run
	r.resubmit = nil
	if fresh && r.call >= 0 {
		// The interrupt for completions published just before the ring
		// last stopped may have been lost with the front-end that stopped
		// it (the source of a migration, a QEMU that reconnects): the
		// driver would then wait for them forever. An extra interrupt only
		// makes it look at its used ring.
		signal(r.call)
	}
	return nil
}

// onFatal is called from a runner whose ring is corrupt: the session ends.
func (s *session) onFatal(err error) {
	select {
	case s.fatal <- err:
	default:
	}
	s.raw.Close()
}

// pause stops ring i's goroutine after its in-flight requests completed.
func (s *session) pause(i int) {
	if r := s.rings[i]; r.run != nil {
		if in, ok := s.dev.(Interrupter); ok {
			in.Interrupt(i)
		}
		r.run.stopAndWait()
		r.run = nil
	}
}

// stopRing stops ring i for GET_VRING_BASE: its goroutine ends, its next
// available index becomes its base, and the device stops when no ring is
// left started.
func (s *session) stopRing(i int) {
	r := s.rings[i]
	s.pause(i)
	if r.q != nil {
		r.base = r.q.LastAvail()
		s.log.Debug("ring stopped", "queue", i, "last_avail", r.base, "used_idx", r.q.UsedIdx(),
			"dirty_marks_outside_log", s.dlog.outside.Load())
		r.q = nil
	}
	r.kickSet = false
	r.iq = nil
	if r.kick >= 0 {
		unix.Close(r.kick)
		r.kick = -1
	}
	s.maybeStopDevice()
}

func (s *session) maybeStopDevice() {
	if !s.started {
		return
	}
	for _, r := range s.rings {
		if r.kickSet {
			return
		}
	}
	s.started = false
	s.running.Store(false)
	s.dev.Stop()
	if h, ok := s.dev.(HandOffer); ok && s.features&FeatLogAll != 0 {
		s.log.Info("rings stopped while dirty logging: migration switchover, volume handed off")
		h.HandOff()
	}
}

// reset returns every ring and the negotiated features to their initial
// state (RESET_OWNER, RESET_DEVICE). Ownership and protocol features stay.
func (s *session) reset() {
	for i, r := range s.rings {
		s.pause(i)
		for _, fd := range []int{r.kick, r.call, r.errFd} {
			if fd >= 0 {
				unix.Close(fd)
			}
		}
		s.rings[i] = &vring{kick: -1, call: -1, errFd: -1}
	}
	if s.started {
		s.started = false
		s.running.Store(false)
		s.dev.Stop()
	}
	s.features = 0
}

func (s *session) teardown() {
	s.reset()
	s.backend.close()
	s.dlog.close()
	s.inflight.unmap()
	s.inflight = nil
	s.mem.Unmap()
	s.mem = nil
	s.raw.Close()
}

// vringFLog is VHOST_VRING_F_LOG in SET_VRING_ADDR's flags: log used-ring
// writes at the ring's log address.
const vringFLog = 1

// getInflight answers GET_INFLIGHT_FD with a new zeroed region.
func (s *session) getInflight(m *message) error {
	if s.proto.Load()&ProtoInflightShmfd == 0 {
		return fmt.Errorf("%w: INFLIGHT_SHMFD not negotiated", ErrUnknownRequest)
	}
	in := m.inflight()
	if int(in.NumQueues) > len(s.rings) {
		return fmt.Errorf("%w: %d queues, device has %d", ErrInflight, in.NumQueues, len(s.rings))
	}
	a, fd, err := newInflightArea(in.NumQueues, in.QueueSize)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	in.MmapSize, in.MmapOffset = uint64(len(a.mapping)), 0
	if err := s.c.replyFds(m.Request, in.encode(), []int{fd}); err != nil {
		a.unmap()
		return err
	}
	s.useInflight(a)
	s.log.Info("inflight region created", "queues", in.NumQueues, "queue_size", in.QueueSize, "bytes", in.MmapSize)
	return nil
}

// setInflight maps the region the front-end kept (SET_INFLIGHT_FD): after a
// restart it holds what the previous back-end left in flight.
func (s *session) setInflight(m *message) error {
	if s.proto.Load()&ProtoInflightShmfd == 0 {
		return fmt.Errorf("%w: INFLIGHT_SHMFD not negotiated", ErrUnknownRequest)
	}
	in := m.inflight()
	if int(in.NumQueues) > len(s.rings) {
		return fmt.Errorf("%w: %d queues, device has %d", ErrInflight, in.NumQueues, len(s.rings))
	}
	a, err := mapInflight(m.fds[0], in.MmapSize, in.MmapOffset, in.NumQueues, in.QueueSize)
	if err != nil {
		return err
	}
	s.useInflight(a)
	return nil
}

// useInflight makes a the session's inflight region. Rings already running
// keep tracking in the old one until they restart.
func (s *session) useInflight(a *inflightArea) {
	for i, r := range s.rings {
		if r.q != nil {
			s.log.Warn("inflight region refused: a ring runs", "queue", i)
			a.unmap()
			return
		}
	}
	s.inflight.unmap()
	s.inflight = a
}

// recoverInflight attaches ring i to its inflight region when it starts: it
// settles the previous process's last batch, queues what it left in flight
// for resubmission and takes new requests after them.
func (s *session) recoverInflight(i int, r *vring, q *virtq.Queue) error {
	r.iq, r.resubmit = nil, nil
	if s.inflight == nil || i >= s.inflight.numQueues {
		return nil
	}
	iq := s.inflight.queue(i)
	if err := iq.check(r.num); err != nil {
		return err
	}
	heads, err := iq.recover(q.UsedIdx(), r.num)
	if err != nil {
		return err
	}
	used, base := q.UsedIdx(), q.LastAvail()
	s.log.Debug("ring starting", "queue", i, "base", base, "used_idx", used, "in_flight", len(heads))
	switch {
	case len(heads) > 0:
		s.log.Info("ring restarted after a back-end restart",
			"queue", i, "used_idx", used, "base", base, "resubmit", len(heads))
	case base != used:
		// Nothing in flight, yet the front-end's base is not the used
		// index: the ring was not drained by the previous back-end and
		// the region does not say why. Go by the region (the spec's rule).
		s.log.Warn("ring base and used index disagree with nothing in flight",
			"queue", i, "used_idx", used, "base", base)
	}
	q.SetLastAvail(used + uint16(len(heads)))
	s.resubmitted.Add(int64(len(heads)))
	r.iq, r.resubmit = iq, heads
	return nil
}
