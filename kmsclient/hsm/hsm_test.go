package hsm

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"os"
	"sync"
	"testing"
	"unsafe"

	"github.com/miekg/pkcs11"
)

// open returns a KMS on a fresh embedded SoftHSM2 token in a temp dir.
func open(t *testing.T) (*KMS, string) {
	t.Helper()
	if _, err := os.Stat(DefaultModule); err != nil {
		t.Skipf("SoftHSM2 is not installed (%v): make test installs softhsm2", err)
	}
	dir := t.TempDir()
	t.Setenv("SOFTHSM2_CONF", "")
	os.Unsetenv("SOFTHSM2_CONF")
	k, err := Open(Config{}, dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k.Close() })
	return k, dir
}

var vol = map[string]string{"aws:ebs:id": "vol-0123456789abcdef0"}

func TestContextBinding(t *testing.T) {
	k, _ := open(t)
	ctx := context.Background()
	m, err := k.CreateKey(ctx, "test")
	if err != nil {
		t.Fatal(err)
	}
	blob, arn, err := k.GenerateDataKeyWithoutPlaintext(ctx, m.KeyID, vol)
	if err != nil || arn != m.Arn {
		t.Fatalf("generate: %v %s", err, arn)
	}
	dek := make([]byte, DataKeySize)
	if _, err := k.Decrypt(ctx, blob, vol, dek); err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(dek, make([]byte, DataKeySize)) {
		t.Fatal("zero data key")
	}
	// Any other context fails.
	for name, c := range map[string]map[string]string{
		"missing":    nil,
		"extra":      {"aws:ebs:id": "vol-0123456789abcdef0", "x": "y"},
		"other vol":  {"aws:ebs:id": "vol-0123456789abcdef1"},
		"other case": {"AWS:EBS:ID": "vol-0123456789abcdef0"},
	} {
		if _, err := k.Decrypt(ctx, blob, c, make([]byte, 64)); !errors.Is(err, ErrInvalidCiphertext) {
			t.Errorf("%s context: %v", name, err)
		}
	}
	// {"ab":"c"} and {"a":"bc"} are different contexts.
	b2, _, _ := k.GenerateDataKeyWithoutPlaintext(ctx, m.KeyID, map[string]string{"ab": "c"})
	if _, err := k.Decrypt(ctx, b2, map[string]string{"a": "bc"}, make([]byte, 64)); !errors.Is(err, ErrInvalidCiphertext) {
		t.Errorf("ambiguous context accepted: %v", err)
	}
	// Reordered pairs are the same context.
	two := map[string]string{"a": "1", "b": "2"}
	b3, _, _ := k.GenerateDataKeyWithoutPlaintext(ctx, m.KeyID, two)
	if _, err := k.Decrypt(ctx, b3, map[string]string{"b": "2", "a": "1"}, make([]byte, 64)); err != nil {
		t.Errorf("reordered context: %v", err)
	}
	// Every flipped byte fails.
	for i := range blob {
		bad := append([]byte(nil), blob...)
		bad[i] ^= 0x01
		if _, err := k.Decrypt(ctx, bad, vol, make([]byte, 64)); err == nil {
			t.Fatalf("blob with byte %d flipped decrypted", i)
		}
	}
}

func TestKeyStates(t *testing.T) {
	k, _ := open(t)
	ctx := context.Background()
	m, _ := k.CreateKey(ctx, "")
	blob, _, _ := k.GenerateDataKeyWithoutPlaintext(ctx, m.KeyID, vol)
	dec := func() error { _, err := k.Decrypt(ctx, blob, vol, make([]byte, 64)); return err }
	gen := func() error { _, _, err := k.GenerateDataKeyWithoutPlaintext(ctx, m.KeyID, vol); return err }
	steps := []struct {
		op       func() error
		want     error
		decWant  error
		genWant  error
		describe string
	}{
		{func() error { return k.DisableKey(ctx, m.KeyID) }, nil, ErrDisabled, ErrDisabled, Disabled},
		{func() error { return k.CancelKeyDeletion(ctx, m.KeyID) }, ErrInvalidState, ErrDisabled, ErrDisabled, Disabled},
		{func() error { return k.EnableKey(ctx, m.KeyID) }, nil, nil, nil, Enabled},
		{func() error { return k.ScheduleKeyDeletion(ctx, m.KeyID, 3) }, ErrValidation, nil, nil, Enabled},
		{func() error { return k.ScheduleKeyDeletion(ctx, m.KeyID, 7) }, nil, ErrInvalidState, ErrInvalidState, PendingDeletion},
		{func() error { return k.EnableKey(ctx, m.KeyID) }, ErrInvalidState, ErrInvalidState, ErrInvalidState, PendingDeletion},
		{func() error { return k.CancelKeyDeletion(ctx, m.KeyID) }, nil, ErrDisabled, ErrDisabled, Disabled},
		{func() error { return k.EnableKey(ctx, m.KeyID) }, nil, nil, nil, Enabled},
	}
	for i, s := range steps {
		if err := s.op(); !errIs(err, s.want) {
			t.Fatalf("step %d: %v, want %v", i, err, s.want)
		}
		if err := dec(); !errIs(err, s.decWant) {
			t.Fatalf("step %d: Decrypt %v, want %v", i, err, s.decWant)
		}
		if err := gen(); !errIs(err, s.genWant) {
			t.Fatalf("step %d: GenerateDataKey %v, want %v", i, err, s.genWant)
		}
		if d, _ := k.DescribeKey(ctx, m.Arn); d.KeyState != s.describe {
			t.Fatalf("step %d: state %s, want %s", i, d.KeyState, s.describe)
		}
	}
	if _, err := k.DescribeKey(ctx, "11111111-2222-4333-8444-555555555555"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown key: %v", err)
	}
	if _, _, err := k.GenerateDataKeyWithoutPlaintext(ctx, "alias/nope", vol); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown alias: %v", err)
	}
}

