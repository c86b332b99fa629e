// Command agent runs inside the VM tests' guests (a static binary in the
// initramfs) and does the byte work busybox cannot: it writes and verifies
// the test pattern over a whole disk with O_DIRECT, from several goroutines
// so that several virtqueues carry I/O, and it soaks a region of the disk
// with generation-tagged writes and read-backs (soak.go), or writes
// generation-tagged blocks and logs the order of its writes while the host
// takes snapshots (snapwrite.go). It prints one result line:
//
//	HEMD-RESULT ok <what> ...   or   HEMD-RESULT fail <what> <why>
//
// Usage:
//
//	agent pattern write|verify DEVICE SEED [WORKERS [OFFSET LENGTH]]
//	agent soak DEVICE SECONDS WORKERS OFFSET LENGTH SEED
//	agent snapwrite DEVICE CHANNEL WORKERS OFFSET LENGTH LOGOFFSET SEED MAXSECONDS
//	agent marker DEVICE OFFSET TEXT
//	agent find DEVICE TEXT
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
	if len(os.Args) == 8 && os.Args[1] == "soak" {
		os.Exit(soakMain(os.Args[2:]))
	}
	if len(os.Args) > 1 && os.Args[1] == "snapwrite" {
		os.Exit(snapwriteMain(os.Args[2:]))
	}
	if len(os.Args) < 5 || len(os.Args) == 7 || len(os.Args) > 8 || os.Args[1] != "pattern" {
		fmt.Println("usage: agent pattern write|verify DEVICE SEED [WORKERS [OFFSET LENGTH]] | " +
			"agent soak DEVICE SECONDS WORKERS OFFSET LENGTH SEED | " + snapwriteUsage + " | agent marker DEVICE OFFSET TEXT | agent find DEVICE TEXT")
		os.Exit(2)
	}
	op, dev := os.Args[2], os.Args[3]
	seed, _ := strconv.ParseUint(os.Args[4], 10, 64)
	workers := runtime.NumCPU() * 2
	if len(os.Args) > 5 {
		workers, _ = strconv.Atoi(os.Args[5])
	}
	var start, length int64 = 0, -1 // the whole disk
	if len(os.Args) == 8 {
		start, _ = strconv.ParseInt(os.Args[6], 10, 64)
		length, _ = strconv.ParseInt(os.Args[7], 10, 64)
		if start < 0 || length <= 0 || start%4096 != 0 || length%4096 != 0 {
			fmt.Printf("HEMD-RESULT fail pattern-%s offset %d length %d: not 4 KiB aligned\n", op, start, length)
			os.Exit(1)
		}
	}
	n, err := run(op, dev, seed, workers, start, length)
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

// run writes or verifies the pattern over [start, start+length) of dev
// (length -1: to the end) and returns the bytes done.
func run(op, dev string, seed uint64, workers int, start, length int64) (int64, error) {
	flag := os.O_RDONLY
	if op == "write" {
		flag = os.O_WRONLY
	}
	f, err := os.OpenFile(dev, flag|syscall.O_DIRECT, 0)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	end, err := f.Seek(0, 2)
	if err != nil {
		return 0, err
	}
	if length >= 0 {
		if start+length > end {
			return 0, fmt.Errorf("range %d+%d is past the disk's end %d", start, length, end)
		}
		end = start + length
	}
	size := end - start
	chunks := (size + chunk - 1) / chunk
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			buf := alignedBuf()
			for c := int64(w); c < chunks; c += int64(workers) {
				off := start + c*chunk
				n := min(int64(chunk), end-off)
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
