// Package hem implements AES-256-XTS (IEEE Std 1619) for hemd's data path,
// at the speed of the hardware (AES-NI and VAES/AVX-512 assembly chosen at
// run time, a portable fallback elsewhere) and with a key schedule that
// lives in memory hem owns, so that Wipe can zeroize every trace of the key.
package hem

import (
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"sync/atomic"
	"unsafe"
)

const (
	// KeySize is the size of an AES-256-XTS key: the data key followed by
	// the tweak key, 32 bytes each.
	KeySize = 64

	// ScheduleSize is the number of bytes of key memory NewXTSIn needs: the
	// encryption and decryption schedules of the data key and the
	// encryption schedule of the tweak key.
	ScheduleSize = 3 * roundKeysSize

	offEnc = 0
	offDec = roundKeysSize
	offTwk = 2 * roundKeysSize

	blockSize = 16
	// maxUnitBlocks is IEEE 1619's limit on the size of a data unit.
	maxUnitBlocks = 1 << 20
)

// Errors returned by the constructors.
var (
	ErrKeySize     = errors.New("hem: XTS key must be 64 bytes")
	ErrEqualHalves = errors.New("hem: XTS key halves are equal")
	ErrUnitSize    = errors.New("hem: XTS data unit size must be 512 or 4096 bytes")
	ErrKeyMemory   = errors.New("hem: key memory smaller than ScheduleSize")
	ErrSelfTest    = errors.New("hem: XTS self-test failed")
)

// impl names an implementation of the XTS core.
type impl uint8

const (
	implGeneric impl = iota
	implAESNI
	implVAES256
	implVAES512
)

func (i impl) String() string {
	switch i {
	case implAESNI:
		return "aesni"
	case implVAES256:
		return "vaes256"
	case implVAES512:
		return "vaes512"
	}
	return "generic"
}

// XTS encrypts and decrypts runs of whole data units with AES-256-XTS. Unit
// k of a run that starts at unit number n uses the tweak n+k, a 128-bit
// little-endian number (dm-crypt's aes-xts-plain64 with iv_large_sectors).
// Its methods may be called from several goroutines at once, except Wipe.
type XTS struct {
	ks       *[ScheduleSize]byte // enc | dec | tweak-enc schedules
	own      *ownedMem           // non-nil if hem allocated ks
	unitSize int
	impl     impl
	wiped    atomic.Bool
}

// NewXTS returns an XTS for key with data units of unitSize bytes (512 or
// 4096). The key schedules are kept in memory hem allocates outside the Go
// heap; Wipe zeroes and frees it. key is not retained.
func NewXTS(key []byte, unitSize int) (*XTS, error) {
	if unitSize != 512 && unitSize != 4096 {
		return nil, fmt.Errorf("%w, got %d", ErrUnitSize, unitSize)
	}
	return newXTSImpl(bestImpl(), nil, key, unitSize)
}

// NewXTSIn is like NewXTS but keeps the key schedules in mem[:ScheduleSize],
// which the caller may have locked or excluded from core dumps. mem must not
// be used for anything else until Wipe has returned; Wipe zeroes it.
func NewXTSIn(mem, key []byte, unitSize int) (*XTS, error) {
	if len(mem) < ScheduleSize {
		return nil, fmt.Errorf("%w: %d bytes, need %d", ErrKeyMemory, len(mem), ScheduleSize)
	}
	if unitSize != 512 && unitSize != 4096 {
		return nil, fmt.Errorf("%w, got %d", ErrUnitSize, unitSize)
	}
	return newXTSImpl(bestImpl(), mem, key, unitSize)
}

