package main

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// snapwrite: the guest side of the snapshot tests (vmtest/snapshot_test.go).
// WORKERS goroutines write generation-tagged 4 KiB blocks (soakFill's
// layout) of the region [OFFSET, OFFSET+LENGTH) with O_DIRECT, one block at
// a time each (worker w owns the blocks whose index is w modulo WORKERS, so
// a block never has two writes in flight), until the host says "stop" on
// the channel (a serial port) or MAXSECONDS pass.
//
// Every write's issue (recorded before the write is submitted) and its
// acknowledgement (recorded after it returned) go into one event log, in
// one order for all workers. A line "mark N" from the host goes into the
// same log when the agent reads it, and is answered on the console with
// "HEMD-MARK N EVENT": the host sends one before it asks for a snapshot
// (and waits for the answer) and one after the snapshot command returned,
// so every event logged before the first mark happened before the
// snapshot was asked for, every event logged after the second after it
// was made.
//
// At the end the log is written to the device at LOGOFFSET (outside the
// region, O_DIRECT, then fsync), for the host to read from the volume:
//
//	a 4096-byte header: magic "HEMDSLOG" (uint64), version 1 (uint32),
//	record size 8 (uint32), events (uint64), seed (uint64), the region's
//	first block (uint64, absolute), its blocks (uint64), SHA-256 of the
//	records (32 bytes); all little endian;
//	then one 8-byte record per event: uint32 kind<<30 | id (id: the block's
//	index in the region, or the mark's number), uint32 microseconds since
//	the agent started.
const (
	snapLogMagic   = 0x474f4c53444d4548 // "HEMDSLOG"
	snapLogHeader  = 4096
	snapLogRecord  = 8
	evIssue        = 0
	evAck          = 1
	evMark         = 2
	snapwriteUsage = "agent snapwrite DEVICE CHANNEL WORKERS OFFSET LENGTH LOGOFFSET SEED MAXSECONDS"
)

type snapwrite struct {
	f       *os.File
	off     int64 // region start, bytes
	n       int   // blocks in the region
	workers int
	seed    uint64
	start   time.Time

	mu     sync.Mutex // orders the events
	events []uint64   // records: kind<<30|id, then µs, as one uint64 (low word first)

	writes atomic.Int64
	maxLat atomic.Int64 // µs
	stop   chan struct{}
	once   sync.Once
}

// event appends one event and returns its number.
func (s *snapwrite) event(kind, id uint32) int {
	us := uint32(time.Since(s.start).Microseconds())
	s.mu.Lock()
	defer s.mu.Unlock()
	s.events = append(s.events, uint64(kind<<30|id)|uint64(us)<<32)
	return len(s.events) - 1
}

func (s *snapwrite) halt() { s.once.Do(func() { close(s.stop) }) }

func snapwriteMain(args []string) int {
	fail := func(format string, a ...any) int {
		fmt.Printf("HEMD-RESULT fail snapwrite "+format+"\n", a...)
		return 1
	}
	if len(args) != 8 {
		fmt.Println("usage: " + snapwriteUsage)
		return 2
	}
	dev, channel := args[0], args[1]
	var nums [6]int64
	for i, a := range args[2:] {
		v, err := strconv.ParseInt(a, 10, 64)
		if err != nil {
			return fail("argument %q: %v (%s)", a, err, snapwriteUsage)
		}
		nums[i] = v
	}
	workers, off, length, logOff, seed, secs := int(nums[0]), nums[1], nums[2], nums[3], uint64(nums[4]), nums[5]
	if workers <= 0 || off < 0 || length <= 0 || off%soakBlock != 0 || length%soakBlock != 0 || length/soakBlock < int64(workers) ||
		logOff < off+length || logOff%soakBlock != 0 || secs <= 0 || length/soakBlock >= 1<<30 {
		return fail("arguments: workers %d offset %d length %d log offset %d seconds %d: want 4 KiB aligned, a block per worker, the log after the region",
			workers, off, length, logOff, secs)
	}
	f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		return fail("%v", err)
	}
	defer f.Close()
	end, err := f.Seek(0, 2)
	if err != nil || logOff+snapLogHeader > end {
		return fail("log offset %d does not fit the device (size %d, %v)", logOff, end, err)
	}
	ch, err := openRaw(channel)
	if err != nil {
		return fail("channel: %v", err)
	}
	defer ch.Close()

	s := &snapwrite{f: f, off: off, n: int(length / soakBlock), workers: workers, seed: seed, start: time.Now(), stop: make(chan struct{})}
	var marks atomic.Int64
	go func() {
		// The host's lines: "mark N" and "stop".
		buf := make([]byte, 256)
		var line []byte
		for {
			k, err := ch.Read(buf)
			if err != nil {
				fmt.Printf("HEMD-SNAPWRITE channel read: %v\n", err)
				s.halt()
				return
			}
			line = append(line, buf[:k]...)
			for {
				i := slices.Index(line, '\n')
				if i < 0 {
					break
				}
				cmd := strings.TrimSpace(string(line[:i]))
				line = line[i+1:]
				switch {
				case cmd == "stop":
					s.halt()
				case strings.HasPrefix(cmd, "mark "):
					n, err := strconv.ParseUint(cmd[5:], 10, 30)
					if err != nil {
						fmt.Printf("HEMD-SNAPWRITE bad mark %q\n", cmd)
						continue
					}
					e := s.event(evMark, uint32(n))
					marks.Add(1)
					fmt.Printf("HEMD-MARK %d %d\n", n, e)
				case cmd != "":
					fmt.Printf("HEMD-SNAPWRITE unknown command %q\n", cmd)
				}
			}
		}
	}()
	progressDone := make(chan struct{})
	go func() {
		defer close(progressDone)
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-s.stop:
				return
			case <-tick.C:
				fmt.Printf("HEMD-SNAPWRITE t=%.0fs writes=%d\n", time.Since(s.start).Seconds(), s.writes.Load())
			}
		}
	}()
	fmt.Printf("HEMD-SNAPWRITE ready blocks=%d workers=%d\n", s.n, workers)

	deadline := time.AfterFunc(time.Duration(secs)*time.Second, s.halt)
	errs := make(chan error, workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.worker(w); err != nil {
				errs <- err
				s.halt()
			}
		}()
	}
	wg.Wait()
	timedOut := !deadline.Stop()
	<-progressDone
	close(errs)
	if err := <-errs; err != nil {
		return fail("%v (after %d writes)", err, s.writes.Load())
	}
	if timedOut {
		return fail("the host did not say stop within %d s (after %d writes)", secs, s.writes.Load())
	}
	s.mu.Lock()
	events := slices.Clone(s.events)
	s.mu.Unlock()
	n, err := s.writeLog(logOff, end, events)
	if err != nil {
		return fail("log: %v", err)
	}
	fmt.Printf("HEMD-RESULT ok snapwrite writes=%d events=%d marks=%d log=%d max_latency_us=%d\n",
		s.writes.Load(), len(events), marks.Load(), n, s.maxLat.Load())
	return 0
}

