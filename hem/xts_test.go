package hem

import (
	"bytes"
	"crypto/aes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"os/exec"
	"strings"
	"sync"
	"testing"

	"golang.org/x/crypto/xts"
)

// impls lists every implementation this CPU (and build) can run.
func impls() []impl {
	var out []impl
	for _, im := range []impl{implGeneric, implAESNI, implVAES256, implVAES512} {
		if implSupported(im) {
			out = append(out, im)
		}
	}
	return out
}

// forEachImpl runs f as a subtest under every supported implementation.
func forEachImpl(t *testing.T, f func(t *testing.T, im impl)) {
	for _, im := range impls() {
		t.Run(im.String(), func(t *testing.T) { f(t, im) })
	}
}

func mustXTS(tb testing.TB, im impl, key []byte, unitSize int) *XTS {
	tb.Helper()
	x, err := newXTSImpl(im, nil, key, unitSize)
	if err != nil {
		tb.Fatalf("newXTSImpl(%v, unitSize %d): %v", im, unitSize, err)
	}
	tb.Cleanup(x.Wipe)
	return x
}

func fromHex(tb testing.TB, s string) []byte {
	tb.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

func TestImplementations(t *testing.T) {
	var names []string
	for _, im := range impls() {
		names = append(names, im.String())
	}
	t.Logf("implementations on this CPU: %s; NewXTS picks %v", strings.Join(names, ", "), bestImpl())
	x, err := NewXTS(fromHex(t, ieee1619Key), 4096)
	if err != nil {
		t.Fatal(err)
	}
	defer x.Wipe()
	if x.Impl() != bestImpl().String() || x.UnitSize() != 4096 {
		t.Errorf("Impl() = %q, UnitSize() = %d", x.Impl(), x.UnitSize())
	}
}

// TestIEEE1619 checks IEEE Std 1619-2007 Annex B vectors 10-14 (XTS-AES-256).
func TestIEEE1619(t *testing.T) {
	pt := make([]byte, 512)
	for i := range pt {
		pt[i] = byte(i)
	}
	forEachImpl(t, func(t *testing.T, im impl) {
		for _, v := range ieee1619Vectors {
			x := mustXTS(t, im, fromHex(t, v.key), 512)
			want := fromHex(t, v.ct)
			got := make([]byte, 512)
			x.Encrypt(got, pt, v.unit)
			if !bytes.Equal(got, want) {
				t.Errorf("%s: Encrypt wrong:\n got %x\nwant %x", v.name, got, want)
			}
			x.Decrypt(got, got, v.unit) // in place
			if !bytes.Equal(got, pt) {
				t.Errorf("%s: Decrypt wrong", v.name)
			}
		}
	})
}

// refXTS is an independent AES-256-XTS built on crypto/aes with a
// hand-built 128-bit tweak (lo, hi) per unit.
func refXTS(tb testing.TB, key, data []byte, unitSize int, lo, hi uint64, decrypt bool) []byte {
	k1, err := aes.NewCipher(key[:32])
	if err != nil {
		tb.Fatal(err)
	}
	k2, _ := aes.NewCipher(key[32:])
	out := make([]byte, len(data))
	var t [16]byte
	for u := 0; u < len(data); u += unitSize {
		binary.LittleEndian.PutUint64(t[:], lo)
		binary.LittleEndian.PutUint64(t[8:], hi)
		k2.Encrypt(t[:], t[:])
		for i := u; i < u+unitSize; i += 16 {
			var b [16]byte
			for j := range b {
				b[j] = data[i+j] ^ t[j]
			}
			if decrypt {
				k1.Decrypt(b[:], b[:])
			} else {
				k1.Encrypt(b[:], b[:])
			}
			for j := range b {
				out[i+j] = b[j] ^ t[j]
			}
			var carry byte
			for j := range t {
				c := t[j] >> 7
				t[j] = t[j]<<1 | carry
				carry = c
			}
			t[0] ^= 0x87 * carry
		}
		lo++
		if lo == 0 {
			hi++
		}
	}
	return out
}

var crossUnits = []uint64{0, 1, 1<<32 - 1, 1 << 32, 1<<64 - 64, 1<<64 - 1}

// checkRun encrypts and decrypts one run under every implementation and
// compares with x/crypto/xts unit by unit (where the tweak fits in 64 bits)
// and with refXTS (everywhere, including across the 2^64 carry).
func checkRun(t *testing.T, key, pt []byte, unitSize int, unit uint64, xs map[impl]*XTS) {
	t.Helper()
	n := len(pt) / unitSize
	want := refXTS(t, key, pt, unitSize, unit, 0, false)
	xc, err := xts.NewCipher(aes.NewCipher, key)
	if err != nil {
		t.Fatal(err)
	}
	for k := 0; k < n; k++ {
		if unit+uint64(k) < unit {
			break // x/crypto's tweak is a uint64; past 2^64 only refXTS applies
		}
		got := make([]byte, unitSize)
		xc.Encrypt(got, pt[k*unitSize:(k+1)*unitSize], unit+uint64(k))
		if !bytes.Equal(got, want[k*unitSize:(k+1)*unitSize]) {
			t.Fatalf("refXTS disagrees with x/crypto/xts at unit %d", unit+uint64(k))
		}
	}
	for im, x := range xs {
		ct := make([]byte, len(pt))
		x.Encrypt(ct, pt, unit)
		if !bytes.Equal(ct, want) {
			t.Fatalf("%v: unit size %d, %d units from %#x: Encrypt differs from reference at byte %d", im, unitSize, n, unit, firstDiff(ct, want))
		}
		x.Decrypt(ct, ct, unit)
		if !bytes.Equal(ct, pt) {
			t.Fatalf("%v: unit size %d, %d units from %#x: Decrypt does not invert Encrypt (byte %d)", im, unitSize, n, unit, firstDiff(ct, pt))
		}
	}
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

func TestCrossCheck(t *testing.T) {
	rng := rand.New(rand.NewPCG(1619, 2007))
	runs := []int{1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64}
	if testing.Short() {
		runs = []int{1, 2, 3, 17, 64}
	}
	for _, unitSize := range []int{512, 4096} {
		key := make([]byte, KeySize)
		for i := range key {
			key[i] = byte(rng.Uint32())
		}
		xs := map[impl]*XTS{}
		for _, im := range impls() {
			xs[im] = mustXTS(t, im, key, unitSize)
		}
		for _, n := range runs {
			pt := make([]byte, n*unitSize)
			for i := range pt {
				pt[i] = byte(rng.Uint32())
			}
			for _, unit := range crossUnits {
				checkRun(t, key, pt, unitSize, unit, xs)
			}
			checkRun(t, key, pt, unitSize, rng.Uint64(), xs)
		}
	}
}

// TestTweakCarry checks runs that cross unit number 2^64 against the
// portable implementation and a hand-built 128-bit tweak.
func TestTweakCarry(t *testing.T) {
	key := fromHex(t, ieee1619Key)
	pt := make([]byte, 4*512)
	for i := range pt {
		pt[i] = byte(i * 7)
	}
	g := mustXTS(t, implGeneric, key, 512)
	want := make([]byte, len(pt))
	g.Encrypt(want, pt, 1<<64-2) // units 2^64-2, 2^64-1, 2^64, 2^64+1
	// Units 2^64 and 2^64+1 by hand: tweak (0, 1) and (1, 1).
	if ref := refXTS(t, key, pt[2*512:], 512, 0, 1, false); !bytes.Equal(ref, want[2*512:]) {
		t.Fatal("generic tweak past 2^64 is not the 128-bit unit number")
	}
	forEachImpl(t, func(t *testing.T, im impl) {
		x := mustXTS(t, im, key, 512)
		got := make([]byte, len(pt))
		x.Encrypt(got, pt, 1<<64-2)
		if !bytes.Equal(got, want) {
			t.Fatalf("differs from generic at byte %d", firstDiff(got, want))
		}
	})
}

func FuzzXTS(f *testing.F) {
	f.Add([]byte("seed"), uint64(0), uint8(1), false)
	f.Add([]byte{1, 2, 3}, uint64(1<<64-1), uint8(3), true)
	f.Add([]byte{9}, uint64(1<<32-1), uint8(64), true)
	f.Fuzz(func(t *testing.T, seed []byte, unit uint64, units uint8, big bool) {
		unitSize := 512
		if big {
			unitSize = 4096
		}
		n := int(units)%64 + 1
		var s [32]byte
		copy(s[:], seed)
		rng := rand.New(rand.NewChaCha8(s))
		key := make([]byte, KeySize)
		for i := range key {
			key[i] = byte(rng.Uint32())
		}
		if bytes.Equal(key[:32], key[32:]) {
			return
		}
		pt := make([]byte, n*unitSize)
		for i := range pt {
			pt[i] = byte(rng.Uint32())
		}
		xs := map[impl]*XTS{}
		for _, im := range impls() {
			xs[im] = mustXTS(t, im, key, unitSize)
		}
		checkRun(t, key, pt, unitSize, unit, xs)
	})
}

// opensslScript decrypts stdin unit by unit with OpenSSL's EVP_aes_256_xts
// (through python3-cryptography) and writes the plaintext to stdout.
const opensslScript = `
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.backends.openssl import backend
key = bytes.fromhex(sys.argv[1]); us = int(sys.argv[2]); unit = int(sys.argv[3])
data = sys.stdin.buffer.read()
out = bytearray()
for k in range(len(data) // us):
    tweak = ((unit + k) % (1 << 128)).to_bytes(16, "little")
    d = Cipher(algorithms.AES(key), modes.XTS(tweak)).decryptor()
    out += d.update(data[k*us:(k+1)*us]) + d.finalize()
sys.stderr.write(backend.openssl_version_text())
sys.stdout.buffer.write(bytes(out))
`

// TestOpenSSL decrypts hem's output with OpenSSL's libcrypto.
func TestOpenSSL(t *testing.T) {
	// Debian's python3-cryptography (installed by make test) links the
	// system's libcrypto; another python3 on PATH is the fallback.
	python := ""
	for _, p := range []string{"/usr/bin/python3", "python3"} {
		if out, err := exec.Command(p, "-c", "import cryptography").CombinedOutput(); err == nil {
			python = p
			break
		} else {
			t.Logf("%s: no cryptography module: %s", p, out)
		}
	}
	if python == "" {
		t.Skip("python3-cryptography not installed: cannot reach OpenSSL's EVP_aes_256_xts (apt-get install python3-cryptography)")
	}
	rng := rand.New(rand.NewPCG(3, 0))
	logged := false
	forEachImpl(t, func(t *testing.T, im impl) {
		for _, unitSize := range []int{512, 4096} {
			for _, unit := range []uint64{0, 1<<32 - 1, 1<<64 - 3} {
				key := make([]byte, KeySize)
				for i := range key {
					key[i] = byte(rng.Uint32())
				}
				pt := make([]byte, 5*unitSize)
				for i := range pt {
					pt[i] = byte(rng.Uint32())
				}
				x := mustXTS(t, im, key, unitSize)
				ct := make([]byte, len(pt))
				x.Encrypt(ct, pt, unit)
				cmd := exec.Command(python, "-c", opensslScript, hex.EncodeToString(key), fmt.Sprint(unitSize), fmt.Sprint(unit))
				cmd.Stdin = bytes.NewReader(ct)
				var stderr bytes.Buffer
				cmd.Stderr = &stderr
				got, err := cmd.Output()
				if err != nil {
					t.Fatalf("python3: %v: %s", err, stderr.String())
				}
				if !bytes.Equal(got, pt) {
					t.Fatalf("unit size %d from unit %#x: OpenSSL (%s) does not decrypt hem's ciphertext (byte %d)", unitSize, unit, stderr.String(), firstDiff(got, pt))
				}
				if !logged {
					t.Logf("decrypted by %s", stderr.String())
					logged = true
				}
			}
		}
	})
}

func TestWipe(t *testing.T) {
	key := make([]byte, KeySize)
	for i := range key {
		key[i] = byte(0xa0 + i)
	}
	forEachImpl(t, func(t *testing.T, im impl) {
		mem := make([]byte, ScheduleSize+64)
		x, err := newXTSImpl(im, mem, key, 4096)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Contains(mem, key[:32]) || !bytes.Contains(mem, key[32:]) {
			t.Fatal("key schedule is not in the caller's memory")
		}
		buf := make([]byte, 4096)
		x.Encrypt(buf, buf, 7)
		x.Wipe()
		for i, b := range mem {
			if b != 0 {
				t.Fatalf("byte %d of key memory is %#x after Wipe", i, b)
			}
		}
		x.Wipe() // idempotent
		mustPanic(t, "Encrypt after Wipe", func() { x.Encrypt(buf, buf, 7) })
		mustPanic(t, "Decrypt after Wipe", func() { x.Decrypt(buf, buf, 7) })
	})
	x, err := NewXTS(key, 512)
	if err != nil {
		t.Fatal(err)
	}
	own := x.own.b
	if !bytes.Contains(own, key[:32]) {
		t.Fatal("NewXTS key schedule is not in hem's own memory")
	}
	x.own.once.Do(func() {}) // keep Wipe from unmapping, so the memory can be read back
	x.Wipe()
	if i := bytes.IndexFunc(own, func(r rune) bool { return r != 0 }); i >= 0 {
		t.Fatalf("byte %d of NewXTS key memory not zero after Wipe", i)
	}
}

func mustPanic(t *testing.T, what string, f func()) {
	t.Helper()
	defer func() {
		if recover() == nil {
			t.Errorf("%s did not panic", what)
		}
	}()
	f()
}

func TestErrors(t *testing.T) {
	key := fromHex(t, ieee1619Key)
	for _, tc := range []struct {
		name string
		mem  []byte
		key  []byte
		unit int
		want error
	}{
		{"short key", nil, key[:32], 512, ErrKeySize},
		{"long key", nil, append(key, 0), 512, ErrKeySize},
		{"equal halves", nil, append(key[:32:32], key[:32]...), 512, ErrEqualHalves},
		{"unit 1024", nil, key, 1024, ErrUnitSize},
		{"unit 0", nil, key, 0, ErrUnitSize},
		{"short memory", make([]byte, ScheduleSize-1), key, 512, ErrKeyMemory},
	} {
		var err error
		if tc.mem != nil {
			_, err = NewXTSIn(tc.mem, tc.key, tc.unit)
		} else {
			_, err = NewXTS(tc.key, tc.unit)
		}
		if !errors.Is(err, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, err, tc.want)
		}
	}
	// IEEE 1619: no more than 2^20 blocks in a data unit.
	if _, err := newXTSImpl(implGeneric, nil, key, 16<<20+256); !errors.Is(err, ErrUnitSize) {
		t.Errorf("unit above 2^20 blocks: got %v", err)
	}
	if x, err := newXTSImpl(implGeneric, nil, key, 16<<20); err != nil {
		t.Errorf("unit of 2^20 blocks: %v", err)
	} else {
		x.Wipe()
	}
}

// TestSelfTestRefusesKey breaks the known answer and expects every
// implementation to refuse the key, leaving the caller's memory zeroed.
func TestSelfTestRefusesKey(t *testing.T) {
	katDigest[0] ^= 1
	defer func() { katDigest[0] ^= 1 }()
	forEachImpl(t, func(t *testing.T, im impl) {
		mem := make([]byte, ScheduleSize)
		_, err := newXTSImpl(im, mem, fromHex(t, ieee1619Key), 512)
		if !errors.Is(err, ErrSelfTest) {
			t.Fatalf("got %v, want ErrSelfTest", err)
		}
		if !bytes.Equal(mem, make([]byte, ScheduleSize)) {
			t.Fatal("refused key left its schedule in memory")
		}
	})
}

func TestMisusePanics(t *testing.T) {
	x := mustXTS(t, bestImpl(), fromHex(t, ieee1619Key), 512)
	buf := make([]byte, 2048)
	mustPanic(t, "partial unit", func() { x.Encrypt(buf[:600], buf[:600], 0) })
	mustPanic(t, "short dst", func() { x.Encrypt(buf[:512], buf[:1024], 0) })
	mustPanic(t, "overlap", func() { x.Encrypt(buf[16:1040], buf[:1024], 0) })
	x.Encrypt(buf[:0], buf[:0], 0) // empty is fine
	x.Encrypt(buf[1024:], buf[:1024], 0)
}

func TestConcurrent(t *testing.T) {
	forEachImpl(t, func(t *testing.T, im impl) {
		x := mustXTS(t, im, fromHex(t, ieee1619Key), 4096)
		pt := make([]byte, 8*4096)
		want := make([]byte, len(pt))
		x.Encrypt(want, pt, 42)
		var wg sync.WaitGroup
		for range 4 {
			wg.Go(func() {
				got := make([]byte, len(pt))
				for range 50 {
					x.Encrypt(got, pt, 42)
					if !bytes.Equal(got, want) {
						t.Error("concurrent Encrypt gave a different result")
						return
					}
				}
			})
		}
		wg.Wait()
	})
}

func TestZeroAllocs(t *testing.T) {
	forEachImpl(t, func(t *testing.T, im impl) {
		x := mustXTS(t, im, fromHex(t, ieee1619Key), 4096)
		buf := make([]byte, 16*4096)
		if n := testing.AllocsPerRun(20, func() {
			x.Encrypt(buf, buf, 1)
			x.Decrypt(buf, buf, 1)
		}); n != 0 {
			t.Errorf("%v allocations per call", n)
		}
	})
}

var benchSizes = []int{512, 4096, 65536, 1048576}

// BenchmarkXTS measures one Encrypt call over a run of 4096-byte units (a
// single 512-byte unit for size 512), per implementation, with
// golang.org/x/crypto/xts as "xcrypto".
func BenchmarkXTS(b *testing.B) {
	key := fromHex(b, ieee1619Key)
	for _, im := range impls() {
		b.Run(im.String(), func(b *testing.B) {
			for _, size := range benchSizes {
				unitSize := min(size, 4096)
				x := mustXTS(b, im, key, unitSize)
				buf := make([]byte, size)
				b.Run(fmt.Sprint(size), func(b *testing.B) {
					b.SetBytes(int64(size))
					b.ReportAllocs()
					for i := 0; b.Loop(); i++ {
						x.Encrypt(buf, buf, uint64(i))
					}
				})
			}
		})
	}
	b.Run("xcrypto", func(b *testing.B) {
		c, err := xts.NewCipher(aes.NewCipher, key)
		if err != nil {
			b.Fatal(err)
		}
		for _, size := range benchSizes {
			unitSize := min(size, 4096)
			buf := make([]byte, size)
			b.Run(fmt.Sprint(size), func(b *testing.B) {
				b.SetBytes(int64(size))
				b.ReportAllocs()
				for i := 0; b.Loop(); i++ {
					for u := 0; u < size; u += unitSize {
						c.Encrypt(buf[u:u+unitSize], buf[u:u+unitSize], uint64(i)+uint64(u/unitSize))
					}
				}
			})
		}
	})
}

// BenchmarkXTSSectors runs 512-byte data units, a volume's default, over
// request-sized runs: what hemd pays for a 4 KiB or 128 KiB request.
func BenchmarkXTSSectors(b *testing.B) {
	key := fromHex(b, ieee1619Key)
	for _, im := range impls() {
		x := mustXTS(b, im, key, 512)
		for _, size := range []int{4096, 131072} {
			buf := make([]byte, size)
			b.Run(fmt.Sprintf("%s/%d", im, size), func(b *testing.B) {
				b.SetBytes(int64(size))
				b.ReportAllocs()
				for i := 0; b.Loop(); i++ {
					x.Decrypt(buf, buf, uint64(i)*uint64(size/512))
				}
			})
		}
	}
}
