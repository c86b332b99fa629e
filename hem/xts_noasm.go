//go:build !amd64 || purego

package hem

func bestImpl() impl { return implGeneric }

func implSupported(im impl) bool { return im == implGeneric }

func cryptAsm(x *XTS, dst, src []byte, unit uint64, decrypt bool) {
	panic("hem: no assembly implementation")
}
