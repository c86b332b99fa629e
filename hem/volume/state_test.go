package volume

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
)

func creatingHeader() *Header {
	h := goodHeader()
	h.State = StateCreating
	h.Operation = &Operation{Kind: OpImport, Source: "/images/debian.raw", SourceSize: 100 << 20, Done: 37 << 20,
		Started: time.Date(2026, 11, 22, 1, 2, 3, 0, time.UTC)}
	return h
}

// Every state survives Write and Read; an available volume is written as
// version 1, any other state as version 2.
func TestStateRoundTrip(t *testing.T) {
	failed := creatingHeader()
	failed.State, failed.Operation.Error = StateError, "read image at 38797312: input/output error"
	snap := goodHeader()
	snap.State, snap.Operation = StateCreating, &Operation{Kind: OpSnapshot, Source: "vol-0123456789abcdef1", SourceSize: 1 << 30}
	cases := map[string]struct {
		h       *Header
		version uint16
	}{
		"available": {goodHeader(), 1},
		"creating":  {creatingHeader(), 2},
		"error":     {failed, 2},
		"snapshot":  {snap, 2},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			m := &memFile{}
			if err := Write(m, tc.h); err != nil {
				t.Fatal(err)
			}
			for _, off := range []int{0, BackupOffset} {
				if v := binary.LittleEndian.Uint16(m.b[off+8:]); v != tc.version {
					t.Fatalf("copy at %d has version %d, want %d", off, v, tc.version)
				}
			}
			got, err := Read(m)
			if err != nil {
				t.Fatal(err)
			}
			want := tc.h.State
			if want == "" {
				want = StateAvailable
			}
			if got.State != want {
				t.Fatalf("state %q, want %q", got.State, want)
			}
			a, _ := json.Marshal(got.Operation)
			b, _ := json.Marshal(tc.h.Operation)
			if !bytes.Equal(a, b) {
				t.Fatalf("operation %s, want %s", a, b)
			}
			if (got.Servable("/v") == nil) != (want == StateAvailable) {
				t.Fatalf("servable %v in state %s", got.Servable("/v"), want)
			}
		})
	}
}

// oldHeader is the header as hemd wrote it before volumes had states.
type oldHeader struct {
	VolumeID          string            `json:"volume_id"`
	SizeBytes         uint64            `json:"size_bytes"`
	BlockSize         uint32            `json:"block_size"`
	DataUnitSize      uint32            `json:"data_unit_size"`
	Cipher            string            `json:"cipher"`
	DataOffset        uint64            `json:"data_offset"`
	KeyID             string            `json:"key_id"`
	EncryptionContext map[string]string `json:"encryption_context"`
	WrappedDEK        []byte            `json:"wrapped_dek"`
	Created           time.Time         `json:"created"`
	ParentSnapshot    string            `json:"parent_snapshot"`
}

// forge encodes meta as copy idx with version v and a valid checksum.
func forge(meta []byte, v, idx uint16, seq uint64) []byte {
	b := make([]byte, prefixSize+len(meta))
	copy(b, magic[:])
	binary.LittleEndian.PutUint16(b[8:], v)
	binary.LittleEndian.PutUint16(b[10:], idx)
	binary.LittleEndian.PutUint32(b[12:], uint32(len(meta)))
	binary.LittleEndian.PutUint64(b[16:], seq)
	copy(b[prefixSize:], meta)
	sum := sha256Sum(b)
	copy(b[32:64], sum[:])
	return b
}

// A header written before states (version 1, no state field) reads as
// available; an available header today is byte for byte the old format, so
// an older hemd reads it too.
func TestOldHeaderIsAvailable(t *testing.T) {
	g := goodHeader()
	old := oldHeader{g.VolumeID, g.SizeBytes, g.BlockSize, g.DataUnitSize, g.Cipher, g.DataOffset, g.KeyID,
		g.EncryptionContext, g.WrappedDEK, g.Created, g.ParentSnapshot}
	meta, _ := json.Marshal(old)
	m := &memFile{b: make([]byte, DataOffset)}
	copy(m.b, forge(meta, 1, 0, 1))
	copy(m.b[BackupOffset:], forge(meta, 1, 1, 1))
	h, err := Read(m)
	if err != nil {
		t.Fatal(err)
	}
	if h.State != StateAvailable || h.Operation != nil || h.Servable("/v") != nil || h.VolumeID != g.VolumeID {
		t.Fatalf("old header: state %q op %+v", h.State, h.Operation)
	}
	b, err := encodeCopy(h, 0)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b, forge(meta, 1, 0, 1)) {
		t.Fatalf("an available header is not written in the old format:\n%s\n%s", b[prefixSize:], meta)
	}
}

