package datakey

import (
	"fmt"
	"unsafe"
)

func uintptrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[0])) }

func fmtSscanf(s string, lo, hi *uint64) (int, error) { return fmt.Sscanf(s, "%x-%x", lo, hi) }
