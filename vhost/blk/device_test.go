package blk

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/hemd/hemd/storage"
	"github.com/hemd/hemd/vhost"
	"github.com/hemd/hemd/vhost/frontend"
	"golang.org/x/sys/unix"
)

// rig is a back-end served on a socket in a temp dir with a front-end
// connected to it.
type rig struct {
	t     *testing.T
	dev   *Device
	store *storage.File
	path  string
	c     *frontend.Client
	sock  string
	srv   *vhost.Server
	stop  func()
}

type rigOpts struct {
	sync   bool // one system call per request (no Batch)
	size   int64
	cfg    Config
	fe     frontend.Options
	noDial bool
	logTo  io.Writer // the device's log goes here too
	// msgTimeout is the server's MessageTimeout (its default if zero).
	msgTimeout time.Duration
	// pollTime is the server's PollTime (its default if zero).
	pollTime time.Duration
	// wrapBatch, if set, wraps each batch the device opens.
	wrapBatch func(Batch) Batch
	// asyncReadMin, if set, is the device's asyncReadMin (-1: 0).
	asyncReadMin int
	// stream: the queues stream (StreamStore), on a file opened with
	// O_DIRECT too. -stream sets it for every rig that does not ask for
	// batches (wrapBatch, asyncReadMin, mapped) or sync.
	stream bool
	// wrapStream, if set, wraps each stream the device opens.
	wrapStream func(Stream) Stream
	// mapped: the file is mapped and large reads served from the mapping
	// (Config.Mapped) for reads of at least mapReadMin bytes (0: default).
	mapped     bool
	mapReadMin int
}

// streamAll serves every rig's queues as streams: make test runs the
// package once without and once with it.
var streamAll = flag.Bool("stream", false, "serve the queues of every rig that allows it as streams, over O_DIRECT")

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

