// Package volume is the on-disk format of an encrypted hemd volume: a header
// region with two checksummed copies of the volume's metadata (id, geometry,
// cipher, the KMS-wrapped data key and its encryption context), followed by
// a data area in dm-crypt aes-xts-plain64 layout.
package volume

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"regexp"
	"time"
)

// Layout of the header region. Copy 0 is the primary, copy 1 the backup;
// each is written and synced on its own, so a torn write spoils one copy at
// most.
const (
	CopySize       = 64 << 10 // bytes reserved for one copy
	BackupOffset   = 512 << 10
	DataOffset     = 1 << 20 // default start of the data area (1 MiB aligned)
	prefixSize     = 64
	maxMetaSize    = CopySize - prefixSize
	formatVersion  = 1
	CipherXTSPlain = "aes-xts-plain64"
)

var magic = [8]byte{'H', 'E', 'M', 'D', 'V', 'O', 'L', 0}

// Errors of a header copy. A copy with any of them is not used.
var (
	ErrMagic       = errors.New("not a hemd volume header (bad magic)")
	ErrVersion     = errors.New("unsupported header version")
	ErrChecksum    = errors.New("header checksum mismatch")
	ErrLength      = errors.New("header metadata length out of range")
	ErrCopyIndex   = errors.New("header copy index does not match its place")
	ErrMeta        = errors.New("invalid header metadata")
	ErrBothCorrupt = errors.New("both header copies are corrupt")
	// ErrNotVolume means neither header copy has the magic: a raw image,
	// not a hemd volume.
	ErrNotVolume = errors.New("not a hemd volume (no header)")
)

// Header is a volume's metadata.
type Header struct {
	VolumeID          string            `json:"volume_id"`
	SizeBytes         uint64            `json:"size_bytes"`
	BlockSize         uint32            `json:"block_size"`
	DataUnitSize      uint32            `json:"data_unit_size"`
	Cipher            string            `json:"cipher"`
	DataOffset        uint64            `json:"data_offset"`
	KeyID             string            `json:"key_id"`
	EncryptionContext map[string]string `json:"encryption_context"`
	WrappedDEK        []byte            `json:"wrapped_dek"` // base64 in JSON
	Created           time.Time         `json:"created"`
	ParentSnapshot    string            `json:"parent_snapshot"`
	// Seq orders header updates: the valid copy with the higher one wins.
	Seq uint64 `json:"-"`
}

var (
	volIDRe  = regexp.MustCompile(`^vol-[0-9a-f]{17}$`)
	snapIDRe = regexp.MustCompile(`^snap-[0-9a-f]{17}$`)
)

// ValidVolumeID reports whether id has the EBS form vol- and 17 hex digits.
func ValidVolumeID(id string) bool { return volIDRe.MatchString(id) }

// ValidSnapshotID reports whether id has the EBS form snap- and 17 hex digits.
func ValidSnapshotID(id string) bool { return snapIDRe.MatchString(id) }

// Validate checks every field.
func (h *Header) Validate() error {
	bad := func(f string, a ...any) error { return fmt.Errorf("%w: "+f, append([]any{ErrMeta}, a...)...) }
	switch {
	case !ValidVolumeID(h.VolumeID) && !ValidSnapshotID(h.VolumeID):
		return bad("id %q is not vol-/snap- and 17 hex digits", h.VolumeID)
	case h.BlockSize != 512 && h.BlockSize != 4096:
		return bad("block size %d", h.BlockSize)
	case h.DataUnitSize != 512 && h.DataUnitSize != 4096:
		return bad("data unit size %d", h.DataUnitSize)
	case h.DataUnitSize > h.BlockSize:
		return bad("data unit %d larger than block size %d", h.DataUnitSize, h.BlockSize)
	case h.SizeBytes == 0 || h.SizeBytes%uint64(h.BlockSize) != 0:
		return bad("size %d is not a positive multiple of the block size %d", h.SizeBytes, h.BlockSize)
	case h.Cipher != CipherXTSPlain:
		return bad("cipher %q", h.Cipher)
	case h.DataOffset < DataOffset || h.DataOffset%DataOffset != 0:
		return bad("data offset %d is not a multiple of 1 MiB past the header", h.DataOffset)
	case h.SizeBytes > 1<<62 || h.DataOffset > 1<<62:
		return bad("size %d or data offset %d too large", h.SizeBytes, h.DataOffset)
	case h.KeyID == "":
		return bad("no key id")
	case len(h.WrappedDEK) == 0:
		return bad("no wrapped data key")
	case len(h.EncryptionContext) == 0:
		return bad("no encryption context")
	case h.ParentSnapshot != "" && !ValidSnapshotID(h.ParentSnapshot):
		return bad("parent snapshot %q", h.ParentSnapshot)
	}
	return nil
}

