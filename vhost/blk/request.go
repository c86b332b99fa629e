package blk

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/hemd/hemd/vhost/virtq"
)

// Request types (virtio 1.2, 5.2.6).
const (
	TypeIn          = 0
	TypeOut         = 1
	TypeFlush       = 4
	TypeGetID       = 8
	TypeDiscard     = 11
	TypeWriteZeroes = 13
)

// Status values.
const (
	StatusOK     = 0
	StatusIOErr  = 1
	StatusUnsupp = 2
)

const (
	sectorSize  = 512
	headerLen   = 16
	segmentLen  = 16 // discard / write zeroes segment
	idLen       = 20 // VIRTIO_BLK_ID_BYTES
	flagUnmap   = 1
	maxSegments = 16
)

// Errors in a guest's request. Each completes the request with an error
// status and bumps a counter; the queue goes on.
var (
	ErrNoStatus          = errors.New("chain has no device-writable status byte at its end")
	ErrHeaderTooShort    = errors.New("request header shorter than 16 bytes")
	ErrUnexpectedRead    = errors.New("request carries device-readable data it must not have")
	ErrUnexpectedWrite   = errors.New("request carries device-writable data it must not have")
	ErrLenNotSector      = errors.New("data length not a multiple of 512")
	ErrMisaligned        = errors.New("request not aligned to the logical block size")
	ErrOutOfRange        = errors.New("sector range beyond the end of the disk")
	ErrReadOnly          = errors.New("write to a read-only disk")
	ErrSegmentsLen       = errors.New("discard/write-zeroes data not a non-empty multiple of 16 bytes")
	ErrTooManySegments   = errors.New("too many discard/write-zeroes segments")
	ErrSegmentTooLarge   = errors.New("discard/write-zeroes segment larger than advertised")
	ErrUnsupported       = errors.New("unsupported request type")
	ErrUnsupportedFlags  = errors.New("unsupported discard/write-zeroes flags")
	ErrDiscardNotEnabled = errors.New("discard is not enabled for this disk")
)

// unsupported reports whether err completes a request with S_UNSUPP rather
// than S_IOERR.
func unsupported(err error) bool {
	return errors.Is(err, ErrUnsupported) || errors.Is(err, ErrUnsupportedFlags) || errors.Is(err, ErrDiscardNotEnabled)
}

// span is a sector range of a discard or write-zeroes request.
type span struct {
	sector  uint64
	sectors uint32
	unmap   bool
}

// request is a parsed, bounds-checked virtio-blk request. Its slices point
// into guest memory.
type request struct {
	typ    uint32
	sector uint64
	data   [][]byte // IN: device-writable data; OUT: device-readable data; GET_ID: writable
	length uint64   // bytes in data
	spans  []span   // DISCARD, WRITE_ZEROES
	status []byte   // one byte, nil when the chain has none

	rd, wr [][]byte // scratch, reused between requests
}

// limits are what parseRequest checks a request against.
type limits struct {
	capacity    uint64 // sectors
	blockSize   uint32 // logical block size, 512 or 4096
	readOnly    bool
	discard     bool
	maxSegSects uint32 // most sectors in one discard/write-zeroes segment
}