func newRig(t *testing.T, o rigOpts) *rig {
	t.Helper()
	if o.size == 0 {
		o.size = 8 << 20
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, o.size); err != nil {
		t.Fatal(err)
	}
	if *streamAll && !o.sync && o.wrapBatch == nil && o.asyncReadMin == 0 && !o.mapped {
		o.stream = true
	}
	st, err := storage.Open(path, storage.Options{ReadOnly: o.cfg.ReadOnly, Discard: o.cfg.Discard, Direct: o.stream})
	if err != nil {
		t.Fatal(err)
	}
	cfg := o.cfg
	cfg.Store = st
	if !o.sync {
		cfg.Store = WithBatches(st, func(d int) Batch {
			if o.wrapBatch != nil {
				return o.wrapBatch(st.NewBatch(d, false))
			}
			return st.NewBatch(d, false)
		})
	}
	if o.stream {
		cfg.Store = WithStreams(cfg.Store, func(d int) (Stream, error) {
			s, err := st.NewStream(d)
			if err != nil || o.wrapStream == nil {
				return s, err
			}
			return o.wrapStream(s), nil
		})
	}
	if o.mapped {
		if err := st.Map(); err != nil {
			t.Fatal(err)
		}
		cfg.Mapped = st
	}
	if cfg.ID == "" {
		cfg.ID = "vol-0123456789abcdef0"
	}
	cfg.Log = testLogger(t)
	if o.logTo != nil {
		cfg.Log = slog.New(slog.NewTextHandler(io.MultiWriter(tWriter{t}, o.logTo), &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	dev, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if o.asyncReadMin != 0 {
		dev.asyncReadMin = max(o.asyncReadMin, 0)
	}
	if o.mapReadMin != 0 {
		dev.mapReadMin = o.mapReadMin
	}
	sock := filepath.Join(dir, "blk.sock")
	ln, err := vhost.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	srv := &vhost.Server{Device: dev, Log: cfg.Log.With("volume", cfg.ID), MessageTimeout: o.msgTimeout, PollTime: o.pollTime}
	go func() { done <- srv.Serve(ctx, ln) }()
	r := &rig{t: t, dev: dev, store: st, path: path, sock: sock, srv: srv}
	var stop func()
	var once sync.Once
	r.stop = func() { once.Do(stop) }
	stop = func() {
		if r.c != nil {
			r.c.Close()
		}
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("Serve did not return after cancel")
		}
		ln.Close()
		st.Close()
	}
	t.Cleanup(r.stop)
	if !o.noDial {
		r.c = r.dial(o.fe)
	}
	return r
}

func (r *rig) dial(o frontend.Options) *frontend.Client {
	r.t.Helper()
	c, err := frontend.Dial(r.sock)
	if err != nil {
		r.t.Fatal(err)
	}
	if o.MemSize == 0 {
		o.MemSize = 16 << 20
	}
	if err := c.Setup(o); err != nil {
		c.Close()
		r.t.Fatal(err)
	}
	return c
}

// flushBufs lays a FLUSH out in guest memory.
func (r *rig) flushBufs() []frontend.Buf {
	bufs, _, _ := r.build(blkIO{typ: TypeFlush})
	return bufs
}

// io is one virtio-blk request laid out in guest memory.
type blkIO struct {
	typ    uint32
	sector uint64
	data   []byte // OUT: what to write; IN: len(data) bytes are read into it
	write  bool   // data is device-writable
	split  int    // split the data into buffers of this size (0: one buffer)
}

// do submits one request on queue q and returns its status and used length.
func (r *rig) do(q int, io blkIO) (byte, uint32, []byte) {
	r.t.Helper()
	bufs, st, data := r.build(io)
	used := r.submit(q, bufs)
	return r.result(io, st, data, used)
}

// build lays a request out in guest memory: its buffers, and the addresses
// of its status byte and data.
func (r *rig) build(io blkIO) (bufs []frontend.Buf, st, data uint64) {
	c := r.c
	hdr, _ := c.Alloc(16, 16)
	binary.LittleEndian.PutUint32(c.Mem[hdr:], io.typ)
	binary.LittleEndian.PutUint64(c.Mem[hdr+8:], io.sector)
	bufs = []frontend.Buf{{Addr: hdr, Len: 16}}
	if len(io.data) > 0 {
		data, _ = c.Alloc(uint64(len(io.data)), 4096)
		copy(c.Mem[data:], io.data)
		step := len(io.data)
		if io.split > 0 {
			step = io.split
		}
		for off := 0; off < len(io.data); off += step {
			n := min(step, len(io.data)-off)
			bufs = append(bufs, frontend.Buf{Addr: data + uint64(off), Len: uint32(n), Write: io.write})
		}
	}
	st, _ = c.Alloc(1, 1)
	c.Mem[st] = 0xee
	bufs = append(bufs, frontend.Buf{Addr: st, Len: 1, Write: true})
	return bufs, st, data
}

// result is a completed request's status, used length and data.
func (r *rig) result(io blkIO, st, data uint64, used frontend.Used) (byte, uint32, []byte) {
	c := r.c
	var out []byte
	if len(io.data) > 0 {
		out = append([]byte(nil), c.Mem[data:data+uint64(len(io.data))]...)
	}
	return c.Mem[st], used.Len, out
}

func (r *rig) submit(q int, bufs []frontend.Buf) frontend.Used {
	r.t.Helper()
	qu := r.c.Queues[q]
	head, err := qu.Add(bufs)
	if err != nil {
		r.t.Fatal(err)
	}
	return r.kickWait(qu, head)
}

func (r *rig) kickWait(qu *frontend.Queue, head uint16) frontend.Used {
	r.t.Helper()
	if err := qu.Kick(); err != nil {
		r.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	u, err := qu.Wait(ctx, nil)
	if err != nil {
		r.t.Fatalf("waiting for completion: %v", err)
	}
	if len(u) != 1 || u[0].Head != head {
		r.t.Fatalf("completions %+v, want head %d", u, head)
	}
	return u[0]
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i/512) ^ byte(i) ^ seed
	}
	return b
}

func TestReadWriteFlushGetID(t *testing.T) {
	for _, o := range []frontend.Options{{}, {NoEventIdx: true}, {NoIndirect: true, NoEventIdx: true}} {
		t.Run(name(o), func(t *testing.T) {
			r := newRig(t, rigOpts{fe: o})
			want := pattern(64<<10, 7)
			if st, n, _ := r.do(0, blkIO{typ: TypeOut, sector: 8, data: want, split: 4096}); st != StatusOK || n != 1 {
				t.Fatalf("write: status %d len %d", st, n)
			}
			st, n, got := r.do(0, blkIO{typ: TypeIn, sector: 8, data: make([]byte, len(want)), write: true, split: 8192})
			if st != StatusOK || n != uint32(len(want))+1 || !bytes.Equal(got, want) {
				t.Fatalf("read: status %d len %d equal %v", st, n, bytes.Equal(got, want))
			}
			if st, _, _ := r.do(0, blkIO{typ: TypeFlush}); st != StatusOK {
				t.Fatalf("flush: status %d", st)
			}
			onDisk := make([]byte, len(want))
			f, _ := os.Open(r.path)
			f.ReadAt(onDisk, 8*512)
			f.Close()
			if !bytes.Equal(onDisk, want) {
				t.Fatal("backing file does not hold the written data")
			}
			st, n, id := r.do(0, blkIO{typ: TypeGetID, data: make([]byte, 20), write: true})
			if st != StatusOK || n != 21 || string(bytes.TrimRight(id, "\x00")) != "vol0123456789abcdef0" {
				t.Fatalf("get id: status %d len %d id %q", st, n, id)
			}
			if r.dev.Stats(0).Writes.Load() != 1 || r.dev.Stats(0).BytesRead.Load() != uint64(len(want)) {
				t.Fatalf("stats: %d writes, %d bytes read", r.dev.Stats(0).Writes.Load(), r.dev.Stats(0).BytesRead.Load())
			}
		})
	}
}

func name(o frontend.Options) string {
	s := "event_idx"
	if o.NoEventIdx {
		s = "no_event_idx"
	}
	if o.NoIndirect {
		s += ",no_indirect"
	}
	return s
}

func TestIndirect(t *testing.T) {
	r := newRig(t, rigOpts{})
	c := r.c
	want := pattern(8192, 3)
	hdr, _ := c.Alloc(16, 16)
	binary.LittleEndian.PutUint32(c.Mem[hdr:], TypeOut)
	binary.LittleEndian.PutUint64(c.Mem[hdr+8:], 16)
	data, _ := c.Alloc(8192, 4096)
	copy(c.Mem[data:], want)
	st, _ := c.Alloc(1, 1)
	table, _ := c.Alloc(16*4, 16)
	qu := c.Queues[0]
	head, err := qu.AddIndirect(table, []frontend.Buf{{Addr: hdr, Len: 16}, {Addr: data, Len: 4096}, {Addr: data + 4096, Len: 4096}, {Addr: st, Len: 1, Write: true}})
	if err != nil {
		t.Fatal(err)
	}
	r.kickWait(qu, head)
	if c.Mem[st] != StatusOK {
		t.Fatalf("indirect write: status %d", c.Mem[st])
	}
	s, _, got := r.do(0, blkIO{typ: TypeIn, sector: 16, data: make([]byte, 8192), write: true})
	if s != StatusOK || !bytes.Equal(got, want) {
		t.Fatalf("read back after indirect write: status %d equal %v", s, bytes.Equal(got, want))
	}
}

func TestMultiQueue(t *testing.T) {
	r := newRig(t, rigOpts{cfg: Config{Queues: 4}, fe: frontend.Options{Queues: 4}})
	cfg, err := r.c.Config(34, 2)
	if err != nil {
		t.Fatal(err)
	}
	if n := binary.LittleEndian.Uint16(cfg); n != 4 {
		t.Fatalf("config num_queues = %d, want 4", n)
	}
	for q := 0; q < 4; q++ {
		want := pattern(4096, byte(q))
		if st, _, _ := r.do(q, blkIO{typ: TypeOut, sector: uint64(q * 8), data: want}); st != StatusOK {
			t.Fatalf("queue %d write: %d", q, st)
		}
	}
	for q := 0; q < 4; q++ {
		st, _, got := r.do(3-q, blkIO{typ: TypeIn, sector: uint64(q * 8), data: make([]byte, 4096), write: true})
		if st != StatusOK || !bytes.Equal(got, pattern(4096, byte(q))) {
			t.Fatalf("queue %d read: status %d", 3-q, st)
		}
		if r.dev.Stats(q).Writes.Load() != 1 {
			t.Fatalf("queue %d served %d writes, want 1", q, r.dev.Stats(q).Writes.Load())
		}
	}
}

// A frontend that enables fewer queues than the device offers is served.
func TestFewerQueuesEnabled(t *testing.T) {
	r := newRig(t, rigOpts{cfg: Config{Queues: 4}, fe: frontend.Options{Queues: 1}})
	if st, _, _ := r.do(0, blkIO{typ: TypeOut, data: pattern(512, 1)}); st != StatusOK {
		t.Fatalf("write: %d", st)
	}
}

func TestConfigSpace(t *testing.T) {
	r := newRig(t, rigOpts{size: 16 << 20, cfg: Config{BlockSize: 4096, Queues: 2}, fe: frontend.Options{Queues: 2}})
	b, err := r.c.Config(0, 60)
	if err != nil {
		t.Fatal(err)
	}
	le := binary.LittleEndian
	if got := le.Uint64(b[0:]); got != (16<<20)/512 {
		t.Errorf("capacity %d", got)
	}
	if got := le.Uint32(b[20:]); got != 4096 {
		t.Errorf("blk_size %d", got)
	}
	if got := le.Uint32(b[12:]); got != segMax {
		t.Errorf("seg_max %d", got)
	}
	f := r.c.Features
	for _, bit := range []uint64{vhost.FeatVersion1, FeatFlush, FeatMQ, FeatBlkSize, FeatWriteZeroes, FeatTopology, FeatSegMax, FeatSizeMax} {
		if f&bit == 0 {
			t.Errorf("feature %#x not offered", bit)
		}
	}
	if f&FeatDiscard != 0 || f&FeatRO != 0 {
		t.Errorf("discard/ro offered on a read-write volume without discard: %#x", f)
	}
	// A misaligned request on a 4096-byte-block disk is refused.
	if st, _, _ := r.do(0, blkIO{typ: TypeIn, sector: 1, data: make([]byte, 4096), write: true}); st != StatusIOErr {
		t.Errorf("misaligned read: status %d, want IOERR", st)
	}
}

func TestBadRequests(t *testing.T) {
	r := newRig(t, rigOpts{size: 1 << 20, cfg: Config{ReadOnly: false}})
	cases := []struct {
		name string
		io   blkIO
		want byte
	}{
		{"past end", blkIO{typ: TypeIn, sector: 2048, data: make([]byte, 512), write: true}, StatusIOErr},
		{"straddles end", blkIO{typ: TypeIn, sector: 2047, data: make([]byte, 1024), write: true}, StatusIOErr},
		{"sector overflow", blkIO{typ: TypeOut, sector: 1<<64 - 1, data: make([]byte, 512)}, StatusIOErr},
		{"length not sector multiple", blkIO{typ: TypeOut, data: make([]byte, 100)}, StatusIOErr},
		{"read with readable data", blkIO{typ: TypeIn, data: make([]byte, 512)}, StatusIOErr},
		{"write with writable data", blkIO{typ: TypeOut, data: make([]byte, 512), write: true}, StatusIOErr},
		{"unknown type", blkIO{typ: 99}, StatusUnsupp},
		{"discard not enabled", blkIO{typ: TypeDiscard, data: make([]byte, 16)}, StatusUnsupp},
		{"write zeroes bad length", blkIO{typ: TypeWriteZeroes, data: make([]byte, 15)}, StatusIOErr},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if st, n, _ := r.do(0, tc.io); st != tc.want || n != 1 {
				t.Fatalf("status %d len %d, want %d len 1", st, n, tc.want)
			}
		})
	}
	// A descriptor outside guest memory fails the request, not the queue.
	c := r.c
	hdr, _ := c.Alloc(16, 16)
	binary.LittleEndian.PutUint32(c.Mem[hdr:], TypeIn)
	st, _ := c.Alloc(1, 1)
	u := r.submit(0, []frontend.Buf{{Addr: hdr, Len: 16}, {Addr: 1 << 40, Len: 512, Write: true}, {Addr: st, Len: 1, Write: true}})
	if c.Mem[st] != StatusIOErr || u.Len != 1 {
		t.Fatalf("descriptor outside memory: status %d len %d", c.Mem[st], u.Len)
	}
	if got := r.dev.Stats(0).BadRequests.Load(); got < 8 {
		t.Fatalf("bad request counter %d", got)
	}
	// The queue still works.
	if s, _, _ := r.do(0, blkIO{typ: TypeOut, data: pattern(512, 9)}); s != StatusOK {
		t.Fatalf("write after bad requests: %d", s)
	}
}

