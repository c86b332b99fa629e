package vmtest

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// DiffRAM saves the first mib MiB of guest memory of two stopped VMs (the
// source of a migration after it, the destination before it runs: -S) and
// logs the 4 KiB pages that differ, returning how many do (differ). A
// migration leaves none: every page the source's vCPUs or back-ends wrote
// reached the destination. It saves the source's memory again half a
// second later and counts the pages that changed meanwhile (late): a
// back-end that writes guest memory after its rings stopped.
func DiffRAM(t testing.TB, src, dst *VM, mib int) (differ, late int) {
	t.Helper()
	dir := t.TempDir()
	save := func(vm *VM, name string) []byte {
		f := filepath.Join(dir, name)
		if err := vm.QMPT().Execute(context.Background(), "pmemsave",
			map[string]any{"val": 0, "size": mib << 20, "filename": f}, nil); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	a, b := save(src, "src.ram"), save(dst, "dst.ram")
	time.Sleep(500 * time.Millisecond)
	if a2 := save(src, "src2.ram"); !bytes.Equal(a, a2) {
		for p := 0; p+4096 <= len(a); p += 4096 {
			if !bytes.Equal(a[p:p+4096], a2[p:p+4096]) {
				if late++; late <= 10 {
					t.Logf("source page %#x changed after the migration", p)
				}
			}
		}
	}
	for p := 0; p+4096 <= len(a) && p+4096 <= len(b); p += 4096 {
		x, y := a[p:p+4096], b[p:p+4096]
		if bytes.Equal(x, y) {
			continue
		}
		if differ++; differ > 20 {
			continue
		}
		first, last, cnt := -1, -1, 0
		for k := range x {
			if x[k] != y[k] {
				if first < 0 {
					first = k
				}
				last, cnt = k, cnt+1
			}
		}
		t.Logf("page %#x differs: %d bytes in [%#x, %#x]; source %x, destination %x", p, cnt, first, last,
			x[first:min(first+32, 4096)], y[first:min(first+32, 4096)])
	}
	return differ, late
}
