package recipient

import (
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"math/bits"
)

// RSA for a recipient: key generation and the private-key operation on
// numbers in locked memory (a KeyPair), and the public-key operation for
// the KMS side. hemd's key pairs are multi-prime RSA (RFC 8017): three
// primes of 704 bits (11 limbs, the top two bits set), a modulus of 2111 or
// 2112 bits, e = 65537. Three primes make the private-key operation about
// twice as fast as two of 1024 bits (three exponentiations of a third of
// the size), which is the attach's latency; factoring a 704-bit prime out
// of it is as far out of reach as factoring a 2048-bit modulus.

const (
	nPrimes    = 3
	primeLimbs = 11
	nLimbs     = nPrimes * primeLimbs // 33
	// Bits is the size of the moduli hemd makes (at most; 2111 or 2112).
	Bits = 64 * nLimbs
	// nBytes is the length of an RSA ciphertext (and OAEP encoding) for
	// them.
	nBytes  = Bits / 8
	publicE = 65537
	// mrRounds of Miller-Rabin with random bases: for random 704-bit
	// candidates the chance of a composite passing is far below 2^-100
	// (Damgård, Landrock and Pomerance), and the pairwise test after
	// generation would catch one.
	mrRounds = 6
)

// smallPrimes are the odd primes below 2048, for trial division.
var smallPrimes = func() []uint64 {
	var ps []uint64
	for c := uint64(3); c < 2048; c += 2 {
		prime := true
		for _, p := range ps {
			if p*p > c {
				break
			}
			if c%p == 0 {
				prime = false
				break
			}
		}
		if prime {
			ps = append(ps, c)
		}
	}
	return ps
}()

// prime is one prime of a private key with what the CRT needs.
type prime struct {
	p     []uint64 // the prime
	d     []uint64 // e^-1 mod (p-1)
	coeff []uint64 // (product of the earlier primes)^-1 mod p; unused for the first
	md    *modulus
}

// privateKey is a multi-prime RSA private key in CRT form, in arena
// memory.
type privateKey struct {
	n      []uint64 // nLimbs
	primes [nPrimes]prime
}

// randLimbs fills z from r.
func randLimbs(r io.Reader, z []uint64) error {
	_, err := io.ReadFull(r, asBytes(z))
	return err
}

// generatePrime sets p to a random prime of 64·len(p) bits whose top two
// bits are set (so that two of them make a modulus of exactly twice the
// bits) and with p mod e != 1 (so that e is invertible mod p-1).
func generatePrime(a *arena, r io.Reader, p []uint64) error {
	mk := a.mark()
	defer a.release(mk)
	res := a.limbs(len(smallPrimes) + 1) // residues of the base candidate
	top := len(p) - 1
	for {
		if err := randLimbs(r, p); err != nil {
			return fmt.Errorf("recipient: random: %w", err)
		}
		p[top] |= 3 << 62
		p[0] |= 1
		for i, sp := range smallPrimes {
			res[i] = modWord(p, sp)
		}
		res[len(smallPrimes)] = modWord(p, publicE)
		// Walk p, p+2, p+4, … until one survives trial division, then test
		// it; a base whose walk runs long (or past the top bits) is
		// dropped.
		for delta := uint64(0); delta < 1<<16; delta += 2 {
			ok := (res[len(smallPrimes)]+delta)%publicE != 1
			for i := 0; ok && i < len(smallPrimes); i++ {
				ok = (res[i]+delta)%smallPrimes[i] != 0
			}
			if !ok {
				continue
			}
			cm := a.mark()
			cand := a.limbs(len(p))
			if addWord(cand, p, delta) != 0 || cand[top]>>62 != 3 {
				a.release(cm)
				break
			}
			prime, err := probablyPrime(a, r, cand)
			if prime {
				copy(p, cand)
			}
			a.release(cm)
			if err != nil || prime {
				return err
			}
		}
	}
}

// probablyPrime runs Miller-Rabin with mrRounds random bases on the odd
// number w (top bit set).
func probablyPrime(a *arena, r io.Reader, w []uint64) (bool, error) {
	mk := a.mark()
	defer a.release(mk)
	n := len(w)
	wm1 := a.limbs(n)
	subWord(wm1, w, 1)
	// w-1 = 2^s·d with d odd.
	s := 0
	for i := 0; i < n && wm1[i] == 0; i++ {
		s += 64
	}
	s += bits.TrailingZeros64(wm1[s/64])
	d := a.limbs(n)
	shiftRight(d, wm1, s)
	md := newModulus(a, w)
	minus1 := a.limbs(n) // w-1 in Montgomery form: m - R mod m
	sub(minus1, w, md.one)
	base, x := a.limbs(n), a.limbs(n)
	for range mrRounds {
		// A random base in [2, w-2]: below 2^(64n-1) < w, not 0 or 1.
		for {
			if err := randLimbs(r, base); err != nil {
				return false, fmt.Errorf("recipient: random: %w", err)
			}
			base[n-1] >>= 1
			if base[0] > 1 || isZero(base[1:]) == 0 {
				break
			}
		}
		md.toMont(x, base)
		md.exp(a, x, x, d)
		if equal(x, md.one) == 1 || equal(x, minus1) == 1 {
			continue
		}
		composite := true
		for range s - 1 {
			md.mul(x, x, x)
			if equal(x, minus1) == 1 {
				composite = false
				break
			}
			if equal(x, md.one) == 1 {
				break
			}
		}
		if composite {
			return false, nil
		}
	}
	return true, nil
}

