package volume

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/hemd/hemd/hem"
	"github.com/hemd/hemd/hem/datakey"
	"golang.org/x/sys/unix"
)

// ContextKey is the encryption-context key that binds a data key to its
// volume, as EBS does.
const ContextKey = "aws:ebs:id"

// KMS is what volumes need of the key management service. Every plaintext
// data key it returns goes straight into caller-owned (locked) memory.
type KMS interface {
	// GenerateDataKeyWithoutPlaintext returns a new AES-256-XTS (64-byte)
	// data key wrapped under keyID with ctx, and the key's ARN.
	GenerateDataKeyWithoutPlaintext(ctx context.Context, keyID string, ectx map[string]string) (blob []byte, keyARN string, err error)
	// Decrypt unwraps blob with ectx into dst (64 bytes) and returns the
	// ARN of the key that wrapped it.
	Decrypt(ctx context.Context, blob []byte, ectx map[string]string, dst []byte) (keyARN string, err error)
}

// NewID returns a fresh id with prefix ("vol" or "snap") and 17 hex digits.
func NewID(prefix string) string {
	var b [9]byte
	rand.Read(b[:])
	return prefix + "-" + hex.EncodeToString(b[:])[:17]
}

// CreateOptions describe a new volume.
type CreateOptions struct {
	ID        string // default: a new vol- id
	Size      uint64 // bytes, a multiple of BlockSize
	BlockSize uint32 // 512 (default) or 4096
	KeyID     string // CMK id, ARN or alias
	// Parent, when set, is the snapshot the volume starts from: the new
	// volume shares its wrapped key and context and holds a copy of its data.
	Parent string
}

// Volume is an open volume file.
type Volume struct {
	f    *os.File
	Head *Header
	path string
}

// Create makes a new encrypted volume at path under a fresh data key from
// the KMS, or from the snapshot at opts.Parent.
func Create(ctx context.Context, kms KMS, path string, opts CreateOptions) (*Volume, error) {
	if opts.BlockSize == 0 {
		opts.BlockSize = 512
	}
	if opts.ID == "" {
		opts.ID = NewID("vol")
	}
	h := &Header{
		VolumeID:     opts.ID,
		SizeBytes:    opts.Size,
		BlockSize:    opts.BlockSize,
		DataUnitSize: opts.BlockSize,
		Cipher:       CipherXTSPlain,
		DataOffset:   DataOffset,
		Created:      time.Now().UTC().Truncate(time.Second),
	}
	var parent *Volume
	if opts.Parent != "" {
		p, err := Open(opts.Parent, true)
		if err != nil {
			return nil, fmt.Errorf("create %s: parent: %w", opts.ID, err)
		}
		defer p.Close()
		ph := p.Head
		if !ValidSnapshotID(ph.VolumeID) {
			return nil, fmt.Errorf("create %s: %s is volume %s, not a snapshot", opts.ID, opts.Parent, ph.VolumeID)
		}
		if h.SizeBytes == 0 {
			h.SizeBytes = ph.SizeBytes
		}
		if h.SizeBytes < ph.SizeBytes {
			return nil, fmt.Errorf("create %s: size %d is smaller than snapshot %s (%d)", opts.ID, h.SizeBytes, ph.VolumeID, ph.SizeBytes)
		}
		h.BlockSize, h.DataUnitSize = ph.BlockSize, ph.DataUnitSize
		h.KeyID, h.WrappedDEK, h.EncryptionContext = ph.KeyID, ph.WrappedDEK, ph.EncryptionContext
		h.ParentSnapshot = ph.VolumeID
		parent = p
	} else {
		h.EncryptionContext = map[string]string{ContextKey: h.VolumeID}
		// Check the geometry before the KMS makes a key for nothing.
		pre := *h
		pre.KeyID, pre.WrappedDEK = "pending", []byte{0}
		if err := pre.Validate(); err != nil {
			return nil, fmt.Errorf("create %s: %w", opts.ID, err)
		}
		if opts.KeyID == "" {
			return nil, fmt.Errorf("create %s: no KMS key given", opts.ID)
		}
		blob, arn, err := kms.GenerateDataKeyWithoutPlaintext(ctx, opts.KeyID, h.EncryptionContext)
		if err != nil {
			return nil, fmt.Errorf("create %s: generate data key under %s: %w", opts.ID, opts.KeyID, err)
		}
		h.KeyID, h.WrappedDEK = arn, blob
	}
	if err := h.Validate(); err != nil {
		return nil, fmt.Errorf("create %s: %w", opts.ID, err)
	}
	v, err := createFile(path, h)
	if err != nil {
		return nil, err
	}
	if parent != nil {
		// Same key, same layout: the ciphertext is copied as it is.
		if err := copyData(v.f, parent.f, int64(parent.Head.DataOffset), int64(h.DataOffset), int64(parent.Head.SizeBytes)); err != nil {
			v.Close()
			os.Remove(path)
			return nil, fmt.Errorf("create %s from %s: %w", opts.ID, parent.Head.VolumeID, err)
		}
	}
	return v, nil
}

