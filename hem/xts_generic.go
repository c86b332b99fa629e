package hem

import "encoding/binary"

// cryptGeneric is the portable XTS core: one block at a time with the
// table-based AES of aes.go, on the schedules in x's key memory. The run
// starts at the 128-bit unit number (lo, hi).
func cryptGeneric(x *XTS, dst, src []byte, lo, hi uint64, decrypt bool) {
	le := binary.LittleEndian
	enc, dec, twk := x.encKeys(), x.decKeys(), x.twkKeys()
	var t, b [blockSize]byte
	for len(src) > 0 {
		putTweak(t[:], lo, hi)
		encryptBlock(twk, t[:], t[:])
		tlo, thi := le.Uint64(t[:]), le.Uint64(t[8:])
		for i := 0; i < x.unitSize; i += blockSize {
			le.PutUint64(b[:], le.Uint64(src[i:])^tlo)
			le.PutUint64(b[8:], le.Uint64(src[i+8:])^thi)
			if decrypt {
				decryptBlock(dec, b[:], b[:])
			} else {
				encryptBlock(enc, b[:], b[:])
			}
			le.PutUint64(dst[i:], le.Uint64(b[:])^tlo)
			le.PutUint64(dst[i+8:], le.Uint64(b[8:])^thi)
			// Multiply the tweak by x in GF(2^128) (IEEE 1619 section 5.2).
			carry := thi >> 63
			thi = thi<<1 | tlo>>63
			tlo = tlo<<1 ^ carry*0x87
		}
		src, dst = src[x.unitSize:], dst[x.unitSize:]
		lo++
		if lo == 0 {
			hi++
		}
	}
	clear(t[:])
	clear(b[:])
}
