package main

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hemd/hemd/vmtest/pattern"
)

// The soak: WORKERS goroutines each own the region's 4 KiB blocks whose
// index (from the region's start) is w modulo WORKERS. Each loops for
// SECONDS: pick one of its blocks, write its next generation (O_DIRECT |
// O_DSYNC), and count that generation as acked only once the write has
// returned; every third write, read back one of its acked blocks and check
// it holds its acked generation. I/O is never timed out here: a stalled
// back-end (a restart, a paused VM) only makes the soak slower. At the end
// every block of the region is read: a written block must hold exactly its
// last acked generation; a block never written is not checked for content
// (it holds whatever was there) but must not carry this soak's header, which
// would mean a write landed on the wrong block (so soak a region again
// with another seed).
//
// A block is a 32-byte header (magic, absolute block number, generation,
// seed; little endian) and filler from vmtest/pattern determined by (seed,
// block, generation).

const (
	soakBlock  = 4096
	soakMagic  = 0x4b414f53444d4548 // "HEMDSOAK"
	soakHeader = 32
)

// soakFill writes the content of block blk at generation gen into b.
func soakFill(b []byte, blk, gen, seed uint64) {
	binary.LittleEndian.PutUint64(b[0:], soakMagic)
	binary.LittleEndian.PutUint64(b[8:], blk)
	binary.LittleEndian.PutUint64(b[16:], gen)
	binary.LittleEndian.PutUint64(b[24:], seed)
	pattern.Fill(b[soakHeader:soakBlock], blk*soakBlock+soakHeader, seed^gen*0xd1b54a32d192ed03)
}

// soakDescribe says what a block that is not what was expected holds.
func soakDescribe(b []byte, seed uint64) string {
	magic := binary.LittleEndian.Uint64(b[0:])
	if magic != soakMagic {
		zero := bytes.Count(b[:soakBlock], []byte{0}) == soakBlock
		return fmt.Sprintf("no soak header (first bytes %x, all zero %v)", b[:16], zero)
	}
	blk, gen, s := binary.LittleEndian.Uint64(b[8:]), binary.LittleEndian.Uint64(b[16:]), binary.LittleEndian.Uint64(b[24:])
	want := make([]byte, soakBlock)
	soakFill(want, blk, gen, s)
	filler := "intact"
	if !bytes.Equal(b[:soakBlock], want) {
		filler = "corrupt"
	}
	return fmt.Sprintf("header block=%d gen=%d seed=%d (this soak's seed %d), filler %s", blk, gen, s, seed, filler)
}

type soak struct {
	f       *os.File
	off     int64 // region start, bytes
	n       int   // blocks in the region
	workers int
	seed    uint64
	acked   []uint64 // last acked generation per region block; 0: never written
	writes  atomic.Int64
	reads   atomic.Int64
	failed  atomic.Bool
	errOnce sync.Once
	err     error
}

func soakMain(args []string) int {
	dev := args[0]
	secs, err1 := strconv.Atoi(args[1])
	workers, err2 := strconv.Atoi(args[2])
	off, err3 := strconv.ParseInt(args[3], 10, 64)
	length, err4 := strconv.ParseInt(args[4], 10, 64)
	seed, err5 := strconv.ParseUint(args[5], 10, 64)
	for _, err := range []error{err1, err2, err3, err4, err5} {
		if err != nil {
			fmt.Printf("HEMD-RESULT fail soak arguments: %v\n", err)
			return 2
		}
	}
	if secs <= 0 || workers <= 0 || off < 0 || length <= 0 || off%soakBlock != 0 || length%soakBlock != 0 || length/soakBlock < int64(workers) {
		fmt.Printf("HEMD-RESULT fail soak arguments: seconds %d workers %d offset %d length %d (4 KiB aligned, a block per worker at least)\n",
			secs, workers, off, length)
		return 2
	}
	f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT|syscall.O_DSYNC, 0)
	if err != nil {
		fmt.Printf("HEMD-RESULT fail soak %v\n", err)
		return 1
	}
	defer f.Close()
	if end, err := f.Seek(0, 2); err != nil || off+length > end {
		fmt.Printf("HEMD-RESULT fail soak region %d+%d does not fit the device (size %d, %v)\n", off, length, end, err)
		return 1
	}
	s := &soak{f: f, off: off, n: int(length / soakBlock), workers: workers, seed: seed}
	s.acked = make([]uint64, s.n)
	start := time.Now()
	deadline := start.Add(time.Duration(secs) * time.Second)

	stop := make(chan struct{})
	progress := make(chan struct{})
	go func() {
		defer close(progress)
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				fmt.Printf("HEMD-SOAK t=%.0fs writes=%d reads=%d\n", time.Since(start).Seconds(), s.writes.Load(), s.reads.Load())
			}
		}
	}()
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			if err := s.worker(w, deadline); err != nil {
				s.fail(err)
			}
		}(w)
	}
	wg.Wait()
	close(stop)
	<-progress
	if s.err != nil {
		fmt.Printf("HEMD-RESULT fail soak %v (after writes=%d reads=%d)\n", s.err, s.writes.Load(), s.reads.Load())
		return 1
	}
	written, err := s.verifyAll()
	if err != nil {
		fmt.Printf("HEMD-RESULT fail soak final check: %v (writes=%d reads=%d)\n", err, s.writes.Load(), s.reads.Load())
		return 1
	}
	fmt.Printf("HEMD-RESULT ok soak writes=%d reads=%d blocks=%d written=%d\n", s.writes.Load(), s.reads.Load(), s.n, written)
	return 0
}

