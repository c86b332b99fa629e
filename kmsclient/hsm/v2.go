package hsm

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"
)

// Version 2 blobs (blob.go): data keys generated, wrapped and unwrapped as
// HSM session objects, under a key-encryption key the HSM derives from the
// CMK version, the blob's header and the encryption context.

// kekLabel separates the derivation of v2 key-encryption keys from any
// other use of the CMK.
const kekLabel = "hemd kms v2 kek\x00"

// kekData is what the KEK is derived over: SHA-256(label ‖ header ‖
// canonical context), two AES blocks.
func kekData(header []byte, ectx map[string]string) []byte {
	h := sha256.New()
	h.Write([]byte(kekLabel))
	h.Write(header)
	h.Write(canonicalContext(ectx))
	return h.Sum(nil)
}

// kek derives a v2 blob's key-encryption key from the CMK version object
// cmk: a session object that can only wrap and unwrap. A CMK made before
// version 2 blobs may not derive (CKA_DERIVE false): it is allowed to, once.
func (k *KMS) kek(sh pkcs11.SessionHandle, cmk pkcs11.ObjectHandle, header []byte, ectx map[string]string) (pkcs11.ObjectHandle, error) {
	data := kekData(header, ectx)
	h, err := k.keys.deriveKEK(sh, cmk, data)
	if !errors.Is(err, pkcs11.Error(pkcs11.CKR_KEY_FUNCTION_NOT_PERMITTED)) {
		return h, err
	}
	if serr := k.p.SetAttributeValue(sh, cmk, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_DERIVE, true)}); serr != nil {
		return 0, fmt.Errorf("allowing the CMK to derive key-encryption keys: %w (after %v)", serr, err)
	}
	if log := k.log.Load(); log != nil {
		log.Info("kms: a CMK made before version 2 blobs may now derive their key-encryption keys (CKA_DERIVE)")
	}
	return k.keys.deriveKEK(sh, cmk, data)
}

// destroy destroys a session object made for one operation. One that cannot
// be destroyed goes with its session; it is logged.
func (k *KMS) destroy(sh pkcs11.SessionHandle, h pkcs11.ObjectHandle) {
	if err := k.p.DestroyObject(sh, h); err != nil {
		if log := k.log.Load(); log != nil {
			log.Warn("kms: PKCS#11 session object not destroyed", "err", err)
		}
	}
}

// dataKeyTemplate is a data key as a session object: a generic secret
// that can be wrapped (extractable) and do nothing else; sensitive unless
// its value must be read.
func dataKeyTemplate(n int, sensitive bool) []*pkcs11.Attribute {
	t := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, sensitive),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true),
	}
	for _, a := range []uint{pkcs11.CKA_ENCRYPT, pkcs11.CKA_DECRYPT, pkcs11.CKA_WRAP, pkcs11.CKA_UNWRAP,
		pkcs11.CKA_SIGN, pkcs11.CKA_VERIFY, pkcs11.CKA_DERIVE} {
		t = append(t, pkcs11.NewAttribute(a, false))
	}
	if n > 0 {
		t = append(t, pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, n))
	}
	return t
}

var kwp = []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_WRAP_PAD, nil)}

// wrappingKey resolves ref for a new blob: its metadata, id and current
// backing-key version; the key must be Enabled.
func (k *KMS) wrappingKey(ref string) (*KeyMetadata, string, uint32, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	m, err := k.resolve(ref)
	if err == nil {
		err = usable(m)
	}
	if err != nil {
		return m, "", 0, err
	}
	return m, m.KeyID, m.Versions, nil
}

// v2Size reports whether a data key of n bytes is made as a version 2
// blob: a multiple of 8 bytes (RFC 5649 wraps any size, but SoftHSM2 2.6
// unwraps a padded key with its padding).
func v2Size(n int) bool { return n%8 == 0 }

// generateV1On makes an n-byte data key of a size v2Size refuses: the HSM
// makes it as a readable session object, its value is read into locked
// memory, encrypted from there (a version 1 blob) and copied into dst, if
// given, then wiped.
func (k *KMS) generateV1On(ctx context.Context, sh pkcs11.SessionHandle, ref string, ectx map[string]string, n int, dst []byte) ([]byte, string, error) {
	dk, err := k.p.GenerateKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_GENERIC_SECRET_KEY_GEN, nil)},
		dataKeyTemplate(n, false))
	if err != nil {
		return nil, "", err
	}
	defer k.destroy(sh, dk)
	pt := k.dec.lockedBuf()
	defer k.dec.releaseBuf(pt)
	if _, err := k.keys.value(sh, dk, pt[:n]); err != nil {
		return nil, "", err
	}
	blob, arn, err := k.wrapOn(ctx, sh, ref, ectx, pt[:n])
	if err == nil {
		copy(dst, pt[:n])
	}
	return blob, arn, err
}

// generateV2On makes an n-byte data key inside the HSM, wraps it under
// ref's current version with ectx (a version 2 blob), and calls use, if
// given, with the key's object before it is destroyed. A readable key
// (sensitive false) is made only for a use that reads it.
func (k *KMS) generateV2On(sh pkcs11.SessionHandle, ref string, ectx map[string]string, n int, readable bool,
	use func(dk pkcs11.ObjectHandle) error) ([]byte, string, error) {
	if err := validateContext(ectx); err != nil {
		return nil, "", err
	}
	if n < 1 || n > maxDataKey {
		return nil, "", kmsErr(ErrValidation, "NumberOfBytes %d is not in 1..%d", n, maxDataKey)
	}
	m, id, version, err := k.wrappingKey(ref)
	if err != nil {
		return nil, arnOf(m), err
	}
	nonce, err := k.p.GenerateRandom(sh, ivLen)
	if err != nil {
		return nil, m.Arn, err
	}
	cmk, err := k.findKey(sh, id, version)
	if err != nil {
		return nil, m.Arn, err
	}
	hdr := headerOf(blobV2, uuidBytes(id), version, nonce)
	kek, err := k.kek(sh, cmk, hdr, ectx)
	if err != nil {
		return nil, m.Arn, err
	}
	defer k.destroy(sh, kek)
	dk, err := k.p.GenerateKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_GENERIC_SECRET_KEY_GEN, nil)},
		dataKeyTemplate(n, !readable))
	if err != nil {
		return nil, m.Arn, err
	}
	defer k.destroy(sh, dk)
	wrapped, err := k.p.WrapKey(sh, kwp, kek, dk)
	if err != nil {
		return nil, m.Arn, err
	}
	if use != nil {
		if err := use(dk); err != nil {
			return nil, m.Arn, err
		}
	}
	return append(hdr, wrapped...), m.Arn, nil
}

// unwrapV2On unwraps a version 2 blob (its CMK version object cmk) with
// ectx into a session object, readable or not; the caller destroys it. A
// wrong context or a changed blob fails the key wrap's integrity check.
func (k *KMS) unwrapV2On(sh pkcs11.SessionHandle, cmk pkcs11.ObjectHandle, b *blob, ectx map[string]string, readable bool) (pkcs11.ObjectHandle, error) {
	kek, err := k.kek(sh, cmk, b.header, ectx)
	if err != nil {
		return 0, err
	}
	defer k.destroy(sh, kek)
	return k.p.UnwrapKey(sh, kwp, kek, b.ct, dataKeyTemplate(0, !readable))
}