func TestReadOnly(t *testing.T) {
	r := newRig(t, rigOpts{cfg: Config{ReadOnly: true}})
	if r.c.Features&FeatRO == 0 {
		t.Fatal("RO not offered")
	}
	if st, _, _ := r.do(0, blkIO{typ: TypeOut, data: make([]byte, 512)}); st != StatusIOErr {
		t.Fatalf("write on read-only: status %d", st)
	}
	if st, _, _ := r.do(0, blkIO{typ: TypeIn, data: make([]byte, 512), write: true}); st != StatusOK {
		t.Fatalf("read on read-only: status %d", st)
	}
}

func TestDiscardAndWriteZeroes(t *testing.T) {
	r := newRig(t, rigOpts{cfg: Config{Discard: true}})
	if r.c.Features&FeatDiscard == 0 {
		t.Fatal("discard not offered")
	}
	data := pattern(1<<20, 5)
	if st, _, _ := r.do(0, blkIO{typ: TypeOut, data: data}); st != StatusOK {
		t.Fatal("write")
	}
	seg := func(sector uint64, n, flags uint32) []byte {
		b := binary.LittleEndian.AppendUint64(nil, sector)
		b = binary.LittleEndian.AppendUint32(b, n)
		return binary.LittleEndian.AppendUint32(b, flags)
	}
	if st, _, _ := r.do(0, blkIO{typ: TypeDiscard, data: seg(0, 256, 0)}); st != StatusOK {
		t.Fatalf("discard: %d", st)
	}
	if st, _, _ := r.do(0, blkIO{typ: TypeDiscard, data: seg(0, 8, flagUnmap)}); st != StatusUnsupp {
		t.Fatalf("discard with unmap flag: %d, want UNSUPP", st)
	}
	if st, _, _ := r.do(0, blkIO{typ: TypeWriteZeroes, data: append(seg(512, 256, 0), seg(1024, 8, flagUnmap)...)}); st != StatusOK {
		t.Fatalf("write zeroes: %d", st)
	}
	if st, _, _ := r.do(0, blkIO{typ: TypeWriteZeroes, data: seg(16384, 8, 0)}); st != StatusIOErr {
		t.Fatalf("write zeroes past end: %d", st)
	}
	_, _, got := r.do(0, blkIO{typ: TypeIn, data: make([]byte, 1<<20), write: true})
	want := append([]byte(nil), data...)
	clear(want[:256*512])
	clear(want[512*512 : 768*512])
	clear(want[1024*512 : 1032*512])
	if !bytes.Equal(got, want) {
		t.Fatal("discarded / zeroed ranges do not read back as expected")
	}
}

