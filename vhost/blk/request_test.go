package blk

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/hemd/hemd/vhost/virtq"
)

func hdrBytes(typ uint32, sector uint64) []byte {
	b := binary.LittleEndian.AppendUint32(nil, typ)
	b = binary.LittleEndian.AppendUint32(b, 0)
	return binary.LittleEndian.AppendUint64(b, sector)
}

func seg(b []byte, write bool) virtq.Seg {
	return virtq.Seg{Len: uint32(len(b)), Write: write, Buf: b}
}

// TestParseRequest breaks one field at a time of a good request and expects
// exactly one error.
func TestParseRequest(t *testing.T) {
	lim := &limits{capacity: 2048, blockSize: 512, maxSegSects: maxSpanSectors}
	lim4k := &limits{capacity: 2048, blockSize: 4096, maxSegSects: maxSpanSectors}
	ro := &limits{capacity: 2048, blockSize: 512, readOnly: true, maxSegSects: maxSpanSectors}
	disc := &limits{capacity: 2048, blockSize: 512, discard: true, maxSegSects: 64}
	span := func(sector uint64, n, flags uint32) []byte {
		b := binary.LittleEndian.AppendUint64(nil, sector)
		b = binary.LittleEndian.AppendUint32(b, n)
		return binary.LittleEndian.AppendUint32(b, flags)
	}
	st := func() virtq.Seg { return seg(make([]byte, 1), true) }
	cases := []struct {
		name   string
		lim    *limits
		segs   []virtq.Seg
		err    error
		want   error // nil: parses
		status bool  // a status byte is found
	}{
		{"read ok", lim, []virtq.Seg{seg(hdrBytes(TypeIn, 0), false), seg(make([]byte, 4096), true), st()}, nil, nil, true},
		{"write ok", lim, []virtq.Seg{seg(hdrBytes(TypeOut, 2040), false), seg(make([]byte, 4096), false), st()}, nil, nil, true},
		{"header, data and status in one buffer each way", lim, []virtq.Seg{seg(append(hdrBytes(TypeOut, 0), make([]byte, 512)...), false), st()}, nil, nil, true},
		{"chain error", lim, []virtq.Seg{seg(hdrBytes(TypeIn, 0), false), st()}, virtq.ErrOutsideMemory, virtq.ErrOutsideMemory, true},
		{"no segments", lim, nil, nil, ErrNoStatus, false},
		{"status not writable", lim, []virtq.Seg{seg(hdrBytes(TypeFlush, 0), false), seg(make([]byte, 1), false)}, nil, ErrNoStatus, false},
		{"status unmapped", lim, []virtq.Seg{seg(hdrBytes(TypeFlush, 0), false), {Len: 1, Write: true}}, nil, ErrNoStatus, false},
		{"header short", lim, []virtq.Seg{seg(hdrBytes(TypeIn, 0)[:12], false), st()}, nil, ErrHeaderTooShort, true},
		{"read with readable data", lim, []virtq.Seg{seg(hdrBytes(TypeIn, 0), false), seg(make([]byte, 512), false), st()}, nil, ErrUnexpectedRead, true},
		{"write with writable data", lim, []virtq.Seg{seg(hdrBytes(TypeOut, 0), false), seg(make([]byte, 512), true), st()}, nil, ErrUnexpectedWrite, true},
		{"length not sector multiple", lim, []virtq.Seg{seg(hdrBytes(TypeIn, 0), false), seg(make([]byte, 513), true), st()}, nil, ErrLenNotSector, true},
		{"misaligned sector 4k", lim4k, []virtq.Seg{seg(hdrBytes(TypeIn, 1), false), seg(make([]byte, 4096), true), st()}, nil, ErrMisaligned, true},
		{"misaligned length 4k", lim4k, []virtq.Seg{seg(hdrBytes(TypeIn, 0), false), seg(make([]byte, 512), true), st()}, nil, ErrMisaligned, true},
		{"past end", lim, []virtq.Seg{seg(hdrBytes(TypeIn, 2048), false), seg(make([]byte, 512), true), st()}, nil, ErrOutOfRange, true},
		{"sector overflow", lim, []virtq.Seg{seg(hdrBytes(TypeIn, 1<<64-1), false), seg(make([]byte, 512), true), st()}, nil, ErrOutOfRange, true},
		{"write read-only", ro, []virtq.Seg{seg(hdrBytes(TypeOut, 0), false), seg(make([]byte, 512), false), st()}, nil, ErrReadOnly, true},
		{"flush with data", lim, []virtq.Seg{seg(hdrBytes(TypeFlush, 0), false), seg(make([]byte, 512), false), st()}, nil, ErrUnexpectedRead, true},
		{"unknown type", lim, []virtq.Seg{seg(hdrBytes(77, 0), false), st()}, nil, ErrUnsupported, true},
		{"discard off", lim, []virtq.Seg{seg(hdrBytes(TypeDiscard, 0), false), seg(span(0, 8, 0), false), st()}, nil, ErrDiscardNotEnabled, true},
		{"discard ok", disc, []virtq.Seg{seg(hdrBytes(TypeDiscard, 0), false), seg(span(0, 8, 0), false), st()}, nil, nil, true},
		{"discard unmap flag", disc, []virtq.Seg{seg(hdrBytes(TypeDiscard, 0), false), seg(span(0, 8, 1), false), st()}, nil, ErrUnsupportedFlags, true},
		{"write zeroes reserved flag", disc, []virtq.Seg{seg(hdrBytes(TypeWriteZeroes, 0), false), seg(span(0, 8, 2), false), st()}, nil, ErrUnsupportedFlags, true},
		{"discard segment too large", disc, []virtq.Seg{seg(hdrBytes(TypeDiscard, 0), false), seg(span(0, 128, 0), false), st()}, nil, ErrSegmentTooLarge, true},
		{"discard past end", disc, []virtq.Seg{seg(hdrBytes(TypeDiscard, 0), false), seg(span(2044, 8, 0), false), st()}, nil, ErrOutOfRange, true},
		{"discard length", disc, []virtq.Seg{seg(hdrBytes(TypeDiscard, 0), false), seg(make([]byte, 20), false), st()}, nil, ErrSegmentsLen, true},
		{"discard no segments", disc, []virtq.Seg{seg(hdrBytes(TypeDiscard, 0), false), st()}, nil, ErrSegmentsLen, true},
		{"discard too many segments", disc, []virtq.Seg{seg(hdrBytes(TypeDiscard, 0), false), seg(make([]byte, 16*17), false), st()}, nil, ErrTooManySegments, true},
	}
	var r request
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := &virtq.Chain{Segs: tc.segs, Err: tc.err}
			err := parseRequest(c, tc.lim, &r)
			if tc.want == nil && err != nil || tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("error %v, want %v", err, tc.want)
			}
			if (r.status != nil) != tc.status {
				t.Fatalf("status found %v, want %v", r.status != nil, tc.status)
			}
		})
	}
}

