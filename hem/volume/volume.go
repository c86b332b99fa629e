package volume

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
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
	// Parent, when set, is the snapshot file the volume starts from: the
	// new volume shares its wrapped key and context and holds a copy of its
	// data. ParentAt is the same for a snapshot anywhere (it wins).
	Parent   string
	ParentAt Location
	// Pending, when set, creates the volume in state creating for this
	// operation (an import): the operation marks it available when its
	// data is complete.
	Pending *Operation
}

// Volume is an open volume.
type Volume struct {
	f      Store
	Head   *Header
	loc    Location
	locked bool // this process claims the volume (lock)
}

// Create makes a new encrypted volume file at path (see CreateAt).
func Create(ctx context.Context, kms KMS, path string, opts CreateOptions) (*Volume, error) {
	return CreateAt(ctx, kms, FileAt(path), opts)
}

// CreateAt makes a new encrypted volume at loc under a fresh data key from
// the KMS, or from the snapshot at opts.ParentAt (or opts.Parent). A volume
// from a snapshot is cloned where loc can (Cloner): available at once, no
// data copied; otherwise it is creating until its data is copied and synced.
// A killed CreateAt leaves nothing at loc, or a volume that says it is
// creating.
func CreateAt(ctx context.Context, kms KMS, loc Location, opts CreateOptions) (*Volume, error) {
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
		State:        StateAvailable,
	}
	if opts.Pending != nil {
		op := *opts.Pending
		if op.Started.IsZero() {
			op.Started = h.Created
		}
		h.State, h.Operation = StateCreating, &op
	}
	var parent *Volume
	if opts.ParentAt == nil && opts.Parent != "" {
		opts.ParentAt = FileAt(opts.Parent)
	}
	if opts.ParentAt != nil {
		p, err := OpenAt(opts.ParentAt, true)
		if err != nil {
			return nil, fmt.Errorf("create %s: parent: %w", opts.ID, err)
		}
		defer p.Close()
		ph := p.Head
		if !ValidSnapshotID(ph.VolumeID) {
			return nil, fmt.Errorf("create %s: %s is volume %s, not a snapshot", opts.ID, opts.ParentAt, ph.VolumeID)
		}
		if err := ph.Servable(opts.ParentAt.String()); err != nil {
			return nil, fmt.Errorf("create %s: parent: %w", opts.ID, err)
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
		h.State = StateCreating
		h.Operation = &Operation{Kind: OpRestore, Source: ph.VolumeID, SourceSize: ph.SizeBytes, Started: h.Created}
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
	if parent != nil {
		if c, ok := loc.(Cloner); ok {
			// Copy-on-write: the data is there at once, so is the volume.
			ch := *h
			ch.State, ch.Operation = StateAvailable, nil
			v := &Volume{Head: &ch, loc: loc}
			st, cloned, err := c.Clone(parent.f, v.init)
			if err != nil {
				return nil, fmt.Errorf("create %s from %s: %w", opts.ID, parent.Head.VolumeID, err)
			}
			if cloned {
				v.f = st
				return v, nil
			}
		}
	}
	v, err := create(loc, h)
	if err != nil {
		return nil, err
	}
	if parent != nil {
		// Same key, same layout: the ciphertext is copied as it is.
		err := copyData(ctx, v.f, parent.f, int64(parent.Head.DataOffset), int64(h.DataOffset), int64(parent.Head.SizeBytes))
		if err == nil {
			err = v.complete()
		}
		if err != nil {
			return nil, v.abandon(fmt.Errorf("create %s from %s: %w", opts.ID, parent.Head.VolumeID, err))
		}
	}
	return v, nil
}

// create makes a new store of the volume's full size with header h at loc.
// The store is made and its header synced before it appears at loc (for a
// file: under a temporary name beside it, renamed into place, never
// replacing a file there): a process killed on the way leaves nothing at
// loc, or a store with a whole header. The new volume is claimed (see lock)
// for as long as it is open.
func create(loc Location, h *Header) (*Volume, error) {
	v := &Volume{Head: h, loc: loc}
	st, err := loc.Create(int64(h.DataOffset+h.SizeBytes), v.init)
	if err != nil {
		if errors.Is(err, fs.ErrExist) {
			return nil, fmt.Errorf("create volume %s: %s: %w", h.VolumeID, loc, fs.ErrExist)
		}
		return nil, fmt.Errorf("create volume %s: %w", h.VolumeID, err)
	}
	v.f = st
	return v, nil
}

// init claims a new store and writes the volume's header to it.
func (v *Volume) init(st Store) error {
	v.f = st
	if err := v.lock(); err != nil {
		return err
	}
	return Write(st, v.Head)
}

// renameNoReplace renames from to to, failing if to exists.
func renameNoReplace(from, to string) error {
	err := unix.Renameat2(unix.AT_FDCWD, from, unix.AT_FDCWD, to, unix.RENAME_NOREPLACE)
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) {
		// A filesystem without RENAME_NOREPLACE: a hard link also refuses
		// to replace, and the temporary name goes after.
		if err = os.Link(from, to); err == nil {
			return os.Remove(from)
		}
		return err
	}
	if err != nil {
		return &os.LinkError{Op: "rename", Old: from, New: to, Err: err}
	}
	return nil
}

