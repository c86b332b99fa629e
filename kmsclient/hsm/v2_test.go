package hsm

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/hemd/hemd/kmsclient/recipient"
	"github.com/miekg/pkcs11"
)

func testRecipient(t *testing.T) (*recipient.KeyPair, *recipient.PublicKey) {
	t.Helper()
	kp, err := recipient.GenerateKeyPair()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(kp.Destroy)
	to, err := recipient.ParseDocument(kp.Document())
	if err != nil {
		t.Fatal(err)
	}
	return kp, to
}

// TestDataKeysV2: data keys of every size that is a multiple of 8 bytes
// are version 2 blobs of the expected length, others version 1; Decrypt, GenerateDataKey's plaintext and Decrypt for a
// recipient agree on their plaintext.
func TestDataKeysV2(t *testing.T) {
	k, _ := open(t)
	ctx := context.Background()
	m, _ := k.CreateKey(ctx, "")
	kp, to := testRecipient(t)
	for _, n := range []int{1, 8, 15, 16, 17, 24, 32, 64, 1000, 1024} {
		blob, arn, err := k.GenerateDataKeyWithoutPlaintextN(ctx, m.KeyID, vol, n)
		if err != nil || arn != m.Arn {
			t.Fatalf("%d bytes: %v", n, err)
		}
		if n%8 == 0 && (blob[4] != blobV2 || len(blob) != headerLen+8+n) || n%8 != 0 && blob[4] != blobV1 {
			t.Fatalf("%d bytes: blob version %d of %d bytes", n, blob[4], len(blob))
		}
		dst := make([]byte, 4096)
		got, _, err := k.DecryptN(ctx, blob, vol, dst)
		if err != nil || got != n {
			t.Fatalf("%d bytes: Decrypt gave %d, %v", n, got, err)
		}
		env, arn, err := k.DecryptForRecipient(ctx, blob, vol, to)
		if err != nil || arn != m.Arn {
			t.Fatalf("%d bytes: DecryptForRecipient: %v", n, err)
		}
		opened := make([]byte, 4096)
		if o, err := kp.Open(env, opened); err != nil || !bytes.Equal(opened[:o], dst[:n]) {
			t.Fatalf("%d bytes: the recipient's plaintext differs (%d, %v)", n, o, err)
		}
		pt := make([]byte, n)
		blob, _, err = k.GenerateDataKey(ctx, m.KeyID, vol, pt)
		if err != nil || (blob[4] == blobV2) != (n%8 == 0) {
			t.Fatalf("%d bytes: GenerateDataKey: %v", n, err)
		}
		if got, _, err := k.DecryptN(ctx, blob, vol, dst); err != nil || !bytes.Equal(dst[:got], pt) {
			t.Fatalf("%d bytes: GenerateDataKey's plaintext is not its blob's", n)
		}
		blob, env, _, err = k.GenerateDataKeyForRecipient(ctx, m.KeyID, vol, n, to)
		if err != nil {
			t.Fatalf("%d bytes: GenerateDataKeyForRecipient: %v", n, err)
		}
		o, err := kp.Open(env, opened)
		if got, _, derr := k.DecryptN(ctx, blob, vol, dst); err != nil || derr != nil || o != n || !bytes.Equal(dst[:got], opened[:o]) {
			t.Fatalf("%d bytes: GenerateDataKeyForRecipient's envelope is not its blob's key: %v %v", n, err, derr)
		}
	}
}

// TestRecipientV1: blobs made before version 2 (Encrypt's format; volumes
// made by earlier hemds) decrypt for a recipient too, up to 4096 bytes.
func TestRecipientV1(t *testing.T) {
	k, _ := open(t)
	ctx := context.Background()
	m, _ := k.CreateKey(ctx, "")
	kp, to := testRecipient(t)
	for _, n := range []int{1, 16, 64, 4096} {
		pt := randBytes(n)
		blob, _, err := k.Encrypt(ctx, m.KeyID, vol, pt)
		if err != nil || blob[4] != blobV1 {
			t.Fatal(err)
		}
		env, _, err := k.DecryptForRecipient(ctx, blob, vol, to)
		if err != nil {
			t.Fatal(err)
		}
		dst := make([]byte, 4096)
		if o, err := kp.Open(env, dst); err != nil || !bytes.Equal(dst[:o], pt) {
			t.Fatalf("%d bytes: %v", n, err)
		}
	}
}

