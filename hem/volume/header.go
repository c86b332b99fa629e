// Package volume is the on-disk format of an encrypted hemd volume: a header
// region with two checksummed copies of the volume's metadata (id, geometry,
// cipher, the KMS-wrapped data key and its encryption context, and the
// volume's state: creating, available or error), followed by a data area in
// dm-crypt aes-xts-plain64 layout.
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
	CipherXTSPlain = "aes-xts-plain64"
	// MaxWrappedDEK is the longest wrapped data key a header may carry:
	// AWS KMS's CiphertextBlob limit. A longer one is a corrupt or forged
	// header, refused before it reaches the KMS.
	MaxWrappedDEK = 6144

	// formatVersion is the version of a header of an available volume: its
	// metadata has no state field, byte for byte what hemd wrote before
	// volumes had states, so old volumes read as available and an older
	// hemd still reads a new available volume.
	formatVersion = 1
	// stateVersion is the version of a header of a volume that is not
	// available (creating or error): the metadata carries "state" and
	// "operation". An older hemd refuses it ("unsupported header version
	// 2"), so no hemd ever serves a half-made volume.
	stateVersion = 2
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
	WrappedDEK        []byte            `json:"wrapped_dek"` // base64 in JSON, at most MaxWrappedDEK
	Created           time.Time         `json:"created"`
	ParentSnapshot    string            `json:"parent_snapshot"`
	// State is what the volume is good for: StateAvailable (complete,
	// servable), StateCreating (an import or copy into it has not
	// finished) or StateError (that operation failed; Operation.Error says
	// why). Read always sets it; "" is taken as available when writing.
	State State `json:"state,omitempty"`
	// Operation is the unfinished operation of a volume that is not
	// available: what it copies from and, for an import, how far it got.
	Operation *Operation `json:"operation,omitempty"`
	// Seq orders header updates: the valid copy with the higher one wins.
	Seq uint64 `json:"-"`
}

// State is a volume's state, named as EBS names them.
type State string

// Volume states.
const (
	// StateCreating: an operation is filling the volume; until it marks
	// the volume available, the data is incomplete and hemd serve refuses
	// it.
	StateCreating State = "creating"
	// StateAvailable: the data is complete and synced.
	StateAvailable State = "available"
	// StateError: the operation that was filling the volume failed; the
	// data is incomplete and hemd serve refuses it.
	StateError State = "error"
)

// Kinds of operation that make a volume (Operation.Kind).
const (
	OpImport   = "import"   // hemd volume import: a raw image encrypted into the volume
	OpSnapshot = "snapshot" // hemd snapshot create: a volume's ciphertext copied
	OpCopy     = "copy"     // hemd snapshot copy: a snapshot re-encrypted under a new key
	OpRestore  = "restore"  // hemd volume create --snapshot: a snapshot's ciphertext copied
)

// maxErrorLen bounds the failure reason kept in a header.
const maxErrorLen = 1024

// Operation is the unfinished operation of a volume that is creating or in
// error.
type Operation struct {
	Kind string `json:"kind"` // OpImport, OpSnapshot, OpCopy or OpRestore
	// Source is what the data comes from: the image's absolute path for an
	// import, the source volume or snapshot id otherwise.
	Source string `json:"source"`
	// SourceSize is the size in bytes of the source: the image for an
	// import, the source's data area otherwise.
	SourceSize uint64 `json:"source_size"`
	// Done is, for an import, the checkpoint: the bytes of the image that
	// are encrypted into the volume and synced to disk. An import resumes
	// here. Other operations cannot resume and leave it 0.
	Done    uint64    `json:"done"`
	Started time.Time `json:"started"`
	// Error is why the operation failed (state error only).
	Error string `json:"error,omitempty"`
}

// Percent is how much of the operation is done, rounded down.
func (o *Operation) Percent() int {
	if o.SourceSize == 0 {
		return 0
	}
	return int(o.Done * 100 / o.SourceSize)
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
	case len(h.WrappedDEK) > MaxWrappedDEK:
		return bad("wrapped data key of %d bytes (at most %d: the largest CiphertextBlob AWS KMS makes)", len(h.WrappedDEK), MaxWrappedDEK)
	case len(h.EncryptionContext) == 0:
		return bad("no encryption context")
	case h.ParentSnapshot != "" && !ValidSnapshotID(h.ParentSnapshot):
		return bad("parent snapshot %q", h.ParentSnapshot)
	}
	return h.validateState()
}

