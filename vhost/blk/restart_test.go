package blk

import (
	"bytes"
	"context"
	"encoding/binary"
	"testing"
	"time"

	"github.com/hemd/hemd/vhost/frontend"
)

// req is one request laid out in guest memory by prepare.
type req struct {
	head      uint16
	hdr, data uint64 // guest addresses
	status    uint64
	dataLen   int
}

// prepare lays out a request and puts it on the available ring of queue 0
// without kicking: the back-end does not see it until it looks.
func (r *rig) prepare(typ uint32, sector uint64, data []byte, n int) req {
	r.t.Helper()
	c := r.c
	var q req
	q.hdr, _ = c.Alloc(16, 16)
	binary.LittleEndian.PutUint32(c.Mem[q.hdr:], typ)
	binary.LittleEndian.PutUint64(c.Mem[q.hdr+8:], sector)
	q.data, _ = c.Alloc(uint64(n), 4096)
	q.dataLen = n
	copy(c.Mem[q.data:], data)
	q.status, _ = c.Alloc(1, 4096)
	c.Mem[q.status] = 0xee
	var err error
	q.head, err = c.Queues[0].Add([]frontend.Buf{
		{Addr: q.hdr, Len: 16},
		{Addr: q.data, Len: uint32(n), Write: typ == TypeIn},
		{Addr: q.status, Len: 1, Write: true},
	})
	if err != nil {
		r.t.Fatal(err)
	}
	return q
}

// waitUsed collects n completions of queue 0 in used-ring order.
func (r *rig) waitUsed(n int) []frontend.Used {
	r.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var got []frontend.Used
	for len(got) < n {
		var err error
		if got, err = r.c.Queues[0].Wait(ctx, got); err != nil {
			r.t.Fatalf("waiting for %d completions, have %+v: %v", n, got, err)
		}
	}
	if len(got) != n {
		r.t.Fatalf("completions %+v, want %d", got, n)
	}
	return got
}

// inflightDesc edits descriptor head's state in queue 0's inflight region:
// the region layout of docs/interop/vhost-user.rst.
func inflightDesc(c *frontend.Client, head uint16) (flag *byte, counter []byte) {
	off := 16 + 16*int(head)
	return &c.Inflight[off], c.Inflight[off+8 : off+16]
}

// A back-end that dies with requests in flight leaves them marked in the
// inflight region; the next one resubmits them in the order they were taken
// (their counters), then takes the available ring after them, so that no
// request is lost and none is served twice.
func TestInflightResubmit(t *testing.T) {
	r := newRig(t, rigOpts{fe: frontend.Options{Inflight: true}})
	if r.c.Inflight == nil {
		t.Fatal("no inflight region negotiated")
	}
	if st, _, _ := r.do(0, blkIO{typ: TypeOut, sector: 0, data: pattern(512, 1)}); st != StatusOK {
		t.Fatalf("write: status %d", st)
	}
	// After a completed request nothing is in flight and the region's used
	// index follows the ring's.
	for h := uint16(0); h < 128; h++ {
		if f, _ := inflightDesc(r.c, h); *f != 0 {
			t.Fatalf("descriptor %d still in flight after completion", h)
		}
	}
	if got := binary.LittleEndian.Uint16(r.c.Inflight[14:]); got != 1 {
		t.Fatalf("region used_idx %d, want 1", got)
	}

	// Stop the ring so that the back-end does not look at what comes next:
	// those requests stand for what the dead back-end had taken.
	if _, err := r.c.StopQueue(0); err != nil {
		t.Fatal(err)
	}
	x, y, z := pattern(4096, 0x11), pattern(4096, 0x22), pattern(4096, 0x33)
	w0 := r.prepare(TypeOut, 8, x, 4096)
	w1 := r.prepare(TypeOut, 8, y, 4096)
	w2 := r.prepare(TypeOut, 16, z, 4096)
	rd := r.prepare(TypeIn, 8, nil, 4096)
	// The dead back-end had taken w0 and w1 and finished neither; it took w1
	// first (its counter is older), so w0's data must be the one that stays.
	for _, e := range []struct {
		head    uint16
		counter uint64
	}{{w1.head, 100}, {w0.head, 101}} {
		f, c := inflightDesc(r.c, e.head)
		*f = 1
		binary.LittleEndian.PutUint64(c, e.counter)
	}
	if err := r.c.Reattach(r.sock, frontend.Options{}); err != nil {
		t.Fatal(err)
	}
	// The two taken before come back first, in the order they were taken;
	// the new ones after them, in any order (a streaming queue completes
	// them as storage does).
	got := r.waitUsed(4)
	want := []uint16{w1.head, w0.head, w2.head, rd.head}
	if got[0].Head != want[0] || got[1].Head != want[1] ||
		!(got[2].Head == want[2] && got[3].Head == want[3] || got[2].Head == want[3] && got[3].Head == want[2]) {
		t.Fatalf("completion order %+v, want heads %v (the last two in any order)", got, want)
	}
	for _, q := range []req{w0, w1, w2, rd} {
		if st := r.c.Mem[q.status]; st != StatusOK {
			t.Fatalf("head %d: status %d", q.head, st)
		}
	}
	if !bytes.Equal(r.c.Mem[rd.data:rd.data+4096], x) {
		t.Fatal("read after resubmission: not the data of the newest write")
	}
	if n := r.srv.Resubmitted.Load(); n != 2 {
		t.Fatalf("Resubmitted = %d, want 2", n)
	}
	for h := uint16(0); h < 128; h++ {
		if f, _ := inflightDesc(r.c, h); *f != 0 {
			t.Fatalf("descriptor %d still in flight after resubmission", h)
		}
	}
}

