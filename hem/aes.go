package hem

import "encoding/binary"

// AES-256 key expansion and a portable block cipher that works on a key
// schedule stored as bytes in memory hem owns (FIPS 197 byte order, the
// layout AESENC/AESDEC take from memory), so that the schedule can be wiped.

const (
	aesRounds     = 14
	roundKeysSize = (aesRounds + 1) * 16 // 240 bytes per direction
)

// roundKeys is one expanded AES-256 schedule: 15 round keys of 16 bytes.
type roundKeys = [roundKeysSize]byte

var (
	sbox, invSbox      [256]byte
	te0, te1, te2, te3 [256]uint32
	td0, td1, td2, td3 [256]uint32
	rcon               = [7]uint32{0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40}
)

func init() {
	// S-box from the multiplicative inverse in GF(2^8) and the affine map
	// (FIPS 197 section 5.1.1), walking p over the powers of 3 and q over
	// those of its inverse.
	p, q := byte(1), byte(1)
	for {
		p = p ^ p<<1 ^ byte(int8(p)>>7)&0x1b
		q ^= q << 1
		q ^= q << 2
		q ^= q << 4
		if q&0x80 != 0 {
			q ^= 0x09
		}
		s := q ^ rotl8(q, 1) ^ rotl8(q, 2) ^ rotl8(q, 3) ^ rotl8(q, 4) ^ 0x63
		sbox[p] = s
		if p == 1 {
			break
		}
	}
	sbox[0] = 0x63
	for i := range 256 {
		invSbox[sbox[i]] = byte(i)
	}
	for i := range 256 {
		s := sbox[i]
		w := uint32(gmul(s, 2))<<24 | uint32(s)<<16 | uint32(s)<<8 | uint32(gmul(s, 3))
		te0[i], te1[i], te2[i], te3[i] = w, rotr32(w, 8), rotr32(w, 16), rotr32(w, 24)
		si := invSbox[i]
		w = uint32(gmul(si, 0x0e))<<24 | uint32(gmul(si, 0x09))<<16 | uint32(gmul(si, 0x0d))<<8 | uint32(gmul(si, 0x0b))
		td0[i], td1[i], td2[i], td3[i] = w, rotr32(w, 8), rotr32(w, 16), rotr32(w, 24)
	}
}

func rotl8(x byte, n uint) byte      { return x<<n | x>>(8-n) }
func rotr32(x uint32, n uint) uint32 { return x>>n | x<<(32-n) }

// gmul multiplies in GF(2^8) modulo x^8+x^4+x^3+x+1.
func gmul(a, b byte) byte {
	var r byte
	for b != 0 {
		if b&1 != 0 {
			r ^= a
		}
		a = a<<1 ^ byte(int8(a)>>7)&0x1b
		b >>= 1
	}
	return r
}

func subWord(w uint32) uint32 {
	return uint32(sbox[w>>24])<<24 | uint32(sbox[w>>16&0xff])<<16 | uint32(sbox[w>>8&0xff])<<8 | uint32(sbox[w&0xff])
}

// invMixColumn applies InvMixColumns to one column (the AESIMC operation).
func invMixColumn(w uint32) uint32 {
	return td0[sbox[w>>24]] ^ td1[sbox[w>>16&0xff]] ^ td2[sbox[w>>8&0xff]] ^ td3[sbox[w&0xff]]
}

// expandKey writes the AES-256 encryption schedule of key into enc and, if
// dec is not nil, the schedule of the equivalent inverse cipher (the one
// AESDEC uses: round keys in reverse order, the inner ones through
// InvMixColumns) into dec. It works in place in the destination memory so
// that no copy of the schedule is left anywhere else.
func expandKey(enc, dec *roundKeys, key []byte) {
	be := binary.BigEndian
	for i := range 8 {
		be.PutUint32(enc[4*i:], be.Uint32(key[4*i:]))
	}
	for i := 8; i < 60; i++ {
		t := be.Uint32(enc[4*(i-1):])
		switch i % 8 {
		case 0:
			t = subWord(t<<8|t>>24) ^ rcon[i/8-1]<<24
		case 4:
			t = subWord(t)
		}
		be.PutUint32(enc[4*i:], be.Uint32(enc[4*(i-8):])^t)
	}
	if dec == nil {
		return
	}
	for r := 0; r <= aesRounds; r++ {
		src := enc[16*(aesRounds-r):]
		for c := range 4 {
			w := be.Uint32(src[4*c:])
			if r != 0 && r != aesRounds {
				w = invMixColumn(w)
			}
			be.PutUint32(dec[16*r+4*c:], w)
		}
	}
}