// GET_VRING_BASE stops the ring and returns the next available index; the
// ring restarts from there and a new front-end can connect after the first
// leaves.
func TestStopRestartReconnect(t *testing.T) {
	r := newRig(t, rigOpts{})
	for i := 0; i < 3; i++ {
		r.do(0, blkIO{typ: TypeOut, sector: uint64(i), data: pattern(512, byte(i))})
	}
	base, err := r.c.StopQueue(0)
	if err != nil {
		t.Fatal(err)
	}
	if base != 3 {
		t.Fatalf("GET_VRING_BASE = %d, want 3", base)
	}
	r.c.Close()
	r.c = r.dial(frontend.Options{})
	st, _, got := r.do(0, blkIO{typ: TypeIn, sector: 2, data: make([]byte, 512), write: true})
	if st != StatusOK || !bytes.Equal(got, pattern(512, 2)) {
		t.Fatalf("after reconnect: status %d", st)
	}
}

// A second front-end while one is connected is turned away; the first goes on.
func TestSecondFrontendRefused(t *testing.T) {
	r := newRig(t, rigOpts{})
	c2, err := frontend.Dial(r.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if _, err := c2.Recv(vhost.ReqGetFeatures); err == nil || !errors.Is(err, io.EOF) {
		t.Fatalf("second front-end: %v, want EOF", err)
	}
	if st, _, _ := r.do(0, blkIO{typ: TypeOut, data: pattern(512, 1)}); st != StatusOK {
		t.Fatalf("first front-end after refusal: %d", st)
	}
}

// A corrupt available index ends the session; the server keeps listening.
func TestCorruptAvailIndex(t *testing.T) {
	r := newRig(t, rigOpts{})
	qu := r.c.Queues[0]
	qu.SetAvailIdx(1000)
	qu.Kick()
	if _, err := r.c.Recv(vhost.ReqGetFeatures); err == nil {
		t.Fatal("connection still open after a corrupt avail index")
	}
	r.c.Close()
	r.c = r.dial(frontend.Options{})
	if st, _, _ := r.do(0, blkIO{typ: TypeOut, data: pattern(512, 1)}); st != StatusOK {
		t.Fatalf("next front-end: %d", st)
	}
}

func TestSocketInUse(t *testing.T) {
	r := newRig(t, rigOpts{noDial: true})
	if _, err := vhost.Listen(r.sock); !errors.Is(err, vhost.ErrSocketInUse) {
		t.Fatalf("second Listen: %v, want ErrSocketInUse", err)
	}
	st, err := os.Stat(r.sock)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, want 0600", st.Mode().Perm())
	}
}