// TestWalkUnits: units straddling guest buffers are gathered and scattered
// back; every unit is seen once with its offset.
func TestWalkUnits(t *testing.T) {
	flat := make([]byte, 8192)
	for i := range flat {
		flat[i] = byte(i * 7)
	}
	for _, sizes := range [][]int{{8192}, {4096, 4096}, {100, 3996, 4096}, {512, 512, 1000, 6168}, {1, 8191}} {
		var bufs [][]byte
		off := 0
		data := append([]byte(nil), flat...)
		for _, n := range sizes {
			bufs = append(bufs, data[off:off+n])
			off += n
		}
		seen := 0
		walkUnits(bufs, 8192, 4096, make([]byte, 4096), true, func(b []byte, rel int) {
			if len(b)%4096 != 0 || rel%4096 != 0 {
				t.Fatalf("sizes %v: run of %d at %d", sizes, len(b), rel)
			}
			for i := range b {
				if b[i] != flat[rel+i] {
					t.Fatalf("sizes %v: byte %d of run at %d wrong", sizes, i, rel)
				}
				b[i] ^= 0xff
			}
			seen += len(b)
		})
		if seen != 8192 {
			t.Fatalf("sizes %v: saw %d bytes", sizes, seen)
		}
		for i := range data {
			if data[i] != flat[i]^0xff {
				t.Fatalf("sizes %v: byte %d not scattered back", sizes, i)
			}
		}
	}
}

// FuzzParseRequest: any chain parses to an error or to a request whose
// range lies inside the disk; it never panics.
func FuzzParseRequest(f *testing.F) {
	f.Add([]byte{0, 16, 1, 0, 2, 0}, hdrBytes(TypeIn, 4))
	f.Add([]byte{0, 16, 0, 0, 1, 0}, append(hdrBytes(TypeOut, 4), make([]byte, 512)...))
	f.Add([]byte{0, 16, 0, 16, 1, 0}, append(hdrBytes(TypeDiscard, 0), make([]byte, 16)...))
	f.Fuzz(func(t *testing.T, layout []byte, data []byte) {
		lim := &limits{capacity: 64, blockSize: 512, discard: len(layout)%2 == 0, maxSegSects: 16}
		var segs []virtq.Seg
		for i := 0; i+1 < len(layout) && len(segs) < 16; i += 2 {
			n := int(layout[i+1]) * 4
			if layout[i]&2 != 0 {
				n = int(layout[i+1])
			}
			if n > len(data) {
				n = len(data)
			}
			segs = append(segs, virtq.Seg{Len: uint32(n), Write: layout[i]&1 != 0, Buf: data[:n:n]})
			data = data[n:]
		}
		var r request
		err := parseRequest(&virtq.Chain{Segs: segs}, lim, &r)
		if err != nil {
			return
		}
		if r.typ == TypeIn || r.typ == TypeOut {
			if r.sector*512+r.length > lim.capacity*512 || r.length != sum(r.data) {
				t.Fatalf("accepted out-of-range request: sector %d length %d", r.sector, r.length)
			}
		}
		for _, s := range r.spans {
			if s.sector+uint64(s.sectors) > lim.capacity {
				t.Fatalf("accepted out-of-range span %+v", s)
			}
		}
	})
}
