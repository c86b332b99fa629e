package hsm

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/miekg/pkcs11"
)

// DataKeySize is the data key hemd asks for: an AES-256-XTS key (64 bytes).
const DataKeySize = 64

type metaFile struct {
	Keys    map[string]*KeyMetadata `json:"keys"`
	Aliases map[string]string       `json:"aliases"`
	Grants  []*Grant                `json:"grants"`
}

// refresh reloads the metadata when another process (hemd key ...) changed
// it, so that a running hemd serve sees a key disabled meanwhile. Call with
// k.mu held.
func (k *KMS) refresh() error {
	st, err := os.Stat(filepath.Join(k.stateDir, "keys.json"))
	if err != nil {
		return nil
	}
	if st.ModTime().Equal(k.metaTime) && st.Size() == k.metaSize {
		return nil
	}
	return k.loadMeta()
}

// loadMeta reads the key metadata (states, aliases) kept beside the token.
// Key material is only in the HSM; this file holds none.
func (k *KMS) loadMeta() error {
	path := filepath.Join(k.stateDir, "keys.json")
	if st, err := os.Stat(path); err == nil {
		k.metaTime, k.metaSize = st.ModTime(), st.Size()
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("kms: %w", err)
	}
	var m metaFile
	if err := json.Unmarshal(b, &m); err != nil {
		return fmt.Errorf("kms: keys.json is corrupt: %w", err)
	}
	k.meta, k.aliases, k.grants = map[string]*KeyMetadata{}, map[string]string{}, m.Grants
	if m.Keys != nil {
		k.meta = m.Keys
	}
	if m.Aliases != nil {
		k.aliases = m.Aliases
	}
	return nil
}

// saveMeta writes the metadata atomically. Call with k.mu held.
func (k *KMS) saveMeta() error {
	b, err := json.MarshalIndent(metaFile{Keys: k.meta, Aliases: k.aliases, Grants: k.grants}, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(k.stateDir, "keys.json.tmp")
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err == nil {
		err = f.Sync()
	}
	f.Close()
	if err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(k.stateDir, "keys.json")); err != nil {
		return err
	}
	if st, err := os.Stat(filepath.Join(k.stateDir, "keys.json")); err == nil {
		k.metaTime, k.metaSize = st.ModTime(), st.Size()
	}
	return nil
}

var uuidRe = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)

func newUUID() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

func uuidBytes(id string) [16]byte {
	var b [16]byte
	hex.Decode(b[:], []byte(strings.ReplaceAll(id, "-", "")))
	return b
}

