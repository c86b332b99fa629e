//go:build amd64 && !purego

package hem

import "golang.org/x/sys/cpu"

//go:generate go run xts_amd64_gen.go

var (
	hasAESNI   = cpu.X86.HasAES && cpu.X86.HasPCLMULQDQ
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

// The XTS cores (see xts_amd64_gen.go): units data units of unitBlocks
// blocks each (a multiple of 16) from src to dst, starting at the 128-bit
// unit number hi:lo. rk is the data key's encryption or decryption schedule,
// tk the tweak key's encryption schedule.

//go:noescape
func xtsEncAESNI(rk, tk *roundKeys, dst, src *byte, units, unitBlocks int, lo, hi uint64)

//go:noescape
func xtsDecAESNI(rk, tk *roundKeys, dst, src *byte, units, unitBlocks int, lo, hi uint64)

//go:noescape
func xtsEncVAES256(rk, tk *roundKeys, dst, src *byte, units, unitBlocks int, lo, hi uint64)

//go:noescape
func xtsDecVAES256(rk, tk *roundKeys, dst, src *byte, units, unitBlocks int, lo, hi uint64)

//go:noescape
func xtsEncVAES512(rk, tk *roundKeys, dst, src *byte, units, unitBlocks int, lo, hi uint64)

//go:noescape
func xtsDecVAES512(rk, tk *roundKeys, dst, src *byte, units, unitBlocks int, lo, hi uint64)

// cryptAsm runs the assembly core x.impl over the whole run in one call.
// Direct calls (no function values) keep escape analysis seeing go:noescape.
func cryptAsm(x *XTS, dst, src []byte, unit uint64, decrypt bool) {
	rk, tk := x.encKeys(), x.twkKeys()
	if decrypt {
		rk = x.decKeys()
	}
	d, s, n, ub := &dst[0], &src[0], len(src)/x.unitSize, x.unitSize/blockSize
	switch {
	case x.impl == implVAES512 && !decrypt:
		xtsEncVAES512(rk, tk, d, s, n, ub, unit, 0)
	case x.impl == implVAES512:
		xtsDecVAES512(rk, tk, d, s, n, ub, unit, 0)
	case x.impl == implVAES256 && !decrypt:
		xtsEncVAES256(rk, tk, d, s, n, ub, unit, 0)
	case x.impl == implVAES256:
		xtsDecVAES256(rk, tk, d, s, n, ub, unit, 0)
	case !decrypt:
		xtsEncAESNI(rk, tk, d, s, n, ub, unit, 0)
	default:
		xtsDecAESNI(rk, tk, d, s, n, ub, unit, 0)
	}
}
