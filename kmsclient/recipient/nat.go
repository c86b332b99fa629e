package recipient

import (
	"math/big"
	"math/bits"
	"unsafe"
)

// The arithmetic of RSA on numbers kept in locked memory: little-endian
// 64-bit limbs, fixed lengths, Montgomery multiplication, and an
// exponentiation whose time does not depend on the exponent's value.
// math/big and crypto/rsa would put the private key and the padded
// plaintext on the Go heap, which can be neither locked nor wiped.

// arena hands out limbs from one locked region; mark and release reuse the
// tail of it for scratch (wiped when released).
type arena struct {
	w   []uint64
	off int
}

func newArena(b []byte) *arena {
	if len(b) < 8 || uintptr(unsafe.Pointer(&b[0]))%8 != 0 {
		panic("recipient: arena memory must be 8-byte aligned")
	}
	return &arena{w: unsafe.Slice((*uint64)(unsafe.Pointer(&b[0])), len(b)/8)}
}

// limbs returns n zeroed limbs.
func (a *arena) limbs(n int) []uint64 {
	if a.off+n > len(a.w) {
		panic("recipient: arena exhausted")
	}
	z := a.w[a.off : a.off+n : a.off+n]
	a.off += n
	clear(z)
	return z
}

// bytes returns n zeroed bytes (whole limbs underneath).
func (a *arena) bytes(n int) []byte {
	z := a.limbs((n + 7) / 8)
	return asBytes(z)[:n:n]
}

func (a *arena) mark() int { return a.off }

// release wipes everything handed out since m and makes it available again.
func (a *arena) release(m int) {
	clear(a.w[m:a.off])
	a.off = m
}

// asBytes views limbs as bytes (little-endian machines: byte i of limb j is
// byte 8j+i).
func asBytes(z []uint64) []byte {
	if len(z) == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(&z[0])), len(z)*8)
}

// setBytes sets z to the big-endian number b (len(b) <= 8*len(z)).
func setBytes(z []uint64, b []byte) {
	clear(z)
	for i, j := len(b)-1, 0; i >= 0; i, j = i-1, j+1 {
		z[j/8] |= uint64(b[i]) << (8 * (j % 8))
	}
}

// fillBytes writes z big-endian into b, which it fills exactly (the high
// limbs of z beyond b must be zero).
func fillBytes(b []byte, z []uint64) {
	for i, j := len(b)-1, 0; i >= 0; i, j = i-1, j+1 {
		b[i] = byte(z[j/8] >> (8 * (j % 8)))
	}
}

// ctMask is all ones when v is 1, zero when v is 0.
func ctMask(v uint64) uint64 { return -v }

// ctEqZero is 1 when x is zero, else 0, without branching on x.
func ctEqZero(x uint64) uint64 { return 1 ^ (x|-x)>>63 }

// selectLimbs sets z to a where mask is all ones, else to b.
func selectLimbs(mask uint64, z, a, b []uint64) {
	for i := range z {
		z[i] = b[i] ^ (mask & (a[i] ^ b[i]))
	}
}

// equal is 1 when x == y, else 0 (constant time).
func equal(x, y []uint64) uint64 {
	var d uint64
	for i := range x {
		d |= x[i] ^ y[i]
	}
	return ctEqZero(d)
}

// isZero is 1 when x is zero.
func isZero(x []uint64) uint64 {
	var d uint64
	for _, v := range x {
		d |= v
	}
	return ctEqZero(d)
}

// add sets z = x + y and returns the carry.
func add(z, x, y []uint64) uint64 {
	var c uint64
	for i := range z {
		z[i], c = bits.Add64(x[i], y[i], c)
	}
	return c
}

// sub sets z = x - y and returns the borrow.
func sub(z, x, y []uint64) uint64 {
	var b uint64
	for i := range z {
		z[i], b = bits.Sub64(x[i], y[i], b)
	}
	return b
}

// addWord sets z = x + w and returns the carry.
func addWord(z, x []uint64, w uint64) uint64 {
	c := w
	for i := range z {
		z[i], c = bits.Add64(x[i], c, 0)
	}
	return c
}

// subWord sets z = x - w and returns the borrow.
func subWord(z, x []uint64, w uint64) uint64 {
	b := w
	for i := range z {
		z[i], b = bits.Sub64(x[i], b, 0)
	}
	return b
}

// less is 1 when x < y (same lengths), without branching on the values.
func less(x, y []uint64) uint64 {
	var b uint64
	for i := range x {
		_, b = bits.Sub64(x[i], y[i], b)
	}
	return b
}