func uuidString(b [16]byte) string {
	h := hex.EncodeToString(b[:])
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// ARN returns a key id's ARN.
func (k *KMS) ARN(id string) string { return k.arn(id) }

func (k *KMS) arn(id string) string {
	return fmt.Sprintf("arn:aws:kms:%s:%s:key/%s", k.cfg.Region, k.cfg.Account, id)
}

// resolve finds a key by id, key ARN, alias name or alias ARN. Call with
// k.mu held.
func (k *KMS) resolve(ref string) (*KeyMetadata, error) {
	if err := k.refresh(); err != nil {
		return nil, kmsErr(ErrInternal, "key metadata: %v", err)
	}
	id := ref
	if i := strings.Index(ref, ":alias/"); strings.HasPrefix(ref, "arn:") && i > 0 {
		id = ref[i+1:]
	} else if i := strings.Index(ref, ":key/"); strings.HasPrefix(ref, "arn:") && i > 0 {
		id = ref[i+5:]
	}
	if strings.HasPrefix(id, "alias/") {
		target, ok := k.aliases[id]
		if !ok {
			return nil, kmsErr(ErrNotFound, "alias %s is not found", id)
		}
		id = target
	}
	if !uuidRe.MatchString(id) {
		return nil, kmsErr(ErrNotFound, "invalid keyId %s", ref)
	}
	m, ok := k.meta[id]
	if !ok {
		return nil, kmsErr(ErrNotFound, "key %s does not exist", k.arn(id))
	}
	return m, nil
}

func (k *KMS) aliasesOf(id string) []string {
	var out []string
	for a, t := range k.aliases {
		if t == id {
			out = append(out, a)
		}
	}
	sort.Strings(out)
	return out
}

func (k *KMS) describe(m *KeyMetadata) KeyMetadata {
	c := *m
	c.Enabled = m.KeyState == Enabled
	c.Aliases = k.aliasesOf(m.KeyID)
	return c
}

// usable checks a key's state for a cryptographic operation.
func usable(m *KeyMetadata) error {
	switch m.KeyState {
	case Enabled:
		return nil
	case Disabled:
		return kmsErr(ErrDisabled, "%s is disabled", m.Arn)
	default:
		return kmsErr(ErrInvalidState, "%s is pending deletion", m.Arn)
	}
}

// CreateKey creates a CMK: a new AES-256 key inside the HSM.
func (k *KMS) CreateKey(ctx context.Context, description string) (KeyMetadata, error) {
	id := newUUID()
	m := &KeyMetadata{KeyID: id, Arn: k.arn(id), KeyState: Enabled, Description: description,
		CreationDate: time.Now().UTC().Truncate(time.Second), KeyUsage: "ENCRYPT_DECRYPT",
		KeySpec: "SYMMETRIC_DEFAULT", Origin: "AWS_KMS", Versions: 1}
	err := k.generateBackingKey(ctx, id, 1)
	if err == nil {
		k.mu.Lock()
		k.meta[id] = m
		err = k.saveMeta()
		k.mu.Unlock()
	}
	k.record(ctx, "CreateKey", m.Arn, nil, err)
	if err != nil {
		return KeyMetadata{}, fmt.Errorf("create key: %w", err)
	}
	return k.describe(m), nil
}

// DescribeKey returns a key's metadata.
func (k *KMS) DescribeKey(ctx context.Context, ref string) (KeyMetadata, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	m, err := k.resolve(ref)
	if err != nil {
		return KeyMetadata{}, err
	}
	return k.describe(m), nil
}

// ListKeys returns every key's metadata, oldest first.
func (k *KMS) ListKeys(ctx context.Context) []KeyMetadata {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.refresh()
	var out []KeyMetadata
	for _, m := range k.meta {
		out = append(out, k.describe(m))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].CreationDate.Before(out[j].CreationDate) })
	return out
}

// CreateAlias points alias/NAME at a key.
func (k *KMS) CreateAlias(ctx context.Context, alias, ref string) error {
	if !regexp.MustCompile(`^alias/[a-zA-Z0-9/_-]+$`).MatchString(alias) || strings.HasPrefix(alias, "alias/aws/") {
		return kmsErr(ErrValidation, "alias name %q is not valid", alias)
	}
	return k.addAlias(alias, ref)
}

// CreateReservedAlias creates an alias in the reserved alias/aws/ space, as
// AWS does for its managed default keys (alias/aws/ebs).
func (k *KMS) CreateReservedAlias(ctx context.Context, alias, ref string) error {
	if !strings.HasPrefix(alias, "alias/aws/") {
		return kmsErr(ErrValidation, "%s is not a reserved alias", alias)
	}
	return k.addAlias(alias, ref)
}

// addAlias records a checked alias name for a key.
func (k *KMS) addAlias(alias, ref string) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if _, ok := k.aliases[alias]; ok {
		return kmsErr(ErrAlreadyExists, "alias %s already exists", alias)
	}
	m, err := k.resolve(ref)
	if err != nil {
		return err
	}
	k.aliases[alias] = m.KeyID
	return k.saveMeta()
}

// setState moves a key between states as EnableKey, DisableKey and
// CancelKeyDeletion do.
func (k *KMS) setState(ctx context.Context, op, ref, state string, days int) error {
	k.mu.Lock()
	m, err := k.resolve(ref)
	if err == nil {
		switch {
		case op == "CancelKeyDeletion" && m.KeyState != PendingDeletion:
			err = kmsErr(ErrInvalidState, "%s is not pending deletion", m.Arn)
		case op != "CancelKeyDeletion" && m.KeyState == PendingDeletion:
			err = kmsErr(ErrInvalidState, "%s is pending deletion", m.Arn)
		default:
			m.KeyState = state
			m.Enabled = state == Enabled
			m.DeletionDate = nil
			if state == PendingDeletion {
				d := time.Now().UTC().Add(time.Duration(days) * 24 * time.Hour).Truncate(time.Second)
				m.DeletionDate = &d
			}
			err = k.saveMeta()
		}
	}
	arn := ""
	if m != nil {
		arn = m.Arn
	}
	k.mu.Unlock()
	k.record(ctx, op, arn, nil, err)
	return err
}

