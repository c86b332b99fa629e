package recipient

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"math/big"
	mrand "math/rand/v2"
	"testing"

	"github.com/hemd/hemd/hem/datakey"
)

func testArena(t testing.TB, size int) *arena {
	t.Helper()
	l, err := datakey.NewLocked(size)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.Free)
	return newArena(l.Bytes())
}

func toBig(z []uint64) *big.Int {
	b := make([]byte, 8*len(z))
	fillBytes(b, z)
	return new(big.Int).SetBytes(b)
}

func fromBig(t testing.TB, a *arena, x *big.Int, n int) []uint64 {
	z := a.limbs(n)
	setBytes(z, x.Bytes())
	return z
}

// TestMontgomery checks mul, exp and the modular helpers against math/big
// on seeded random odd moduli of several sizes.
func TestMontgomery(t *testing.T) {
	r := mrand.New(mrand.NewPCG(3, 4))
	a := testArena(t, 64<<10)
	for _, n := range []int{1, 2, 5, 16, 32} {
		for range 20 {
			mk := a.mark()
			m := a.limbs(n)
			for i := range m {
				m[i] = r.Uint64()
			}
			m[0] |= 1
			if n > 1 && r.IntN(2) == 0 {
				m[n-1] >>= uint(r.IntN(63)) // moduli without the top bit set too
			}
			M := toBig(m)
			md := newModulus(a, m)
			R := new(big.Int).Lsh(big.NewInt(1), uint(64*n))
			if toBig(md.one).Cmp(new(big.Int).Mod(R, M)) != 0 {
				t.Fatalf("n=%d: R mod m wrong", n)
			}
			x, y := a.limbs(n), a.limbs(n)
			for i := range x {
				x[i], y[i] = r.Uint64(), r.Uint64()
			}
			X := new(big.Int).Mod(toBig(x), M)
			Y := new(big.Int).Mod(toBig(y), M)
			setBytes(x, X.Bytes())
			setBytes(y, Y.Bytes())
			z := a.limbs(n)
			md.mul(z, x, y)
			Rinv := new(big.Int).ModInverse(R, M)
			want := new(big.Int).Mul(X, Y)
			want.Mul(want, Rinv).Mod(want, M)
			if toBig(z).Cmp(want) != 0 {
				t.Fatalf("n=%d: mul wrong", n)
			}
			md.addMod(z, x, y)
			if toBig(z).Cmp(new(big.Int).Mod(new(big.Int).Add(X, Y), M)) != 0 {
				t.Fatalf("n=%d: addMod wrong", n)
			}
			md.subMod(z, x, y)
			if toBig(z).Cmp(new(big.Int).Mod(new(big.Int).Sub(X, Y), M)) != 0 {
				t.Fatalf("n=%d: subMod wrong", n)
			}
			e := a.limbs(2)
			e[0], e[1] = r.Uint64(), r.Uint64()
			xm := a.limbs(n)
			md.toMont(xm, x)
			md.exp(a, z, xm, e)
			md.fromMont(z, z, xm)
			if toBig(z).Cmp(new(big.Int).Exp(X, toBig(e), M)) != 0 {
				t.Fatalf("n=%d: exp wrong", n)
			}
			md.toMont(xm, x)
			md.expPublic(z, xm, publicE)
			md.fromMont(z, z, xm)
			if toBig(z).Cmp(new(big.Int).Exp(X, big.NewInt(publicE), M)) != 0 {
				t.Fatalf("n=%d: expPublic wrong", n)
			}
			a.release(mk)
		}
	}
}