// shiftRight sets z = x >> s.
func shiftRight(z, x []uint64, s int) {
	limbs, sh := s/64, uint(s%64)
	clear(z)
	for i := 0; i+limbs < len(x); i++ {
		v := x[i+limbs] >> sh
		if sh != 0 && i+limbs+1 < len(x) {
			v |= x[i+limbs+1] << (64 - sh)
		}
		z[i] = v
	}
}

// crtExponent sets d to e^-1 mod (p-1) for the prime p (p mod e != 1):
// with r = (p-1) mod e and k = -r^-1 mod e, d = (k·(p-1) + 1) / e.
func crtExponent(a *arena, d, p []uint64) {
	mk := a.mark()
	defer a.release(mk)
	n := len(p)
	pm1 := a.limbs(n)
	subWord(pm1, p, 1)
	r := modWord(pm1, publicE)
	// r^-1 mod e by Fermat (e is prime): r^(e-2), with the same steps for
	// every r.
	inv := uint64(1)
	for s := bits.Len64(publicE-2) - 1; s >= 0; s-- {
		inv = inv * inv % publicE
		sq := inv * r % publicE
		m := ctMask((publicE - 2) >> uint(s) & 1)
		inv = inv ^ (m & (inv ^ sq))
	}
	k := (publicE - inv) % publicE
	t := a.limbs(n + 1)
	mulWord(t, pm1, k, 1)
	q := a.limbs(n + 1)
	divWord(q, t, publicE)
	copy(d, q[:n])
}

// generateKey makes a key pair in arena memory.
func generateKey(a *arena, r io.Reader) (*privateKey, error) {
	k := &privateKey{n: a.limbs(nLimbs)}
	for i := range k.primes {
		k.primes[i] = prime{p: a.limbs(primeLimbs), d: a.limbs(primeLimbs), coeff: a.limbs(primeLimbs)}
	}
	for {
		for i := range k.primes {
			if err := generatePrime(a, r, k.primes[i].p); err != nil {
				return nil, err
			}
		}
		// Two equal primes would be a broken key; they are as likely as
		// guessing one.
		p := k.primes
		if equal(p[0].p, p[1].p)|equal(p[0].p, p[2].p)|equal(p[1].p, p[2].p) == 0 {
			break
		}
	}
	for i := range k.primes {
		pr := &k.primes[i]
		crtExponent(a, pr.d, pr.p)
		pr.md = newModulus(a, pr.p) // kept with the key
	}
	mk := a.mark()
	prod := a.limbs(nLimbs) // p1·…·pi, in its first primeLimbs·i limbs
	copy(prod, k.primes[0].p)
	for i := range k.primes {
		pr := &k.primes[i]
		if i == 0 {
			continue
		}
		// coeff = prod^(p-2) mod p (Fermat), prod being the earlier primes.
		m2 := a.mark()
		x, pm2 := a.limbs(primeLimbs), a.limbs(primeLimbs)
		pr.md.reduce(a, x, prod[:primeLimbs*i])
		subWord(pm2, pr.p, 2)
		pr.md.toMont(x, x)
		pr.md.exp(a, x, x, pm2)
		pr.md.fromMont(pr.coeff, x, pm2)
		next := a.limbs(primeLimbs * (i + 1))
		mul(next, prod[:primeLimbs*i], pr.p)
		copy(prod, next)
		a.release(m2)
	}
	copy(k.n, prod)
	a.release(mk)
	if err := k.selfTest(a, r); err != nil {
		return nil, err
	}
	return k, nil
}

// selfTest encrypts a random number with the public key and decrypts it
// with the private one: a composite taken for a prime fails here.
func (k *privateKey) selfTest(a *arena, r io.Reader) error {
	mk := a.mark()
	defer a.release(mk)
	m, c, back := a.limbs(nLimbs), a.limbs(nLimbs), a.limbs(nLimbs)
	if err := randLimbs(r, m); err != nil {
		return err
	}
	m[nLimbs-1] >>= 2 // below n, whose top two bits are set
	publicOp(a, c, m, k.n)
	k.decrypt(a, back, c)
	if equal(back, m) != 1 {
		return errors.New("recipient: generated RSA key failed its self-test")
	}
	return nil
}

// publicOp sets c = m^65537 mod n (n public), with scratch from a.
func publicOp(a *arena, c, m, n []uint64) {
	mk := a.mark()
	defer a.release(mk)
	md := newPublicModulus(a, n)
	x := a.limbs(len(n))
	md.toMont(x, m)
	md.expPublic(c, x, publicE)
	md.fromMont(c, c, x)
}

