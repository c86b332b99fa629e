package recipient

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/hemd/hemd/hem/datakey"
)

// seal is the KMS's side done in Go for the tests: a fresh CEK, OAEP to
// the document's key, AES-256-CBC with PKCS #7 padding.
func seal(t testing.TB, doc, plaintext []byte) []byte {
	t.Helper()
	pub, err := ParseDocument(doc)
	if err != nil {
		t.Fatal(err)
	}
	scratch, err := datakey.NewLocked(EncryptScratch)
	if err != nil {
		t.Fatal(err)
	}
	defer scratch.Free()
	cek := make([]byte, 32)
	rand.Read(cek)
	ek, err := pub.EncryptOAEP(scratch.Bytes(), cek)
	if err != nil {
		t.Fatal(err)
	}
	iv := make([]byte, 16)
	rand.Read(iv)
	pad := 16 - len(plaintext)%16
	padded := append(bytes.Clone(plaintext), bytes.Repeat([]byte{byte(pad)}, pad)...)
	c, _ := aes.NewCipher(cek)
	cipher.NewCBCEncrypter(c, iv).CryptBlocks(padded, padded)
	out, err := (&Envelope{SubjectKeyID: pub.SubjectKeyID(), EncryptedKey: ek, IV: iv, EncryptedContent: padded}).Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func testKeyPair(t testing.TB) *KeyPair {
	t.Helper()
	kp, err := GenerateKeyPair()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(kp.Destroy)
	return kp
}

// TestOpen: plaintexts of every length a KMS returns come back whole; the
// key pair's scratch is wiped after each Open.
func TestOpen(t *testing.T) {
	kp := testKeyPair(t)
	for _, n := range []int{1, 15, 16, 17, 32, 64, 1024, MaxPlaintext} {
		pt := make([]byte, n)
		rand.Read(pt)
		env := seal(t, kp.Document(), pt)
		dst := make([]byte, MaxPlaintext)
		got, err := kp.Open(env, dst)
		if err != nil || !bytes.Equal(dst[:got], pt) {
			t.Fatalf("%d bytes: got %d, %v", n, got, err)
		}
		mem := kp.mem.Bytes()
		used := 8 * kp.a.off
		if !bytes.Equal(mem[used:], make([]byte, len(mem)-used)) {
			t.Fatalf("%d bytes: scratch not wiped after Open", n)
		}
		if n >= 16 && bytes.Contains(mem, pt[:16]) {
			t.Fatalf("%d bytes: plaintext left in the key pair's memory", n)
		}
	}
	small := make([]byte, 8)
	if _, err := kp.Open(seal(t, kp.Document(), make([]byte, 64)), small); err == nil {
		t.Fatal("64 bytes opened into 8")
	}
	kp.Destroy()
	if _, err := kp.Open(seal(t, kp.Document(), []byte("x")), small); !errors.Is(err, ErrKeyDestroyed) {
		t.Fatalf("after Destroy: %v", err)
	}
}

// TestOpenTampered: a changed byte anywhere in the envelope's ciphertexts,
// another recipient's envelope, or garbage is an error, never a wrong
// plaintext.
func TestOpenTampered(t *testing.T) {
	kp, other := testKeyPair(t), testKeyPair(t)
	pt := bytes.Repeat([]byte{7}, 64)
	env := seal(t, kp.Document(), pt)
	e, err := ParseEnvelope(env, kp.SubjectKeyID())
	if err != nil {
		t.Fatal(err)
	}
	dst := make([]byte, 64)
	for _, c := range []struct {
		name string
		mut  func(e *Envelope)
	}{
		{"encrypted key", func(e *Envelope) { e.EncryptedKey[100] ^= 1 }},
		{"encrypted key too long", func(e *Envelope) { e.EncryptedKey = append(e.EncryptedKey, 0) }},
		{"encrypted key not below n", func(e *Envelope) { e.EncryptedKey = bytes.Repeat([]byte{0xff}, 256) }},
		{"last block", func(e *Envelope) { e.EncryptedContent[len(e.EncryptedContent)-1] ^= 1 }},
		{"IV", func(e *Envelope) { e.IV = e.IV[:8] }},
		{"content not whole blocks", func(e *Envelope) { e.EncryptedContent = e.EncryptedContent[:20] }},
		{"another recipient", func(e *Envelope) { e.SubjectKeyID = other.SubjectKeyID() }},
	} {
		t.Run(c.name, func(t *testing.T) {
			m := *e
			m.EncryptedKey, m.EncryptedContent, m.IV = bytes.Clone(e.EncryptedKey), bytes.Clone(e.EncryptedContent), bytes.Clone(e.IV)
			c.mut(&m)
			b, err := m.Marshal()
			if err != nil {
				t.Fatal(err)
			}
			if n, err := kp.Open(b, dst); err == nil {
				t.Fatalf("opened: %x", dst[:n])
			}
		})
	}
	for _, garbage := range [][]byte{nil, {0x30, 0x00}, []byte("HEMDRCP1"), env[:len(env)-1], append(bytes.Clone(env), 0)} {
		if _, err := kp.Open(garbage, dst); !errors.Is(err, ErrEnvelope) {
			t.Errorf("garbage %x: %v", garbage[:min(len(garbage), 8)], err)
		}
	}
	if _, err := other.Open(env, dst); err == nil {
		t.Fatal("another key pair opened the envelope")
	}
}

// TestParseDocument: what a recipient document may and may not be.
func TestParseDocument(t *testing.T) {
	kp := testKeyPair(t)
	if _, err := ParseDocument(kp.Document()); err != nil {
		t.Fatal(err)
	}
	der := func(bits, e int) []byte {
		k, err := rsa.GenerateKey(rand.Reader, bits)
		if err != nil {
			t.Fatal(err)
		}
		k.PublicKey.E = e
		b, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	for _, c := range []struct {
		name string
		doc  []byte
	}{
		{"empty", nil},
		{"no magic", kp.Document()[8:]},
		{"nitro CBOR", []byte{0x84, 0x44, 0xa1, 0x01, 0x38, 0x22}},
		{"truncated key", kp.Document()[:100]},
		{"1024-bit key", append([]byte(documentMagic), der(1024, 65537)...)},
		{"exponent 3", append([]byte(documentMagic), der(2048, 3)...)},
		{"too long", append(kp.Document(), make([]byte, maxDocument)...)},
	} {
		if _, err := ParseDocument(c.doc); !errors.Is(err, ErrDocument) {
			t.Errorf("%s: %v", c.name, err)
		}
	}
	if pk, err := ParseDocument(append([]byte(documentMagic), der(4096, 65537)...)); err != nil || pk.Size() != 512 {
		t.Fatalf("4096-bit key: %v", err)
	}
}

// TestEncryptOAEP4096: the KMS side encrypts to a 4096-bit key too, and
// crypto/rsa decrypts it.
func TestEncryptOAEP4096(t *testing.T) {
	k, err := rsa.GenerateKey(rand.Reader, 4096)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKIXPublicKey(&k.PublicKey)
	pub, err := ParseDocument(append([]byte(documentMagic), der...))
	if err != nil {
		t.Fatal(err)
	}
	scratch, _ := datakey.NewLocked(EncryptScratch)
	defer scratch.Free()
	msg := []byte("a content-encryption key of 32 b")
	ct, err := pub.EncryptOAEP(scratch.Bytes(), msg)
	if err != nil {
		t.Fatal(err)
	}
	if back, err := rsa.DecryptOAEP(sha256.New(), nil, k, ct, nil); err != nil || !bytes.Equal(back, msg) {
		t.Fatalf("%q, %v", back, err)
	}
	if !bytes.Equal(scratch.Bytes(), make([]byte, len(scratch.Bytes()))) {
		t.Fatal("scratch not wiped")
	}
}

// opensslKey writes kp's private key (through crypto/rsa: test only) and a
// self-signed certificate naming its SubjectKeyIdentifier to dir.
func opensslKey(t *testing.T, kp *KeyPair, dir string) (keyPEM, certPEM string) {
	t.Helper()
	gk := goKey(t, kp.key)
	keyPEM, certPEM = filepath.Join(dir, "key.pem"), filepath.Join(dir, "cert.pem")
	der, _ := x509.MarshalPKCS8PrivateKey(gk)
	os.WriteFile(keyPEM, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "recipient"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), SubjectKeyId: kp.SubjectKeyID(),
		KeyUsage: x509.KeyUsageKeyEncipherment}
	cert, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &gk.PublicKey, gk)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(certPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert}), 0o600)
	return keyPEM, certPEM
}

