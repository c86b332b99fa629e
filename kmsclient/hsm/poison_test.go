package hsm

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/hemd/hemd/hem/volume"
	"github.com/hemd/hemd/kmsclient/recipient"
	"github.com/miekg/pkcs11"
)

// Issue 13.4: a request that fails must not leave a PKCS#11 operation active
// on its pooled session, or later operations on that session fail with
// CKR_OPERATION_ACTIVE until hemd restarts.

// activeOp returns the error a new operation on sh meets: SoftHSM2 refuses
// every C_*Init with CKR_OPERATION_ACTIVE while another operation is active.
func activeOp(k *KMS, sh pkcs11.SessionHandle) error {
	if err := k.p.FindObjectsInit(sh, nil); err != nil {
		return err
	}
	return k.p.FindObjectsFinal(sh)
}

// checkPool takes the session gate exclusively (no operation runs, every
// session is in the pool), checks that the pool is full of distinct sessions
// none of which has an operation active, and returns them.
func checkPool(t *testing.T, k *KMS) {
	t.Helper()
	k.sess.gate.Lock()
	defer k.sess.gate.Unlock()
	if len(k.pool) != poolSize {
		t.Errorf("pool holds %d sessions, want %d", len(k.pool), poolSize)
	}
	seen := map[pkcs11.SessionHandle]bool{}
	for range len(k.pool) {
		sh := <-k.pool
		if seen[sh] {
			t.Errorf("session %d is in the pool twice", sh)
		}
		seen[sh] = true
		if err := activeOp(k, sh); err != nil {
			t.Errorf("pooled session %d: a new operation fails: %v", sh, err)
		}
		if n := sessionObjects(t, k, sh); n != 0 {
			t.Errorf("pooled session %d: %d session objects left (data keys, KEKs or CEKs not destroyed)", sh, n)
		}
		k.pool <- sh
	}
}

// sessionObjects counts the session (non-token) objects sh sees.
func sessionObjects(t *testing.T, k *KMS, sh pkcs11.SessionHandle) int {
	t.Helper()
	if err := k.p.FindObjectsInit(sh, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false)}); err != nil {
		t.Fatal(err)
	}
	objs, _, err := k.p.FindObjects(sh, 100)
	k.p.FindObjectsFinal(sh)
	if err != nil {
		t.Fatal(err)
	}
	return len(objs)
}

// pooled returns the sessions in the pool (call with no operation running).
func pooled(k *KMS) []pkcs11.SessionHandle {
	k.sess.gate.Lock()
	defer k.sess.gate.Unlock()
	var out []pkcs11.SessionHandle
	for range len(k.pool) {
		sh := <-k.pool
		out = append(out, sh)
		k.pool <- sh
	}
	return out
}

// servedSessions records which sessions serve operations while it is on.
type servedSessions struct {
	mu   sync.Mutex
	on   bool
	seen map[pkcs11.SessionHandle]int
}

func watchSessions(k *KMS) *servedSessions {
	s := &servedSessions{seen: map[pkcs11.SessionHandle]int{}}
	k.sessionHook = func(sh pkcs11.SessionHandle) {
		s.mu.Lock()
		if s.on {
			s.seen[sh]++
		}
		s.mu.Unlock()
	}
	return s
}

func (s *servedSessions) start() {
	s.mu.Lock()
	s.on, s.seen = true, map[pkcs11.SessionHandle]int{}
	s.mu.Unlock()
}

func (s *servedSessions) stop() map[pkcs11.SessionHandle]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.on = false
	return s.seen
}