// encryptBlock encrypts one block with the schedule xk (T-table AES, as in
// Go's portable crypto/aes). dst and src may be the same.
func encryptBlock(xk *roundKeys, dst, src []byte) {
	be := binary.BigEndian
	_ = src[15]
	_ = dst[15]
	s0 := be.Uint32(src[0:]) ^ be.Uint32(xk[0:])
	s1 := be.Uint32(src[4:]) ^ be.Uint32(xk[4:])
	s2 := be.Uint32(src[8:]) ^ be.Uint32(xk[8:])
	s3 := be.Uint32(src[12:]) ^ be.Uint32(xk[12:])
	for k := 16; k < 16*aesRounds; k += 16 {
		t0 := be.Uint32(xk[k:]) ^ te0[s0>>24] ^ te1[s1>>16&0xff] ^ te2[s2>>8&0xff] ^ te3[s3&0xff]
		t1 := be.Uint32(xk[k+4:]) ^ te0[s1>>24] ^ te1[s2>>16&0xff] ^ te2[s3>>8&0xff] ^ te3[s0&0xff]
		t2 := be.Uint32(xk[k+8:]) ^ te0[s2>>24] ^ te1[s3>>16&0xff] ^ te2[s0>>8&0xff] ^ te3[s1&0xff]
		t3 := be.Uint32(xk[k+12:]) ^ te0[s3>>24] ^ te1[s0>>16&0xff] ^ te2[s1>>8&0xff] ^ te3[s2&0xff]
		s0, s1, s2, s3 = t0, t1, t2, t3
	}
	k := 16 * aesRounds
	t0 := uint32(sbox[s0>>24])<<24 | uint32(sbox[s1>>16&0xff])<<16 | uint32(sbox[s2>>8&0xff])<<8 | uint32(sbox[s3&0xff])
	t1 := uint32(sbox[s1>>24])<<24 | uint32(sbox[s2>>16&0xff])<<16 | uint32(sbox[s3>>8&0xff])<<8 | uint32(sbox[s0&0xff])
	t2 := uint32(sbox[s2>>24])<<24 | uint32(sbox[s3>>16&0xff])<<16 | uint32(sbox[s0>>8&0xff])<<8 | uint32(sbox[s1&0xff])
	t3 := uint32(sbox[s3>>24])<<24 | uint32(sbox[s0>>16&0xff])<<16 | uint32(sbox[s1>>8&0xff])<<8 | uint32(sbox[s2&0xff])
	be.PutUint32(dst[0:], t0^be.Uint32(xk[k:]))
	be.PutUint32(dst[4:], t1^be.Uint32(xk[k+4:]))
	be.PutUint32(dst[8:], t2^be.Uint32(xk[k+8:]))
	be.PutUint32(dst[12:], t3^be.Uint32(xk[k+12:]))
}

// decryptBlock decrypts one block with the inverse-cipher schedule xk.
func decryptBlock(xk *roundKeys, dst, src []byte) {
	be := binary.BigEndian
	_ = src[15]
	_ = dst[15]
	s0 := be.Uint32(src[0:]) ^ be.Uint32(xk[0:])
	s1 := be.Uint32(src[4:]) ^ be.Uint32(xk[4:])
	s2 := be.Uint32(src[8:]) ^ be.Uint32(xk[8:])
	s3 := be.Uint32(src[12:]) ^ be.Uint32(xk[12:])
	for k := 16; k < 16*aesRounds; k += 16 {
		t0 := be.Uint32(xk[k:]) ^ td0[s0>>24] ^ td1[s3>>16&0xff] ^ td2[s2>>8&0xff] ^ td3[s1&0xff]
		t1 := be.Uint32(xk[k+4:]) ^ td0[s1>>24] ^ td1[s0>>16&0xff] ^ td2[s3>>8&0xff] ^ td3[s2&0xff]
		t2 := be.Uint32(xk[k+8:]) ^ td0[s2>>24] ^ td1[s1>>16&0xff] ^ td2[s0>>8&0xff] ^ td3[s3&0xff]
		t3 := be.Uint32(xk[k+12:]) ^ td0[s3>>24] ^ td1[s2>>16&0xff] ^ td2[s1>>8&0xff] ^ td3[s0&0xff]
		s0, s1, s2, s3 = t0, t1, t2, t3
	}
	k := 16 * aesRounds
	t0 := uint32(invSbox[s0>>24])<<24 | uint32(invSbox[s3>>16&0xff])<<16 | uint32(invSbox[s2>>8&0xff])<<8 | uint32(invSbox[s1&0xff])
	t1 := uint32(invSbox[s1>>24])<<24 | uint32(invSbox[s0>>16&0xff])<<16 | uint32(invSbox[s3>>8&0xff])<<8 | uint32(invSbox[s2&0xff])
	t2 := uint32(invSbox[s2>>24])<<24 | uint32(invSbox[s1>>16&0xff])<<16 | uint32(invSbox[s0>>8&0xff])<<8 | uint32(invSbox[s3&0xff])
	t3 := uint32(invSbox[s3>>24])<<24 | uint32(invSbox[s2>>16&0xff])<<16 | uint32(invSbox[s1>>8&0xff])<<8 | uint32(invSbox[s0&0xff])
	be.PutUint32(dst[0:], t0^be.Uint32(xk[k:]))
	be.PutUint32(dst[4:], t1^be.Uint32(xk[k+4:]))
	be.PutUint32(dst[8:], t2^be.Uint32(xk[k+8:]))
	be.PutUint32(dst[12:], t3^be.Uint32(xk[k+12:]))
}