// newXTSImpl builds an XTS on the given implementation; tests use it to run
// every implementation the CPU supports. unitSize may be any multiple of 256
// bytes here (the IEEE 1619 limit is checked), the public constructors only
// allow 512 and 4096.
func newXTSImpl(im impl, mem, key []byte, unitSize int) (*XTS, error) {
	if len(key) != KeySize {
		return nil, fmt.Errorf("%w, got %d", ErrKeySize, len(key))
	}
	if subtle.ConstantTimeCompare(key[:32], key[32:]) == 1 {
		return nil, ErrEqualHalves
	}
	if unitSize <= 0 || unitSize%256 != 0 {
		return nil, fmt.Errorf("%w, got %d", ErrUnitSize, unitSize)
	}
	if unitSize/blockSize > maxUnitBlocks {
		return nil, fmt.Errorf("%w: %d bytes is above the IEEE 1619 limit of 2^20 blocks", ErrUnitSize, unitSize)
	}
	if !implSupported(im) {
		return nil, fmt.Errorf("hem: XTS implementation %v not supported on this CPU", im)
	}
	x := &XTS{unitSize: unitSize, impl: im}
	if mem == nil {
		own, err := allocKeyMem(ScheduleSize)
		if err != nil {
			return nil, fmt.Errorf("hem: allocating XTS key memory: %w", err)
		}
		x.own = own
		mem = own.b
		runtime.AddCleanup(x, (*ownedMem).free, own)
	}
	x.ks = (*[ScheduleSize]byte)(mem[:ScheduleSize])
	expandKey(x.encKeys(), x.decKeys(), key[:32])
	expandKey(x.twkKeys(), nil, key[32:])
	if err := selfTest(x); err != nil {
		x.Wipe()
		return nil, err
	}
	return x, nil
}

func (x *XTS) encKeys() *roundKeys { return (*roundKeys)(x.ks[offEnc : offEnc+roundKeysSize]) }
func (x *XTS) decKeys() *roundKeys { return (*roundKeys)(x.ks[offDec : offDec+roundKeysSize]) }
func (x *XTS) twkKeys() *roundKeys { return (*roundKeys)(x.ks[offTwk : offTwk+roundKeysSize]) }

// UnitSize returns the size of a data unit in bytes.
func (x *XTS) UnitSize() int { return x.unitSize }

// Impl names the implementation in use: "vaes512", "vaes256", "aesni" or
// "generic".
func (x *XTS) Impl() string { return x.impl.String() }

// Encrypt encrypts src, a run of whole data units of which the first is unit
// number unit, into dst. dst and src may be the same slice but must not
// otherwise overlap. It panics if len(src) is not a multiple of UnitSize, if
// dst is shorter than src, or after Wipe.
func (x *XTS) Encrypt(dst, src []byte, unit uint64) { x.crypt(dst, src, unit, false) }

// Decrypt decrypts src, a run of whole data units of which the first is unit
// number unit, into dst, under the same rules as Encrypt.
func (x *XTS) Decrypt(dst, src []byte, unit uint64) { x.crypt(dst, src, unit, true) }

func (x *XTS) crypt(dst, src []byte, unit uint64, decrypt bool) {
	if x.wiped.Load() {
		panic("hem: XTS used after Wipe")
	}
	if len(src)%x.unitSize != 0 {
		panic(fmt.Sprintf("hem: XTS input of %d bytes is not a whole number of %d-byte data units", len(src), x.unitSize))
	}
	if len(dst) < len(src) {
		panic("hem: XTS output smaller than input")
	}
	if len(src) == 0 {
		return
	}
	dst = dst[:len(src)]
	if inexactOverlap(dst, src) {
		panic("hem: XTS invalid buffer overlap")
	}
	if x.impl == implGeneric {
		cryptGeneric(x, dst, src, unit, 0, decrypt)
	} else {
		cryptAsm(x, dst, src, unit, decrypt)
	}
	runtime.KeepAlive(x)
}

// Wipe zeroes the key schedules (and frees the key memory if hem allocated
// it). After Wipe, Encrypt and Decrypt panic. Wipe must not run at the same
// time as Encrypt or Decrypt.
func (x *XTS) Wipe() {
	if x.wiped.Swap(true) {
		return
	}
	clear(x.ks[:])
	runtime.KeepAlive(x.ks)
	if x.own != nil {
		x.own.free()
	}
	x.ks = nil
}

// inexactOverlap reports whether x and y share memory at any non-corresponding
// index (as crypto/internal/alias does).
func inexactOverlap(x, y []byte) bool {
	if len(x) == 0 || len(y) == 0 || &x[0] == &y[0] {
		return false
	}
	xs, ys := uintptr(unsafe.Pointer(&x[0])), uintptr(unsafe.Pointer(&y[0]))
	return xs <= ys+uintptr(len(y)-1) && ys <= xs+uintptr(len(x)-1)
}

// putTweak writes the 128-bit little-endian tweak (lo, hi) to b.
func putTweak(b []byte, lo, hi uint64) {
	binary.LittleEndian.PutUint64(b, lo)
	binary.LittleEndian.PutUint64(b[8:], hi)
}