// TestOpenSSLInterop: OpenSSL's CMS reads what hemd writes (so any CMS
// library does, as with AWS's CiphertextForRecipient), and hemd reads what
// OpenSSL writes for the same algorithms.
func TestOpenSSLInterop(t *testing.T) {
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Fatalf("openssl is needed (make deps installs it): %v", err)
	}
	kp := testKeyPair(t)
	dir := t.TempDir()
	keyPEM, certPEM := opensslKey(t, kp, dir)
	pt := make([]byte, 64)
	rand.Read(pt)
	in := filepath.Join(dir, "env.der")
	os.WriteFile(in, seal(t, kp.Document(), pt), 0o600)
	out, err := exec.Command("openssl", "cms", "-decrypt", "-inform", "DER", "-in", in, "-inkey", keyPEM, "-recip", certPEM).CombinedOutput()
	if err != nil || !bytes.Equal(out, pt) {
		t.Fatalf("openssl cms -decrypt: %v\n%q", err, out)
	}
	ptFile, envFile := filepath.Join(dir, "pt"), filepath.Join(dir, "openssl.der")
	os.WriteFile(ptFile, pt, 0o600)
	if out, err := exec.Command("openssl", "cms", "-encrypt", "-binary", "-outform", "DER", "-aes256", "-keyid",
		"-in", ptFile, "-out", envFile, "-recip", certPEM, "-keyopt", "rsa_padding_mode:oaep",
		"-keyopt", "rsa_oaep_md:sha256", "-keyopt", "rsa_mgf1_md:sha256").CombinedOutput(); err != nil {
		t.Fatalf("openssl cms -encrypt: %v\n%s", err, out)
	}
	env, _ := os.ReadFile(envFile)
	dst := make([]byte, 64)
	if n, err := kp.Open(env, dst); err != nil || !bytes.Equal(dst[:n], pt) {
		t.Fatalf("OpenSSL's envelope: %d, %v", n, err)
	}
}

// TestKeys: Get hands out a different key pair each time, the spare made
// ahead among them; Close destroys the spare and waits for the work.
func TestKeys(t *testing.T) {
	k := NewKeys()
	k.Warm()
	ctx := context.Background()
	seen := map[string]bool{}
	for range 3 {
		kp, err := k.Get(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if seen[string(kp.SubjectKeyID())] {
			t.Fatal("a key pair was handed out twice")
		}
		seen[string(kp.SubjectKeyID())] = true
		kp.Destroy()
		k.Warm()
	}
	k.Close()
	if k.spare != nil || k.making {
		t.Fatal("a spare survived Close")
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := k.Get(cctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Get with a canceled context: %v", err)
	}
}