// EnableKey enables a key.
func (k *KMS) EnableKey(ctx context.Context, ref string) error {
	return k.setState(ctx, "EnableKey", ref, Enabled, 0)
}

// DisableKey disables a key: it can no longer wrap or unwrap.
func (k *KMS) DisableKey(ctx context.Context, ref string) error {
	return k.setState(ctx, "DisableKey", ref, Disabled, 0)
}

// ScheduleKeyDeletion puts a key in PendingDeletion (7 to 30 days).
func (k *KMS) ScheduleKeyDeletion(ctx context.Context, ref string, days int) error {
	if days < 7 || days > 30 {
		err := kmsErr(ErrValidation, "PendingWindowInDays %d is not in 7..30", days)
		k.record(ctx, "ScheduleKeyDeletion", "", nil, err)
		return err
	}
	return k.setState(ctx, "ScheduleKeyDeletion", ref, PendingDeletion, days)
}

// CancelKeyDeletion brings a key pending deletion back, Disabled.
func (k *KMS) CancelKeyDeletion(ctx context.Context, ref string) error {
	return k.setState(ctx, "CancelKeyDeletion", ref, Disabled, 0)
}

// EnableKeyRotation and DisableKeyRotation set the key's rotation flag.
func (k *KMS) EnableKeyRotation(ctx context.Context, ref string, on bool) error {
	k.mu.Lock()
	m, err := k.resolve(ref)
	if err == nil {
		err = usable(m)
	}
	if err == nil {
		m.RotationEnabled = on
		err = k.saveMeta()
	}
	k.mu.Unlock()
	op := "EnableKeyRotation"
	if !on {
		op = "DisableKeyRotation"
	}
	k.record(ctx, op, arnOf(m), nil, err)
	return err
}

// RotateKey adds a new backing-key version; new blobs use it, old blobs keep
// decrypting with theirs.
func (k *KMS) RotateKey(ctx context.Context, ref string) error {
	k.mu.Lock()
	m, err := k.resolve(ref)
	if err == nil {
		err = usable(m)
	}
	var id string
	var next uint32
	if err == nil {
		id, next = m.KeyID, m.Versions+1
	}
	k.mu.Unlock()
	if err == nil {
		err = k.generateBackingKey(ctx, id, next)
	}
	if err == nil {
		k.mu.Lock()
		m.Versions = next
		err = k.saveMeta()
		k.mu.Unlock()
	}
	k.record(ctx, "RotateKeyOnDemand", arnOf(m), nil, err)
	return err
}

func arnOf(m *KeyMetadata) string {
	if m == nil {
		return ""
	}
	return m.Arn
}

// GenerateDataKeyWithoutPlaintext makes a 64-byte data key from the HSM's
// random generator and returns it only wrapped, under the key's current
// version with ectx bound as AAD, and the key's ARN.
func (k *KMS) GenerateDataKeyWithoutPlaintext(ctx context.Context, ref string, ectx map[string]string) ([]byte, string, error) {
	return k.GenerateDataKeyWithoutPlaintextN(ctx, ref, ectx, DataKeySize)
}

// GenerateDataKeyWithoutPlaintextN is GenerateDataKeyWithoutPlaintext for a
// data key of n bytes (1 to 1024), as the API's NumberOfBytes.
func (k *KMS) GenerateDataKeyWithoutPlaintextN(ctx context.Context, ref string, ectx map[string]string, n int) ([]byte, string, error) {
	blob, arn, err := k.generate(ctx, ref, ectx, n)
	k.record(ctx, "GenerateDataKeyWithoutPlaintext", arn, ectx, err)
	return blob, arn, err
}

