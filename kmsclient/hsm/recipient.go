package hsm

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"sync"

	"github.com/hemd/hemd/hem/datakey"
	"github.com/hemd/hemd/hem/shield"
	"github.com/hemd/hemd/kmsclient/recipient"
	"github.com/miekg/pkcs11"
)

// Decrypt for a recipient (AWS's Recipient, CiphertextForRecipient): the
// plaintext is sent encrypted to a caller's public key in a CMS envelope
// (recipient package). A fresh AES-256 content-encryption key (CEK) is made
// in locked memory and handed to the HSM as a session object; the HSM
// encrypts the plaintext with it (AES-256-CBC): a version 2 blob's data
// key, when its size is a multiple of 16 bytes, by C_WrapKey straight from
// its unwrapped session object, so the plaintext never leaves the HSM; any
// other plaintext is decrypted into locked memory, encrypted from there and
// wiped. The CEK is then encrypted to the recipient (RSA-OAEP-SHA-256) in
// locked memory and wiped. SoftHSM2 2.6 does RSA-OAEP only with SHA-1,
// which is why the CEK, not the plaintext, is the secret that leaves the
// HSM for hemd's locked memory.

// workspace is the locked memory of one Decrypt for a recipient.
type workspace struct {
	mem              *datakey.Locked
	scratch, cek, pt []byte
}

const workspaceSize = recipient.EncryptScratch + 32 + maxPlaintext

// workspaces lends at most a fixed number of workspaces (their memory is
// locked), made on first use and wiped when given back.
type workspaces struct {
	sem  chan struct{}
	mu   sync.Mutex
	free []*workspace
}

func newWorkspaces(n int) *workspaces { return &workspaces{sem: make(chan struct{}, n)} }

func (w *workspaces) get(ctx context.Context) (*workspace, error) {
	select {
	case w.sem <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	w.mu.Lock()
	if n := len(w.free); n > 0 {
		x := w.free[n-1]
		w.free = w.free[:n-1]
		w.mu.Unlock()
		return x, nil
	}
	w.mu.Unlock()
	mem, err := datakey.NewLocked(workspaceSize)
	if err != nil {
		<-w.sem
		return nil, kmsErr(ErrInternal, "locked memory for a recipient: %v", err)
	}
	b := mem.Bytes()
	s := recipient.EncryptScratch
	return &workspace{mem: mem, scratch: b[:s], cek: b[s : s+32], pt: b[s+32 : s+32+maxPlaintext]}, nil
}

func (w *workspaces) put(x *workspace) {
	clear(x.mem.Bytes())
	w.mu.Lock()
	w.free = append(w.free, x)
	w.mu.Unlock()
	<-w.sem
}

func (w *workspaces) close() {
	if w == nil {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, x := range w.free {
		x.mem.Free()
	}
	w.free = nil
}

// cbc is AES-CBC (no padding) with iv, for C_WrapKey and the last block.
func cbc(iv []byte) []*pkcs11.Mechanism {
	return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_CBC, iv)}
}

// sealer encrypts a plaintext for the envelope with a CEK object.
type sealer struct {
	k   *KMS
	sh  pkcs11.SessionHandle
	cek pkcs11.ObjectHandle
	iv  []byte
}

// object encrypts a key object of n bytes (n a multiple of 16) in the HSM:
// C_WrapKey with AES-CBC, then the PKCS #7 padding block (16 bytes of 16)
// encrypted on its own, chained from the last ciphertext block.
func (s *sealer) object(dk pkcs11.ObjectHandle) ([]byte, error) {
	ct, err := s.k.p.WrapKey(s.sh, cbc(s.iv), s.cek, dk)
	if err != nil {
		return nil, err
	}
	if len(ct) == 0 || len(ct)%16 != 0 {
		return nil, fmt.Errorf("C_WrapKey with AES-CBC gave %d bytes", len(ct))
	}
	if err := s.k.p.EncryptInit(s.sh, cbc(ct[len(ct)-16:]), s.cek); err != nil {
		return nil, err
	}
	pad := make([]byte, 16)
	for i := range pad {
		pad[i] = 16
	}
	last, err := s.k.p.Encrypt(s.sh, pad)
	if err != nil {
		return nil, s.k.abandon(s.sh, opEncrypt, err)
	}
	return append(ct, last...), nil
}

// bytes encrypts a plaintext in locked memory with AES-CBC and PKCS #7
// padding, C_Encrypt reading it from there.
func (s *sealer) bytes(pt []byte) ([]byte, error) {
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_CBC_PAD, s.iv)}
	if err := s.k.p.EncryptInit(s.sh, mech, s.cek); err != nil {
		return nil, err
	}
	out := make([]byte, len(pt)+16)
	n, rv := crypt(s.k.raw.encrypt, s.sh, pt, out)
	if rv != pkcs11.CKR_OK {
		return nil, s.k.abandon(s.sh, opEncrypt, rv)
	}
	return out[:n], nil
}

// sealV2 encrypts a version 2 blob's data key: from its session object when
// its size (the wrapped size less the key wrap's 8 bytes: version 2 blobs
// hold multiples of 8 bytes) is a multiple of 16 bytes, else through locked
// memory.
func (s *sealer) sealV2(cmk pkcs11.ObjectHandle, b *blob, ectx map[string]string, pt []byte) ([]byte, error) {
	readable := (len(b.ct)-8)%16 != 0
	dk, err := s.k.unwrapV2On(s.sh, cmk, b, ectx, readable)
	if err != nil {
		return nil, err
	}
	defer s.k.destroy(s.sh, dk)
	if !readable {
		return s.object(dk)
	}
	n, err := s.k.keys.value(s.sh, dk, pt)
	if err != nil {
		return nil, err
	}
	defer clear(pt[:n])
	return s.bytes(pt[:n])
}

