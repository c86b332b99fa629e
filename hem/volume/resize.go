package volume

import (
	"errors"
	"fmt"
	"io"
)

// Growing a volume (EBS Elastic Volumes): the storage grows first, then the
// header says so. The header is written as every header update is, the
// primary copy synced, then the backup synced, each with a higher sequence
// number; so a crash at any point leaves a volume whose header says the old
// size or the new one, never more than its storage holds.

// Resizable is the storage of a volume as Resize uses it: a file, a block
// device, or (once it lands) an RBD image. Grow makes it at least size bytes,
// durably (a file is extended and synced; a block device must have been
// grown by its owner; an RBD image is resized).
type Resizable interface {
	io.ReaderAt
	WriterSyncer
	Grow(size int64) error
}

// ErrShrink is a resize to less than the volume's size.
var ErrShrink = errors.New("a volume cannot shrink")

// CheckResize says whether h's volume can be resized to size bytes: size is
// a positive multiple of the block and data unit sizes, and not less than
// the volume's size (a filesystem in the guest may use its end: shrinking
// would lose data, and EBS does not shrink volumes either).
func CheckResize(h *Header, size uint64) error {
	switch {
	case !h.Available():
		return fmt.Errorf("volume %s: %w (state %s): only an available volume grows", h.VolumeID, ErrNotAvailable, h.State)
	case size == 0 || size%uint64(h.BlockSize) != 0 || size%uint64(h.DataUnitSize) != 0:
		return fmt.Errorf("volume %s: size %d is not a positive multiple of the block size %d and data unit %d",
			h.VolumeID, size, h.BlockSize, h.DataUnitSize)
	case size > 1<<62 || h.DataOffset+size < size:
		return fmt.Errorf("volume %s: size %d too large", h.VolumeID, size)
	case size < h.SizeBytes:
		return fmt.Errorf("volume %s: %w: it has %d bytes, %d asked; shrinking would cut off what the guest keeps at its end",
			h.VolumeID, ErrShrink, h.SizeBytes, size)
	}
	return nil
}

// Resize grows the volume on st to size bytes of data and returns its old
// and new headers. A volume already that size is left alone (new is old).
// The storage grows first (durably), then both header copies are rewritten,
// one after the other, each synced.
func Resize(st Resizable, size uint64) (old, new *Header, err error) {
	h, err := Read(st)
	if err != nil {
		return nil, nil, fmt.Errorf("resize: %w", err)
	}
	if err := CheckResize(h, size); err != nil {
		return h, nil, err
	}
	if size == h.SizeBytes {
		return h, h, nil
	}
	if err := st.Grow(int64(h.DataOffset + size)); err != nil {
		return h, nil, fmt.Errorf("volume %s: grow to %d bytes: %w", h.VolumeID, size, err)
	}
	nh := *h
	nh.SizeBytes = size
	if err := Write(st, &nh); err != nil {
		return h, nil, fmt.Errorf("volume %s: resize to %d bytes: %w", h.VolumeID, size, err)
	}
	return h, &nh, nil
}