// goKey is the key as crypto/rsa sees it, for cross-checks; its CRT values
// are checked against math/big's.
func goKey(t testing.TB, k *privateKey) *rsa.PrivateKey {
	t.Helper()
	N := toBig(k.n)
	one := big.NewInt(1)
	phi := big.NewInt(1)
	prod := big.NewInt(1)
	var primes []*big.Int
	for i, pr := range k.primes {
		P := toBig(pr.p)
		if P.BitLen() != 64*primeLimbs || !P.ProbablyPrime(20) {
			t.Fatalf("prime %d: %d bits, or not prime", i, P.BitLen())
		}
		pm1 := new(big.Int).Sub(P, one)
		if want := new(big.Int).ModInverse(big.NewInt(publicE), pm1); toBig(pr.d).Cmp(want) != 0 {
			t.Fatalf("prime %d: CRT exponent differs from math/big's", i)
		}
		if i > 0 {
			if want := new(big.Int).ModInverse(prod, P); toBig(pr.coeff).Cmp(want) != 0 {
				t.Fatalf("prime %d: CRT coefficient differs from math/big's", i)
			}
		}
		prod.Mul(prod, P)
		phi.Mul(phi, pm1)
		primes = append(primes, P)
	}
	if prod.Cmp(N) != 0 {
		t.Fatal("n is not the product of the primes")
	}
	if b := N.BitLen(); b != Bits && b != Bits-1 {
		t.Fatalf("modulus of %d bits", b)
	}
	D := new(big.Int).ModInverse(big.NewInt(publicE), phi)
	gk := &rsa.PrivateKey{PublicKey: rsa.PublicKey{N: N, E: publicE}, D: D, Primes: primes}
	if err := gk.Validate(); err != nil {
		t.Fatalf("generated key: %v", err)
	}
	gk.Precompute()
	return gk
}

// TestGenerateKey: the key is a valid (three-prime) RSA key for crypto/rsa, and
// both directions of OAEP interoperate with crypto/rsa.
func TestGenerateKey(t *testing.T) {
	a := testArena(t, 16<<10)
	k, err := generateKey(a, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	gk := goKey(t, k)
	msg := bytes.Repeat([]byte{0x5a}, 32)
	for range 3 {
		ct, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, &gk.PublicKey, msg, nil)
		if err != nil {
			t.Fatal(err)
		}
		mk := a.mark()
		c, m := a.limbs(nLimbs), a.limbs(nLimbs)
		setBytes(c, ct)
		k.decrypt(a, m, c)
		em := a.bytes(nBytes)
		fillBytes(em, m)
		got, err := oaepDecode(em, a.bytes(nBytes+hashLen+4))
		if err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("decrypt of crypto/rsa's OAEP: %x, %v", got, err)
		}
		// Our encoding and public operation, crypto/rsa's decryption.
		oaepEncode(rand.Reader, em, msg, a.bytes(nBytes+hashLen+4))
		setBytes(m, em)
		publicOp(a, c, m, k.n)
		out := make([]byte, nBytes)
		fillBytes(out, c)
		back, err := rsa.DecryptOAEP(sha256.New(), nil, gk, out, nil)
		if err != nil || !bytes.Equal(back, msg) {
			t.Fatalf("crypto/rsa's decrypt of ours: %x, %v", back, err)
		}
		a.release(mk)
	}
}

// TestOAEPDecodeRejects flips bytes of a valid encoding: every flip is an
// error, never a wrong message.
func TestOAEPDecodeRejects(t *testing.T) {
	a := testArena(t, 8<<10)
	msg := []byte("0123456789abcdef0123456789abcdef")
	for i := 0; i < 256; i += 7 {
		mk := a.mark()
		em := a.bytes(256)
		if err := oaepEncode(rand.Reader, em, msg, a.bytes(300)); err != nil {
			t.Fatal(err)
		}
		em[i] ^= 1
		if got, err := oaepDecode(em, a.bytes(300)); err == nil {
			t.Fatalf("byte %d flipped: decoded %x", i, got)
		}
		a.release(mk)
	}
	if err := oaepEncode(rand.Reader, a.bytes(256), make([]byte, 191), a.bytes(300)); err == nil {
		t.Fatal("a 191-byte message was encoded for a 2048-bit key")
	}
}

func BenchmarkGenerateKey(b *testing.B) {
	a := testArena(b, 16<<10)
	for b.Loop() {
		mk := a.mark()
		if _, err := generateKey(a, rand.Reader); err != nil {
			b.Fatal(err)
		}
		a.release(mk)
	}
}

func BenchmarkPrivateOp(b *testing.B) {
	a := testArena(b, 16<<10)
	k, err := generateKey(a, rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	c, m := a.limbs(nLimbs), a.limbs(nLimbs)
	c[0] = 12345
	for b.Loop() {
		k.decrypt(a, m, c)
	}
}