func (k *KMS) generate(ctx context.Context, ref string, ectx map[string]string, n int) ([]byte, string, error) {
	var blob []byte
	var arn string
	if n < 1 || n > maxDataKey {
		return nil, "", kmsErr(ErrValidation, "NumberOfBytes %d is not in 1..%d", n, maxDataKey)
	}
	err := k.withSession(ctx, func(sh pkcs11.SessionHandle) error {
		var err error
		if v2Size(n) {
			blob, arn, err = k.generateV2On(sh, ref, ectx, n, false, nil)
		} else {
			blob, arn, err = k.generateV1On(ctx, sh, ref, ectx, n, nil)
		}
		return err
	})
	return blob, arn, internal(err)
}

// internal reports an HSM failure as KMSInternalException; KMS errors and a
// caller's canceled or expired context pass as they are.
func internal(err error) error {
	var ke *Error
	if err != nil && !errors.As(err, &ke) && !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded) {
		return kmsErr(ErrInternal, "HSM: %v", err)
	}
	return err
}

// wrap encrypts plaintext under the key's current version inside the HSM.
func (k *KMS) wrap(ctx context.Context, ref string, ectx map[string]string, plaintext []byte) ([]byte, string, error) {
	var blob []byte
	var arn string
	err := k.withSession(ctx, func(sh pkcs11.SessionHandle) error {
		var err error
		blob, arn, err = k.wrapOn(ctx, sh, ref, ectx, plaintext)
		return err
	})
	return blob, arn, internal(err)
}

func (k *KMS) wrapOn(ctx context.Context, sh pkcs11.SessionHandle, ref string, ectx map[string]string, plaintext []byte) ([]byte, string, error) {
	if err := validateContext(ectx); err != nil {
		return nil, "", err
	}
	if len(plaintext) == 0 || len(plaintext) > maxPlaintext {
		return nil, "", kmsErr(ErrValidation, "plaintext of %d bytes is not in 1..%d", len(plaintext), maxPlaintext)
	}
	k.mu.Lock()
	m, err := k.resolve(ref)
	if err == nil {
		err = usable(m)
	}
	var id string
	var version uint32
	if err == nil {
		id, version = m.KeyID, m.Versions
	}
	k.mu.Unlock()
	if err != nil {
		return nil, arnOf(m), err
	}
	iv, err := k.p.GenerateRandom(sh, ivLen)
	if err != nil {
		return nil, m.Arn, err
	}
	obj, err := k.findKey(sh, id, version)
	if err != nil {
		return nil, m.Arn, err
	}
	hdr := headerOf(blobV1, uuidBytes(id), version, iv)
	params := pkcs11.NewGCMParams(iv, aad(hdr, ectx), tagLen*8)
	defer params.Free()
	if err := k.p.EncryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, obj); err != nil {
		return nil, m.Arn, err
	}
	// C_Encrypt called directly on the caller's plaintext (ReEncrypt's is
	// in locked memory): miekg/pkcs11 would leave a copy in the C heap.
	out := make([]byte, len(hdr)+len(plaintext)+tagLen)
	copy(out, hdr)
	n, rv := crypt(k.raw.encrypt, sh, plaintext, out[len(hdr):])
	if rv != pkcs11.CKR_OK {
		return nil, m.Arn, k.abandon(sh, opEncrypt, rv)
	}
	return out[:len(hdr)+n], m.Arn, nil
}

// GenerateDataKey returns a new data key of len(dst) bytes in plaintext
// (into dst, which should be locked memory: the HSM writes it there) and
// wrapped (a version 2 blob, or version 1 for sizes v2Size refuses).
func (k *KMS) GenerateDataKey(ctx context.Context, ref string, ectx map[string]string, dst []byte) ([]byte, string, error) {
	var blob []byte
	var arn string
	if len(dst) < 1 || len(dst) > maxDataKey {
		err := kmsErr(ErrValidation, "NumberOfBytes %d is not in 1..%d", len(dst), maxDataKey)
		k.record(ctx, "GenerateDataKey", "", ectx, err)
		return nil, "", err
	}
	err := k.withSession(ctx, func(sh pkcs11.SessionHandle) error {
		var err error
		if !v2Size(len(dst)) {
			blob, arn, err = k.generateV1On(ctx, sh, ref, ectx, len(dst), dst)
			return err
		}
		blob, arn, err = k.generateV2On(sh, ref, ectx, len(dst), true, func(dk pkcs11.ObjectHandle) error {
			_, err := k.keys.value(sh, dk, dst)
			return err
		})
		return err
	})
	err = internal(err)
	k.record(ctx, "GenerateDataKey", arn, ectx, err)
	return blob, arn, err
}