func errIs(err, want error) bool {
	if want == nil {
		return err == nil
	}
	return errors.Is(err, want)
}

func TestAliasRotationReopen(t *testing.T) {
	k, dir := open(t)
	ctx := context.Background()
	m, _ := k.CreateKey(ctx, "")
	if err := k.CreateAlias(ctx, "alias/prod", m.KeyID); err != nil {
		t.Fatal(err)
	}
	if err := k.CreateAlias(ctx, "alias/prod", m.KeyID); !errors.Is(err, ErrAlreadyExists) {
		t.Fatalf("duplicate alias: %v", err)
	}
	old, _, err := k.GenerateDataKeyWithoutPlaintext(ctx, "alias/prod", vol)
	if err != nil {
		t.Fatal(err)
	}
	if err := k.RotateKey(ctx, "alias/prod"); err != nil {
		t.Fatal(err)
	}
	nw, _, _ := k.GenerateDataKeyWithoutPlaintext(ctx, m.Arn, vol)
	if bytes.Equal(old[22:26], nw[22:26]) {
		t.Fatal("rotation did not change the backing-key version")
	}
	k.Close()
	// Reopened from the state dir: same token, same PINs, same keys.
	k2, err := Open(Config{}, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer k2.Close()
	for _, b := range [][]byte{old, nw} {
		if _, err := k2.Decrypt(ctx, b, vol, make([]byte, 64)); err != nil {
			t.Fatalf("after rotation and reopen: %v", err)
		}
	}
	if d, err := k2.DescribeKey(ctx, "alias/prod"); err != nil || d.Versions != 2 {
		t.Fatalf("describe after reopen: %+v %v", d, err)
	}
}

// The CMK cannot be read or wrapped out of the token.
func TestCMKNeverLeaves(t *testing.T) {
	k, _ := open(t)
	ctx := context.Background()
	m, _ := k.CreateKey(ctx, "")
	err := k.withSession(ctx, func(sh pkcs11.SessionHandle) error {
		obj, err := k.findKey(sh, m.KeyID, 1)
		if err != nil {
			return err
		}
		if _, err := k.p.GetAttributeValue(sh, obj, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)}); err == nil {
			t.Error("CKA_VALUE of the CMK was readable")
		}
		attrs, err := k.p.GetAttributeValue(sh, obj, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, nil), pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, nil)})
		if err != nil {
			return err
		}
		if attrs[0].Value[0] != 1 || attrs[1].Value[0] != 0 {
			t.Errorf("CMK sensitive=%v extractable=%v", attrs[0].Value, attrs[1].Value)
		}
		// A wrapping key of our own cannot wrap the CMK out.
		wk, err := k.p.GenerateKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32), pkcs11.NewAttribute(pkcs11.CKA_WRAP, true), pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false)})
		if err != nil {
			return err
		}
		if _, err := k.p.WrapKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_WRAP, nil)}, wk, obj); err == nil {
			t.Error("the CMK was wrapped out of the token")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// Parallel Decrypt with the sessions closed underneath recovers.
func TestParallelRecovery(t *testing.T) {
	k, _ := open(t)
	ctx := context.Background()
	m, _ := k.CreateKey(ctx, "")
	blob, _, _ := k.GenerateDataKeyWithoutPlaintext(ctx, m.KeyID, vol)
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 20; i++ {
				if _, err := k.Decrypt(ctx, blob, vol, make([]byte, 64)); err != nil {
					errs <- err
				}
			}
		}()
	}
	for i := 0; i < 3; i++ {
		k.sess.gate.Lock() // between operations, as an HSM restart would
		k.p.CloseAllSessions(k.slot)
		k.sess.gate.Unlock()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("Decrypt during session loss: %v", err)
	}
}

