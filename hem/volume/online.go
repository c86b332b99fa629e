package volume

import (
	"fmt"
	"io"
	"time"
)

// A snapshot of an attached volume is filled by the hemd that serves the
// volume, which copies its ciphertext before the guest overwrites it
// (storage.File.StartCOW): NewSnapshotFile makes the snapshot's file,
// DataWriter is where the copy goes, Complete or Abandon ends it.

// NewSnapshotFile creates the file of a new snapshot, with id snapID (default
// a new snap- id), of the volume whose header is src: the volume's geometry,
// wrapped data key and encryption context, its data area still empty
// (sparse). It is creating, and locked, until Complete. srcPath names the
// volume in errors.
func NewSnapshotFile(src *Header, srcPath, path, snapID string) (*Volume, error) {
	if err := src.Servable(srcPath); err != nil {
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	if snapID == "" {
		snapID = NewID("snap")
	}
	if !ValidSnapshotID(snapID) {
		return nil, fmt.Errorf("snapshot of %s: id %q is not snap- and 17 hex digits", src.VolumeID, snapID)
	}
	h := *src
	h.VolumeID, h.Seq, h.ParentSnapshot = snapID, 0, ""
	h.Created = time.Now().UTC().Truncate(time.Second)
	h.State = StateCreating
	h.Operation = &Operation{Kind: OpSnapshot, Source: src.VolumeID, SourceSize: src.SizeBytes, Started: h.Created}
	return create(FileAt(path), &h)
}

// DataWriter writes the volume's data area: its offset 0 is the first byte
// of data.
func (v *Volume) DataWriter() io.WriterAt {
	return io.NewOffsetWriter(v.f, int64(v.Head.DataOffset))
}

// Complete marks a volume whose data is all written available: the data is
// synced first, then the header.
func (v *Volume) Complete() error { return v.complete() }

// Abandon removes a new volume whose data could not be written (marking it
// error should the file stay) and closes it. It returns err.
func (v *Volume) Abandon(err error) error { return v.abandon(err) }