// createFile writes h into a new sparse file of the volume's full size.
func createFile(path string, h *Header) (*Volume, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create volume: %w", err)
	}
	fail := func(err error) (*Volume, error) {
		f.Close()
		os.Remove(path)
		return nil, fmt.Errorf("create volume %s: %w", h.VolumeID, err)
	}
	if err := f.Truncate(int64(h.DataOffset + h.SizeBytes)); err != nil {
		return fail(err)
	}
	if err := Write(f, h); err != nil {
		return fail(err)
	}
	return &Volume{f: f, Head: h, path: path}, nil
}

// Open opens a volume file and reads its header.
func Open(path string, readOnly bool) (*Volume, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("open volume: %w", err)
	}
	h, err := Read(f)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open volume %s: %w", path, err)
	}
	st, err := f.Stat()
	if err == nil && st.Mode().IsRegular() && uint64(st.Size()) < h.DataOffset+h.SizeBytes {
		f.Close()
		return nil, fmt.Errorf("open volume %s: file has %d bytes, header says %d", path, st.Size(), h.DataOffset+h.SizeBytes)
	}
	return &Volume{f: f, Head: h, path: path}, nil
}

// Close closes the file.
func (v *Volume) Close() error { return v.f.Close() }

// Path returns the volume's path.
func (v *Volume) Path() string { return v.path }

// Unwrapper returns the function that unwraps the volume's data key through
// the KMS, with the context stored in the header. A wrapped key swapped in
// from another volume fails here: its context does not match.
func (v *Volume) Unwrapper(kms KMS) datakey.Unwrap { return Unwrapper(v.Head, kms) }

// Unwrapper is Volume.Unwrapper for a header read elsewhere.
func Unwrapper(h *Header, kms KMS) datakey.Unwrap {
	return func(ctx context.Context, dst []byte) error {
		arn, err := kms.Decrypt(ctx, h.WrappedDEK, h.EncryptionContext, dst)
		if err != nil {
			return fmt.Errorf("volume %s: unwrap data key with %s: %w", h.VolumeID, h.KeyID, err)
		}
		if arn != "" && h.KeyID != "" && arn != h.KeyID {
			clear(dst)
			return fmt.Errorf("volume %s: data key was wrapped by %s, header says %s", h.VolumeID, arn, h.KeyID)
		}
		return nil
	}
}

// chunk is how much data import, export and copy move at a time.
const chunk = 1 << 20

// Progress reports bytes done out of total.
type Progress func(done, total int64)