// encodeCopy returns copy idx of h: the 64-byte prefix and the JSON metadata.
//
//	0  magic "HEMDVOL\0"   8  version u16   10 copy u16   12 metadata length u32
//	16 seq u64             24 reserved [8]  32 SHA-256 of prefix (checksum zeroed) ‖ metadata
func encodeCopy(h *Header, idx uint16) ([]byte, error) {
	meta, err := json.Marshal(h)
	if err != nil {
		return nil, err
	}
	if len(meta) > maxMetaSize {
		return nil, fmt.Errorf("%w: %d bytes", ErrLength, len(meta))
	}
	b := make([]byte, prefixSize+len(meta))
	copy(b[0:], magic[:])
	binary.LittleEndian.PutUint16(b[8:], formatVersion)
	binary.LittleEndian.PutUint16(b[10:], idx)
	binary.LittleEndian.PutUint32(b[12:], uint32(len(meta)))
	binary.LittleEndian.PutUint64(b[16:], h.Seq)
	copy(b[prefixSize:], meta)
	sum := sha256.Sum256(b)
	copy(b[32:64], sum[:])
	return b, nil
}

// decodeCopy parses and checks one copy read from its place idx. b holds at
// least the copy (up to CopySize bytes).
func decodeCopy(b []byte, idx uint16) (*Header, error) {
	if len(b) < prefixSize {
		return nil, fmt.Errorf("%w: %d bytes", ErrLength, len(b))
	}
	if !bytes.Equal(b[:8], magic[:]) {
		return nil, ErrMagic
	}
	if v := binary.LittleEndian.Uint16(b[8:]); v != formatVersion {
		return nil, fmt.Errorf("%w: %d", ErrVersion, v)
	}
	if c := binary.LittleEndian.Uint16(b[10:]); c != idx {
		return nil, fmt.Errorf("%w: copy %d found at place %d", ErrCopyIndex, c, idx)
	}
	n := binary.LittleEndian.Uint32(b[12:])
	if n == 0 || n > maxMetaSize || int(n) > len(b)-prefixSize {
		return nil, fmt.Errorf("%w: %d", ErrLength, n)
	}
	whole := append([]byte(nil), b[:prefixSize+int(n)]...)
	var want [32]byte
	copy(want[:], whole[32:64])
	clear(whole[32:64])
	if sha256.Sum256(whole) != want {
		return nil, ErrChecksum
	}
	var h Header
	dec := json.NewDecoder(bytes.NewReader(whole[prefixSize:]))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&h); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrMeta, err)
	}
	h.Seq = binary.LittleEndian.Uint64(b[16:])
	if err := h.Validate(); err != nil {
		return nil, err
	}
	return &h, nil
}

// Read reads the header of a volume. A corrupt copy is passed over for the
// other; the valid copy with the higher sequence number wins. Both corrupt is
// ErrBothCorrupt with both reasons, never a guess.
func Read(r io.ReaderAt) (*Header, error) {
	var hs [2]*Header
	var errs [2]error
	for i, off := range []int64{0, BackupOffset} {
		b := make([]byte, CopySize)
		n, err := r.ReadAt(b, off)
		if err != nil && !(errors.Is(err, io.EOF) && n > 0) {
			errs[i] = fmt.Errorf("read copy %d: %w", i, err)
			continue
		}
		hs[i], errs[i] = decodeCopy(b[:n], uint16(i))
	}
	switch {
	case hs[0] != nil && hs[1] != nil:
		if hs[1].Seq > hs[0].Seq {
			return hs[1], nil
		}
		return hs[0], nil
	case hs[0] != nil:
		return hs[0], nil
	case hs[1] != nil:
		return hs[1], nil
	}
	if errors.Is(errs[0], ErrMagic) && errors.Is(errs[1], ErrMagic) {
		return nil, ErrNotVolume
	}
	return nil, fmt.Errorf("%w: primary: %w; backup: %w", ErrBothCorrupt, errs[0], errs[1])
}

// WriterSyncer is where a header is written: a volume file.
type WriterSyncer interface {
	io.WriterAt
	Sync() error
}

// Write stores h with the next sequence number: the primary copy, a sync,
// then the backup and a sync. An interrupted Write leaves at least one valid
// copy, the old header or the new one.
func Write(w WriterSyncer, h *Header) error {
	if err := h.Validate(); err != nil {
		return err
	}
	h.Seq++
	for i, off := range []int64{0, BackupOffset} {
		b, err := encodeCopy(h, uint16(i))
		if err != nil {
			return err
		}
		// Pad to the whole copy so no stale bytes of an older, longer copy
		// remain behind it.
		full := make([]byte, CopySize)
		copy(full, b)
		if _, err := w.WriteAt(full, off); err != nil {
			return fmt.Errorf("write header copy %d: %w", i, err)
		}
		if err := w.Sync(); err != nil {
			return fmt.Errorf("sync header copy %d: %w", i, err)
		}
	}
	return nil
}

func sha256Sum(b []byte) [32]byte { return sha256.Sum256(b) }