// syncDir makes a rename in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	return nil
}

// Open opens a volume file and reads its header.
func Open(path string, readOnly bool) (*Volume, error) { return OpenAt(FileAt(path), readOnly) }

// OpenAt opens the volume at loc and reads its header. A native snapshot
// (SnapshotLocation) reads as a snapshot: the header's id is the
// snapshot's.
func OpenAt(loc Location, readOnly bool) (*Volume, error) {
	f, err := loc.Open(readOnly)
	if err != nil {
		if _, ok := err.(*fs.PathError); ok {
			return nil, fmt.Errorf("open volume: %w", err) // names the path
		}
		return nil, fmt.Errorf("open volume %s: %w", loc, err)
	}
	h, err := Read(f)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open volume %s: %w", loc, err)
	}
	if sz, ok := f.(sizer); ok {
		if n, err := sz.Size(); err == nil && n > 0 && uint64(n) < h.DataOffset+h.SizeBytes {
			f.Close()
			return nil, fmt.Errorf("open volume %s: file has %d bytes, header says %d", loc, n, h.DataOffset+h.SizeBytes)
		}
	}
	if sl, ok := loc.(SnapshotLocation); ok && sl.SnapshotID() != "" {
		id := sl.SnapshotID()
		if !ValidSnapshotID(id) {
			f.Close()
			return nil, fmt.Errorf("open volume %s: snapshot %q is not a hemd snapshot (snap- and 17 hex digits)", loc, id)
		}
		if err := h.Servable(loc.String()); err != nil {
			f.Close()
			return nil, fmt.Errorf("open volume %s: the snapshot was taken of a volume that was not available: %w", loc, err)
		}
		view := *h
		view.VolumeID, view.ParentSnapshot = id, ""
		h = &view
	}
	return &Volume{f: f, Head: h, loc: loc}, nil
}

// Close closes the volume (and so drops its claim).
func (v *Volume) Close() error { return v.f.Close() }

// Path returns the volume's path (or name: rbd:POOL/IMAGE).
func (v *Volume) Path() string { return v.loc.String() }

// Location returns where the volume is.
func (v *Volume) Location() Location { return v.loc }

// lock claims the volume, as the operations that fill a volume (create,
// import, snapshot, copy) do while they write: a second import or resume of
// the same volume is refused, and InUse tells an interrupted operation from
// a running one. A file is claimed with an open file description lock
// (F_OFD_SETLK), the kind hemd serve claims a volume with, so an import and
// a hemd serve of one volume exclude each other too; an RBD image with its
// exclusive lock. The claim dies with the process.
func (v *Volume) lock() error {
	c, ok := v.f.(claimer)
	if v.locked || !ok {
		return nil
	}
	if err := c.Claim(); err != nil {
		if errors.Is(err, errClaimed) {
			return fmt.Errorf("volume %s (%s) is in use by another process (an import, or hemd serve)", v.Head.VolumeID, v.loc)
		}
		return fmt.Errorf("lock volume %s: %w", v.loc, err)
	}
	v.locked = true
	return nil
}

// InUse reports whether another process claims the volume: for a volume
// that is creating, whether its operation is still running.
func (v *Volume) InUse() bool {
	c, ok := v.f.(claimer)
	if v.locked || !ok {
		return false
	}
	return c.InUse()
}

// setState writes the header with state s and operation op, synced.
func (v *Volume) setState(s State, op *Operation) error {
	h := *v.Head
	h.State, h.Operation = s, op
	if err := Write(v.f, &h); err != nil {
		return fmt.Errorf("volume %s: mark %s: %w", h.VolumeID, s, err)
	}
	v.Head = &h
	return nil
}

// complete marks a volume whose data is all written available: the data
// synced first, then the header.
func (v *Volume) complete() error {
	if err := datasync(v.f); err != nil {
		return fmt.Errorf("volume %s: sync data: %w", v.Head.VolumeID, err)
	}
	return v.setState(StateAvailable, nil)
}

