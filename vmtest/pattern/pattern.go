// Package pattern is the deterministic data the VM tests write: every
// 8-byte word depends on its byte offset on the disk and a seed, so a block
// written to the wrong place, lost, or left stale is told from the right one,
// both inside the guest and on the host.
package pattern

import "encoding/binary"

// Word is the pattern's 8 bytes at byte offset off (a multiple of 8).
func Word(off, seed uint64) uint64 {
	x := off ^ seed*0x9e3779b97f4a7c15
	x ^= x >> 31
	x *= 0xbf58476d1ce4e5b9
	return x ^ x>>29
}

// Fill writes the pattern for the disk range starting at off into b.
func Fill(b []byte, off, seed uint64) {
	for i := 0; i+8 <= len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], Word(off+uint64(i), seed))
	}
}

// Check returns the offset (relative to b) of the first word of b that is
// not the pattern for off, or -1.
func Check(b []byte, off, seed uint64) int {
	for i := 0; i+8 <= len(b); i += 8 {
		if binary.LittleEndian.Uint64(b[i:]) != Word(off+uint64(i), seed) {
			return i
		}
	}
	return -1
}