func (s *snapwrite) worker(w int) error {
	var own []int
	for i := w; i < s.n; i += s.workers {
		own = append(own, i)
	}
	gens := make([]uint64, s.n)
	rng := rand.New(rand.NewPCG(s.seed, uint64(w)))
	b := alignedBuf()[:soakBlock]
	blk0 := uint64(s.off / soakBlock)
	for {
		select {
		case <-s.stop:
			return nil
		default:
		}
		i := own[rng.IntN(len(own))]
		gens[i]++
		soakFill(b, blk0+uint64(i), gens[i], s.seed)
		t0 := time.Now()
		s.event(evIssue, uint32(i))
		if _, err := s.f.WriteAt(b, s.off+int64(i)*soakBlock); err != nil {
			return fmt.Errorf("write block %d gen %d: %w", blk0+uint64(i), gens[i], err)
		}
		s.event(evAck, uint32(i))
		s.writes.Add(1)
		lat := time.Since(t0).Microseconds()
		for m := s.maxLat.Load(); lat > m && !s.maxLat.CompareAndSwap(m, lat); m = s.maxLat.Load() {
		}
	}
}

// writeLog writes the header and the records at off and syncs them; end is
// the device's size. It returns the bytes written.
func (s *snapwrite) writeLog(off, end int64, events []uint64) (int64, error) {
	body := make([]byte, len(events)*snapLogRecord)
	for i, e := range events {
		binary.LittleEndian.PutUint64(body[i*snapLogRecord:], e)
	}
	size := (snapLogHeader + int64(len(body)) + soakBlock - 1) / soakBlock * soakBlock
	if off+size > end {
		return 0, fmt.Errorf("%d events need %d bytes at %d: past the device's end %d", len(events), size, off, end)
	}
	// An O_DIRECT buffer: aligned, a multiple of the block.
	raw := make([]byte, size+4096)
	a := int(4096 - uintptr(unsafe.Pointer(&raw[0]))%4096)
	buf := raw[a : a+int(size)]
	h := buf[:snapLogHeader]
	binary.LittleEndian.PutUint64(h[0:], snapLogMagic)
	binary.LittleEndian.PutUint32(h[8:], 1)
	binary.LittleEndian.PutUint32(h[12:], snapLogRecord)
	binary.LittleEndian.PutUint64(h[16:], uint64(len(events)))
	binary.LittleEndian.PutUint64(h[24:], s.seed)
	binary.LittleEndian.PutUint64(h[32:], uint64(s.off/soakBlock))
	binary.LittleEndian.PutUint64(h[40:], uint64(s.n))
	sum := sha256.Sum256(body)
	copy(h[48:], sum[:])
	copy(buf[snapLogHeader:], body)
	if _, err := s.f.WriteAt(buf, off); err != nil {
		return 0, fmt.Errorf("write %d bytes at %d: %w", size, off, err)
	}
	if err := s.f.Sync(); err != nil {
		return 0, fmt.Errorf("fsync: %w", err)
	}
	return size, nil
}

// openRaw opens a serial port in raw mode: bytes pass as they are, no echo,
// no line editing.
func openRaw(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		return nil, err
	}
	fd := int(f.Fd())
	t, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: not a terminal: %w", path, err)
	}
	t.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
	t.Oflag &^= unix.OPOST
	t.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
	t.Cflag &^= unix.CSIZE | unix.PARENB
	t.Cflag |= unix.CS8 | unix.CLOCAL | unix.CREAD
	t.Cc[unix.VMIN], t.Cc[unix.VTIME] = 1, 0
	if err := unix.IoctlSetTermios(fd, unix.TCSETS, t); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: raw mode: %w", path, err)
	}
	return f, nil
}