// fail marks a volume error with err as the reason; it returns err.
func (v *Volume) fail(err error) error {
	op := *v.Head.Operation
	op.Error = err.Error()
	if len(op.Error) > maxErrorLen {
		op.Error = op.Error[:maxErrorLen]
	}
	if serr := v.setState(StateError, &op); serr != nil {
		return errors.Join(err, serr)
	}
	return err
}

// abandon removes a new volume whose operation failed. Should it stay (it
// cannot be removed), it is marked error. It returns err.
func (v *Volume) abandon(err error) error {
	if rerr := v.loc.Remove(); rerr != nil {
		err = v.fail(err)
	}
	v.Close()
	return err
}

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

// DefaultCheckpoint is how often an import records its progress.
const DefaultCheckpoint = 64 << 20

// Progress reports bytes done out of total.
type Progress func(done, total int64)

// ImportOptions tune Import.
type ImportOptions struct {
	// Source names the image (its absolute path): recorded in the header
	// so that an interrupted import says what to resume from.
	Source string
	// Resume continues the interrupted import the header records, from
	// its last checkpoint, instead of starting over.
	Resume bool
	// CheckpointEvery is how many bytes are imported between checkpoints
	// (rounded to whole MiB; default DefaultCheckpoint). A checkpoint
	// syncs the data (fdatasync), then records the bytes done in the
	// header.
	CheckpointEvery int64
	Progress        Progress
}

// Import encrypts the raw image src of size bytes into the volume's data
// area. The volume is creating from the start until every byte is written
// and synced, then available; a killed import leaves it creating with its
// last checkpoint, a failed one in state error with the reason. With
// o.Resume, Import continues from the checkpoint after checking that src
// has the size the interrupted import recorded and that its first MiB and
// the MiB before the checkpoint are what the volume holds; it cannot tell an
// image changed anywhere else.
func (v *Volume) Import(ctx context.Context, kms KMS, src io.ReaderAt, size int64, o ImportOptions) error {
	h := v.Head
	id := h.VolumeID
	if size < 0 || uint64(size) > h.SizeBytes {
		return fmt.Errorf("import into %s: image of %d bytes is larger than the volume (%d)", id, size, h.SizeBytes)
	}
	if o.Source == "" && !o.Resume {
		return fmt.Errorf("import into %s: the image is not named (ImportOptions.Source)", id)
	}
	if err := v.lock(); err != nil {
		return fmt.Errorf("import into %s: %w", id, err)
	}
	every := max(o.CheckpointEvery, chunk) / chunk * chunk
	if o.CheckpointEvery == 0 {
		every = DefaultCheckpoint
	}
	var start int64
	switch op := h.Operation; {
	case o.Resume && h.Available():
		return fmt.Errorf("import into %s: --resume: the volume is available: there is no import to resume", id)
	case o.Resume && op.Kind != OpImport:
		return fmt.Errorf("import into %s: --resume: %w", id, h.Servable(v.Path()))
	case o.Resume && uint64(size) != op.SourceSize:
		return fmt.Errorf("import into %s: --resume: the image has %d bytes, the interrupted import of %s had %d: not the same image",
			id, size, op.Source, op.SourceSize)
	case o.Resume:
		start = int64(op.Done)
		if h.State != StateCreating {
			resumed := *op
			resumed.Error = ""
			if err := v.setState(StateCreating, &resumed); err != nil {
				return fmt.Errorf("import into %s: %w", id, err)
			}
		}
	case !h.Available() && op.Kind != OpImport:
		return fmt.Errorf("import into %s: %w", id, h.Servable(v.Path()))
	case h.State == StateCreating && op.Kind == OpImport && op.Done == 0 && op.Source == o.Source && op.SourceSize == uint64(size):
		// Created for this import: the header says so already.
	default:
		op := &Operation{Kind: OpImport, Source: o.Source, SourceSize: uint64(size), Started: time.Now().UTC().Truncate(time.Second)}
		if err := v.setState(StateCreating, op); err != nil {
			return fmt.Errorf("import into %s: %w", id, err)
		}
	}
	err := v.withKey(ctx, kms, func(x *hem.XTS) error {
		if start > 0 {
			if err := v.sameImage(src, x, start); err != nil {
				return err
			}
		}
		return v.encryptFrom(ctx, src, x, start, size, every, o.Progress)
	})
	if err == nil {
		err = v.complete()
	}
	switch {
	case err == nil:
		return nil
	case errors.Is(err, errDifferentImage) || ctx.Err() != nil:
		return fmt.Errorf("import into %s: %w", id, err) // resume refused, or interrupted: still creating
	}
	return fmt.Errorf("import into %s: %w", id, v.fail(err))
}

