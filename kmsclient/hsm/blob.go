package hsm

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"sort"
)

// A ciphertext blob:
//
//	0  magic "HKB1"            4  version u8 (1)   5 algorithm u8 (1: AES-256-GCM)
//	6  key id (16 bytes, the CMK's UUID)
//	22 backing-key version u32 (rotation adds one; old blobs keep theirs)
//	26 IV (12 bytes)            38 ciphertext ‖ 16-byte tag
//
// The AAD of the GCM encryption is the 38-byte header followed by the
// canonical encoding of the encryption context.
const (
	blobVersion  = 1
	algAES256GCM = 1
	headerLen    = 38
	ivLen        = 12
	tagLen       = 16
	// maxPlaintext is the most Encrypt takes (as AWS KMS: 4096 bytes), so
	// maxBlob is the longest blob this KMS makes; a longer one is refused
	// before it reaches the HSM.
	maxPlaintext = 4096
	maxBlob      = headerLen + maxPlaintext + tagLen
)

var blobMagic = []byte("HKB1")

type blob struct {
	keyID   [16]byte
	version uint32
	iv      []byte
	ct      []byte // ciphertext ‖ tag
	header  []byte
}

func (b *blob) encode() []byte {
	out := make([]byte, 0, headerLen+len(b.ct))
	out = append(out, blobMagic...)
	out = append(out, blobVersion, algAES256GCM)
	out = append(out, b.keyID[:]...)
	out = binary.BigEndian.AppendUint32(out, b.version)
	out = append(out, b.iv...)
	return append(out, b.ct...)
}

func headerOf(keyID [16]byte, version uint32, iv []byte) []byte {
	b := blob{keyID: keyID, version: version, iv: iv}
	return b.encode()
}

// decodeBlob parses a blob; every malformed one is InvalidCiphertextException.
func decodeBlob(p []byte) (*blob, error) {
	switch {
	case len(p) < headerLen+tagLen+1:
		return nil, kmsErr(ErrInvalidCiphertext, "ciphertext blob of %d bytes is too short", len(p))
	case len(p) > maxBlob:
		return nil, kmsErr(ErrInvalidCiphertext, "ciphertext blob of %d bytes is longer than any this KMS makes (%d)", len(p), maxBlob)
	case !bytes.Equal(p[:4], blobMagic):
		return nil, kmsErr(ErrInvalidCiphertext, "ciphertext blob has a bad magic")
	case p[4] != blobVersion:
		return nil, kmsErr(ErrInvalidCiphertext, "ciphertext blob version %d is not supported", p[4])
	case p[5] != algAES256GCM:
		return nil, kmsErr(ErrInvalidCiphertext, "ciphertext blob algorithm %d is not supported", p[5])
	}
	b := &blob{version: binary.BigEndian.Uint32(p[22:26]), iv: p[26:38], ct: p[headerLen:], header: p[:headerLen]}
	copy(b.keyID[:], p[6:22])
	return b, nil
}

// canonicalContext encodes an encryption context unambiguously: the pairs
// sorted by key, each key and value prefixed with its length. {"ab":"c"} and
// {"a":"bc"} encode differently.
func canonicalContext(ctx map[string]string) []byte {
	keys := make([]string, 0, len(ctx))
	for k := range ctx {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	out := binary.BigEndian.AppendUint32(nil, uint32(len(keys)))
	for _, k := range keys {
		out = binary.BigEndian.AppendUint32(out, uint32(len(k)))
		out = append(out, k...)
		out = binary.BigEndian.AppendUint32(out, uint32(len(ctx[k])))
		out = append(out, ctx[k]...)
	}
	return out
}

func aad(header []byte, ctx map[string]string) []byte {
	return append(append([]byte(nil), header...), canonicalContext(ctx)...)
}

func validateContext(ctx map[string]string) error {
	for k, v := range ctx {
		if k == "" || len(k) > 2048 || len(v) > 2048 {
			return kmsErr(ErrValidation, "encryption context key %q or its value is empty or too long", k)
		}
	}
	if len(ctx) > 64 {
		return fmt.Errorf("%w", kmsErr(ErrValidation, "encryption context has %d pairs", len(ctx)))
	}
	return nil
}