// validateState checks the state and the operation that goes with it.
func (h *Header) validateState() error {
	bad := func(f string, a ...any) error { return fmt.Errorf("%w: "+f, append([]any{ErrMeta}, a...)...) }
	o := h.Operation
	switch h.State {
	case "", StateAvailable:
		if o != nil {
			return bad("an available volume with an unfinished %s", o.Kind)
		}
		return nil
	case StateCreating, StateError:
		if o == nil {
			return bad("state %s without its operation", h.State)
		}
	default:
		return bad("state %q", h.State)
	}
	switch {
	case o.Kind != OpImport && o.Kind != OpSnapshot && o.Kind != OpCopy && o.Kind != OpRestore:
		return bad("operation %q", o.Kind)
	case o.Source == "":
		return bad("%s without a source", o.Kind)
	case o.Done > o.SourceSize:
		return bad("%s done %d of %d bytes", o.Kind, o.Done, o.SourceSize)
	case o.Done%uint64(h.DataUnitSize) != 0:
		return bad("%s checkpoint %d is not a multiple of the data unit %d", o.Kind, o.Done, h.DataUnitSize)
	case o.Kind == OpImport && o.SourceSize > h.SizeBytes:
		return bad("import of %d bytes into a volume of %d", o.SourceSize, h.SizeBytes)
	case o.Kind != OpImport && o.Done != 0:
		return bad("%s has a checkpoint: only an import resumes", o.Kind)
	case h.State == StateError && o.Error == "":
		return bad("state error without a reason")
	case h.State == StateCreating && o.Error != "":
		return bad("state creating with an error")
	case len(o.Error) > maxErrorLen:
		return bad("error of %d bytes", len(o.Error))
	}
	return nil
}

// Available reports whether the volume's data is complete.
func (h *Header) Available() bool { return h.State == "" || h.State == StateAvailable }

// ErrNotAvailable is the error of Servable: the volume is creating or in
// error, its data incomplete.
var ErrNotAvailable = errors.New("volume is not available")

// Servable returns nil for an available volume. For any other it returns
// an error (ErrNotAvailable) that says what happened and what to do; path is
// the volume's file, named in the command to run.
func (h *Header) Servable(path string) error {
	if h.Available() {
		return nil
	}
	return &notAvailableError{h: h, path: path}
}

type notAvailableError struct {
	h    *Header
	path string
}

func (e *notAvailableError) Unwrap() error { return ErrNotAvailable }

func (e *notAvailableError) Error() string {
	h, o := e.h, e.h.Operation
	var what, todo string
	switch o.Kind {
	case OpImport:
		what = fmt.Sprintf("import of %s %s at %d %% (%d of %d MiB)", o.Source, stopped(h), o.Percent(), o.Done>>20, o.SourceSize>>20)
		todo = fmt.Sprintf("run hemd volume import --resume --from %s %s", o.Source, e.path)
		if h.State == StateCreating {
			todo += " (unless that import is still running)"
		}
	case OpSnapshot:
		what = fmt.Sprintf("snapshot of %s %s", o.Source, stopped(h))
		todo = fmt.Sprintf("a snapshot cannot resume: delete %s and run hemd snapshot create again", e.path)
	case OpCopy:
		what = fmt.Sprintf("copy of snapshot %s %s", o.Source, stopped(h))
		todo = fmt.Sprintf("a copy cannot resume: delete %s and run hemd snapshot copy again", e.path)
	default:
		what = fmt.Sprintf("restore from snapshot %s %s", o.Source, stopped(h))
		todo = fmt.Sprintf("a restore cannot resume: delete %s and run hemd volume create --snapshot again", e.path)
	}
	if h.State == StateError {
		what += ": " + o.Error
	}
	state := string(h.State)
	if h.State == StateError {
		state = "in state error"
	}
	return fmt.Sprintf("volume %s is %s: %s: %s", h.VolumeID, state, what, todo)
}

func stopped(h *Header) string {
	if h.State == StateError {
		return "failed"
	}
	return "interrupted"
}

// encodeCopy returns copy idx of h: the 64-byte prefix and the JSON metadata.
//
// The version is 1 for an available volume (metadata without a state) and
// 2 for one that is creating or in error.
//
//	0  magic "HEMDVOL\0"   8  version u16   10 copy u16   12 metadata length u32
//	16 seq u64             24 reserved [8]  32 SHA-256 of prefix (checksum zeroed) ‖ metadata
func encodeCopy(h *Header, idx uint16) ([]byte, error) {
	version := uint16(stateVersion)
	if h.Available() {
		// The metadata of an available volume has no state: version 1.
		plain := *h
		plain.State = ""
		h, version = &plain, formatVersion
	}
	meta, err := json.Marshal(h)
	if err != nil {
		return nil, err
	}
	if len(meta) > maxMetaSize {
		return nil, fmt.Errorf("%w: %d bytes", ErrLength, len(meta))
	}
	b := make([]byte, prefixSize+len(meta))
	copy(b[0:], magic[:])
	binary.LittleEndian.PutUint16(b[8:], version)
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
	version := binary.LittleEndian.Uint16(b[8:])
	if version != formatVersion && version != stateVersion {
		return nil, fmt.Errorf("%w: %d", ErrVersion, version)
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
	switch {
	case version == formatVersion && (h.State != "" || h.Operation != nil):
		return nil, fmt.Errorf("%w: a version %d header with a state", ErrMeta, version)
	case version == stateVersion && (h.State == "" || h.State == StateAvailable):
		return nil, fmt.Errorf("%w: a version %d header of an available volume", ErrMeta, version)
	case version == formatVersion:
		h.State = StateAvailable
	}
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