// mul sets z (len(x)+len(y) limbs) to x·y.
func mul(z, x, y []uint64) {
	clear(z)
	for i, xi := range x {
		var c uint64
		for j, yj := range y {
			hi, lo := bits.Mul64(xi, yj)
			var cc uint64
			lo, cc = bits.Add64(lo, z[i+j], 0)
			hi += cc
			lo, cc = bits.Add64(lo, c, 0)
			hi += cc
			z[i+j], c = lo, hi
		}
		z[i+len(y)] = c
	}
}

// mulWord sets z (len(x)+1 limbs) to x·w + c.
func mulWord(z, x []uint64, w, c uint64) {
	for i, xi := range x {
		hi, lo := bits.Mul64(xi, w)
		var cc uint64
		lo, cc = bits.Add64(lo, c, 0)
		z[i], c = lo, hi+cc
	}
	z[len(x)] = c
}

// divWord sets z = x / d and returns x mod d (d > 0).
func divWord(z, x []uint64, d uint64) uint64 {
	var r uint64
	for i := len(x) - 1; i >= 0; i-- {
		z[i], r = bits.Div64(r, x[i], d)
	}
	return r
}

// modWord returns x mod d (d > 0).
func modWord(x []uint64, d uint64) uint64 {
	var r uint64
	for i := len(x) - 1; i >= 0; i-- {
		_, r = bits.Div64(r, x[i], d)
	}
	return r
}

// bitLen is the length of x in bits. It branches on the value: use it only
// on public numbers (a recipient's modulus).
func bitLen(x []uint64) int {
	for i := len(x) - 1; i >= 0; i-- {
		if x[i] != 0 {
			return 64*i + bits.Len64(x[i])
		}
	}
	return 0
}

// modulus is an odd modulus m with what Montgomery multiplication needs,
// all in arena memory. R is 2^(64·len(m)).
type modulus struct {
	m     []uint64
	m0inv uint64   // -m^-1 mod 2^64
	rr    []uint64 // R² mod m
	one   []uint64 // R mod m: 1 in Montgomery form
	t     []uint64 // scratch, len(m)+2
}

// newModulus prepares m (odd, nonzero top limb not required) for
// Montgomery arithmetic. m is used in place.
func newModulus(a *arena, m []uint64) *modulus {
	n := len(m)
	md := &modulus{m: m, rr: a.limbs(n), one: a.limbs(n), t: a.limbs(n + 2)}
	// Newton's iteration for m0^-1 mod 2^64: each step doubles the correct
	// low bits (m0·m0 ≡ 1 mod 8 for odd m0: 3 bits to start).
	inv := m[0]
	for range 5 {
		inv *= 2 - m[0]*inv
	}
	md.m0inv = -inv
	// R mod m and R² mod m by doubling 1 modulo m, 64n and then another 64n
	// times.
	z := md.rr
	z[0] = 1
	for i := range 2 * 64 * n {
		md.double(z)
		if i == 64*n-1 {
			copy(md.one, z)
		}
	}
	return md
}

// newPublicModulus is newModulus for a public modulus (a recipient's):
// R mod m and R² mod m come from math/big, which is faster and may see m.
func newPublicModulus(a *arena, m []uint64) *modulus {
	n := len(m)
	md := &modulus{m: m, rr: a.limbs(n), one: a.limbs(n), t: a.limbs(n + 2)}
	inv := m[0]
	for range 5 {
		inv *= 2 - m[0]*inv
	}
	md.m0inv = -inv
	mb := make([]byte, 8*n)
	fillBytes(mb, m)
	M := new(big.Int).SetBytes(mb)
	R := new(big.Int).Lsh(big.NewInt(1), uint(64*n))
	setBytes(md.one, new(big.Int).Mod(R, M).Bytes())
	setBytes(md.rr, new(big.Int).Exp(R, big.NewInt(2), M).Bytes())
	return md
}

// double sets z = 2z mod m (z < m).
func (md *modulus) double(z []uint64) {
	var c uint64
	for i := range z {
		z[i], c = z[i]<<1|c, z[i]>>63
	}
	md.reduceOnce(z, c)
}

// reduceOnce subtracts m from the number c·R + z when it is at least m
// (the number is below 2m).
func (md *modulus) reduceOnce(z []uint64, c uint64) {
	t := md.t[:len(z)]
	b := sub(t, z, md.m)
	// Keep the difference when there was a carry out or no borrow.
	selectLimbs(ctMask(c|(b^1)), z, t, z)
}

// addMod sets z = x + y mod m (x, y < m).
func (md *modulus) addMod(z, x, y []uint64) {
	c := add(z, x, y)
	md.reduceOnce(z, c)
}

// subMod sets z = x - y mod m (x, y < m).
func (md *modulus) subMod(z, x, y []uint64) {
	b := sub(z, x, y)
	t := md.t[:len(z)]
	add(t, z, md.m)
	selectLimbs(ctMask(b), z, t, z)
}

