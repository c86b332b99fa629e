package hem

import (
	"errors"
	"fmt"
)

// CBCScheduleSize is the key memory DecryptCBC needs: the AES-256
// encryption and decryption schedules.
const CBCScheduleSize = 2 * roundKeysSize

// ErrCBCInput is a CBC input that is not whole blocks or a bad IV or key.
var ErrCBCInput = errors.New("hem: AES-256-CBC needs a 32-byte key, a 16-byte IV and whole blocks")

// DecryptCBC decrypts buf in place with AES-256-CBC under key and iv, with
// the key schedules in mem[:CBCScheduleSize] (memory the caller owns, locked
// like a data key's page), and zeroes that memory before it returns: for a
// short-lived key such as a CMS content-encryption key, which must not leave
// a schedule on the Go heap as crypto/aes would. It is the portable (table)
// AES, meant for a few blocks.
func DecryptCBC(mem, key, iv, buf []byte) error {
	if len(key) != 32 || len(iv) != blockSize || len(buf)%blockSize != 0 {
		return ErrCBCInput
	}
	if len(mem) < CBCScheduleSize {
		return fmt.Errorf("%w: %d bytes, need %d", ErrKeyMemory, len(mem), CBCScheduleSize)
	}
	enc := (*roundKeys)(mem[:roundKeysSize])
	dec := (*roundKeys)(mem[roundKeysSize:CBCScheduleSize])
	defer clear(mem[:CBCScheduleSize])
	expandKey(enc, dec, key)
	// Walk backwards so that each block's predecessor is still ciphertext.
	var prev, cur [blockSize]byte
	defer clear(cur[:])
	for i := len(buf) - blockSize; i >= 0; i -= blockSize {
		copy(cur[:], buf[i:i+blockSize])
		if i == 0 {
			copy(prev[:], iv)
		} else {
			copy(prev[:], buf[i-blockSize:i])
		}
		decryptBlock(dec, buf[i:i+blockSize], cur[:])
		for j := range blockSize {
			buf[i+j] ^= prev[j]
		}
	}
	return nil
}