// A back-end that died after publishing a batch on the used ring but before
// clearing its in-flight marks must not serve that batch again: the new one
// settles it from the batch list.
func TestInflightLastBatchSettled(t *testing.T) {
	r := newRig(t, rigOpts{fe: frontend.Options{Inflight: true}})
	done := r.prepare(TypeOut, 3, pattern(4096, 7), 4096)
	if err := r.c.Queues[0].Kick(); err != nil {
		t.Fatal(err)
	}
	r.waitUsed(1)
	if _, err := r.c.StopQueue(0); err != nil {
		t.Fatal(err)
	}
	// Roll the region back to just before the batch was cleared.
	f, _ := inflightDesc(r.c, done.head)
	*f = 1
	binary.LittleEndian.PutUint16(r.c.Inflight[12:], done.head) // last_batch_head
	binary.LittleEndian.PutUint16(r.c.Inflight[14:], 0)         // used_idx
	rd := r.prepare(TypeIn, 3, nil, 4096)
	if err := r.c.Reattach(r.sock, frontend.Options{}); err != nil {
		t.Fatal(err)
	}
	if err := r.c.Queues[0].Kick(); err != nil {
		t.Fatal(err)
	}
	got := r.waitUsed(1)
	if got[0].Head != rd.head {
		t.Fatalf("completion %+v, want only the read (head %d)", got, rd.head)
	}
	if !bytes.Equal(r.c.Mem[rd.data:rd.data+4096], pattern(4096, 7)) {
		t.Fatal("read back wrong data")
	}
	if n := r.srv.Resubmitted.Load(); n != 0 {
		t.Fatalf("Resubmitted = %d, want 0", n)
	}
	// Nothing more arrives: the settled request was not served twice.
	time.Sleep(50 * time.Millisecond)
	if more := r.c.Queues[0].Poll(nil); len(more) != 0 {
		t.Fatalf("extra completions %+v", more)
	}
}

// A corrupt inflight region (a head outside the ring in the batch list) is
// refused with an error, not served. A fresh region whose used index lags
// the ring (a migration's destination) is simply brought up to it.
func TestInflightFreshRegionFollowsRing(t *testing.T) {
	r := newRig(t, rigOpts{fe: frontend.Options{Inflight: true}})
	for i := 0; i < 3; i++ {
		r.do(0, blkIO{typ: TypeOut, sector: uint64(i), data: pattern(512, byte(i))})
	}
	if _, err := r.c.StopQueue(0); err != nil {
		t.Fatal(err)
	}
	clear(r.c.Inflight)                                   // as if just created
	binary.LittleEndian.PutUint16(r.c.Inflight[8:], 1)    // version
	binary.LittleEndian.PutUint16(r.c.Inflight[10:], 128) // desc_num
	if err := r.c.Reattach(r.sock, frontend.Options{}); err != nil {
		t.Fatal(err)
	}
	st, _, got := r.do(0, blkIO{typ: TypeIn, sector: 2, data: make([]byte, 512), write: true})
	if st != StatusOK || !bytes.Equal(got, pattern(512, 2)) {
		t.Fatalf("read after start on a fresh region: status %d", st)
	}
	if u := binary.LittleEndian.Uint16(r.c.Inflight[14:]); u != 4 {
		t.Fatalf("region used_idx %d, want 4", u)
	}
}

