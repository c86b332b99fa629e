package memscan

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"github.com/hemd/hemd/hem/datakey"
)

func testKey() []byte { return fillKey(make([]byte, 64)) }

// fillKey writes the test key into k.
func fillKey(k []byte) []byte {
	for i := range k {
		k[i] = byte(i*37 + 11)
	}
	return k
}

// TestWindowsMatchEncodings: every encoding of the key, at any offset in a
// longer string, contains windows of its kind; a different key's do not.
func TestWindowsMatchEncodings(t *testing.T) {
	key := testKey()
	wins := Windows(key)
	for pad := range 3 {
		prefixed := append(bytes.Repeat([]byte{'x'}, pad), key...)
		for _, enc := range []struct{ kind, s string }{
			{"base64", base64.StdEncoding.EncodeToString(prefixed)},
			{"hex", hex.EncodeToString(prefixed)},
			{"raw", string(prefixed)},
		} {
			found := 0
			for _, w := range wins {
				if w.Kind == enc.kind && bytes.Contains([]byte(enc.s), w.Bytes) {
					found++
				}
			}
			if found < 2 {
				t.Errorf("%s with %d bytes before the key: %d windows found", enc.kind, pad, found)
			}
		}
	}
	other := testKey()
	other[0] ^= 1
	other[63] ^= 1
	for _, w := range Windows(other) {
		if w.Kind == "raw" && bytes.Contains(key, w.Bytes) && !bytes.Equal(w.Bytes, key[16:32]) && !bytes.Equal(w.Bytes, key[32:48]) {
			t.Fatal("a window of another key matched")
		}
	}
}

// TestMain makes the test binary the scanned process too: with
// MEMSCAN_CHILD set it puts the key in a locked page and its hex on the
// heap, says so, and waits for a line on stdin to wipe both, then for EOF.
func TestMain(m *testing.M) {
	if os.Getenv("MEMSCAN_CHILD") == "" {
		os.Exit(m.Run())
	}
	l, err := datakey.NewLocked(4096)
	if err != nil {
		fmt.Println("error", err)
		os.Exit(1)
	}
	key := fillKey(l.Bytes()[100:164]) // never on the heap raw
	h := make([]byte, hex.EncodedLen(len(key)))
	hex.Encode(h, key)
	in := bufio.NewReader(os.Stdin)
	fmt.Println("holding")
	in.ReadString('\n')
	clear(l.Bytes())
	clear(h)
	runtime.KeepAlive(h)
	fmt.Println("wiped")
	in.ReadString('\n')
	os.Exit(0)
}

// TestScanChild scans a process that holds the key in a locked page and
// its hex on the heap: both are found, the first said to be locked; once
// it wiped them, neither is.
func TestScanChild(t *testing.T) {
	cmd := exec.Command(os.Args[0], "-test.run", "^$")
	cmd.Env = append(os.Environ(), "MEMSCAN_CHILD=1")
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	defer stdin.Close()
	out := bufio.NewReader(stdout)
	expect := func(want string) {
		t.Helper()
		line, err := out.ReadString('\n')
		if err != nil || strings.TrimSpace(line) != want {
			t.Fatalf("child said %q, %v; want %q", line, err, want)
		}
	}
	expect("holding")
	wins := Windows(testKey())
	hits, scanned, err := Scan(cmd.Process.Pid, wins)
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[string]bool{}
	for _, h := range hits {
		kinds[fmt.Sprintf("%s %v", h.Kind, h.Locked)] = true
	}
	if !kinds["raw true"] || !kinds["hex false"] || kinds["raw false"] || scanned < 1<<20 {
		t.Fatalf("%d bytes scanned, found %v:\n%v", scanned, kinds, hits)
	}
	fmt.Fprintln(stdin, "wipe")
	expect("wiped")
	if hits, _, err = Scan(cmd.Process.Pid, wins); err != nil || len(hits) > 0 {
		t.Fatalf("after wiping: %v %v", hits, err)
	}
}