// A ring whose kick has no fd (the no-fd bit) is polled.
func TestPollingKick(t *testing.T) {
	r := newRig(t, rigOpts{fe: frontend.Options{PollKick: true}})
	want := pattern(4096, 4)
	if st, _, _ := r.do(0, blkIO{typ: TypeOut, data: want}); st != StatusOK {
		t.Fatalf("write: %d", st)
	}
	if st, _, got := r.do(0, blkIO{typ: TypeIn, data: make([]byte, 4096), write: true}); st != StatusOK || !bytes.Equal(got, want) {
		t.Fatalf("read: %d", st)
	}
}

// A running queue given a new call fd signals it at once: QEMU enables a
// ring before it unmasks the ring's interrupt with a new call fd (at the
// destination of a migration, the ring has requests from the start), and
// what the ring completed in between must not wait for the next request.
func TestNewCallFdSignalled(t *testing.T) {
	r := newRig(t, rigOpts{})
	if st, _, _ := r.do(0, blkIO{typ: TypeFlush}); st != StatusOK {
		t.Fatalf("flush: %d", st)
	}
	q := r.c.Queues[0]
	if q.Signalled(0) {
		t.Fatal("an interrupt left over from the flush")
	}
	if err := q.NewCall(); err != nil {
		t.Fatal(err)
	}
	if !q.Signalled(5 * time.Second) {
		t.Fatal("the new call fd was not signalled")
	}
	if st, _, _ := r.do(0, blkIO{typ: TypeFlush}); st != StatusOK {
		t.Fatalf("flush after the new call fd: %d", st)
	}
}

