//go:build amd64 && !purego

package hem

import "golang.org/x/sys/cpu"

//go:generate go run xts_amd64_gen.go

// tweakChunk is how many units' tweaks are encrypted ahead, 8 at a time.
const tweakChunk = 16

var (
	hasAESNI   = cpu.X86.HasAES
	hasVAES256 = cpu.X86.HasAES && cpu.X86.HasAVX2 && cpuHasVAESAndVPCLMULQDQ()
	hasVAES512 = cpu.X86.HasAES && cpu.X86.HasAVX512F && cpu.X86.HasAVX512BW && cpu.X86.HasAVX512VL &&
		cpu.X86.HasAVX512VAES && cpu.X86.HasAVX512VPCLMULQDQ
)

// cpuHasVAESAndVPCLMULQDQ reads CPUID leaf 7 itself: x/sys/cpu reports VAES
// and VPCLMULQDQ only together with AVX-512, but the VEX (YMM) forms exist
// on AVX2-only CPUs too. The caller checks OS support through HasAVX2.
func cpuHasVAESAndVPCLMULQDQ() bool {
	_, ecx := cpuid7()
	return ecx&(1<<9) != 0 && ecx&(1<<10) != 0
}

func bestImpl() impl {
	switch {
	case hasVAES512:
		return implVAES512
	case hasVAES256:
		return implVAES256
	case hasAESNI:
		return implAESNI
	}
	return implGeneric
}

func implSupported(im impl) bool {
	switch im {
	case implGeneric:
		return true
	case implAESNI:
		return hasAESNI
	case implVAES256:
		return hasVAES256
	case implVAES512:
		return hasVAES512
	}
	return false
}

func cpuid7() (ebx, ecx uint32)

// aesniEncryptBlocks encrypts the first n blocks of buf in place (n a
// multiple of 8, at most tweakChunk).
//
//go:noescape
func aesniEncryptBlocks(rk *roundKeys, buf *[tweakChunk * 16]byte, n int)

// The XTS cores: units data units of unitBlocks blocks each (a multiple of
// 16) from src to dst, unit k with the encrypted tweak tw[16k:16k+16]. rk is
// the data key's encryption or decryption schedule.

//go:noescape
func xtsEncAESNI(rk *roundKeys, tw *[tweakChunk * 16]byte, dst, src *byte, units, unitBlocks int)

//go:noescape
func xtsDecAESNI(rk *roundKeys, tw *[tweakChunk * 16]byte, dst, src *byte, units, unitBlocks int)

//go:noescape
func xtsEncVAES256(rk *roundKeys, tw *[tweakChunk * 16]byte, dst, src *byte, units, unitBlocks int)

//go:noescape
func xtsDecVAES256(rk *roundKeys, tw *[tweakChunk * 16]byte, dst, src *byte, units, unitBlocks int)

// The VAES-512 cores encrypt the tweaks themselves, with the tweak-key
// schedule tk, starting from the 128-bit unit number hi:lo.

//go:noescape
func xtsEncVAES512(rk, tk *roundKeys, dst, src *byte, units, unitBlocks int, lo, hi uint64)

//go:noescape
func xtsDecVAES512(rk, tk *roundKeys, dst, src *byte, units, unitBlocks int, lo, hi uint64)

// cryptAsm runs the assembly core x.impl over src, tweakChunk units at a
// time: it writes the chunk's 128-bit unit numbers, encrypts them with the
// tweak key, then hands the chunk to the core.
func cryptAsm(x *XTS, dst, src []byte, unit uint64, decrypt bool) {
	rk := x.encKeys()
	if decrypt {
		rk = x.decKeys()
	}
	us := x.unitSize
	if x.impl == implVAES512 {
		if decrypt {
			xtsDecVAES512(rk, x.twkKeys(), &dst[0], &src[0], len(src)/us, us/blockSize, unit, 0)
		} else {
			xtsEncVAES512(rk, x.twkKeys(), &dst[0], &src[0], len(src)/us, us/blockSize, unit, 0)
		}
		return
	}
	var tw [tweakChunk * 16]byte
	lo, hi := unit, uint64(0)
	for len(src) > 0 {
		n := min(len(src)/us, tweakChunk)
		for k := range n {
			putTweak(tw[16*k:], lo, hi)
			lo++
			if lo == 0 {
				hi++
			}
		}
		aesniEncryptBlocks(x.twkKeys(), &tw, (n+7)&^7)
		// Direct calls, so that escape analysis sees go:noescape.
		switch {
		case x.impl == implVAES256 && !decrypt:
			xtsEncVAES256(rk, &tw, &dst[0], &src[0], n, us/blockSize)
		case x.impl == implVAES256:
			xtsDecVAES256(rk, &tw, &dst[0], &src[0], n, us/blockSize)
		case !decrypt:
			xtsEncAESNI(rk, &tw, &dst[0], &src[0], n, us/blockSize)
		default:
			xtsDecAESNI(rk, &tw, &dst[0], &src[0], n, us/blockSize)
		}
		src, dst = src[n*us:], dst[n*us:]
	}
	clear(tw[:])
}
