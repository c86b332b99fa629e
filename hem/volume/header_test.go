package volume

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func goodHeader() *Header {
	return &Header{
		VolumeID:          "vol-0123456789abcdef0",
		SizeBytes:         1 << 30,
		BlockSize:         512,
		DataUnitSize:      512,
		Cipher:            CipherXTSPlain,
		DataOffset:        DataOffset,
		KeyID:             "arn:aws:kms:local:000000000000:key/11111111-2222-3333-4444-555555555555",
		EncryptionContext: map[string]string{"aws:ebs:id": "vol-0123456789abcdef0"},
		WrappedDEK:        bytes.Repeat([]byte{0xab}, 120),
		Created:           time.Date(2026, 11, 22, 0, 0, 0, 0, time.UTC),
	}
}

// memFile is an in-memory volume file.
type memFile struct{ b []byte }

func (m *memFile) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(m.b)) {
		return 0, os.ErrClosed
	}
	n := copy(p, m.b[off:])
	return n, nil
}
func (m *memFile) WriteAt(p []byte, off int64) (int, error) {
	if need := int(off) + len(p); need > len(m.b) {
		m.b = append(m.b, make([]byte, need-len(m.b))...)
	}
	return copy(m.b[off:], p), nil
}
func (m *memFile) Sync() error { return nil }

func TestRoundTrip(t *testing.T) {
	p := filepath.Join(t.TempDir(), "vol")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := goodHeader()
	if err := Write(f, h); err != nil {
		t.Fatal(err)
	}
	got, err := Read(f)
	if err != nil {
		t.Fatal(err)
	}
	if got.VolumeID != h.VolumeID || !bytes.Equal(got.WrappedDEK, h.WrappedDEK) || got.Seq != 1 ||
		got.EncryptionContext["aws:ebs:id"] != h.VolumeID || !got.Created.Equal(h.Created) {
		t.Fatalf("round trip: %+v", got)
	}
}

// TestCopyErrors breaks one field at a time of the primary copy: the backup
// is used; breaking the backup the same way too is ErrBothCorrupt.
func TestCopyErrors(t *testing.T) {
	cases := []struct {
		name   string
		break_ func(b []byte)
		want   error
	}{
		{"magic", func(b []byte) { b[0] = 'X' }, ErrMagic},
		{"version", func(b []byte) { binary.LittleEndian.PutUint16(b[8:], 3) }, ErrVersion},
		{"copy index", func(b []byte) { b[10] ^= 1 }, ErrCopyIndex},
		{"length zero", func(b []byte) { binary.LittleEndian.PutUint32(b[12:], 0) }, ErrLength},
		{"length huge", func(b []byte) { binary.LittleEndian.PutUint32(b[12:], 1<<30) }, ErrLength},
		{"length short", func(b []byte) { binary.LittleEndian.PutUint32(b[12:], binary.LittleEndian.Uint32(b[12:])-1) }, ErrChecksum},
		{"seq", func(b []byte) { b[16] ^= 1 }, ErrChecksum},
		{"checksum", func(b []byte) { b[40] ^= 1 }, ErrChecksum},
		{"metadata byte", func(b []byte) { b[prefixSize+5] ^= 0x20 }, ErrChecksum},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := &memFile{}
			if err := Write(m, goodHeader()); err != nil {
				t.Fatal(err)
			}
			tc.break_(m.b[0:CopySize])
			if _, err := decodeCopy(m.b[:CopySize], 0); !errors.Is(err, tc.want) {
				t.Fatalf("primary: %v, want %v", err, tc.want)
			}
			h, err := Read(m)
			if err != nil || h.VolumeID != goodHeader().VolumeID {
				t.Fatalf("fallback to backup: %v", err)
			}
			b := m.b[BackupOffset : BackupOffset+CopySize]
			tc.break_(b)
			if tc.name == "copy index" {
				b[10] = 0 // the backup's own index broken the other way
			}
			want := ErrBothCorrupt
			if tc.want == ErrMagic {
				want = ErrNotVolume
			}
			if _, err := Read(m); !errors.Is(err, want) || (want == ErrBothCorrupt && !errors.Is(err, tc.want)) {
				t.Fatalf("both broken: %v, want ErrBothCorrupt and %v", err, tc.want)
			}
		})
	}
}