var errDifferentImage = errors.New("not the same image")

// sameImage checks that the image's first MiB and the MiB before the
// checkpoint at done are what the volume holds.
func (v *Volume) sameImage(src io.ReaderAt, x *hem.XTS, done int64) error {
	a, b := make([]byte, chunk), make([]byte, chunk)
	defer clear(a)
	defer clear(b)
	us := int64(x.UnitSize())
	for _, off := range []int64{0, max(0, done-chunk)} {
		n := min(chunk, done-off)
		if err := readFull(src, a[:n], off); err != nil {
			return fmt.Errorf("read image at %d: %w", off, err)
		}
		if _, err := v.f.ReadAt(b[:n], int64(v.Head.DataOffset)+off); err != nil {
			return err
		}
		x.Decrypt(b[:n], b[:n], uint64(off/us))
		if !bytes.Equal(a[:n], b[:n]) {
			return fmt.Errorf("%w: the image differs from what the interrupted import of %s wrote (MiB %d); import without --resume to start over",
				errDifferentImage, v.Head.Operation.Source, off>>20)
		}
	}
	return nil
}

// encryptFrom encrypts the image's bytes [off, size) into the data area,
// with a checkpoint every every bytes.
func (v *Volume) encryptFrom(ctx context.Context, src io.ReaderAt, x *hem.XTS, off, size, every int64, progress Progress) error {
	buf := make([]byte, chunk)
	defer clear(buf)
	us, bs := int64(x.UnitSize()), int64(v.Head.BlockSize)
	for last := off; off < size; {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := min(chunk, size-off)
		if err := readFull(src, buf[:n], off); err != nil {
			return fmt.Errorf("read image at %d: %w", off, err)
		}
		// A tail that is not a whole block is padded with zeros.
		w := (n + bs - 1) / bs * bs
		clear(buf[n:w])
		x.Encrypt(buf[:w], buf[:w], uint64(off/us))
		if _, err := v.f.WriteAt(buf[:w], int64(v.Head.DataOffset)+off); err != nil {
			return err
		}
		off += n
		if progress != nil {
			progress(off, size)
		}
		if off-last >= every && off < size {
			if err := v.checkpoint(off); err != nil {
				return err
			}
			last = off
		}
	}
	return nil
}

// checkpoint records that the image's first done bytes are in the volume:
// the data synced first, then the header.
func (v *Volume) checkpoint(done int64) error {
	if err := datasync(v.f); err != nil {
		return fmt.Errorf("sync data: %w", err)
	}
	op := *v.Head.Operation
	op.Done = uint64(done)
	return v.setState(StateCreating, &op)
}

// readFull reads len(p) bytes at off; an image that ends before is an error.
func readFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		return fmt.Errorf("the image ends at %d: it changed size during the import", off+int64(n))
	}
	return err
}

