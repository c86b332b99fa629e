package recipient

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"errors"
	"fmt"
	"sync"

	"github.com/hemd/hemd/hem"
	"github.com/hemd/hemd/hem/datakey"
	"github.com/hemd/hemd/hem/shield"
)

// keyPairMemory holds a key pair and the scratch of its one decryption.
const keyPairMemory = 16 << 10

// MaxPlaintext is the most CiphertextForRecipient may carry (AWS KMS's
// Decrypt limit).
const MaxPlaintext = 4096

// KeyPair is a recipient's RSA key pair (three primes, 2112 bits) for one Decrypt: the private
// key lives only in its locked memory; Destroy wipes it. Its methods are
// safe for concurrent use (Open calls run one at a time).
type KeyPair struct {
	mu  sync.Mutex // Open's scratch
	mem *datakey.Locked
	a   *arena
	key *privateKey
	doc []byte
	ski []byte
}

// GenerateKeyPair makes a fresh key pair (about 30 ms of one core).
func GenerateKeyPair() (*KeyPair, error) {
	mem, err := datakey.NewLocked(keyPairMemory)
	if err != nil {
		return nil, fmt.Errorf("recipient key: %w", err)
	}
	kp := &KeyPair{mem: mem, a: newArena(mem.Bytes())}
	shield.Run(func() { kp.key, err = generateKey(kp.a, rand.Reader) })
	if err != nil {
		mem.Free()
		return nil, err
	}
	n := make([]byte, nBytes) // public
	fillBytes(n, kp.key.n)
	if kp.doc, kp.ski, err = document(n); err != nil {
		mem.Free()
		return nil, err
	}
	return kp, nil
}

// Document is the recipient document to send as the Recipient's
// AttestationDocument.
func (kp *KeyPair) Document() []byte { return kp.doc }

// SubjectKeyID names the key in CiphertextForRecipient.
func (kp *KeyPair) SubjectKeyID() []byte { return kp.ski }

// Destroy wipes the key pair. It may be called more than once.
func (kp *KeyPair) Destroy() {
	kp.mu.Lock()
	defer kp.mu.Unlock()
	kp.mem.Free()
}

// ErrKeyDestroyed is a KeyPair used after Destroy.
var ErrKeyDestroyed = errors.New("recipient key pair was destroyed")

// Open decrypts CiphertextForRecipient into dst (locked memory) and returns
// the plaintext's length. The content-encryption key, the padded plaintext
// and the AES schedules stay in the key pair's locked memory and are wiped
// before Open returns.
func (kp *KeyPair) Open(ciphertext, dst []byte) (n int, err error) {
	kp.mu.Lock()
	defer kp.mu.Unlock()
	shield.Run(func() { n, err = kp.open(ciphertext, dst) })
	return n, err
}

func (kp *KeyPair) open(ciphertext, dst []byte) (int, error) {
	if kp.mem.Bytes() == nil {
		return 0, ErrKeyDestroyed
	}
	e, err := ParseEnvelope(ciphertext, kp.ski)
	if err != nil {
		return 0, err
	}
	if len(e.EncryptedKey) != nBytes {
		return 0, envErr("encrypted key of %d bytes, want %d", len(e.EncryptedKey), nBytes)
	}
	if len(e.EncryptedContent) > MaxPlaintext+16 {
		return 0, envErr("encrypted content of %d bytes is longer than any plaintext", len(e.EncryptedContent))
	}
	a := kp.a
	mk := a.mark()
	defer a.release(mk)
	c, m := a.limbs(nLimbs), a.limbs(nLimbs)
	setBytes(c, e.EncryptedKey)
	if less(c, kp.key.n) != 1 {
		return 0, errDecryption
	}
	kp.key.decrypt(a, m, c)
	em := a.bytes(nBytes)
	fillBytes(em, m)
	cek, err := oaepDecode(em, a.bytes(nBytes+hashLen+4))
	if err != nil {
		return 0, err
	}
	if len(cek) != 32 {
		return 0, envErr("content-encryption key of %d bytes is not AES-256", len(cek))
	}
	buf := a.bytes(len(e.EncryptedContent))
	copy(buf, e.EncryptedContent)
	if err := hem.DecryptCBC(a.bytes(hem.CBCScheduleSize), cek, e.IV, buf); err != nil {
		return 0, err
	}
	// PKCS #7 padding: 1 to 16 bytes, each the pad's length.
	pad := int(buf[len(buf)-1])
	good := subtle.ConstantTimeLessOrEq(1, pad) & subtle.ConstantTimeLessOrEq(pad, 16)
	for i := 1; i <= 16; i++ {
		in := subtle.ConstantTimeLessOrEq(i, pad)
		good &= subtle.ConstantTimeSelect(in, subtle.ConstantTimeByteEq(buf[len(buf)-i], byte(pad)), 1)
	}
	if good != 1 {
		return 0, envErr("bad padding after decryption")
	}
	n := len(buf) - pad
	if n > len(dst) {
		return 0, fmt.Errorf("recipient: plaintext of %d bytes does not fit %d", n, len(dst))
	}
	copy(dst, buf[:n])
	return n, nil
}

// Keys makes the key pairs of a host, one per Decrypt and never reused:
// Get takes the spare made in the background, if there is one, and Warm
// starts making the next, so that an attach (a migration's switchover) does
// not wait for a key to be generated. Close ends the background work.
type Keys struct {
	mu      sync.Mutex
	spare   *KeyPair
	making  bool
	closed  bool
	stopped chan struct{} // closed when no generation runs
}

// NewKeys returns Keys with no spare yet; Warm or the first Get starts one.
func NewKeys() *Keys { return &Keys{} }

// Warm starts making a spare if there is none.
func (k *Keys) Warm() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.refillLocked()
}

func (k *Keys) refillLocked() {
	if k.spare != nil || k.making || k.closed {
		return
	}
	k.making = true
	k.stopped = make(chan struct{})
	go func(done chan struct{}) {
		defer close(done)
		kp, err := GenerateKeyPair()
		k.mu.Lock()
		defer k.mu.Unlock()
		k.making = false
		if err != nil {
			return // Get makes one itself, and says why it fails
		}
		if k.closed {
			kp.Destroy()
			return
		}
		k.spare = kp
	}(k.stopped)
}

// Ready reports whether a spare is ready.
func (k *Keys) Ready() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.spare != nil
}

// Get returns a fresh key pair: the spare, or one made now. The next spare
// is made at the next Warm (call it once the key pair has done its work:
// making it meanwhile would compete for the CPU with the attach).
func (k *Keys) Get(ctx context.Context) (*KeyPair, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	k.mu.Lock()
	kp := k.spare
	k.spare = nil
	k.mu.Unlock()
	if kp != nil {
		return kp, nil
	}
	return GenerateKeyPair()
}

// Close stops making spares and destroys the one kept.
func (k *Keys) Close() {
	k.mu.Lock()
	k.closed = true
	if k.spare != nil {
		k.spare.Destroy()
		k.spare = nil
	}
	done := k.stopped
	k.mu.Unlock()
	if done != nil {
		<-done
	}
}
