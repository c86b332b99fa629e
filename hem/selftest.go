package hem

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
)

// The known-answer test is IEEE Std 1619-2007 Annex B, vector 10: the
// 512-byte data unit 0xff, plaintext 00 01 … ff twice.
var (
	katKey, _    = hex.DecodeString("2718281828459045235360287471352662497757247093699959574966967627" + "3141592653589793238462643383279502884197169399375105820974944592")
	katDigest, _ = hex.DecodeString("e97e974fa393af794f7a4684395814cf820de60a01eaec677d87b452e316b364") // SHA-256 of the ciphertext
)

const katUnit = 0xff

// selfTest checks the implementation x uses before x is handed out: a
// known-answer test on a fixed key, then on x's own key a comparison with
// the portable implementation across the 2^64 tweak carry, and a decryption
// back to the plaintext.
func selfTest(x *XTS) error {
	var ks [ScheduleSize]byte
	kat := &XTS{ks: &ks, unitSize: 512, impl: x.impl}
	expandKey(kat.encKeys(), kat.decKeys(), katKey[:32])
	expandKey(kat.twkKeys(), nil, katKey[32:])
	var pt, buf [2 * 512]byte
	for i := range pt {
		pt[i] = byte(i)
	}
	kat.crypt(buf[:512], pt[:512], katUnit, false)
	if sum := sha256.Sum256(buf[:512]); !bytes.Equal(sum[:], katDigest) {
		return fmt.Errorf("%w: %v: IEEE 1619 vector 10 encrypts wrong", ErrSelfTest, x.impl)
	}
	kat.crypt(buf[:512], buf[:512], katUnit, true)
	if !bytes.Equal(buf[:512], pt[:512]) {
		return fmt.Errorf("%w: %v: IEEE 1619 vector 10 decrypts wrong", ErrSelfTest, x.impl)
	}

	if x.impl == implGeneric {
		return nil
	}
	var ref [2 * 512]byte
	fast := &XTS{ks: x.ks, unitSize: 512, impl: x.impl}
	slow := &XTS{ks: x.ks, unitSize: 512, impl: implGeneric}
	fast.crypt(buf[:], pt[:], 1<<64-1, false)
	slow.crypt(ref[:], pt[:], 1<<64-1, false)
	ok := bytes.Equal(buf[:], ref[:])
	fast.crypt(buf[:], buf[:], 1<<64-1, true)
	ok = ok && bytes.Equal(buf[:], pt[:])
	clear(buf[:])
	clear(ref[:])
	if !ok {
		return fmt.Errorf("%w: %v disagrees with the portable implementation on the installed key", ErrSelfTest, x.impl)
	}
	return nil
}