func (s *soak) fail(err error) {
	s.errOnce.Do(func() { s.err = err })
	s.failed.Store(true)
}

// blk is the absolute block number of region block i.
func (s *soak) blk(i int) uint64 { return uint64(s.off/soakBlock) + uint64(i) }

func (s *soak) worker(w int, deadline time.Time) error {
	var own []int
	for i := w; i < s.n; i += s.workers {
		own = append(own, i)
	}
	rng := rand.New(rand.NewPCG(s.seed, uint64(w)))
	buf := alignedBuf()
	wb, rb, want := buf[:soakBlock], buf[soakBlock:2*soakBlock], make([]byte, soakBlock)
	var acked []int // own blocks written at least once
	for k := 0; time.Now().Before(deadline) && !s.failed.Load(); k++ {
		i := own[rng.IntN(len(own))]
		gen := s.acked[i] + 1
		soakFill(wb, s.blk(i), gen, s.seed)
		if _, err := s.f.WriteAt(wb, s.off+int64(i)*soakBlock); err != nil {
			return fmt.Errorf("write block %d gen %d: %w", s.blk(i), gen, err)
		}
		if s.acked[i] == 0 {
			acked = append(acked, i)
		}
		s.acked[i] = gen
		s.writes.Add(1)
		if k%3 != 2 {
			continue
		}
		j := acked[rng.IntN(len(acked))]
		if _, err := s.f.ReadAt(rb, s.off+int64(j)*soakBlock); err != nil {
			return fmt.Errorf("read block %d (acked gen %d): %w", s.blk(j), s.acked[j], err)
		}
		soakFill(want, s.blk(j), s.acked[j], s.seed)
		if !bytes.Equal(rb, want) {
			return fmt.Errorf("read-back of block %d: acked gen %d, read %s", s.blk(j), s.acked[j], soakDescribe(rb, s.seed))
		}
		s.reads.Add(1)
	}
	return nil
}

// verifyAll reads the whole region and checks every block; it returns how
// many blocks were written.
func (s *soak) verifyAll() (int, error) {
	buf := alignedBuf()
	want := make([]byte, soakBlock)
	written := 0
	per := len(buf) / soakBlock
	for first := 0; first < s.n; first += per {
		cnt := min(per, s.n-first)
		b := buf[:cnt*soakBlock]
		if _, err := s.f.ReadAt(b, s.off+int64(first)*soakBlock); err != nil {
			return written, fmt.Errorf("read blocks %d..%d: %w", s.blk(first), s.blk(first+cnt-1), err)
		}
		for k := 0; k < cnt; k++ {
			i := first + k
			got := b[k*soakBlock : (k+1)*soakBlock]
			if gen := s.acked[i]; gen > 0 {
				written++
				soakFill(want, s.blk(i), gen, s.seed)
				if !bytes.Equal(got, want) {
					return written, fmt.Errorf("block %d: acked gen %d, holds %s", s.blk(i), gen, soakDescribe(got, s.seed))
				}
				continue
			}
			if binary.LittleEndian.Uint64(got[0:]) == soakMagic && binary.LittleEndian.Uint64(got[24:]) == s.seed {
				return written, fmt.Errorf("block %d was never written by this soak but holds %s", s.blk(i), soakDescribe(got, s.seed))
			}
		}
	}
	return written, nil
}
