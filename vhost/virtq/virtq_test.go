package virtq

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/hemd/hemd/vhost/guestmem"
	"golang.org/x/sys/unix"
)

const (
	memSize  = 1 << 20
	userBase = 0x7f0000000000
	qsize    = 8
	descAt   = 0x1000
	availAt  = 0x2000
	usedAt   = 0x3000
)

// testMem maps a memfd as guest memory at guest address 0 and returns the
// table and a writable view of the same memory.
func testMem(t testing.TB) (*guestmem.Table, []byte) {
	fd, err := unix.MemfdCreate("guest", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, memSize); err != nil {
		t.Fatal(err)
	}
	tbl, err := guestmem.NewTable([]guestmem.Region{{Size: memSize, UserAddr: userBase}}, []int{fd})
	if err != nil {
		t.Fatal(err)
	}
	view, err := tbl.Slice(0, memSize)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tbl.Unmap)
	return tbl, view
}

func putDesc(m []byte, at uint64, i int, addr uint64, n uint32, flags, next uint16) {
	d := m[at+uint64(16*i):]
	binary.LittleEndian.PutUint64(d[0:], addr)
	binary.LittleEndian.PutUint32(d[8:], n)
	binary.LittleEndian.PutUint16(d[12:], flags)
	binary.LittleEndian.PutUint16(d[14:], next)
}

func newQ(t testing.TB, tbl *guestmem.Table, indirect bool) *Queue {
	q, err := New(tbl, qsize, Addrs{Desc: userBase + descAt, Avail: userBase + availAt, Used: userBase + usedAt}, 0, true, indirect)
	if err != nil {
		t.Fatal(err)
	}
	return q
}

func offer(m []byte, idx uint16, head uint16) {
	binary.LittleEndian.PutUint16(m[availAt+4+2*uint64(idx%qsize):], head)
	binary.LittleEndian.PutUint16(m[availAt+2:], idx+1)
}

// TestChainErrors breaks one field at a time of a chain.
func TestChainErrors(t *testing.T) {
	cases := []struct {
		name     string
		indirect bool
		setup    func(m []byte)
		want     error
	}{
		{"good", false, func(m []byte) {
			putDesc(m, descAt, 0, 0x10000, 16, DescFNext, 1)
			putDesc(m, descAt, 1, 0x11000, 1, DescFWrite, 0)
		}, nil},
		{"next out of range", false, func(m []byte) { putDesc(m, descAt, 0, 0x10000, 16, DescFNext, qsize) }, ErrNextOutOfRange},
		{"loop", false, func(m []byte) {
			putDesc(m, descAt, 0, 0x10000, 16, DescFNext, 1)
			putDesc(m, descAt, 1, 0x10000, 16, DescFNext, 0)
		}, ErrChainTooLong},
		{"outside memory", false, func(m []byte) { putDesc(m, descAt, 0, memSize-8, 16, 0, 0) }, ErrOutsideMemory},
		{"length wraps", false, func(m []byte) { putDesc(m, descAt, 0, 1<<64-8, 16, 0, 0) }, ErrOutsideMemory},
		{"read after write", false, func(m []byte) {
			putDesc(m, descAt, 0, 0x10000, 1, DescFWrite|DescFNext, 1)
			putDesc(m, descAt, 1, 0x11000, 16, 0, 0)
		}, ErrReadAfterWrite},
		{"indirect not negotiated", false, func(m []byte) { putDesc(m, descAt, 0, 0x20000, 32, DescFIndirect, 0) }, ErrIndirectNotNeg},
		{"indirect with next", true, func(m []byte) { putDesc(m, descAt, 0, 0x20000, 32, DescFIndirect|DescFNext, 1) }, ErrIndirectWithNext},
		{"indirect length", true, func(m []byte) { putDesc(m, descAt, 0, 0x20000, 24, DescFIndirect, 0) }, ErrIndirectLen},
		{"indirect too long", true, func(m []byte) { putDesc(m, descAt, 0, 0x20000, 16*(qsize+1), DescFIndirect, 0) }, ErrChainTooLong},
		{"indirect outside memory", true, func(m []byte) { putDesc(m, descAt, 0, memSize, 32, DescFIndirect, 0) }, ErrIndirectOutsideMe},
		{"nested indirect", true, func(m []byte) {
			putDesc(m, descAt, 0, 0x20000, 32, DescFIndirect, 0)
			putDesc(m, 0x20000, 0, 0x21000, 32, DescFIndirect, 0)
		}, ErrNestedIndirect},
		{"indirect next out of table", true, func(m []byte) {
			putDesc(m, descAt, 0, 0x20000, 32, DescFIndirect, 0)
			putDesc(m, 0x20000, 0, 0x10000, 16, DescFNext, 2)
		}, ErrNextOutOfRange},
		{"indirect good", true, func(m []byte) {
			putDesc(m, descAt, 0, 0x20000, 32, DescFIndirect, 0)
			putDesc(m, 0x20000, 0, 0x10000, 16, DescFNext, 1)
			putDesc(m, 0x20000, 1, 0x11000, 1, DescFWrite, 0)
		}, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tbl, m := testMem(t)
			q := newQ(t, tbl, tc.indirect)
			tc.setup(m)
			offer(m, 0, 0)
			var c Chain
			ok, err := q.Next(&c)
			if err != nil || !ok {
				t.Fatalf("Next: %v %v", ok, err)
			}
			if tc.want == nil && c.Err != nil || tc.want != nil && !errors.Is(c.Err, tc.want) {
				t.Fatalf("chain error %v, want %v", c.Err, tc.want)
			}
		})
	}
}