// Encrypt encrypts up to 4 KiB of plaintext under a key.
func (k *KMS) Encrypt(ctx context.Context, ref string, ectx map[string]string, plaintext []byte) ([]byte, string, error) {
	blob, arn, err := k.wrap(ctx, ref, ectx, plaintext)
	k.record(ctx, "Encrypt", arn, ectx, err)
	return blob, arn, err
}

// ReEncrypt decrypts a blob and encrypts its plaintext under another key
// and context. A version 2 blob (a data key) becomes a version 2 blob
// without its plaintext leaving the HSM; a version 1 blob is decrypted into
// this process's locked scratch memory and encrypted again from there.
func (k *KMS) ReEncrypt(ctx context.Context, blob []byte, srcCtx map[string]string, dstRef string, dstCtx map[string]string) ([]byte, string, error) {
	var out []byte
	var arn string
	b, m, err := k.checkBlob(blob)
	switch {
	case err != nil:
		arn = arnOf(m)
	case b.ver == blobV2:
		out, arn, err = k.reEncryptV2(ctx, b, m, srcCtx, dstRef, dstCtx)
	default:
		pt := k.dec.lockedBuf()
		var n int
		n, _, err = k.decrypt(ctx, blob, srcCtx, pt)
		if err == nil {
			out, arn, err = k.wrap(ctx, dstRef, dstCtx, pt[:n])
		}
		k.dec.releaseBuf(pt)
	}
	if arn == "" {
		arn = arnOf(m)
	}
	k.record(ctx, "ReEncrypt", arn, dstCtx, err)
	return out, arn, err
}

// reEncryptV2 unwraps a version 2 blob inside the HSM and wraps the key
// object under the destination key and context.
func (k *KMS) reEncryptV2(ctx context.Context, b *blob, src *KeyMetadata, srcCtx map[string]string, dstRef string, dstCtx map[string]string) ([]byte, string, error) {
	if err := validateContext(dstCtx); err != nil {
		return nil, "", err
	}
	var out []byte
	var arn string
	err := k.withSession(ctx, func(sh pkcs11.SessionHandle) error {
		cmk, err := k.findKey(sh, src.KeyID, b.version)
		if err != nil {
			return err
		}
		dk, err := k.unwrapV2On(sh, cmk, b, srcCtx, false)
		if err != nil {
			return err
		}
		defer k.destroy(sh, dk)
		m, id, version, err := k.wrappingKey(dstRef)
		if err != nil {
			arn = arnOf(m)
			return err
		}
		arn = m.Arn
		nonce, err := k.p.GenerateRandom(sh, ivLen)
		if err != nil {
			return err
		}
		dcmk, err := k.findKey(sh, id, version)
		if err != nil {
			return err
		}
		hdr := headerOf(blobV2, uuidBytes(id), version, nonce)
		kek, err := k.kek(sh, dcmk, hdr, dstCtx)
		if err != nil {
			return err
		}
		defer k.destroy(sh, kek)
		wrapped, err := k.p.WrapKey(sh, kwp, kek, dk)
		if err != nil {
			return err
		}
		out = append(hdr, wrapped...)
		return nil
	})
	return out, arn, k.decryptErr(err)
}

// Decrypt unwraps a blob made by GenerateDataKeyWithoutPlaintext inside the
// HSM, with the same encryption context, into dst, and returns the ARN of
// the key that wrapped it. dst must have room for the plaintext.
func (k *KMS) Decrypt(ctx context.Context, blobBytes []byte, ectx map[string]string, dst []byte) (string, error) {
	_, arn, err := k.DecryptN(ctx, blobBytes, ectx, dst)
	return arn, err
}