// A hostile front-end's call fd, a blocking eventfd whose counter it filled
// to the brim: hemd's interrupts then fail rather than wait, requests still
// complete and the ring still stops.
func TestFullCallFd(t *testing.T) {
	r := newRig(t, rigOpts{})
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	full := binary.LittleEndian.AppendUint64(nil, 0xfffffffffffffffe)
	if _, err := unix.Write(fd, full); err != nil {
		t.Fatal(err)
	}
	if err := r.c.Queues[0].SetCall(fd); err != nil {
		t.Fatal(err)
	}
	q := r.c.Queues[0]
	for i := range 2 {
		head, err := q.Add(r.flushBufs())
		if err != nil {
			t.Fatal(err)
		}
		if err := q.Kick(); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(5 * time.Second)
		var used []frontend.Used
		for len(used) == 0 && time.Now().Before(deadline) {
			used = q.Poll(used)
			time.Sleep(time.Millisecond)
		}
		if len(used) != 1 || used[0].Head != head {
			t.Fatalf("flush %d: completions %+v", i, used)
		}
	}
	stopped := make(chan error, 1)
	go func() { _, err := r.c.StopQueue(0); stopped <- err }()
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("GET_VRING_BASE not answered: a write to the full call fd blocked")
	}
}

// ADD_MEM_REG makes new guest memory usable by running queues; after
// REM_MEM_REG a descriptor into it fails with IOERR.
func TestAddRemoveMemRegion(t *testing.T) {
	r := newRig(t, rigOpts{})
	if r.c.Proto&vhost.ProtoConfigureMemSlots == 0 {
		t.Fatal("CONFIGURE_MEM_SLOTS not negotiated")
	}
	const gpa = 1 << 32
	extra, err := r.c.AddRegion(gpa, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	want := pattern(4096, 8)
	copy(extra, want)
	c := r.c
	hdr, _ := c.Alloc(16, 16)
	st, _ := c.Alloc(1, 1)
	binary.LittleEndian.PutUint32(c.Mem[hdr:], TypeOut)
	binary.LittleEndian.PutUint64(c.Mem[hdr+8:], 0)
	r.submit(0, []frontend.Buf{{Addr: hdr, Len: 16}, {Addr: gpa, Len: 4096}, {Addr: st, Len: 1, Write: true}})
	if c.Mem[st] != StatusOK {
		t.Fatalf("write from the added region: %d", c.Mem[st])
	}
	if s, _, got := r.do(0, blkIO{typ: TypeIn, data: make([]byte, 4096), write: true}); s != StatusOK || !bytes.Equal(got, want) {
		t.Fatalf("read back: %d", s)
	}
	if err := c.RemoveRegion(gpa, extra); err != nil {
		t.Fatal(err)
	}
	r.submit(0, []frontend.Buf{{Addr: hdr, Len: 16}, {Addr: gpa, Len: 4096}, {Addr: st, Len: 1, Write: true}})
	if c.Mem[st] != StatusIOErr {
		t.Fatalf("write from a removed region: status %d, want IOERR", c.Mem[st])
	}
}

// RESET_DEVICE stops every ring; the front-end can set the device up again
// on the same connection.
func TestResetDevice(t *testing.T) {
	r := newRig(t, rigOpts{})
	r.do(0, blkIO{typ: TypeOut, data: pattern(512, 1)})
	if _, err := r.c.Request(vhost.ReqResetDevice, nil, nil, false); err != nil {
		t.Fatal(err)
	}
	r.c.Queues = nil
	if err := r.c.Setup(frontend.Options{MemSize: 16 << 20}); err != nil {
		t.Fatal(err)
	}
	if st, _, got := r.do(0, blkIO{typ: TypeIn, data: make([]byte, 512), write: true}); st != StatusOK || !bytes.Equal(got, pattern(512, 1)) {
		t.Fatalf("read after reset: %d", st)
	}
}

func le64(v uint64) []byte { return binary.LittleEndian.AppendUint64(nil, v) }
func le32(vs ...uint32) []byte {
	var b []byte
	for _, v := range vs {
		b = binary.LittleEndian.AppendUint32(b, v)
	}
	return b
}