// The audit log has one record per operation and no key material.
func TestAudit(t *testing.T) {
	k, dir := open(t)
	ctx := context.Background()
	m, _ := k.CreateKey(ctx, "")
	blob, _, _ := k.GenerateDataKeyWithoutPlaintext(ctx, m.KeyID, vol)
	dek := make([]byte, 64)
	k.Decrypt(ctx, blob, vol, dek)
	k.DisableKey(ctx, m.KeyID)
	k.Decrypt(ctx, blob, vol, make([]byte, 64))
	b, err := os.ReadFile(AuditPath(dir))
	if err != nil {
		t.Fatal(err)
	}
	for _, secret := range [][]byte{dek, blob[headerLen:], []byte(base64.StdEncoding.EncodeToString(blob)),
		[]byte(base64.StdEncoding.EncodeToString(dek)), dek[:16]} {
		if bytes.Contains(b, secret) {
			t.Fatal("audit log holds key material")
		}
	}
	for _, want := range []string{`"eventName":"CreateKey"`, `"eventName":"GenerateDataKeyWithoutPlaintext"`,
		`"eventName":"Decrypt"`, `"errorCode":"DisabledException"`, `"aws:ebs:id":"vol-0123456789abcdef0"`} {
		if !bytes.Contains(b, []byte(want)) {
			t.Errorf("audit log lacks %s", want)
		}
	}
}

func TestBlobErrors(t *testing.T) {
	good := (&blob{ver: blobV1, version: 1, iv: make([]byte, 12), ct: make([]byte, 80)}).encode()
	cases := map[string]func(b []byte) []byte{
		"v2 algorithm":   func(b []byte) []byte { b[4] = blobV2; return b },
		"v1 algorithm 2": func(b []byte) []byte { b[5] = algKWPDerived; return b },
		"short":          func(b []byte) []byte { return b[:40] },
		"magic":          func(b []byte) []byte { b[0] = 'X'; return b },
		"version":        func(b []byte) []byte { b[4] = 9; return b },
		"algorithm":      func(b []byte) []byte { b[5] = 9; return b },
	}
	for name, f := range cases {
		if _, err := decodeBlob(f(append([]byte(nil), good...))); !errors.Is(err, ErrInvalidCiphertext) {
			t.Errorf("%s: %v", name, err)
		}
	}
	if _, err := decodeBlob(good); err != nil {
		t.Fatal(err)
	}
	v2 := (&blob{ver: blobV2, version: 1, iv: make([]byte, 12), ct: make([]byte, 72)}).encode()
	if _, err := decodeBlob(v2); err != nil {
		t.Fatal(err)
	}
	for _, bad := range [][]byte{v2[:len(v2)-1], append(v2, 0), append(v2, make([]byte, maxWrapped)...)} {
		if _, err := decodeBlob(bad); !errors.Is(err, ErrInvalidCiphertext) {
			t.Errorf("v2 blob of %d bytes: %v", len(bad), err)
		}
	}
}

func FuzzDecodeBlob(f *testing.F) {
	f.Add((&blob{ver: blobV1, version: 1, iv: make([]byte, 12), ct: make([]byte, 80)}).encode())
	f.Add((&blob{ver: blobV2, version: 1, iv: make([]byte, 12), ct: make([]byte, 72)}).encode())
	f.Fuzz(func(t *testing.T, p []byte) {
		b, err := decodeBlob(p)
		if err == nil && (len(b.iv) != ivLen || len(b.header) != headerLen || len(b.ct) < 16 ||
			b.ver == blobV1 && len(b.ct) <= tagLen ||
			b.ver == blobV2 && (len(b.ct)%8 != 0 || len(b.ct) > maxWrapped)) {
			t.Fatalf("accepted a malformed blob")
		}
	})
}

func FuzzContextEncoding(f *testing.F) {
	f.Add("ab", "c", "a", "bc")
	f.Fuzz(func(t *testing.T, k1, v1, k2, v2 string) {
		a := canonicalContext(map[string]string{k1: v1})
		b := canonicalContext(map[string]string{k2: v2})
		if bytes.Equal(a, b) && (k1 != k2 || v1 != v2) {
			t.Fatalf("%q=%q and %q=%q encode the same", k1, v1, k2, v2)
		}
	})
}