// Import encrypts the raw image r (size bytes) into the volume's data area.
func (v *Volume) Import(ctx context.Context, kms KMS, r io.Reader, size int64, progress Progress) error {
	if uint64(size) > v.Head.SizeBytes {
		return fmt.Errorf("import into %s: image of %d bytes is larger than the volume (%d)", v.Head.VolumeID, size, v.Head.SizeBytes)
	}
	return v.withKey(ctx, kms, func(x *hem.XTS) error {
		buf := make([]byte, chunk)
		us := int64(x.UnitSize())
		for off := int64(0); off < size; {
			if err := ctx.Err(); err != nil {
				return err
			}
			n, err := io.ReadFull(r, buf[:min(chunk, size-off)])
			if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
				return fmt.Errorf("import into %s: read image at %d: %w", v.Head.VolumeID, off, err)
			}
			// A tail that is not a whole block is padded with zeros.
			w := (int64(n) + int64(v.Head.BlockSize) - 1) / int64(v.Head.BlockSize) * int64(v.Head.BlockSize)
			clear(buf[n:w])
			x.Encrypt(buf[:w], buf[:w], uint64(off/us))
			if _, err := v.f.WriteAt(buf[:w], int64(v.Head.DataOffset)+off); err != nil {
				return fmt.Errorf("import into %s: %w", v.Head.VolumeID, err)
			}
			off += int64(n)
			if progress != nil {
				progress(off, size)
			}
			if n == 0 {
				break
			}
		}
		clear(buf)
		return v.f.Sync()
	})
}

// Export decrypts the volume's data area into w.
func (v *Volume) Export(ctx context.Context, kms KMS, w io.Writer, progress Progress) error {
	return v.withKey(ctx, kms, func(x *hem.XTS) error {
		buf := make([]byte, chunk)
		defer clear(buf)
		size := int64(v.Head.SizeBytes)
		us := int64(x.UnitSize())
		for off := int64(0); off < size; {
			if err := ctx.Err(); err != nil {
				return err
			}
			n := min(chunk, size-off)
			if _, err := v.f.ReadAt(buf[:n], int64(v.Head.DataOffset)+off); err != nil {
				return fmt.Errorf("export %s: %w", v.Head.VolumeID, err)
			}
			x.Decrypt(buf[:n], buf[:n], uint64(off/us))
			if _, err := w.Write(buf[:n]); err != nil {
				return fmt.Errorf("export %s: %w", v.Head.VolumeID, err)
			}
			off += n
			if progress != nil {
				progress(off, size)
			}
		}
		return nil
	})
}

// withKey unwraps the data key into locked memory for fn and zeroizes it after.
func (v *Volume) withKey(ctx context.Context, kms KMS, fn func(*hem.XTS) error) error {
	k := datakey.New(int(v.Head.DataUnitSize))
	x, err := k.Attach(ctx, v.Unwrapper(kms))
	if err != nil {
		return err
	}
	defer k.Zeroize()
	return fn(x)
}

// Snapshot copies the volume into a new snapshot file at path: same data
// key, same wrapped key and context, the ciphertext copied as it is.
func (v *Volume) Snapshot(path, snapID string) (*Volume, error) {
	if snapID == "" {
		snapID = NewID("snap")
	}
	h := *v.Head
	h.VolumeID, h.Seq, h.ParentSnapshot = snapID, 0, ""
	h.Created = time.Now().UTC().Truncate(time.Second)
	s, err := createFile(path, &h)
	if err != nil {
		return nil, err
	}
	if err := copyData(s.f, v.f, int64(v.Head.DataOffset), int64(h.DataOffset), int64(h.SizeBytes)); err != nil {
		s.Close()
		os.Remove(path)
		return nil, fmt.Errorf("snapshot %s of %s: %w", snapID, v.Head.VolumeID, err)
	}
	return s, s.f.Sync()
}