type poisonFixture struct {
	good, other, disabled, pending KeyMetadata
	smallPT, bigPT                 []byte
	small, big                     []byte // Encrypt of smallPT (64 bytes) and bigPT (4096) under good with vol
	disBlob, pendBlob              []byte
	grantID                        string
	dkPT, dk                       []byte // GenerateDataKey (64 bytes, a version 2 blob) under good with vol
	to                             *recipient.PublicKey
	kp                             *recipient.KeyPair
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func newPoisonFixture(t *testing.T, k *KMS) *poisonFixture {
	t.Helper()
	ctx := context.Background()
	f := &poisonFixture{smallPT: randBytes(DataKeySize), bigPT: randBytes(4096)}
	var err error
	mk := func() KeyMetadata {
		m, err := k.CreateKey(ctx, "poison")
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	f.good, f.other, f.disabled, f.pending = mk(), mk(), mk(), mk()
	if f.small, _, err = k.Encrypt(ctx, f.good.KeyID, vol, f.smallPT); err != nil {
		t.Fatal(err)
	}
	if f.big, _, err = k.Encrypt(ctx, f.good.KeyID, vol, f.bigPT); err != nil {
		t.Fatalf("Encrypt of 4096 bytes: %v", err)
	}
	if f.disBlob, _, err = k.GenerateDataKeyWithoutPlaintext(ctx, f.disabled.KeyID, vol); err != nil {
		t.Fatal(err)
	}
	if f.pendBlob, _, err = k.GenerateDataKeyWithoutPlaintext(ctx, f.pending.KeyID, vol); err != nil {
		t.Fatal(err)
	}
	if err := k.DisableKey(ctx, f.disabled.KeyID); err != nil {
		t.Fatal(err)
	}
	if err := k.ScheduleKeyDeletion(ctx, f.pending.KeyID, 7); err != nil {
		t.Fatal(err)
	}
	if err := k.CreateAlias(ctx, "alias/poison", f.good.KeyID); err != nil {
		t.Fatal(err)
	}
	f.grantID, err = k.CreateGrant(ctx, f.good.KeyID, "host-1", "retirer", []string{"Decrypt"},
		&GrantConstraints{EncryptionContextEquals: vol})
	if err != nil {
		t.Fatal(err)
	}
	f.dkPT = make([]byte, DataKeySize)
	if f.dk, _, err = k.GenerateDataKey(ctx, f.good.KeyID, vol, f.dkPT); err != nil {
		t.Fatal(err)
	}
	if f.kp, err = recipient.GenerateKeyPair(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.kp.Destroy)
	if f.to, err = recipient.ParseDocument(f.kp.Document()); err != nil {
		t.Fatal(err)
	}
	return f
}

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

func patched(b []byte, off int, p []byte) []byte {
	c := bytes.Clone(b)
	copy(c[off:], p)
	return c
}

func flipped(b []byte, i int) []byte {
	c := bytes.Clone(b)
	c[i] ^= 0x80
	return c
}

func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

type badCase struct {
	name string
	run  func() error
	want error
}

// badCases is every error the Go API returns for a caller's mistake, each
// one as a case.
func badCases(k *KMS, f *poisonFixture) []badCase {
	ctx := context.Background()
	canceled, cancel := context.WithCancel(ctx)
	cancel()
	dec := func(blob []byte, ectx map[string]string, n int) func() error {
		return func() error { _, err := k.Decrypt(ctx, blob, ectx, make([]byte, n)); return err }
	}
	enc := func(ref string, ectx map[string]string, pt []byte) func() error {
		return func() error { _, _, err := k.Encrypt(ctx, ref, ectx, pt); return err }
	}
	gen := func(ref string, ectx map[string]string, n int) func() error {
		return func() error { _, _, err := k.GenerateDataKeyWithoutPlaintextN(ctx, ref, ectx, n); return err }
	}
	genPT := func(ref string, n int) func() error {
		return func() error { _, _, err := k.GenerateDataKey(ctx, ref, vol, make([]byte, n)); return err }
	}
	forRcpt := func(blob []byte, ectx map[string]string) func() error {
		return func() error { _, _, err := k.DecryptForRecipient(ctx, blob, ectx, f.to); return err }
	}
	genRcpt := func(ref string, n int) func() error {
		return func() error { _, _, _, err := k.GenerateDataKeyForRecipient(ctx, ref, vol, n, f.to); return err }
	}
	reenc := func(blob []byte, src map[string]string, dst string, dstCtx map[string]string) func() error {
		return func() error { _, _, err := k.ReEncrypt(ctx, blob, src, dst, dstCtx); return err }
	}
	unknown := "11111111-2222-4333-8444-555555555555"
	unknownID := uuidBytes(unknown)
	many := map[string]string{}
	for i := range 65 {
		many[fmt.Sprint("k", i)] = "v"
	}
	long := map[string]string{"k": strings.Repeat("v", 2049)}
	emptyKey := map[string]string{"": "v"}
	small, big := f.small, f.big
	return []badCase{
		// Decrypt: malformed, truncated and oversized blobs.
		{"Decrypt nil blob", dec(nil, vol, 64), ErrInvalidCiphertext},
		{"Decrypt 10-byte blob", dec(small[:10], vol, 64), ErrInvalidCiphertext},
		{"Decrypt header only", dec(small[:headerLen], vol, 64), ErrInvalidCiphertext},
		{"Decrypt header and tag, no ciphertext", dec(small[:headerLen+tagLen], vol, 64), ErrInvalidCiphertext},
		{"Decrypt truncated by one byte", dec(small[:len(small)-1], vol, 64), ErrInvalidCiphertext},
		{"Decrypt 4096-byte blob truncated", dec(big[:len(big)-100], vol, 4096), ErrInvalidCiphertext},
		{"Decrypt 4096-byte blob plus one byte", dec(cat(big, []byte{0}), vol, 8192), ErrInvalidCiphertext},
		{"Decrypt blob of 6 KiB", dec(cat(small[:headerLen], randBytes(6144)), vol, 8192), ErrInvalidCiphertext},
		{"Decrypt blob of 1 MiB", dec(cat(small[:headerLen], randBytes(1<<20)), vol, 1<<20), ErrInvalidCiphertext},
		{"Decrypt bad magic", dec(patched(small, 0, []byte("XKB1")), vol, 64), ErrInvalidCiphertext},
		{"Decrypt bad blob version", dec(patched(small, 4, []byte{2}), vol, 64), ErrInvalidCiphertext},
		{"Decrypt bad algorithm", dec(patched(small, 5, []byte{7}), vol, 64), ErrInvalidCiphertext},
		{"Decrypt backing version 0", dec(patched(small, 22, be32(0)), vol, 64), ErrInvalidCiphertext},
		{"Decrypt backing version 2 of 1", dec(patched(small, 22, be32(2)), vol, 64), ErrInvalidCiphertext},
		{"Decrypt flipped IV", dec(flipped(small, 30), vol, 64), ErrInvalidCiphertext},
		{"Decrypt flipped ciphertext", dec(flipped(small, headerLen+1), vol, 64), ErrInvalidCiphertext},
		{"Decrypt flipped tag", dec(flipped(small, len(small)-1), vol, 64), ErrInvalidCiphertext},
		{"Decrypt 4096 bytes flipped tag", dec(flipped(big, len(big)-1), vol, 4096), ErrInvalidCiphertext},
		{"Decrypt wrong context", dec(small, map[string]string{"aws:ebs:id": "vol-fffffffffffffffff"}, 64), ErrInvalidCiphertext},
		{"Decrypt no context", dec(small, nil, 64), ErrInvalidCiphertext},
		{"Decrypt extra context pair", dec(small, map[string]string{"aws:ebs:id": vol["aws:ebs:id"], "x": "y"}, 64), ErrInvalidCiphertext},
		{"Decrypt 4096 bytes wrong context", dec(big, map[string]string{"x": "y"}, 4096), ErrInvalidCiphertext},
		{"Decrypt unknown key", dec(patched(small, 6, unknownID[:]), vol, 64), ErrNotFound},
		{"Decrypt under a disabled key", dec(f.disBlob, vol, 64), ErrDisabled},
		{"Decrypt under a key pending deletion", dec(f.pendBlob, vol, 64), ErrInvalidState},
		{"Decrypt into a buffer one byte short", dec(small, vol, 63), ErrValidation},
		{"Decrypt into no buffer", dec(small, vol, 0), ErrValidation},
		{"Decrypt 4096 bytes into 64", dec(big, vol, 64), ErrValidation},
		{"Decrypt 4096 bytes into 1024", dec(big, vol, 1024), ErrValidation},
		{"Decrypt canceled", func() error { _, err := k.Decrypt(canceled, small, vol, make([]byte, 64)); return err }, context.Canceled},
		{"BlobKeyID of a truncated blob", func() error { _, err := BlobKeyID(small[:20]); return err }, ErrInvalidCiphertext},

		// Version 2 blobs (data keys) and Decrypt for a recipient.
		{"Decrypt v2 flipped nonce", dec(flipped(f.dk, 30), vol, 64), ErrInvalidCiphertext},
		{"Decrypt v2 flipped wrapped key", dec(flipped(f.dk, headerLen+3), vol, 64), ErrInvalidCiphertext},
		{"Decrypt v2 last block dropped", dec(f.dk[:len(f.dk)-8], vol, 64), ErrInvalidCiphertext},
		{"Decrypt v2 wrong context", dec(f.dk, nil, 64), ErrInvalidCiphertext},
		{"Decrypt v2 into a buffer one byte short", dec(f.dk, vol, 63), ErrValidation},
		{"Decrypt v2 under a disabled key", dec(f.disBlob, vol, 64), ErrDisabled},
		{"DecryptForRecipient v1 wrong context", forRcpt(small, nil), ErrInvalidCiphertext},
		{"DecryptForRecipient v1 flipped tag", forRcpt(flipped(small, len(small)-1), vol), ErrInvalidCiphertext},
		{"DecryptForRecipient v2 wrong context", forRcpt(f.dk, map[string]string{"aws:ebs:id": "vol-fffffffffffffffff"}), ErrInvalidCiphertext},
		{"DecryptForRecipient v2 flipped wrapped key", forRcpt(flipped(f.dk, len(f.dk)-1), vol), ErrInvalidCiphertext},
		{"DecryptForRecipient truncated", forRcpt(f.dk[:40], vol), ErrInvalidCiphertext},
		{"DecryptForRecipient disabled key", forRcpt(f.disBlob, vol), ErrDisabled},
		{"DecryptForRecipient key pending deletion", forRcpt(f.pendBlob, vol), ErrInvalidState},
		{"DecryptForRecipient canceled", func() error { _, _, err := k.DecryptForRecipient(canceled, f.dk, vol, f.to); return err }, context.Canceled},
		{"GenerateDataKeyForRecipient 0 bytes", genRcpt(f.good.KeyID, 0), ErrValidation},
		{"GenerateDataKeyForRecipient unknown key", genRcpt(unknown, 64), ErrNotFound},
		{"GenerateDataKeyForRecipient disabled key", genRcpt(f.disabled.KeyID, 64), ErrDisabled},

		// Encrypt and data keys: sizes, contexts, keys and their states.
		{"Encrypt nil", enc(f.good.KeyID, vol, nil), ErrValidation},
		{"Encrypt empty", enc(f.good.KeyID, vol, []byte{}), ErrValidation},
		{"Encrypt 4097 bytes", enc(f.good.KeyID, vol, randBytes(4097)), ErrValidation},
		{"Encrypt 1 MiB", enc(f.good.KeyID, vol, randBytes(1<<20)), ErrValidation},
		{"Encrypt empty context key", enc(f.good.KeyID, emptyKey, []byte("x")), ErrValidation},
		{"Encrypt context value too long", enc(f.good.KeyID, long, []byte("x")), ErrValidation},
		{"Encrypt 65 context pairs", enc(f.good.KeyID, many, []byte("x")), ErrValidation},
		{"Encrypt unknown key", enc(unknown, vol, []byte("x")), ErrNotFound},
		{"Encrypt unknown key ARN", enc(k.ARN(unknown), vol, []byte("x")), ErrNotFound},
		{"Encrypt unknown alias", enc("alias/nope", vol, []byte("x")), ErrNotFound},
		{"Encrypt malformed key id", enc("not-a-key", vol, []byte("x")), ErrNotFound},
		{"Encrypt disabled key", enc(f.disabled.KeyID, vol, []byte("x")), ErrDisabled},
		{"Encrypt key pending deletion", enc(f.pending.KeyID, vol, []byte("x")), ErrInvalidState},
		{"Encrypt canceled", func() error { _, _, err := k.Encrypt(canceled, f.good.KeyID, vol, []byte("x")); return err }, context.Canceled},
		{"GenerateDataKeyWithoutPlaintext 0 bytes", gen(f.good.KeyID, vol, 0), ErrValidation},
		{"GenerateDataKeyWithoutPlaintext -1 bytes", gen(f.good.KeyID, vol, -1), ErrValidation},
		{"GenerateDataKeyWithoutPlaintext 1025 bytes", gen(f.good.KeyID, vol, 1025), ErrValidation},
		{"GenerateDataKeyWithoutPlaintext bad context", gen(f.good.KeyID, emptyKey, 64), ErrValidation},
		{"GenerateDataKeyWithoutPlaintext unknown key", gen(unknown, vol, 64), ErrNotFound},
		{"GenerateDataKeyWithoutPlaintext disabled key", gen(f.disabled.KeyID, vol, 64), ErrDisabled},
		{"GenerateDataKeyWithoutPlaintext key pending deletion", gen(f.pending.KeyID, vol, 64), ErrInvalidState},
		{"GenerateDataKey 0 bytes", genPT(f.good.KeyID, 0), ErrValidation},
		{"GenerateDataKey 1025 bytes", genPT(f.good.KeyID, 1025), ErrValidation},
		{"GenerateDataKey 5000 bytes", genPT(f.good.KeyID, 5000), ErrValidation},
		{"GenerateDataKey unknown key", genPT(unknown, 32), ErrNotFound},
		{"GenerateDataKey disabled key", genPT(f.disabled.KeyID, 32), ErrDisabled},
		{"GenerateDataKey key pending deletion", genPT(f.pending.KeyID, 32), ErrInvalidState},

		// ReEncrypt: both ends.
		{"ReEncrypt oversized blob", reenc(cat(big, []byte{0}), vol, f.other.KeyID, vol), ErrInvalidCiphertext},
		{"ReEncrypt truncated blob", reenc(big[:len(big)-1], vol, f.other.KeyID, vol), ErrInvalidCiphertext},
		{"ReEncrypt wrong source context", reenc(small, nil, f.other.KeyID, vol), ErrInvalidCiphertext},
		{"ReEncrypt from a disabled key", reenc(f.disBlob, vol, f.other.KeyID, vol), ErrDisabled},
		{"ReEncrypt from a key pending deletion", reenc(f.pendBlob, vol, f.other.KeyID, vol), ErrInvalidState},
		{"ReEncrypt to an unknown key", reenc(small, vol, unknown, vol), ErrNotFound},
		{"ReEncrypt to a disabled key", reenc(big, vol, f.disabled.KeyID, vol), ErrDisabled},
		{"ReEncrypt to a key pending deletion", reenc(big, vol, f.pending.KeyID, vol), ErrInvalidState},
		{"ReEncrypt to a bad context", reenc(big, vol, f.other.KeyID, many), ErrValidation},
		{"ReEncrypt v2 wrong source context", reenc(f.dk, nil, f.other.KeyID, vol), ErrInvalidCiphertext},
		{"ReEncrypt v2 to a disabled key", reenc(f.dk, vol, f.disabled.KeyID, vol), ErrDisabled},
		{"ReEncrypt v2 to a bad context", reenc(f.dk, vol, f.other.KeyID, many), ErrValidation},

		// Key administration.
		{"DescribeKey unknown", func() error { _, err := k.DescribeKey(ctx, unknown); return err }, ErrNotFound},
		{"DescribeKey empty", func() error { _, err := k.DescribeKey(ctx, ""); return err }, ErrNotFound},
		{"CreateAlias bad name", func() error { return k.CreateAlias(ctx, "alias/bad name", f.good.KeyID) }, ErrValidation},
		{"CreateAlias without alias/", func() error { return k.CreateAlias(ctx, "poison2", f.good.KeyID) }, ErrValidation},
		{"CreateAlias reserved", func() error { return k.CreateAlias(ctx, "alias/aws/ebs", f.good.KeyID) }, ErrValidation},
		{"CreateAlias existing", func() error { return k.CreateAlias(ctx, "alias/poison", f.other.KeyID) }, ErrAlreadyExists},
		{"CreateAlias to an unknown key", func() error { return k.CreateAlias(ctx, "alias/poison3", unknown) }, ErrNotFound},
		{"CreateReservedAlias outside alias/aws/", func() error { return k.CreateReservedAlias(ctx, "alias/x", f.good.KeyID) }, ErrValidation},
		{"ListAliases unknown key", func() error { _, err := k.ListAliases(ctx, unknown); return err }, ErrNotFound},
		{"EnableKey unknown", func() error { return k.EnableKey(ctx, unknown) }, ErrNotFound},
		{"EnableKey pending deletion", func() error { return k.EnableKey(ctx, f.pending.KeyID) }, ErrInvalidState},
		{"DisableKey pending deletion", func() error { return k.DisableKey(ctx, f.pending.KeyID) }, ErrInvalidState},
		{"ScheduleKeyDeletion 6 days", func() error { return k.ScheduleKeyDeletion(ctx, f.good.KeyID, 6) }, ErrValidation},
		{"ScheduleKeyDeletion 31 days", func() error { return k.ScheduleKeyDeletion(ctx, f.good.KeyID, 31) }, ErrValidation},
		{"ScheduleKeyDeletion again", func() error { return k.ScheduleKeyDeletion(ctx, f.pending.KeyID, 7) }, ErrInvalidState},
		{"CancelKeyDeletion not pending", func() error { return k.CancelKeyDeletion(ctx, f.good.KeyID) }, ErrInvalidState},
		{"EnableKeyRotation disabled key", func() error { return k.EnableKeyRotation(ctx, f.disabled.KeyID, true) }, ErrDisabled},
		{"RotateKey disabled key", func() error { return k.RotateKey(ctx, f.disabled.KeyID) }, ErrDisabled},
		{"RotateKey pending deletion", func() error { return k.RotateKey(ctx, f.pending.KeyID) }, ErrInvalidState},
		{"RotateKey unknown", func() error { return k.RotateKey(ctx, unknown) }, ErrNotFound},

		{"UpdateAlias unknown alias", func() error { return k.UpdateAlias(ctx, "alias/nope", f.good.KeyID) }, ErrNotFound},
		{"DeleteAlias unknown alias", func() error { return k.DeleteAlias(ctx, "alias/nope") }, ErrNotFound},
		{"TagResource reserved tag key", func() error { return k.TagResource(ctx, f.good.KeyID, []Tag{{TagKey: "aws:x", TagValue: "v"}}) }, ErrTag},
		{"GenerateRandom 1025 bytes", func() error { _, err := k.GenerateRandom(ctx, 1025); return err }, ErrValidation},

		// Grants.
		{"CreateGrant no grantee", func() error { _, err := k.CreateGrant(ctx, f.good.KeyID, "", "", []string{"Decrypt"}, nil); return err }, ErrValidation},
		{"CreateGrant bad operation", func() error { _, err := k.CreateGrant(ctx, f.good.KeyID, "h", "", []string{"Nope"}, nil); return err }, ErrValidation},
		{"CreateGrant no operation", func() error { _, err := k.CreateGrant(ctx, f.good.KeyID, "h", "", nil, nil); return err }, ErrValidation},
		{"CreateGrant unknown key", func() error { _, err := k.CreateGrant(ctx, unknown, "h", "", []string{"Decrypt"}, nil); return err }, ErrNotFound},
		{"CreateGrant key pending deletion", func() error {
			_, err := k.CreateGrant(ctx, f.pending.KeyID, "h", "", []string{"Decrypt"}, nil)
			return err
		}, ErrInvalidState},
		{"ListGrants unknown key", func() error { _, err := k.ListGrants(ctx, unknown); return err }, ErrNotFound},
		{"Authorize without a grant", func() error { return k.Authorize(f.good.KeyID, "host-2", "Decrypt", vol) }, ErrAccessDenied},
		{"Authorize other context", func() error { return k.Authorize(f.good.KeyID, "host-1", "Decrypt", nil) }, ErrAccessDenied},
		{"Authorize other operation", func() error { return k.Authorize(f.good.KeyID, "host-1", "Encrypt", vol) }, ErrAccessDenied},
		{"Authorize unknown key", func() error { return k.Authorize(unknown, "host-1", "Decrypt", vol) }, ErrNotFound},
		{"RetireGrant by a stranger", func() error { return k.RetireGrant(ctx, f.grantID, "mallory") }, ErrAccessDenied},
		{"RetireGrant unknown", func() error { return k.RetireGrant(ctx, "nope", "retirer") }, ErrNotFound},
		{"RevokeGrant unknown", func() error { return k.RevokeGrant(ctx, f.good.KeyID, "nope") }, ErrNotFound},
		{"RevokeGrant on another key", func() error { return k.RevokeGrant(ctx, f.other.KeyID, f.grantID) }, ErrNotFound},
	}
}

// goodOps runs n operations (workers at a time) that must all succeed,
// checking every plaintext that comes back.
func goodOps(t *testing.T, k *KMS, f *poisonFixture, n, workers int) {
	t.Helper()
	ctx := context.Background()
	other := map[string]string{"aws:ebs:id": "snap-0123456789abcdef0"}
	jobs := make(chan int)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var reencrypted, opened [][]byte
	for range workers {
		wg.Go(func() {
			for i := range jobs {
				var err error
				switch i % 8 {
				case 0:
					dst := make([]byte, DataKeySize)
					if _, err = k.Decrypt(ctx, f.small, vol, dst); err == nil && !bytes.Equal(dst, f.smallPT) {
						err = errors.New("wrong plaintext")
					}
				case 1:
					dst := make([]byte, 4096)
					var n int
					if n, _, err = k.DecryptN(ctx, f.big, vol, dst); err == nil && !bytes.Equal(dst[:n], f.bigPT) {
						err = errors.New("wrong plaintext")
					}
				case 2:
					var blob []byte
					pt := f.bigPT[:4081+i%16]
					if blob, _, err = k.Encrypt(ctx, "alias/poison", vol, pt); err == nil && len(blob) != headerLen+len(pt)+tagLen {
						err = fmt.Errorf("blob of %d bytes", len(blob))
					}
				case 3:
					_, _, err = k.GenerateDataKeyWithoutPlaintext(ctx, f.good.Arn, vol)
				case 4:
					var blob []byte
					if blob, _, err = k.ReEncrypt(ctx, f.big, vol, f.other.KeyID, other); err == nil {
						mu.Lock()
						reencrypted = append(reencrypted, blob)
						mu.Unlock()
					}
				case 5:
					dst := make([]byte, 32)
					if _, _, err = k.GenerateDataKey(ctx, f.good.KeyID, vol, dst); err == nil && bytes.Equal(dst, make([]byte, 32)) {
						err = errors.New("zero data key")
					}
				case 6:
					dst := make([]byte, DataKeySize)
					if _, err = k.Decrypt(ctx, f.dk, vol, dst); err == nil && !bytes.Equal(dst, f.dkPT) {
						err = errors.New("wrong plaintext")
					}
				case 7:
					var env []byte
					if env, _, err = k.DecryptForRecipient(ctx, []([]byte){f.dk, f.small}[i/8%2], vol, f.to); err == nil {
						mu.Lock()
						opened = append(opened, env)
						mu.Unlock()
					}
				}
				if err != nil {
					t.Errorf("good operation %d (kind %d): %v", i, i%8, err)
				}
			}
		})
	}
	for i := range n {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	for _, env := range opened {
		dst := make([]byte, DataKeySize)
		if _, err := f.kp.Open(env, dst); err != nil || !bytes.Equal(dst, f.dkPT) && !bytes.Equal(dst, f.smallPT) {
			t.Errorf("CiphertextForRecipient: %v", err)
		}
	}
	for _, blob := range reencrypted {
		dst := make([]byte, 4096)
		if n, _, err := k.DecryptN(ctx, blob, other, dst); err != nil || !bytes.Equal(dst[:n], f.bigPT) {
			t.Errorf("re-encrypted blob: %v", err)
		}
	}
}

// TestBadRequestsLeaveSessionsClean drives every error the Go API returns,
// then checks that no pooled session has an operation left active and that
// 100 operations, run as many at a time as the pool has sessions (twice
// over) and served by every session of the pool, all succeed.
func TestBadRequestsLeaveSessionsClean(t *testing.T) {
	k, _ := open(t)
	served := watchSessions(k)
	f := newPoisonFixture(t, k)
	for _, c := range badCases(k, f) {
		if err := c.run(); !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
	}
	checkPool(t, k)
	if n := k.sess.replaced.Load(); n != 0 {
		t.Errorf("%d sessions replaced: SoftHSM2 ends every failed operation", n)
	}
	served.start()
	goodOps(t, k, f, 100, 2*poolSize)
	seen := served.stop()
	for _, sh := range pooled(k) {
		if seen[sh] == 0 {
			t.Errorf("session %d of the pool served none of the 100 operations (served: %v)", sh, seen)
		}
	}
	checkPool(t, k)
}

// A volume header whose wrapped_dek is longer than any blob the KMS makes is
// refused with a clear error, and the attach that follows works.
func TestOversizedWrappedDEK(t *testing.T) {
	k, _ := open(t)
	ctx := context.Background()
	m, err := k.CreateKey(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "vol.img")
	v, err := volume.Create(ctx, k, path, volume.CreateOptions{Size: 1 << 20, KeyID: m.KeyID})
	if err != nil {
		t.Fatal(err)
	}
	good := *v.Head
	v.Close()
	// The blob names the right key and version: only its length is wrong.
	for _, n := range []int{4096 + tagLen + 1, 6144, 40 << 10} {
		bad := good
		bad.WrappedDEK = cat(good.WrappedDEK[:headerLen], randBytes(n))
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		werr := volume.Write(f, &bad)
		f.Close()
		if werr == nil {
			if vv, err := volume.Open(path, true); err == nil {
				bad = *vv.Head // what an attach would use
				vv.Close()
			} else {
				t.Logf("hem/volume refuses a %d-byte wrapped_dek on open: %v", len(bad.WrappedDEK), err)
			}
		} else {
			t.Logf("hem/volume refuses to write a %d-byte wrapped_dek: %v", len(bad.WrappedDEK), werr)
		}
		dst := make([]byte, DataKeySize)
		err = volume.Unwrapper(&bad, k)(ctx, dst)
		if !errors.Is(err, ErrInvalidCiphertext) || !strings.Contains(err.Error(), fmt.Sprintf("%d bytes", len(bad.WrappedDEK))) {
			t.Errorf("wrapped_dek of %d bytes: %v, want InvalidCiphertextException naming its length", len(bad.WrappedDEK), err)
		}
		if !bytes.Equal(dst, make([]byte, DataKeySize)) {
			t.Error("a refused unwrap wrote into the key buffer")
		}
	}
	checkPool(t, k)
	unwrap := volume.Unwrapper(&good, k)
	for i := range 100 {
		if err := unwrap(ctx, make([]byte, DataKeySize)); err != nil {
			t.Fatalf("attach %d after the bad header: %v", i, err)
		}
	}
}

// initOp finds the key's version 1 and initialises a GCM encrypt or decrypt
// on sh, as wrapOn and decrypt do.
func initOp(t *testing.T, k *KMS, sh pkcs11.SessionHandle, keyID string, kind opKind) {
	t.Helper()
	obj, err := k.findKey(sh, keyID, 1)
	if err != nil {
		t.Fatal(err)
	}
	params := pkcs11.NewGCMParams(make([]byte, ivLen), []byte("aad"), tagLen*8)
	defer params.Free()
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}
	if kind == opEncrypt {
		err = k.p.EncryptInit(sh, mech, obj)
	} else {
		err = k.p.DecryptInit(sh, mech, obj)
	}
	if err != nil {
		t.Fatal(err)
	}
}

// TestEndOperation: an operation left active between Init and its call
// (every way hemd could leave one) is ended by endOp on SoftHSM2, with the
// session kept; with Cryptoki 3.0's NULL-mechanism cancel tried first too
// (SoftHSM2 refuses it, and the finishing call does the work).
func TestEndOperation(t *testing.T) {
	k, _ := open(t)
	ctx := context.Background()
	m, _ := k.CreateKey(ctx, "")
	errTest := errors.New("the call that failed")
	for _, cancel3 := range []bool{false, true} {
		k.raw.cancelByInit = cancel3
		for _, kind := range []opKind{opEncrypt, opDecrypt} {
			// Init, then nothing.
			err := k.withSession(ctx, func(sh pkcs11.SessionHandle) error {
				initOp(t, k, sh, m.KeyID, kind)
				if err := activeOp(k, sh); !errors.Is(err, pkcs11.Error(pkcs11.CKR_OPERATION_ACTIVE)) {
					t.Errorf("%s initialised, yet a new operation gets %v", kind, err)
				}
				return k.abandon(sh, kind, errTest)
			})
			if err != errTest {
				t.Errorf("%s (cancel3 %v): withSession returned %v", kind, cancel3, err)
			}
		}
		// C_Decrypt answering CKR_BUFFER_TOO_SMALL leaves the operation active.
		err := k.withSession(ctx, func(sh pkcs11.SessionHandle) error {
			initOp(t, k, sh, m.KeyID, opDecrypt)
			_, rv := crypt(k.raw.decrypt, sh, make([]byte, 100), make([]byte, 8))
			if rv != pkcs11.CKR_BUFFER_TOO_SMALL {
				t.Errorf("C_Decrypt into 8 bytes: %v", rv)
			}
			return k.abandon(sh, opDecrypt, rv)
		})
		if !errors.Is(err, pkcs11.Error(pkcs11.CKR_BUFFER_TOO_SMALL)) {
			t.Errorf("buffer too small: %v", err)
		}
		// The locked decrypt refusing a ciphertext longer than its scratch.
		err = k.withSession(ctx, func(sh pkcs11.SessionHandle) error {
			initOp(t, k, sh, m.KeyID, opDecrypt)
			if _, err := k.dec.decrypt(sh, make([]byte, scratchSize+1), make([]byte, 64)); err != nil {
				return k.abandon(sh, opDecrypt, err)
			}
			return nil
		})
		if !errors.Is(err, ErrInvalidCiphertext) {
			t.Errorf("oversized ciphertext: %v", err)
		}
		checkPool(t, k)
	}
	if n := k.sess.replaced.Load(); n != 0 {
		t.Errorf("%d sessions replaced; every operation could have been ended", n)
	}
}

// TestSpoiledSessionReplaced: a session whose operation could not be ended,
// or whose operation panicked, is closed and replaced, never pooled again.
func TestSpoiledSessionReplaced(t *testing.T) {
	k, _ := open(t)
	ctx := context.Background()
	m, _ := k.CreateKey(ctx, "")
	blob, _, err := k.GenerateDataKeyWithoutPlaintext(ctx, m.KeyID, vol)
	if err != nil {
		t.Fatal(err)
	}
	var logBuf syncBuffer
	k.SetLogger(slog.New(slog.NewTextHandler(&logBuf, nil)))
	errTest := &Error{Type: "ValidationException", Message: "test"}
	err = k.withSession(ctx, func(sh pkcs11.SessionHandle) error {
		initOp(t, k, sh, m.KeyID, opDecrypt)
		return &spoiledError{err: errTest, why: errors.New("pretend the module would not end it")}
	})
	if err != errTest {
		t.Errorf("withSession returned %v, want the operation's own error", err)
	}
	func() {
		defer func() {
			if r := recover(); r != "boom" {
				t.Errorf("recovered %v", r)
			}
		}()
		k.withSession(ctx, func(sh pkcs11.SessionHandle) error {
			initOp(t, k, sh, m.KeyID, opEncrypt)
			panic("boom")
		})
	}()
	if n := k.sess.replaced.Load(); n != 2 {
		t.Errorf("%d sessions replaced, want 2", n)
	}
	for _, want := range []string{"pretend the module would not end it", "the operation panicked"} {
		if !strings.Contains(logBuf.String(), want) {
			t.Errorf("the log does not say %q:\n%s", want, logBuf.String())
		}
	}
	checkPool(t, k)
	for i := range 2 * poolSize {
		if _, err := k.Decrypt(ctx, blob, vol, make([]byte, 64)); err != nil {
			t.Fatalf("Decrypt %d after the replacements: %v", i, err)
		}
	}
	// A canceled context takes no session.
	canceled, cancel := context.WithCancel(ctx)
	cancel()
	ran := false
	if err := k.withSession(canceled, func(pkcs11.SessionHandle) error { ran = true; return nil }); !errors.Is(err, context.Canceled) || ran {
		t.Errorf("canceled context: %v, ran %v", err, ran)
	}
}

// syncBuffer is a bytes.Buffer safe for a logger and a test to share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
