package recipient

import (
	"crypto/rand"
	"fmt"
	"math/big"

	"github.com/hemd/hemd/hem/shield"
)

func newInt(b []byte) *big.Int { return new(big.Int).SetBytes(b) }

// EncryptScratch is the locked scratch memory EncryptOAEP needs.
const EncryptScratch = 12 << 10

// EncryptOAEP encrypts msg (a content-encryption key) to k with
// RSAES-OAEP-SHA-256, doing the padding and the RSA operation in scratch
// (at least EncryptScratch bytes of locked memory, 8-byte aligned), which
// it wipes. msg should be locked memory too. The result is public.
func (k *PublicKey) EncryptOAEP(scratch, msg []byte) (out []byte, err error) {
	shield.Run(func() { out, err = k.encryptOAEP(scratch, msg) })
	return out, err
}

func (k *PublicKey) encryptOAEP(scratch, msg []byte) ([]byte, error) {
	if len(scratch) < EncryptScratch {
		return nil, fmt.Errorf("recipient: %d bytes of scratch, need %d", len(scratch), EncryptScratch)
	}
	a := newArena(scratch[:EncryptScratch])
	defer a.release(0)
	size := len(k.n)
	limbs := (size + 7) / 8
	n := a.limbs(limbs)
	setBytes(n, k.n)
	em := a.bytes(size)
	if err := oaepEncode(rand.Reader, em, msg, a.bytes(size+hashLen+4)); err != nil {
		return nil, err
	}
	m, c := a.limbs(limbs), a.limbs(limbs)
	setBytes(m, em) // em[0] is 0: m < 2^(8(size-1)) <= n
	publicOp(a, c, m, n)
	out := make([]byte, size)
	fillBytes(out, c)
	return out, nil
}
