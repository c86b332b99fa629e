// Package memscan looks for a data key in a running process's memory, as
// hemd's tests do to check key custody: the key raw, in base64 and in hex,
// in windows long enough not to match by chance, each hit with the mapping
// it is in and whether that mapping is locked and kept out of core dumps
// (the key page's protections). Reading another process's memory needs
// ptrace rights over it (root, or CAP_SYS_PTRACE: hemd is non-dumpable).
package memscan

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Window is a run of bytes that only a copy of the key would contain.
type Window struct {
	Kind  string // "raw", "base64", "hex" or the caller's own
	Bytes []byte
}

// Windows returns the windows of key: its 16-byte quarters (of a 64-byte
// key; any length works) raw, 20-character pieces of its base64 at each of
// the three byte alignments a key can have inside a longer encoded string,
// and 32-character pieces of its hex, lower and upper case.
func Windows(key []byte) []Window {
	var out []Window
	for i := 0; i+16 <= len(key); i += 16 {
		out = append(out, Window{"raw", key[i : i+16]})
	}
	for shift := range 3 {
		// Bytes key[shift:] start on a 3-byte boundary: their base64 is
		// what any encoding of a string holding the key at that alignment
		// contains (but for the last, partial group).
		full := (len(key) - shift) / 3 * 3
		enc := base64.StdEncoding.EncodeToString(key[shift : shift+full])
		for i := 0; i+20 <= len(enc); i += 20 {
			out = append(out, Window{"base64", []byte(enc[i : i+20])})
		}
	}
	h := hex.EncodeToString(key)
	for i := 0; i+32 <= len(h); i += 32 {
		out = append(out, Window{"hex", []byte(h[i : i+32])})
		out = append(out, Window{"hex", []byte(strings.ToUpper(h[i : i+32]))})
	}
	return out
}

// Hit is a window found in memory.
type Hit struct {
	Window  int // index in the windows scanned for
	Kind    string
	Addr    uint64
	Mapping string // the line of /proc/PID/maps
	// Locked: the mapping is mlocked and MADV_DONTDUMP (VmFlags lo, dd),
	// as hemd's key page and locked scratch memory are.
	Locked bool
}

func (h Hit) String() string {
	return fmt.Sprintf("window %d (%s) at %#x, locked %v, in %s", h.Window, h.Kind, h.Addr, h.Locked, h.Mapping)
}

// mapping is one region of /proc/PID/smaps.
type mapping struct {
	lo, hi uint64
	line   string
	read   bool
	locked bool
}

func mappings(pid int) ([]mapping, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []mapping
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		fields := strings.Fields(line)
		if len(fields) >= 2 && strings.Contains(fields[0], "-") && !strings.HasSuffix(fields[0], ":") {
			r := strings.SplitN(fields[0], "-", 2)
			lo, err1 := strconv.ParseUint(r[0], 16, 64)
			hi, err2 := strconv.ParseUint(r[1], 16, 64)
			if err1 != nil || err2 != nil {
				continue
			}
			out = append(out, mapping{lo: lo, hi: hi, line: line, read: fields[1][0] == 'r' &&
				!strings.Contains(line, "[vvar") && !strings.Contains(line, "[vsyscall]")})
			continue
		}
		if strings.HasPrefix(line, "VmFlags:") && len(out) > 0 {
			flags := strings.Fields(line)[1:]
			out[len(out)-1].locked = contains(flags, "lo") && contains(flags, "dd")
		}
	}
	return out, sc.Err()
}

func contains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// Scan reads every readable mapping of process pid and returns where the
// windows are, and how many bytes it read.
func Scan(pid int, wins []Window) ([]Hit, int64, error) {
	maps, err := mappings(pid)
	if err != nil {
		return nil, 0, err
	}
	mem, err := os.Open(fmt.Sprintf("/proc/%d/mem", pid))
	if err != nil {
		return nil, 0, err
	}
	defer mem.Close()
	longest := 0
	for _, w := range wins {
		longest = max(longest, len(w.Bytes))
	}
	var hits []Hit
	var scanned int64
	const chunk = 1 << 20
	buf := make([]byte, chunk+longest)
	for _, m := range maps {
		if !m.read {
			continue
		}
		for off := m.lo; off < m.hi; off += chunk {
			// Read a little past the chunk so that a window across its end
			// is found (once: in the chunk it starts in).
			n := min(m.hi-off, chunk+uint64(longest))
			k, _ := mem.ReadAt(buf[:n], int64(off))
			scanned += int64(min(k, chunk))
			for i, w := range wins {
				data := buf[:k]
				for base := 0; ; {
					j := bytes.Index(data[base:], w.Bytes)
					if j < 0 || base+j >= chunk {
						break
					}
					hits = append(hits, Hit{Window: i, Kind: w.Kind, Addr: off + uint64(base+j), Mapping: m.line, Locked: m.locked})
					base += j + 1
				}
			}
		}
	}
	return hits, scanned, nil
}