// TestStateErrors breaks one state field at a time: each is ErrMeta, from
// Validate and (forged with a valid checksum) from decodeCopy.
func TestStateErrors(t *testing.T) {
	cases := map[string]func(h *Header){
		"unknown state":          func(h *Header) { h.State = "deleting" },
		"creating without op":    func(h *Header) { h.Operation = nil },
		"available with op":      func(h *Header) { h.State = StateAvailable },
		"unknown kind":           func(h *Header) { h.Operation.Kind = "download" },
		"no source":              func(h *Header) { h.Operation.Source = "" },
		"done past source":       func(h *Header) { h.Operation.Done = h.Operation.SourceSize + 512 },
		"done unaligned":         func(h *Header) { h.Operation.Done = 1000 },
		"image over volume":      func(h *Header) { h.Operation.SourceSize, h.Operation.Done = h.SizeBytes+512, 0 },
		"snapshot checkpoint":    func(h *Header) { h.Operation.Kind = OpSnapshot },
		"error without reason":   func(h *Header) { h.State = StateError },
		"creating with an error": func(h *Header) { h.Operation.Error = "boom" },
		"long error":             func(h *Header) { h.State, h.Operation.Error = StateError, strings.Repeat("x", maxErrorLen+1) },
	}
	for name, mutate := range cases {
		t.Run(name, func(t *testing.T) {
			h := creatingHeader()
			mutate(h)
			if err := h.Validate(); !errors.Is(err, ErrMeta) {
				t.Fatalf("Validate: %v", err)
			}
			if err := Write(&memFile{}, h); !errors.Is(err, ErrMeta) {
				t.Fatalf("Write: %v", err)
			}
			meta, _ := json.Marshal(h)
			if _, err := decodeCopy(forge(meta, 2, 0, 1), 0); !errors.Is(err, ErrMeta) {
				t.Fatalf("decode: %v", err)
			}
		})
	}
	// The version and the state must agree: a version 1 header with a
	// state, or a version 2 header of an available volume, is forged.
	meta, _ := json.Marshal(creatingHeader())
	if _, err := decodeCopy(forge(meta, 1, 0, 1), 0); !errors.Is(err, ErrMeta) {
		t.Fatalf("version 1 with a state: %v", err)
	}
	meta, _ = json.Marshal(goodHeader())
	if _, err := decodeCopy(forge(meta, 2, 0, 1), 0); !errors.Is(err, ErrMeta) {
		t.Fatalf("version 2 without a state: %v", err)
	}
	a := goodHeader()
	a.State = StateAvailable
	meta, _ = json.Marshal(a)
	if _, err := decodeCopy(forge(meta, 2, 0, 1), 0); !errors.Is(err, ErrMeta) {
		t.Fatalf("version 2 saying available: %v", err)
	}
}

// The switch from creating (version 2) to available (version 1) is as
// crash-safe as any header update: torn inside the primary copy, the volume
// is still creating; after the primary, available.
func TestTornStateUpdate(t *testing.T) {
	m := &memFile{}
	h := creatingHeader()
	if err := Write(m, h); err != nil {
		t.Fatal(err)
	}
	before := append([]byte(nil), m.b...)
	h.State, h.Operation = StateAvailable, nil
	if err := Write(m, h); err != nil {
		t.Fatal(err)
	}
	torn := &memFile{b: append([]byte(nil), before...)}
	copy(torn.b[:100], m.b[:100])
	if got, err := Read(torn); err != nil || got.State != StateCreating {
		t.Fatalf("torn primary: %v %+v", err, got)
	}
	half := &memFile{b: append([]byte(nil), m.b[:BackupOffset]...)}
	half.b = append(half.b, before[BackupOffset:]...)
	if got, err := Read(half); err != nil || got.State != StateAvailable {
		t.Fatalf("primary written, backup not: %v %+v", err, got)
	}
}

// Servable says what happened and what to do, for each operation.
func TestServableMessages(t *testing.T) {
	h := creatingHeader()
	err := h.Servable("/vols/v.img")
	if !errors.Is(err, ErrNotAvailable) {
		t.Fatalf("%v is not ErrNotAvailable", err)
	}
	for _, want := range []string{"vol-0123456789abcdef0 is creating", "import of /images/debian.raw interrupted at 37 %",
		"hemd volume import --resume --from /images/debian.raw /vols/v.img"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%q lacks %q", err, want)
		}
	}
	h.State, h.Operation.Error = StateError, "read image at 38797312: input/output error"
	if err := h.Servable("/v"); !strings.Contains(err.Error(), "is in state error: import of /images/debian.raw failed at 37 %") ||
		!strings.Contains(err.Error(), "input/output error") || !strings.Contains(err.Error(), "--resume") {
		t.Errorf("error state: %v", err)
	}
	for kind, cmd := range map[string]string{OpSnapshot: "hemd snapshot create", OpCopy: "hemd snapshot copy", OpRestore: "hemd volume create --snapshot"} {
		h := creatingHeader()
		h.Operation.Kind, h.Operation.Done, h.Operation.Source = kind, 0, "snap-0123456789abcdef0"
		if err := h.Servable("/v"); !strings.Contains(err.Error(), "delete /v and run "+cmd) || !strings.Contains(err.Error(), "snap-0123456789abcdef0") {
			t.Errorf("%s: %v", kind, err)
		}
	}
}