// TestMetaErrors breaks one metadata field at a time (with a valid checksum):
// each is refused with ErrMeta.
func TestMetaErrors(t *testing.T) {
	cases := map[string]func(h *Header){
		"volume id":       func(h *Header) { h.VolumeID = "vol-123" },
		"block size":      func(h *Header) { h.BlockSize = 1024 },
		"data unit":       func(h *Header) { h.DataUnitSize = 8192 },
		"unit over block": func(h *Header) { h.DataUnitSize = 4096 },
		"size":            func(h *Header) { h.SizeBytes = 1000 },
		"cipher":          func(h *Header) { h.Cipher = "aes-cbc-essiv" },
		"data offset":     func(h *Header) { h.DataOffset = 4096 },
		"key id":          func(h *Header) { h.KeyID = "" },
		"wrapped key":     func(h *Header) { h.WrappedDEK = nil },
		"context":         func(h *Header) { h.EncryptionContext = nil },
		"parent snapshot": func(h *Header) { h.ParentSnapshot = "vol-0123456789abcdef0" },
	}
	for name, mutate := range cases {
		t.Run(name, func(t *testing.T) {
			h := goodHeader()
			mutate(h)
			if err := h.Validate(); !errors.Is(err, ErrMeta) {
				t.Fatalf("Validate: %v", err)
			}
			if err := Write(&memFile{}, h); !errors.Is(err, ErrMeta) {
				t.Fatalf("Write: %v", err)
			}
			// Forged with a valid checksum, Read refuses it too.
			b, _ := encodeCopy(h, 0)
			if _, err := decodeCopy(b, 0); !errors.Is(err, ErrMeta) {
				t.Fatalf("decode: %v", err)
			}
		})
	}
}

// An update interrupted after the primary copy leaves the new header; one
// interrupted inside the primary leaves the old one from the backup.
func TestTornUpdate(t *testing.T) {
	m := &memFile{}
	h := goodHeader()
	if err := Write(m, h); err != nil {
		t.Fatal(err)
	}
	old := append([]byte(nil), m.b...)
	h.KeyID = "arn:aws:kms:local:000000000000:key/new"
	if err := Write(m, h); err != nil {
		t.Fatal(err)
	}
	// New primary, old backup: the newer sequence wins.
	mixed := &memFile{b: append([]byte(nil), m.b...)}
	copy(mixed.b[BackupOffset:], old[BackupOffset:BackupOffset+CopySize])
	if got, err := Read(mixed); err != nil || got.KeyID != h.KeyID || got.Seq != 2 {
		t.Fatalf("after primary written: %v %+v", err, got)
	}
	// Primary torn half way: the old backup.
	torn := &memFile{b: append([]byte(nil), old...)}
	copy(torn.b[:200], m.b[:200])
	if got, err := Read(torn); err != nil || got.KeyID == h.KeyID {
		t.Fatalf("torn primary: %v %+v", err, got)
	}
}

func TestUnknownField(t *testing.T) {
	h := goodHeader()
	b, _ := encodeCopy(h, 0)
	meta := bytes.Replace(b[prefixSize:], []byte(`"cipher"`), []byte(`"cypher"`), 1)
	nb := append(append([]byte(nil), b[:prefixSize]...), meta...)
	clear(nb[32:64])
	sum := sha256Sum(nb)
	copy(nb[32:64], sum[:])
	if _, err := decodeCopy(nb, 0); !errors.Is(err, ErrMeta) {
		t.Fatalf("unknown field: %v", err)
	}
}

// FuzzHeader: any bytes decode to a valid header or a clear error; a
// decoded header encodes back to the same metadata.
func FuzzHeader(f *testing.F) {
	b, _ := encodeCopy(goodHeader(), 0)
	f.Add(b)
	f.Add(b[:70])
	c, _ := encodeCopy(creatingHeader(), 0)
	f.Add(c)
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := decodeCopy(b, 0)
		if err != nil {
			return
		}
		if err := h.Validate(); err != nil {
			t.Fatalf("decoded an invalid header: %v", err)
		}
		if _, err := encodeCopy(h, 0); err != nil {
			t.Fatalf("re-encode: %v", err)
		}
	})
}

// A header whose wrapped data key is longer than any KMS makes is refused
// before the key reaches the KMS.
func TestOversizedWrappedDEK(t *testing.T) {
	h := goodHeader()
	h.WrappedDEK = make([]byte, MaxWrappedDEK+1)
	if err := h.Validate(); !errors.Is(err, ErrMeta) || !strings.Contains(err.Error(), "wrapped data key of 6145 bytes") {
		t.Fatalf("Validate: %v, want ErrMeta naming the size", err)
	}
	h.WrappedDEK = make([]byte, MaxWrappedDEK)
	if err := h.Validate(); err != nil {
		t.Fatalf("Validate at the limit: %v", err)
	}
}