// decrypt sets m = c^d mod n by the CRT (c < n): m_i = c^d_i mod p_i, then
// Garner's recombination, m = m + (p_1·…·p_{i-1})·((m_i - m)·coeff_i mod
// p_i) for each further prime.
func (k *privateKey) decrypt(a *arena, m, c []uint64) {
	mk := a.mark()
	defer a.release(mk)
	var mi [nPrimes][]uint64
	for i := range k.primes {
		pr := &k.primes[i]
		mi[i] = a.limbs(primeLimbs)
		x := a.limbs(primeLimbs)
		pr.md.reduce(a, x, c)
		pr.md.toMont(x, x)
		pr.md.exp(a, x, x, pr.d)
		pr.md.fromMont(mi[i], x, a.limbs(primeLimbs))
	}
	clear(m)
	copy(m, mi[0])
	prod := a.limbs(nLimbs) // p1·…·p(i-1)
	copy(prod, k.primes[0].p)
	t, h := a.limbs(primeLimbs), a.limbs(primeLimbs)
	ph := a.limbs(nLimbs + primeLimbs)
	for i := 1; i < nPrimes; i++ {
		pr := &k.primes[i]
		pr.md.reduce(a, t, m[:primeLimbs*i]) // m < p1·…·p(i-1)
		pr.md.subMod(h, mi[i], t)
		pr.md.mul(h, h, pr.coeff)
		pr.md.mul(h, h, pr.md.rr)
		w := primeLimbs * (i + 1)
		mul(ph[:w], prod[:primeLimbs*i], h)
		add(m[:w], m[:w], ph[:w])
		if i+1 < nPrimes {
			mul(ph[:w], prod[:primeLimbs*i], pr.p)
			copy(prod, ph[:w])
		}
	}
}

// OAEP with SHA-256 and MGF1-SHA-256, an empty label (RFC 8017, 7.1), as
// AWS KMS's RSAES_OAEP_SHA_256.

const hashLen = sha256.Size

var emptyLabelHash = sha256.Sum256(nil)

// mgf1XOR xors MGF1-SHA-256(seed) into out, hashing through buf
// (len(seed)+4 bytes of locked memory).
func mgf1XOR(out, seed, buf []byte) {
	copy(buf, seed)
	ctr := buf[len(seed) : len(seed)+4]
	for i, done := uint32(0), 0; done < len(out); i++ {
		ctr[0], ctr[1], ctr[2], ctr[3] = byte(i>>24), byte(i>>16), byte(i>>8), byte(i)
		h := sha256.Sum256(buf[:len(seed)+4])
		done += subtle.XORBytes(out[done:], out[done:], h[:])
		clear(h[:])
	}
	clear(buf)
}

// oaepEncode writes the encoding of msg into em (k bytes), with a random
// seed, all in the caller's locked memory; buf is scratch of hashLen+4+k
// bytes.
func oaepEncode(r io.Reader, em, msg, buf []byte) error {
	k := len(em)
	if len(msg) > k-2*hashLen-2 {
		return fmt.Errorf("recipient: %d bytes are too long for RSA-OAEP with a %d-bit key", len(msg), 8*k)
	}
	clear(em)
	seed, db := em[1:1+hashLen], em[1+hashLen:]
	copy(db, emptyLabelHash[:])
	db[len(db)-len(msg)-1] = 1
	copy(db[len(db)-len(msg):], msg)
	if _, err := io.ReadFull(r, seed); err != nil {
		return fmt.Errorf("recipient: random: %w", err)
	}
	mgf1XOR(db, seed, buf)
	mgf1XOR(seed, db, buf)
	return nil
}

var errDecryption = errors.New("recipient: RSA-OAEP decryption error")

// oaepDecode checks em (k bytes) and returns the message in it (a slice of
// em). It does not tell which check failed, and runs the same steps for
// any em of that length.
func oaepDecode(em, buf []byte) ([]byte, error) {
	k := len(em)
	if k < 2*hashLen+2 {
		return nil, errDecryption
	}
	seed, db := em[1:1+hashLen], em[1+hashLen:]
	mgf1XOR(seed, db, buf)
	mgf1XOR(db, seed, buf)
	good := subtle.ConstantTimeByteEq(em[0], 0)
	good &= subtle.ConstantTimeCompare(db[:hashLen], emptyLabelHash[:])
	// After the label hash: zeros, then 0x01, then the message.
	rest := db[hashLen:]
	lookingForIndex, index, invalid := 1, 0, 0
	for i, b := range rest {
		isZero := subtle.ConstantTimeByteEq(b, 0)
		isOne := subtle.ConstantTimeByteEq(b, 1)
		index = subtle.ConstantTimeSelect(lookingForIndex&isOne, i, index)
		lookingForIndex = subtle.ConstantTimeSelect(isOne, 0, lookingForIndex)
		invalid = subtle.ConstantTimeSelect(lookingForIndex&^isZero, 1, invalid)
	}
	if good&^invalid&^lookingForIndex != 1 {
		return nil, errDecryption
	}
	return rest[index+1:], nil
}