// CopySnapshot copies a snapshot into a new snapshot under another CMK: a new
// data key (context: the new snapshot id), the data re-encrypted.
func (v *Volume) CopySnapshot(ctx context.Context, kms KMS, path, keyID, snapID string) (*Volume, error) {
	if !ValidSnapshotID(v.Head.VolumeID) {
		return nil, fmt.Errorf("copy %s: not a snapshot", v.Head.VolumeID)
	}
	if snapID == "" {
		snapID = NewID("snap")
	}
	if keyID == "" {
		keyID = v.Head.KeyID
	}
	h := *v.Head
	h.VolumeID, h.Seq, h.ParentSnapshot = snapID, 0, ""
	h.Created = time.Now().UTC().Truncate(time.Second)
	h.EncryptionContext = map[string]string{ContextKey: snapID}
	blob, arn, err := kms.GenerateDataKeyWithoutPlaintext(ctx, keyID, h.EncryptionContext)
	if err != nil {
		return nil, fmt.Errorf("copy %s: generate data key under %s: %w", v.Head.VolumeID, keyID, err)
	}
	h.KeyID, h.WrappedDEK = arn, blob
	dst, err := createFile(path, &h)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*Volume, error) {
		dst.Close()
		os.Remove(path)
		return nil, fmt.Errorf("copy %s to %s: %w", v.Head.VolumeID, snapID, err)
	}
	err = v.withKey(ctx, kms, func(src *hem.XTS) error {
		return dst.withKey(ctx, kms, func(out *hem.XTS) error {
			return reencrypt(ctx, v, dst, src, out)
		})
	})
	if err != nil {
		return fail(err)
	}
	if err := dst.f.Sync(); err != nil {
		return fail(err)
	}
	return dst, nil
}

// reencrypt moves the data area of src into dst, decrypting with from and
// encrypting with to. Holes (never written) stay holes.
func reencrypt(ctx context.Context, src, dst *Volume, from, to *hem.XTS) error {
	buf := make([]byte, chunk)
	defer clear(buf)
	us := int64(from.UnitSize())
	return forData(src.f, int64(src.Head.DataOffset), int64(src.Head.SizeBytes), func(off, n int64) error {
		for n > 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
			c := min(n, chunk)
			if _, err := src.f.ReadAt(buf[:c], int64(src.Head.DataOffset)+off); err != nil {
				return err
			}
			from.Decrypt(buf[:c], buf[:c], uint64(off/us))
			to.Encrypt(buf[:c], buf[:c], uint64(off/us))
			if _, err := dst.f.WriteAt(buf[:c], int64(dst.Head.DataOffset)+off); err != nil {
				return err
			}
			off, n = off+c, n-c
		}
		return nil
	})
}

// forData calls fn for each allocated range of [base, base+size) of f, as
// offsets relative to base, aligned to 4 KiB (SEEK_DATA/SEEK_HOLE); where the
// filesystem cannot tell, the whole range is data.
func forData(f *os.File, base, size int64, fn func(off, n int64) error) error {
	fd := int(f.Fd())
	end := base + size
	for pos := base; pos < end; {
		data, err := unix.Seek(fd, pos, unix.SEEK_DATA)
		if err == unix.ENXIO {
			return nil // only a hole is left
		}
		if err != nil {
			return fn(pos-base, end-pos)
		}
		if data >= end {
			return nil
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil || hole > end {
			hole = end
		}
		data &^= 4095
		if data < pos {
			data = pos
		}
		if err := fn(data-base, hole-data); err != nil {
			return err
		}
		pos = hole
	}
	return nil
}

// copyData copies size bytes of ciphertext from src at srcOff to dst at
// dstOff, keeping holes.
func copyData(dst, src *os.File, srcOff, dstOff, size int64) error {
	buf := make([]byte, chunk)
	return forData(src, srcOff, size, func(off, n int64) error {
		for n > 0 {
			c := min(n, chunk)
			if _, err := src.ReadAt(buf[:c], srcOff+off); err != nil {
				return err
			}
			if _, err := dst.WriteAt(buf[:c], dstOff+off); err != nil {
				return err
			}
			off, n = off+c, n-c
		}
		return nil
	})
}
