package main

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hemd/hemd/hem/volume"
)

// hemd status reads each served volume's state from its header.
func TestStatusVolumeState(t *testing.T) {
	dir := t.TempDir()
	h := &volume.Header{
		VolumeID: "vol-0123456789abcdef0", SizeBytes: 1 << 20, BlockSize: 512, DataUnitSize: 512,
		Cipher: volume.CipherXTSPlain, DataOffset: volume.DataOffset, KeyID: "arn:k", WrappedDEK: []byte{1},
		EncryptionContext: map[string]string{volume.ContextKey: "vol-0123456789abcdef0"}, Created: time.Now(),
	}
	p := filepath.Join(dir, "v")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := volume.Write(f, h); err != nil {
		t.Fatal(err)
	}
	if got := volumeState(volumeStatus{Encrypted: true, Path: p}); got != "available" {
		t.Fatalf("available volume: %q", got)
	}
	h.State, h.Operation = volume.StateCreating, &volume.Operation{Kind: volume.OpImport, Source: "/img", SourceSize: 4096}
	if err := volume.Write(f, h); err != nil {
		t.Fatal(err)
	}
	if got := volumeState(volumeStatus{Encrypted: true, Path: p}); got != "creating" {
		t.Fatalf("creating volume: %q", got)
	}
	if got := volumeState(volumeStatus{Encrypted: false, Path: p}); got != "-" {
		t.Fatalf("raw file: %q", got)
	}
	if got := volumeState(volumeStatus{Encrypted: true, Path: filepath.Join(dir, "gone")}); got != "?" {
		t.Fatalf("unreadable: %q", got)
	}
}
