package recipient

import (
	"testing"
)

// FuzzParseDocument: any bytes are a recipient key or an ErrDocument, never
// a crash, and an accepted key is one the KMS can encrypt to.
func FuzzParseDocument(f *testing.F) {
	kp, err := GenerateKeyPair()
	if err != nil {
		f.Fatal(err)
	}
	defer kp.Destroy()
	f.Add(kp.Document())
	f.Add([]byte(documentMagic))
	f.Add([]byte{0x84, 0x44, 0xa1, 0x01, 0x38, 0x22})
	f.Fuzz(func(t *testing.T, doc []byte) {
		k, err := ParseDocument(doc)
		if err != nil {
			return
		}
		if k.Size()*8 < MinBits || k.Size()*8 > MaxBits+7 || len(k.SubjectKeyID()) != 20 {
			t.Fatalf("accepted a key of %d bytes", k.Size())
		}
	})
}

// FuzzOpen: any CiphertextForRecipient is opened or refused, never a crash
// or a plaintext longer than the envelope could hold.
func FuzzOpen(f *testing.F) {
	kp, err := GenerateKeyPair()
	if err != nil {
		f.Fatal(err)
	}
	defer kp.Destroy()
	env := seal(f, kp.Document(), make([]byte, 64))
	f.Add(env)
	f.Add(env[:len(env)/2])
	f.Add([]byte{0x30, 0x80, 0x06, 0x00})
	dst := make([]byte, MaxPlaintext)
	f.Fuzz(func(t *testing.T, b []byte) {
		n, err := kp.Open(b, dst)
		if err == nil && n > len(b) {
			t.Fatalf("%d bytes of plaintext from a %d-byte envelope", n, len(b))
		}
	})
}
