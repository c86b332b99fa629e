package hsm

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"sort"
)

// A ciphertext blob:
//
//	0  magic "HKB1"            4  version u8        5 algorithm u8
//	6  key id (16 bytes, the CMK's UUID)
//	22 backing-key version u32 (rotation adds one; old blobs keep theirs)
//	26 IV or nonce (12 bytes)   38 the wrapped plaintext
//
// Version 1, algorithm 1 (AES-256-GCM): the plaintext encrypted inside the
// HSM with the CMK version, IV from the HSM, ciphertext ‖ 16-byte tag; the
// AAD is the 38-byte header followed by the canonical encoding of the
// encryption context. Encrypt makes these, and data keys of sizes that are
// not a multiple of 16 bytes.
//
// Version 2, algorithm 2 (AES key wrap with padding, RFC 5649, under a
// derived key): data keys (GenerateDataKey*, sizes a multiple of 16 bytes)
// are generated inside the HSM as session objects and wrapped there with a
// key-encryption key that the HSM derives from the CMK version
// (CKM_AES_ECB_ENCRYPT_DATA) over SHA-256("hemd kms v2 kek\x00" ‖ header ‖
// canonical context): a 12-byte random nonce in the header makes it unique
// per blob, and a wrong context or header derives another key, whose
// unwrap fails its integrity check. The plaintext of a version 2 blob can
// stay in the HSM from generation to a recipient's envelope.
const (
	blobV1        = 1
	algAES256GCM  = 1
	blobV2        = 2
	algKWPDerived = 2
	headerLen     = 38
	ivLen         = 12
	tagLen        = 16
	// maxPlaintext is the most Encrypt takes (as AWS KMS: 4096 bytes), so
	// maxBlob is the longest blob this KMS makes; a longer one is refused
	// before it reaches the HSM.
	maxPlaintext = 4096
	maxBlob      = headerLen + maxPlaintext + tagLen
	// maxDataKey is the largest data key (NumberOfBytes); a version 2 blob
	// wraps at most that, plus the key wrap's 8-byte integrity block.
	maxDataKey = 1024
	maxWrapped = maxDataKey + 8
)

var blobMagic = []byte("HKB1")

type blob struct {
	ver     uint8 // blobV1 or blobV2
	keyID   [16]byte
	version uint32
	iv      []byte
	ct      []byte // v1: ciphertext ‖ tag; v2: the wrapped key
	header  []byte
}

// alg is the algorithm byte of a blob version.
func alg(ver uint8) uint8 {
	if ver == blobV2 {
		return algKWPDerived
	}
	return algAES256GCM
}

func (b *blob) encode() []byte {
	out := make([]byte, 0, headerLen+len(b.ct))
	out = append(out, blobMagic...)
	out = append(out, b.ver, alg(b.ver))
	out = append(out, b.keyID[:]...)
	out = binary.BigEndian.AppendUint32(out, b.version)
	out = append(out, b.iv...)
	return append(out, b.ct...)
}

func headerOf(ver uint8, keyID [16]byte, version uint32, iv []byte) []byte {
	b := blob{ver: ver, keyID: keyID, version: version, iv: iv}
	return b.encode()
}

// decodeBlob parses a blob; every malformed one is InvalidCiphertextException.
func decodeBlob(p []byte) (*blob, error) {
	switch {
	case len(p) < headerLen+16 || len(p) < headerLen+tagLen+1 && p[4] != blobV2:
		// v1: a tag and at least one byte; v2: a key wrap of at least
		// one byte is 16 bytes.
		return nil, kmsErr(ErrInvalidCiphertext, "ciphertext blob of %d bytes is too short", len(p))
	case len(p) > maxBlob:
		return nil, kmsErr(ErrInvalidCiphertext, "ciphertext blob of %d bytes is longer than any this KMS makes (%d)", len(p), maxBlob)
	case !bytes.Equal(p[:4], blobMagic):
		return nil, kmsErr(ErrInvalidCiphertext, "ciphertext blob has a bad magic")
	case p[4] != blobV1 && p[4] != blobV2:
		return nil, kmsErr(ErrInvalidCiphertext, "ciphertext blob version %d is not supported", p[4])
	case p[5] != alg(p[4]):
		return nil, kmsErr(ErrInvalidCiphertext, "ciphertext blob algorithm %d is not supported", p[5])
	}
	b := &blob{ver: p[4], version: binary.BigEndian.Uint32(p[22:26]), iv: p[26:38], ct: p[headerLen:], header: p[:headerLen]}
	copy(b.keyID[:], p[6:22])
	if b.ver == blobV2 && (len(b.ct)%8 != 0 || len(b.ct) > maxWrapped) {
		return nil, kmsErr(ErrInvalidCiphertext, "ciphertext blob version 2 wraps %d bytes: not a wrapped data key", len(b.ct))
	}
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