// A key disabled by another process (hemd key disable) is seen at once.
func TestStateChangedElsewhere(t *testing.T) {
	k, dir := open(t)
	ctx := context.Background()
	m, _ := k.CreateKey(ctx, "")
	blob, _, _ := k.GenerateDataKeyWithoutPlaintext(ctx, m.KeyID, vol)
	other, err := Open(Config{}, dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := other.DisableKey(ctx, m.KeyID); err != nil {
		t.Fatal(err)
	}
	other.Close()
	if _, err := k.Decrypt(ctx, blob, vol, make([]byte, 64)); !errors.Is(err, ErrDisabled) {
		t.Fatalf("Decrypt after another process disabled the key: %v", err)
	}
}

// The functions taken from the function list are the module's own.
func TestFunctionList(t *testing.T) {
	k, _ := open(t)
	for name, fn := range map[string]unsafe.Pointer{"C_EncryptInit": k.raw.encryptInit, "C_Encrypt": k.raw.encrypt,
		"C_DecryptInit": k.raw.decryptInit, "C_Decrypt": k.raw.decrypt} {
		if sym := symbol(DefaultModule, name); sym == nil || sym != fn {
			t.Errorf("function list entry for %s is %p, the module exports %p", name, fn, sym)
		}
	}
	if k.dec.fn != k.raw.decrypt {
		t.Error("the locked decrypt does not call C_Decrypt")
	}
}

// TestStateMatrix: every cryptographic operation in every key state.
func TestStateMatrix(t *testing.T) {
	k, _ := open(t)
	ctx := context.Background()
	m, _ := k.CreateKey(ctx, "")
	other, _ := k.CreateKey(ctx, "")
	blob, _, _ := k.GenerateDataKeyWithoutPlaintext(ctx, m.KeyID, vol)
	ops := map[string]func() error{
		"GenerateDataKeyWithoutPlaintext": func() error { _, _, err := k.GenerateDataKeyWithoutPlaintext(ctx, m.KeyID, vol); return err },
		"GenerateDataKey":                 func() error { _, _, err := k.GenerateDataKey(ctx, m.KeyID, vol, make([]byte, 32)); return err },
		"Encrypt":                         func() error { _, _, err := k.Encrypt(ctx, m.KeyID, vol, []byte("x")); return err },
		"Decrypt":                         func() error { _, err := k.Decrypt(ctx, blob, vol, make([]byte, 64)); return err },
		"ReEncrypt from":                  func() error { _, _, err := k.ReEncrypt(ctx, blob, vol, other.KeyID, vol); return err },
		"RotateKey":                       func() error { return k.RotateKey(ctx, m.KeyID) },
		"EnableKeyRotation":               func() error { return k.EnableKeyRotation(ctx, m.KeyID, true) },
		"CreateGrant":                     func() error { _, err := k.CreateGrant(ctx, m.KeyID, "h", "", []string{"Decrypt"}, nil); return err },
		"DescribeKey":                     func() error { _, err := k.DescribeKey(ctx, m.KeyID); return err },
	}
	want := map[string]map[string]error{
		Enabled:         {},
		Disabled:        {"GenerateDataKeyWithoutPlaintext": ErrDisabled, "GenerateDataKey": ErrDisabled, "Encrypt": ErrDisabled, "Decrypt": ErrDisabled, "ReEncrypt from": ErrDisabled, "RotateKey": ErrDisabled, "EnableKeyRotation": ErrDisabled},
		PendingDeletion: {"GenerateDataKeyWithoutPlaintext": ErrInvalidState, "GenerateDataKey": ErrInvalidState, "Encrypt": ErrInvalidState, "Decrypt": ErrInvalidState, "ReEncrypt from": ErrInvalidState, "RotateKey": ErrInvalidState, "EnableKeyRotation": ErrInvalidState, "CreateGrant": ErrInvalidState},
	}
	set := map[string]func(){
		Enabled:         func() { k.EnableKey(ctx, m.KeyID) },
		Disabled:        func() { k.DisableKey(ctx, m.KeyID) },
		PendingDeletion: func() { k.ScheduleKeyDeletion(ctx, m.KeyID, 7) },
	}
	for _, state := range []string{Enabled, Disabled, PendingDeletion} {
		set[state]()
		for name, op := range ops {
			if err := op(); !errIs(err, want[state][name]) {
				t.Errorf("%s in state %s: %v, want %v", name, state, err, want[state][name])
			}
		}
		if state == PendingDeletion {
			k.CancelKeyDeletion(ctx, m.KeyID)
		}
	}
}