// envelope makes CiphertextForRecipient: content (AES-256-CBC under the CEK
// in w) and the CEK encrypted to the recipient.
func envelope(to *recipient.PublicKey, w *workspace, iv, content []byte) ([]byte, error) {
	ek, err := to.EncryptOAEP(w.scratch, w.cek)
	if err != nil {
		return nil, kmsErr(ErrInternal, "recipient: %v", err)
	}
	return (&recipient.Envelope{SubjectKeyID: to.SubjectKeyID(), EncryptedKey: ek, IV: iv, EncryptedContent: content}).Marshal()
}

// withCEK runs fn on a session with a fresh CEK object made from w.cek.
func (k *KMS) withCEK(ctx context.Context, w *workspace, iv []byte, fn func(s *sealer) error) error {
	if _, err := rand.Read(w.cek); err != nil {
		return err
	}
	return k.withSession(ctx, func(sh pkcs11.SessionHandle) error {
		cek, err := k.keys.createCEK(sh, w.cek)
		if err != nil {
			return err
		}
		defer k.destroy(sh, cek)
		return fn(&sealer{k: k, sh: sh, cek: cek, iv: iv})
	})
}

// recipientParams is what the audit log says of a recipient.
func recipientParams(to *recipient.PublicKey) map[string]any {
	return map[string]any{"recipient": map[string]string{"keyEncryptionAlgorithm": recipient.KeyEncryptionAlgorithm,
		"subjectKeyIdentifier": hex.EncodeToString(to.SubjectKeyID())}}
}

// DecryptForRecipient is Decrypt whose plaintext is returned only encrypted
// to the recipient's public key (CiphertextForRecipient, CMS), with the
// ARN of the key that wrapped the blob.
func (k *KMS) DecryptForRecipient(ctx context.Context, blobBytes []byte, ectx map[string]string, to *recipient.PublicKey) (out []byte, arn string, err error) {
	// Shielded: the CEK and a version 1 plaintext pass through registers.
	shield.Run(func() { out, arn, err = k.decryptForRecipient(ctx, blobBytes, ectx, to) })
	k.recordWith(ctx, "Decrypt", arn, ectx, recipientParams(to), err)
	return out, arn, err
}

func (k *KMS) decryptForRecipient(ctx context.Context, blobBytes []byte, ectx map[string]string, to *recipient.PublicKey) ([]byte, string, error) {
	b, m, err := k.checkBlob(blobBytes)
	if err != nil {
		return nil, arnOf(m), err
	}
	w, err := k.ws.get(ctx)
	if err != nil {
		return nil, m.Arn, err
	}
	defer k.ws.put(w)
	iv := make([]byte, 16)
	rand.Read(iv)
	var content []byte
	err = k.withCEK(ctx, w, iv, func(s *sealer) error {
		cmk, err := k.findKey(s.sh, m.KeyID, b.version)
		if err != nil {
			return err
		}
		if b.ver == blobV2 {
			content, err = s.sealV2(cmk, b, ectx, w.pt)
			return err
		}
		n, err := k.gcmDecryptOn(s.sh, cmk, b, ectx, w.pt)
		if err != nil {
			return err
		}
		defer clear(w.pt[:n])
		content, err = s.bytes(w.pt[:n])
		return err
	})
	if err != nil {
		return nil, m.Arn, k.decryptErr(err)
	}
	env, err := envelope(to, w, iv, content)
	return env, m.Arn, err
}

// GenerateDataKeyForRecipient is GenerateDataKey whose plaintext is
// returned only encrypted to the recipient (CiphertextForRecipient): the
// data key is made, wrapped and sealed inside the HSM when n is a multiple
// of 16 bytes (else through locked memory).
func (k *KMS) GenerateDataKeyForRecipient(ctx context.Context, ref string, ectx map[string]string, n int, to *recipient.PublicKey) (blob, env []byte, arn string, err error) {
	shield.Run(func() { blob, env, arn, err = k.generateDataKeyForRecipient(ctx, ref, ectx, n, to) })
	k.recordWith(ctx, "GenerateDataKey", arn, ectx, recipientParams(to), err)
	return blob, env, arn, err
}

func (k *KMS) generateDataKeyForRecipient(ctx context.Context, ref string, ectx map[string]string, n int, to *recipient.PublicKey) (blob, env []byte, arn string, err error) {
	w, err := k.ws.get(ctx)
	if err != nil {
		return nil, nil, "", err
	}
	defer k.ws.put(w)
	iv := make([]byte, 16)
	rand.Read(iv)
	var content []byte
	err = k.withCEK(ctx, w, iv, func(s *sealer) error {
		var err error
		if !v2Size(n) {
			if n < 1 || n > maxDataKey {
				return kmsErr(ErrValidation, "NumberOfBytes %d is not in 1..%d", n, maxDataKey)
			}
			blob, arn, err = k.generateV1On(ctx, s.sh, ref, ectx, n, w.pt[:n])
			if err == nil {
				content, err = s.bytes(w.pt[:n])
			}
			clear(w.pt[:n])
			return err
		}
		blob, arn, err = k.generateV2On(s.sh, ref, ectx, n, n%16 != 0, func(dk pkcs11.ObjectHandle) error {
			if n%16 == 0 {
				content, err = s.object(dk)
				return err
			}
			m, err := k.keys.value(s.sh, dk, w.pt)
			if err != nil {
				return err
			}
			defer clear(w.pt[:m])
			content, err = s.bytes(w.pt[:m])
			return err
		})
		return err
	})
	if err = internal(err); err != nil {
		return nil, nil, arn, err
	}
	env, err = envelope(to, w, iv, content)
	return blob, env, arn, err
}