// mul sets z = x·y·R^-1 mod m (x, y < m; z may alias x or y). Each row
// adds x[i]·y and q·m in one pass (q chosen from the row's lowest limb so
// that it becomes zero) and shifts by a limb.
func (md *modulus) mul(z, x, y []uint64) {
	m, n := md.m, len(md.m)
	t := md.t[: n+1 : n+1]
	clear(t)
	y = y[:n:n]
	m = m[:n:n]
	x = x[:n:n]
	for _, xi := range x {
		// Limb 0 first: it decides q and is shifted out.
		hi1, lo := bits.Mul64(xi, y[0])
		lo, cc := bits.Add64(lo, t[0], 0)
		hi1 += cc
		q := lo * md.m0inv
		hi2, lo2 := bits.Mul64(q, m[0])
		_, cc = bits.Add64(lo2, lo, 0)
		hi2 += cc
		c1, c2 := hi1, hi2
		for j := 1; j < n; j++ {
			h1, l1 := bits.Mul64(xi, y[j])
			l1, cc = bits.Add64(l1, t[j], 0)
			h1 += cc
			l1, cc = bits.Add64(l1, c1, 0)
			h1 += cc
			h2, l2 := bits.Mul64(q, m[j])
			l2, cc = bits.Add64(l2, l1, 0)
			h2 += cc
			l2, cc = bits.Add64(l2, c2, 0)
			h2 += cc
			t[j-1], c1, c2 = l2, h1, h2
		}
		// The row's top: t[n] (0 or 1, t < 2m) plus both carries.
		s, b := bits.Add64(t[n], c1, 0)
		s, cc = bits.Add64(s, c2, 0)
		t[n-1], t[n] = s, b+cc
	}
	// t < 2m: subtract m once if t >= m.
	b := sub(z[:n], t[:n], m)
	selectLimbs(ctMask(t[n]|(b^1)), z[:n], z[:n], t[:n])
}

// reduce sets z = x mod m for x of any length, by Horner's rule over
// chunks of len(m) limbs: z = z·R + chunk. Each chunk, below R, is
// reduced by one subtraction, so m must be above R/2 (its top bit set, as
// the primes of a key are).
func (md *modulus) reduce(a *arena, z, x []uint64) {
	n := len(md.m)
	mk := a.mark()
	defer a.release(mk)
	chunk := a.limbs(n)
	clear(z)
	for top := (len(x) + n - 1) / n * n; top > 0; top -= n {
		clear(chunk)
		copy(chunk, x[top-n:min(top, len(x))])
		md.reduceOnce(chunk, 0)
		md.mul(z, z, md.rr) // z·R mod m
		md.addMod(z, z, chunk)
	}
}

// toMont sets z = x·R mod m (x < R; x need not be below m).
func (md *modulus) toMont(z, x []uint64) { md.mul(z, x, md.rr) }

// fromMont sets z = x·R^-1 mod m.
func (md *modulus) fromMont(z, x, scratch []uint64) {
	clear(scratch)
	scratch[0] = 1
	md.mul(z, x, scratch)
}

// expWindow is the window of exp: 4 bits, a table of 16 powers.
const expWindow = 4

// exp sets z = x^e mod m in Montgomery form (x in Montgomery form), going
// through every bit of e's limbs with the same operations whatever their
// values: squarings, and a multiplication by a table entry read in full
// each time. Scratch comes from a and is wiped before exp returns.
func (md *modulus) exp(a *arena, z, x, e []uint64) {
	n := len(md.m)
	mk := a.mark()
	defer a.release(mk)
	table := a.limbs(n << expWindow)
	entry := func(i int) []uint64 { return table[i*n : (i+1)*n] }
	copy(entry(0), md.one)
	copy(entry(1), x)
	for i := 2; i < 1<<expWindow; i++ {
		md.mul(entry(i), entry(i-1), x)
	}
	acc, pick := a.limbs(n), a.limbs(n)
	copy(acc, md.one)
	for i := len(e) - 1; i >= 0; i-- {
		for s := 64 - expWindow; s >= 0; s -= expWindow {
			for range expWindow {
				md.mul(acc, acc, acc)
			}
			w := e[i] >> uint(s) & (1<<expWindow - 1)
			for j := range 1 << expWindow {
				selectLimbs(ctMask(ctEqZero(uint64(j)^w)), pick, entry(j), pick)
			}
			md.mul(acc, acc, pick)
		}
	}
	copy(z, acc)
}

// expPublic sets z = x^e mod m in Montgomery form for a public exponent e
// (square and multiply, branching on e's bits).
func (md *modulus) expPublic(z, x []uint64, e uint64) {
	acc := z
	copy(acc, x)
	for s := bits.Len64(e) - 2; s >= 0; s-- {
		md.mul(acc, acc, acc)
		if e>>uint(s)&1 == 1 {
			md.mul(acc, acc, x)
		}
	}
}