// Export decrypts the volume's data area into w. A volume that is not
// available is refused: its data is incomplete.
func (v *Volume) Export(ctx context.Context, kms KMS, w io.Writer, progress Progress) error {
	if err := v.Head.Servable(v.Path()); err != nil {
		return fmt.Errorf("export: %w", err)
	}
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

// ExportFile decrypts the volume into a new file at path. The plaintext is
// written to a temporary file beside path (path.partial-*), synced, and
// renamed to path at the end, so path holds the whole export or nothing; an
// existing path is refused. A killed export leaves only the partial file.
func (v *Volume) ExportFile(ctx context.Context, kms KMS, path string, progress Progress) error {
	if _, err := os.Lstat(path); err == nil {
		return fmt.Errorf("export %s: %s: %w", v.Head.VolumeID, path, fs.ErrExist)
	}
	if err := v.Head.Servable(v.Path()); err != nil {
		return fmt.Errorf("export: %w", err)
	}
	dir := filepath.Dir(path)
	out, err := os.CreateTemp(dir, filepath.Base(path)+".partial-*")
	if err != nil {
		return fmt.Errorf("export %s: %w", v.Head.VolumeID, err)
	}
	tmp := out.Name()
	err = v.Export(ctx, kms, out, progress)
	if err == nil {
		if err = out.Sync(); err != nil {
			err = fmt.Errorf("export %s: sync %s: %w", v.Head.VolumeID, tmp, err)
		}
	}
	if cerr := out.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("export %s: %w", v.Head.VolumeID, cerr)
	}
	if err == nil {
		if err = renameNoReplace(tmp, path); err != nil {
			err = fmt.Errorf("export %s: %w", v.Head.VolumeID, err)
		}
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	if err := syncDir(dir); err != nil {
		return fmt.Errorf("export %s: %w", v.Head.VolumeID, err)
	}
	return nil
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

// Snapshot copies the volume into a new snapshot file at path (see
// SnapshotTo).
func (v *Volume) Snapshot(ctx context.Context, path, snapID string) (*Volume, error) {
	return v.SnapshotTo(ctx, FileAt(path), snapID)
}

// SnapshotTo copies the volume into a new snapshot at loc: same data key,
// same wrapped key and context, the ciphertext copied as it is. The
// snapshot is creating until its data is copied and synced; one that fails
// is removed.
func (v *Volume) SnapshotTo(ctx context.Context, loc Location, snapID string) (*Volume, error) {
	if err := v.Head.Servable(v.Path()); err != nil {
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	if snapID == "" {
		snapID = NewID("snap")
	}
	h := *v.Head
	h.VolumeID, h.Seq, h.ParentSnapshot = snapID, 0, ""
	h.Created = time.Now().UTC().Truncate(time.Second)
	h.State = StateCreating
	h.Operation = &Operation{Kind: OpSnapshot, Source: v.Head.VolumeID, SourceSize: v.Head.SizeBytes, Started: h.Created}
	s, err := create(loc, &h)
	if err != nil {
		return nil, err
	}
	err = copyData(ctx, s.f, v.f, int64(v.Head.DataOffset), int64(h.DataOffset), int64(h.SizeBytes))
	if err == nil {
		err = s.complete()
	}
	if err != nil {
		return nil, s.abandon(fmt.Errorf("snapshot %s of %s: %w", snapID, v.Head.VolumeID, err))
	}
	return s, nil
}

// CopySnapshot copies a snapshot into a new snapshot file at path (see
// CopySnapshotTo).
func (v *Volume) CopySnapshot(ctx context.Context, kms KMS, path, keyID, snapID string) (*Volume, error) {
	return v.CopySnapshotTo(ctx, kms, FileAt(path), keyID, snapID, nil)
}

// CopySnapshotTo copies a snapshot into a new snapshot at loc under another
// CMK: a new data key (context: the new snapshot id), the data re-encrypted
// (progress, if not nil, is told the bytes done). The copy is creating
// until its data is written and synced; one that fails is removed.
func (v *Volume) CopySnapshotTo(ctx context.Context, kms KMS, loc Location, keyID, snapID string, progress Progress) (*Volume, error) {
	if !ValidSnapshotID(v.Head.VolumeID) {
		return nil, fmt.Errorf("copy %s: not a snapshot", v.Head.VolumeID)
	}
	if err := v.Head.Servable(v.Path()); err != nil {
		return nil, fmt.Errorf("copy: %w", err)
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
	h.State = StateCreating
	h.Operation = &Operation{Kind: OpCopy, Source: v.Head.VolumeID, SourceSize: v.Head.SizeBytes, Started: h.Created}
	blob, arn, err := kms.GenerateDataKeyWithoutPlaintext(ctx, keyID, h.EncryptionContext)
	if err != nil {
		return nil, fmt.Errorf("copy %s: generate data key under %s: %w", v.Head.VolumeID, keyID, err)
	}
	h.KeyID, h.WrappedDEK = arn, blob
	dst, err := create(loc, &h)
	if err != nil {
		return nil, err
	}
	err = v.withKey(ctx, kms, func(src *hem.XTS) error {
		return dst.withKey(ctx, kms, func(out *hem.XTS) error {
			return reencrypt(ctx, v, dst, src, out, progress)
		})
	})
	if err == nil && progress != nil {
		progress(int64(h.SizeBytes), int64(h.SizeBytes))
	}
	if err == nil {
		err = dst.complete()
	}
	if err != nil {
		return nil, dst.abandon(fmt.Errorf("copy %s to %s: %w", v.Head.VolumeID, snapID, err))
	}
	return dst, nil
}

// reencrypt moves the data area of src into dst, decrypting with from and
// encrypting with to. Holes (never written) stay holes.
func reencrypt(ctx context.Context, src, dst *Volume, from, to *hem.XTS, progress Progress) error {
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
			if progress != nil {
				progress(off, int64(src.Head.SizeBytes))
			}
		}
		return nil
	})
}

// copyData copies size bytes of ciphertext from src at srcOff to dst at
// dstOff, keeping holes.
func copyData(ctx context.Context, dst, src Store, srcOff, dstOff, size int64) error {
	buf := make([]byte, chunk)
	return forData(src, srcOff, size, func(off, n int64) error {
		for n > 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
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