// parseRequest checks every field of a chain before any I/O: structure,
// direction, lengths, alignment and the sector range. It fills r; r.status
// is set whenever the chain has a usable status byte, also on error.
func parseRequest(c *virtq.Chain, lim *limits, r *request) error {
	r.typ, r.sector, r.length = 0, 0, 0
	r.data, r.spans, r.status = nil, r.spans[:0], nil

	segs := c.Segs
	if n := len(segs); n > 0 {
		last := segs[n-1]
		if last.Write && last.Len > 0 && last.Buf != nil {
			r.status = last.Buf[last.Len-1 : last.Len]
		}
	}
	if c.Err != nil {
		return c.Err
	}
	if r.status == nil {
		return ErrNoStatus
	}

	// The device-readable part starts with the 16-byte header; it may share
	// a descriptor with what follows (VERSION_1 allows any framing).
	var hdr [headerLen]byte
	got := 0
	readable, writable := r.rd[:0], r.wr[:0]
	defer func() { r.rd, r.wr = readable[:0], writable[:0] }()
	for i, s := range segs {
		b := s.Buf
		if i == len(segs)-1 {
			b = b[:len(b)-1] // the status byte
		}
		if s.Write {
			if len(b) > 0 {
				writable = append(writable, b)
			}
			continue
		}
		if got < headerLen {
			k := copy(hdr[got:], b)
			got += k
			b = b[k:]
		}
		if len(b) > 0 {
			readable = append(readable, b)
		}
	}
	if got < headerLen {
		return fmt.Errorf("%w: %d bytes", ErrHeaderTooShort, got)
	}
	r.typ = binary.LittleEndian.Uint32(hdr[0:])
	r.sector = binary.LittleEndian.Uint64(hdr[8:])

	switch r.typ {
	case TypeIn:
		if len(readable) > 0 {
			return ErrUnexpectedRead
		}
		r.data = writable
		return r.checkRange(lim)
	case TypeOut:
		if len(writable) > 0 {
			return ErrUnexpectedWrite
		}
		if lim.readOnly {
			return ErrReadOnly
		}
		r.data = readable
		return r.checkRange(lim)
	case TypeFlush:
		if len(readable) > 0 {
			return ErrUnexpectedRead
		}
		if len(writable) > 0 {
			return ErrUnexpectedWrite
		}
		return nil
	case TypeGetID:
		if len(readable) > 0 {
			return ErrUnexpectedRead
		}
		r.data = writable
		r.length = sum(writable)
		return nil
	case TypeDiscard, TypeWriteZeroes:
		if len(writable) > 0 {
			return ErrUnexpectedWrite
		}
		if lim.readOnly {
			return ErrReadOnly
		}
		if r.typ == TypeDiscard && !lim.discard {
			return ErrDiscardNotEnabled
		}
		return r.parseSpans(readable, lim)
	}
	return fmt.Errorf("%w: %d", ErrUnsupported, r.typ)
}

func sum(bufs [][]byte) uint64 {
	var n uint64
	for _, b := range bufs {
		n += uint64(len(b))
	}
	return n
}

// checkRange checks an IN or OUT request's data against the disk.
func (r *request) checkRange(lim *limits) error {
	r.length = sum(r.data)
	if r.length%sectorSize != 0 {
		return fmt.Errorf("%w: %d bytes", ErrLenNotSector, r.length)
	}
	return checkSectors(r.sector, r.length/sectorSize, lim)
}

func checkSectors(sector, count uint64, lim *limits) error {
	bs := uint64(lim.blockSize / sectorSize)
	if sector%bs != 0 || count%bs != 0 {
		return fmt.Errorf("%w: sector %d count %d, block size %d", ErrMisaligned, sector, count, lim.blockSize)
	}
	if sector > lim.capacity || count > lim.capacity-sector {
		return fmt.Errorf("%w: sector %d count %d, capacity %d", ErrOutOfRange, sector, count, lim.capacity)
	}
	return nil
}

// parseSpans decodes and checks discard / write-zeroes segments.
func (r *request) parseSpans(readable [][]byte, lim *limits) error {
	n := sum(readable)
	if n == 0 || n%segmentLen != 0 {
		return fmt.Errorf("%w: %d bytes", ErrSegmentsLen, n)
	}
	if n/segmentLen > maxSegments {
		return fmt.Errorf("%w: %d, most %d", ErrTooManySegments, n/segmentLen, maxSegments)
	}
	var seg [segmentLen]byte
	fill := 0
	for _, b := range readable {
		for len(b) > 0 {
			k := copy(seg[fill:], b)
			fill += k
			b = b[k:]
			if fill < segmentLen {
				continue
			}
			fill = 0
			s := span{
				sector:  binary.LittleEndian.Uint64(seg[0:]),
				sectors: binary.LittleEndian.Uint32(seg[8:]),
			}
			flags := binary.LittleEndian.Uint32(seg[12:])
			allowed := uint32(0)
			if r.typ == TypeWriteZeroes {
				allowed = flagUnmap
			}
			if flags&^allowed != 0 {
				return fmt.Errorf("%w: %#x", ErrUnsupportedFlags, flags)
			}
			s.unmap = flags&flagUnmap != 0
			if s.sectors > lim.maxSegSects {
				return fmt.Errorf("%w: %d sectors, most %d", ErrSegmentTooLarge, s.sectors, lim.maxSegSects)
			}
			if err := checkSectors(s.sector, uint64(s.sectors), lim); err != nil {
				return err
			}
			r.spans = append(r.spans, s)
		}
	}
	return nil
}
