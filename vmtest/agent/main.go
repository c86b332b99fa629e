// Command agent runs inside the VM tests' guests (a static binary in the
// initramfs) and does the byte work busybox cannot: it writes and verifies
// the test pattern over a whole disk with O_DIRECT, from several goroutines
// so that several virtqueues carry I/O. It prints one result line:
//
//	HEMD-RESULT ok <what> ...   or   HEMD-RESULT fail <what> <why>
package main

import (
	"bytes"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"unsafe"

	"github.com/hemd/hemd/vmtest/pattern"
)

const chunk = 256 << 10

func main() {
	if len(os.Args) == 5 && os.Args[1] == "marker" {
		// agent marker DEVICE OFFSET TEXT: a buffered write then fsync,
		// which the kernel turns into a FLUSH request.
		off, _ := strconv.ParseInt(os.Args[3], 10, 64)
		if err := marker(os.Args[2], off, os.Args[4]); err != nil {
			fmt.Printf("HEMD-RESULT fail marker %v\n", err)
			os.Exit(1)
		}
		fmt.Println("HEMD-RESULT ok marker fsynced")
		return
	}
	if len(os.Args) == 4 && os.Args[1] == "find" {
		// agent find DEVICE TEXT: the byte offset of TEXT on the device.
		off, err := find(os.Args[2], os.Args[3])
		if err != nil {
			fmt.Printf("HEMD-RESULT fail find %v\n", err)
			os.Exit(1)
		}
		fmt.Println(off)
		return
	}
	if len(os.Args) < 5 || os.Args[1] != "pattern" {
		fmt.Println("usage: agent pattern write|verify DEVICE SEED [WORKERS] | agent marker DEVICE OFFSET TEXT")
		os.Exit(2)
	}
	op, dev := os.Args[2], os.Args[3]
	seed, _ := strconv.ParseUint(os.Args[4], 10, 64)
	workers := runtime.NumCPU() * 2
	if len(os.Args) > 5 {
		workers, _ = strconv.Atoi(os.Args[5])
	}
	n, err := run(op, dev, seed, workers)
	if err != nil {
		fmt.Printf("HEMD-RESULT fail pattern-%s %v\n", op, err)
		os.Exit(1)
	}
	fmt.Printf("HEMD-RESULT ok pattern-%s bytes=%d workers=%d\n", op, n, workers)
}

// alignedBuf returns chunk bytes aligned for O_DIRECT.
func alignedBuf() []byte {
	b := make([]byte, chunk+4096)
	off := int(4096 - uintptr(unsafe.Pointer(&b[0]))%4096)
	return b[off : off+chunk]
}

func run(op, dev string, seed uint64, workers int) (int64, error) {
	flag := os.O_RDONLY
	if op == "write" {
		flag = os.O_WRONLY
	}
	f, err := os.OpenFile(dev, flag|syscall.O_DIRECT, 0)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	size, err := f.Seek(0, 2)
	if err != nil {
		return 0, err
	}
	chunks := (size + chunk - 1) / chunk
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			buf := alignedBuf()
			for c := int64(w); c < chunks; c += int64(workers) {
				off := c * chunk
				n := min(int64(chunk), size-off)
				b := buf[:n]
				if op == "write" {
					pattern.Fill(b, uint64(off), seed)
					if _, err := f.WriteAt(b, off); err != nil {
						errs <- fmt.Errorf("write at %d: %w", off, err)
						return
					}
					continue
				}
				if _, err := f.ReadAt(b, off); err != nil {
					errs <- fmt.Errorf("read at %d: %w", off, err)
					return
				}
				if i := pattern.Check(b, uint64(off), seed); i >= 0 {
					errs <- fmt.Errorf("mismatch at byte %d", off+int64(i))
					return
				}
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return 0, err
	}
	if op == "write" {
		if err := f.Sync(); err != nil {
			return 0, fmt.Errorf("fsync: %w", err)
		}
	}
	return size, nil
}

func marker(dev string, off int64, text string) error {
	f, err := os.OpenFile(dev, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	b := make([]byte, 4096)
	copy(b, text)
	if _, err := f.WriteAt(b, off); err != nil {
		return err
	}
	return f.Sync()
}

func find(dev, text string) (int64, error) {
	f, err := os.Open(dev)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	buf := make([]byte, chunk+len(text))
	for off := int64(0); ; off += chunk {
		n, err := f.ReadAt(buf, off)
		if i := bytes.Index(buf[:n], []byte(text)); i >= 0 {
			return off + int64(i), nil
		}
		if err != nil {
			return 0, fmt.Errorf("%q not found", text)
		}
	}
}