func TestRingErrors(t *testing.T) {
	tbl, m := testMem(t)
	q := newQ(t, tbl, false)
	binary.LittleEndian.PutUint16(m[availAt+2:], qsize+1)
	var c Chain
	if _, err := q.Next(&c); !errors.Is(err, ErrAvailIndex) {
		t.Fatalf("avail idx beyond queue size: %v", err)
	}
	binary.LittleEndian.PutUint16(m[availAt+2:], 1)
	binary.LittleEndian.PutUint16(m[availAt+4:], qsize)
	if _, err := q.Next(&c); !errors.Is(err, ErrHeadIndex) {
		t.Fatalf("head beyond queue size: %v", err)
	}
	if _, err := New(tbl, 6, Addrs{Desc: userBase, Avail: userBase, Used: userBase}, 0, false, false); !errors.Is(err, ErrBadSize) {
		t.Fatalf("size 6: %v", err)
	}
	if _, err := New(tbl, 8, Addrs{Desc: userBase + 8, Avail: userBase, Used: userBase}, 0, false, false); !errors.Is(err, ErrBadAlignment) {
		t.Fatalf("misaligned: %v", err)
	}
}

// TestUsedAndNotify: completions land on the used ring; EVENT_IDX decides
// the interrupts.
func TestUsedAndNotify(t *testing.T) {
	tbl, m := testMem(t)
	q := newQ(t, tbl, false)
	putDesc(m, descAt, 3, 0x10000, 1, DescFWrite, 0)
	offer(m, 0, 3)
	var c Chain
	if ok, err := q.Next(&c); !ok || err != nil || c.Head != 3 {
		t.Fatalf("Next: %v %v head %d", ok, err, c.Head)
	}
	// used_event = 0: the driver wants an interrupt after entry 0.
	q.Push(c.Head, 1)
	q.Publish()
	if !q.NeedNotify() {
		t.Fatal("no notification for used_event 0")
	}
	if got := binary.LittleEndian.Uint16(m[usedAt+2:]); got != 1 {
		t.Fatalf("used idx %d", got)
	}
	if id := binary.LittleEndian.Uint32(m[usedAt+4:]); id != 3 {
		t.Fatalf("used id %d", id)
	}
	// used_event = 5: no interrupt until the used index passes 5.
	binary.LittleEndian.PutUint16(m[availAt+4+2*qsize:], 5)
	offer(m, 1, 3)
	q.Next(&c)
	q.Push(c.Head, 1)
	q.Publish()
	if q.NeedNotify() {
		t.Fatal("notification although used_event is ahead")
	}
	more, err := q.EnableNotify()
	if err != nil || more {
		t.Fatalf("EnableNotify: %v %v", more, err)
	}
	if ev := binary.LittleEndian.Uint16(m[usedAt+4+8*qsize:]); ev != 2 {
		t.Fatalf("avail_event %d, want 2", ev)
	}
}

// FuzzWalk: arbitrary descriptor tables never make the walk panic, loop or
// return a segment outside guest memory.
func FuzzWalk(f *testing.F) {
	f.Add(make([]byte, 16*qsize), uint16(0), true)
	f.Fuzz(func(t *testing.T, table []byte, head uint16, indirect bool) {
		tbl, m := testMem(t)
		clear(m[:0x40000])
		copy(m[descAt:descAt+16*qsize], table)
		if len(table) > 16*qsize {
			copy(m[0x20000:0x30000], table[16*qsize:])
		}
		q := newQ(t, tbl, indirect)
		offer(m, 0, head%(qsize+1))
		var c Chain
		ok, err := q.Next(&c)
		if err != nil || !ok {
			return
		}
		if len(c.Segs) > qsize {
			t.Fatalf("%d segments from a queue of %d", len(c.Segs), qsize)
		}
		for _, s := range c.Segs {
			if s.Buf != nil && (s.Addr+uint64(s.Len) > memSize || len(s.Buf) != int(s.Len)) {
				t.Fatalf("segment %+v outside memory", s)
			}
		}
	})
}