func TestInflightCorruptRegion(t *testing.T) {
	r := newRig(t, rigOpts{fe: frontend.Options{Inflight: true}})
	r.do(0, blkIO{typ: TypeOut, sector: 0, data: pattern(512, 1)})
	if _, err := r.c.StopQueue(0); err != nil {
		t.Fatal(err)
	}
	f, _ := inflightDesc(r.c, 0)
	*f = 1
	binary.LittleEndian.PutUint16(r.c.Inflight[12:], 9999) // last_batch_head
	binary.LittleEndian.PutUint16(r.c.Inflight[14:], 0)    // used_idx behind the ring
	if err := r.c.Reattach(r.sock, frontend.Options{}); err == nil {
		// The session is ended when the ring starts; a request gets nothing.
		st, _, _ := r.do(0, blkIO{typ: TypeIn, sector: 0, data: make([]byte, 512), write: true})
		t.Fatalf("corrupt inflight region accepted (status %d)", st)
	}
}

// bit reports whether the dirty log marks the page of guest address gpa.
func bit(log []byte, gpa uint64) bool {
	p := gpa / 4096
	return log[p/8]&(1<<(p%8)) != 0
}

// While migration logs (VHOST_F_LOG_ALL), every page the back-end writes in
// guest memory, decrypted read data and the used ring, is marked dirty in
// the shared log, and nothing it only reads is.
func TestDirtyLog(t *testing.T) {
	r := newRig(t, rigOpts{fe: frontend.Options{Log: true}})
	const memPages = (16 << 20) / 4096
	log, err := r.c.SetLogBase(memPages / 8)
	if err != nil {
		t.Fatal(err)
	}
	kickWait := func(q req) {
		t.Helper()
		if err := r.c.Queues[0].Kick(); err != nil {
			t.Fatal(err)
		}
		r.waitUsed(1)
		if st := r.c.Mem[q.status]; st != StatusOK {
			t.Fatalf("status %d", st)
		}
	}
	used := r.c.Queues[0].UsedGPA()
	rd := r.prepare(TypeIn, 0, nil, 3*4096)
	kickWait(rd)
	if bytes.Count(log, []byte{0}) != len(log) {
		t.Fatal("pages logged while logging is off")
	}

	if err := r.c.SetLogAll(true); err != nil {
		t.Fatal(err)
	}
	wr := r.prepare(TypeOut, 64, pattern(2*4096, 3), 2*4096)
	kickWait(wr)
	rd = r.prepare(TypeIn, 64, nil, 2*4096)
	kickWait(rd)
	for _, gpa := range []uint64{rd.data, rd.data + 4096, rd.status, used} {
		if !bit(log, gpa) {
			t.Errorf("page of %#x not logged", gpa)
		}
	}
	for _, gpa := range []uint64{wr.data, wr.data + 4096} {
		if bit(log, gpa) {
			t.Errorf("page of %#x (device-readable) logged", gpa)
		}
	}

	// A new, larger log replaces the old one while the ring runs.
	log2, err := r.c.SetLogBase(2 * memPages / 8)
	if err != nil {
		t.Fatal(err)
	}
	rd = r.prepare(TypeIn, 0, nil, 4096)
	kickWait(rd)
	if !bit(log2, rd.data) || !bit(log2, used) {
		t.Error("read not logged in the new log")
	}
	if bit(log, rd.data) {
		t.Error("read logged in the replaced log")
	}

	if err := r.c.SetLogAll(false); err != nil {
		t.Fatal(err)
	}
	clear(log2)
	rd = r.prepare(TypeIn, 0, nil, 4096)
	kickWait(rd)
	if bytes.Count(log2, []byte{0}) != len(log2) {
		t.Fatal("pages logged after logging was turned off")
	}
}