// TestReEncryptV2: a data key re-encrypted under another key and context
// stays a version 2 blob with the same key; the old context no longer
// opens it.
func TestReEncryptV2(t *testing.T) {
	k, _ := open(t)
	ctx := context.Background()
	a, _ := k.CreateKey(ctx, "a")
	b, _ := k.CreateKey(ctx, "b")
	pt := make([]byte, DataKeySize)
	blob, _, err := k.GenerateDataKey(ctx, a.KeyID, vol, pt)
	if err != nil {
		t.Fatal(err)
	}
	snap := map[string]string{"aws:ebs:id": "snap-0123456789abcdef0"}
	out, arn, err := k.ReEncrypt(ctx, blob, vol, b.KeyID, snap)
	if err != nil || arn != b.Arn || out[4] != blobV2 {
		t.Fatalf("ReEncrypt: %v %s", err, arn)
	}
	if id, _ := BlobKeyID(out); id != b.KeyID {
		t.Fatalf("re-encrypted under %s", id)
	}
	dst := make([]byte, DataKeySize)
	if _, err := k.Decrypt(ctx, out, snap, dst); err != nil || !bytes.Equal(dst, pt) {
		t.Fatalf("Decrypt of the re-encrypted blob: %v", err)
	}
	if _, err := k.Decrypt(ctx, out, vol, dst); !errors.Is(err, ErrInvalidCiphertext) {
		t.Fatalf("the old context: %v", err)
	}
}

// TestOldCMKDerives: a CMK made before version 2 blobs (CKA_DERIVE false)
// makes and unwraps them: it is allowed to derive on first use.
func TestOldCMKDerives(t *testing.T) {
	k, _ := open(t)
	ctx := context.Background()
	m, _ := k.CreateKey(ctx, "")
	old, _, err := k.Encrypt(ctx, m.KeyID, vol, randBytes(64))
	if err != nil {
		t.Fatal(err)
	}
	derive := func(v bool) bool {
		var got bool
		err := k.withSession(ctx, func(sh pkcs11.SessionHandle) error {
			obj, err := k.findKey(sh, m.KeyID, 1)
			if err != nil {
				return err
			}
			if !v {
				if err := k.p.SetAttributeValue(sh, obj, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false)}); err != nil {
					return err
				}
			}
			a, err := k.p.GetAttributeValue(sh, obj, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_DERIVE, nil)})
			if err != nil {
				return err
			}
			got = len(a) == 1 && len(a[0].Value) == 1 && a[0].Value[0] == 1
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return got
	}
	if !derive(true) {
		t.Fatal("a new CMK may not derive")
	}
	if derive(false) {
		t.Fatal("CKA_DERIVE could not be cleared")
	}
	blob, _, err := k.GenerateDataKeyWithoutPlaintext(ctx, m.KeyID, vol)
	if err != nil {
		t.Fatalf("a data key under a CMK that could not derive: %v", err)
	}
	if !derive(true) {
		t.Fatal("the CMK was not allowed to derive")
	}
	for _, b := range [][]byte{blob, old} {
		if _, err := k.Decrypt(ctx, b, vol, make([]byte, 64)); err != nil {
			t.Fatal(err)
		}
	}
}

// TestRecipientAudit: Decrypt for a recipient is logged as Decrypt with the
// recipient's key named, and no plaintext or envelope.
func TestRecipientAudit(t *testing.T) {
	k, dir := open(t)
	ctx := context.Background()
	m, _ := k.CreateKey(ctx, "")
	_, to := testRecipient(t)
	pt := make([]byte, DataKeySize)
	blob, _, err := k.GenerateDataKey(ctx, m.KeyID, vol, pt)
	if err != nil {
		t.Fatal(err)
	}
	env, _, err := k.DecryptForRecipient(ctx, blob, vol, to)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	want := `"recipient":{"keyEncryptionAlgorithm":"RSAES_OAEP_SHA_256","subjectKeyIdentifier":"` + hex.EncodeToString(to.SubjectKeyID()) + `"}`
	if !bytes.Contains(b, []byte(want)) {
		t.Fatalf("no recipient in the audit log:\n%s", b)
	}
	for _, secret := range [][]byte{pt[:16], []byte(base64.StdEncoding.EncodeToString(pt)[:20]), []byte(hex.EncodeToString(pt)[:32]),
		[]byte(base64.StdEncoding.EncodeToString(env)[:40])} {
		if bytes.Contains(b, secret) {
			t.Fatal("the audit log holds the plaintext or the envelope")
		}
	}
}