// DecryptN is Decrypt that also returns the plaintext's length.
func (k *KMS) DecryptN(ctx context.Context, blobBytes []byte, ectx map[string]string, dst []byte) (int, string, error) {
	n, arn, err := k.decrypt(ctx, blobBytes, ectx, dst)
	k.record(ctx, "Decrypt", arn, ectx, err)
	return n, arn, err
}

// checkBlob decodes a blob and checks its key: it exists, is Enabled and
// has the backing-key version the blob names.
func (k *KMS) checkBlob(blobBytes []byte) (*blob, *KeyMetadata, error) {
	b, err := decodeBlob(blobBytes)
	if err != nil {
		return nil, nil, err
	}
	id := uuidString(b.keyID)
	k.mu.Lock()
	defer k.mu.Unlock()
	m, err := k.resolve(id)
	if err == nil {
		err = usable(m)
		if err == nil && (b.version == 0 || b.version > m.Versions) {
			err = kmsErr(ErrInvalidCiphertext, "ciphertext names backing key version %d of %s", b.version, m.Arn)
		}
	}
	return b, m, err
}

func (k *KMS) decrypt(ctx context.Context, blobBytes []byte, ectx map[string]string, dst []byte) (int, string, error) {
	b, m, err := k.checkBlob(blobBytes)
	if err != nil {
		return 0, arnOf(m), err
	}
	n := 0
	err = k.withSession(ctx, func(sh pkcs11.SessionHandle) error {
		cmk, err := k.findKey(sh, m.KeyID, b.version)
		if err != nil {
			return err
		}
		if b.ver == blobV2 {
			dk, err := k.unwrapV2On(sh, cmk, b, ectx, true)
			if err != nil {
				return err
			}
			defer k.destroy(sh, dk)
			n, err = k.keys.value(sh, dk, dst)
			return err
		}
		n, err = k.gcmDecryptOn(sh, cmk, b, ectx, dst)
		return err
	})
	return n, m.Arn, k.decryptErr(err)
}

// gcmDecryptOn decrypts a version 1 blob with its CMK version object into
// dst through the locked scratch. decodeBlob bounded the blob before
// C_DecryptInit, so the scratch holds any plaintext: C_Decrypt runs to the
// end (tag checked) even when dst is too small, and a tampered blob is
// InvalidCiphertextException.
func (k *KMS) gcmDecryptOn(sh pkcs11.SessionHandle, cmk pkcs11.ObjectHandle, b *blob, ectx map[string]string, dst []byte) (int, error) {
	params := pkcs11.NewGCMParams(b.iv, aad(b.header, ectx), tagLen*8)
	defer params.Free()
	if err := k.p.DecryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, cmk); err != nil {
		return 0, err
	}
	n, err := k.dec.decrypt(sh, b.ct, dst)
	if err != nil {
		return 0, k.abandon(sh, opDecrypt, err)
	}
	return n, nil
}

// decryptErr maps the error of an unwrap: KMS errors and a caller's
// canceled context as they are; a failed integrity check (SoftHSM2 reports
// a GCM tag or key wrap mismatch as CKR_GENERAL_ERROR) is
// InvalidCiphertextException: the blob or its context is wrong, the HSM is
// fine; anything else is the HSM's failure.
func (k *KMS) decryptErr(err error) error {
	if err == nil {
		return nil
	}
	var ke *Error
	if errors.As(err, &ke) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	var pe pkcs11.Error
	if errors.As(err, &pe) {
		switch pe {
		case pkcs11.CKR_GENERAL_ERROR, pkcs11.CKR_ENCRYPTED_DATA_INVALID, pkcs11.CKR_ENCRYPTED_DATA_LEN_RANGE,
			pkcs11.CKR_WRAPPED_KEY_INVALID, pkcs11.CKR_WRAPPED_KEY_LEN_RANGE:
			return kmsErr(ErrInvalidCiphertext, "the ciphertext or its encryption context does not match")
		}
	}
	return kmsErr(ErrInternal, "HSM: %v", err)
}
