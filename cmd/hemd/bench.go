package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/hemd/hemd/vhost/loadgen"
	"golang.org/x/sys/unix"
)

// benchResult is `hemd bench --json` output.
type benchResult struct {
	Socket       string  `json:"socket"`
	RW           string  `json:"rw"`
	BS           int     `json:"bs"`
	Queues       int     `json:"queues"`
	Depth        int     `json:"depth"`
	RuntimeS     float64 `json:"runtime_s"`
	IOs          uint64  `json:"ios"`
	Flushes      uint64  `json:"flushes,omitempty"`
	IOPS         float64 `json:"iops"`
	MBps         float64 `json:"mb_s"`
	P50us        float64 `json:"lat_p50_us"`
	P99us        float64 `json:"lat_p99_us"`
	P999us       float64 `json:"lat_p99_9_us"`
	CPUSecPerMIO float64 `json:"cpu_s_per_mio,omitempty"`
	Verified     uint64  `json:"verified_blocks,omitempty"`
	VerifyErrors uint64  `json:"verify_errors"`
}

func benchCommand(ctx context.Context, g globalFlags, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cfg loadgen.Config
	fs.StringVar(&cfg.Socket, "socket", "", "vhost-user-blk socket of the back-end to measure")
	fs.IntVar(&cfg.Queues, "queues", 1, "virtqueues, one goroutine each")
	fs.IntVar(&cfg.Depth, "depth", 32, "requests in flight per queue")
	bs := fs.String("bs", "4k", "request size (512, 4k, 128k, 1m)")
	fs.StringVar(&cfg.RW, "rw", "randread", "randread, randwrite, read, write or randrw")
	fs.IntVar(&cfg.RWMixRead, "rwmixread", 50, "percent reads with --rw randrw")
	runtime := fs.Duration("runtime", 10*time.Second, "how long to run")
	fs.BoolVar(&cfg.Once, "once", false, "end a sequential read/write after one pass over the disk (or --size)")
	fs.IntVar(&cfg.Fsync, "fsync", 0, "send a flush after every N writes of a queue, as a guest that syncs (fio's fsync=N; 0: never)")
	fs.BoolVar(&cfg.Verify, "verify", false, "write a pattern, check every block read, read back all written blocks at the end")
	size := fs.String("size", "", "use only the first SIZE bytes of the disk")
	pid := fs.Int("pid", 0, "back-end pid: report its CPU seconds per million I/Os")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if cfg.Socket == "" {
		return errors.New("bench: --socket is required")
	}
	var err error
	if cfg.BS, err = parseSize(*bs); err != nil {
		return fmt.Errorf("bench: --bs: %w", err)
	}
	if *size != "" {
		n, err := parseSize(*size)
		if err != nil {
			return fmt.Errorf("bench: --size: %w", err)
		}
		cfg.Size = int64(n)
	}
	cfg.Runtime = *runtime
	cfg.Seed = uint64(time.Now().UnixNano())
	if isTerminal(stderr) && !*asJSON {
		cfg.Progress = func(ios uint64, el time.Duration) {
			fmt.Fprintf(stderr, "\r%s %d I/Os, %.0f IOPS   ", el.Truncate(time.Second), ios, float64(ios)/el.Seconds())
		}
	}
	var cpu0 float64
	if *pid > 0 {
		if cpu0, err = procCPU(*pid); err != nil {
			return fmt.Errorf("bench: --pid: %w", err)
		}
	}
	res, runErr := loadgen.Run(ctx, cfg)
	if cfg.Progress != nil {
		fmt.Fprintln(stderr)
	}
	if res == nil {
		return fmt.Errorf("bench: %w", runErr)
	}
	out := benchResult{
		Socket: cfg.Socket, RW: cfg.RW, BS: cfg.BS, Queues: cfg.Queues, Depth: cfg.Depth,
		RuntimeS: res.Elapsed.Seconds(), IOs: res.IOs, Flushes: res.Flushes, IOPS: res.IOPS, MBps: res.MBps,
		P50us: us(res.P50), P99us: us(res.P99), P999us: us(res.P999),
		Verified: res.Verified, VerifyErrors: res.VerifyErrors,
	}
	if *pid > 0 && res.IOs > 0 {
		cpu1, err := procCPU(*pid)
		if err != nil {
			return fmt.Errorf("bench: --pid: %w", err)
		}
		out.CPUSecPerMIO = (cpu1 - cpu0) / (float64(res.IOs) / 1e6)
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(out); err != nil {
			return err
		}
	} else {
		fmt.Fprintf(stdout, "%s bs=%d queues=%d depth=%d: %.0f IOPS, %.1f MB/s, latency p50 %.0fus p99 %.0fus p99.9 %.0fus",
			out.RW, out.BS, out.Queues, out.Depth, out.IOPS, out.MBps, out.P50us, out.P99us, out.P999us)
		if out.CPUSecPerMIO > 0 {
			fmt.Fprintf(stdout, ", backend CPU %.2f s per million I/Os", out.CPUSecPerMIO)
		}
		if cfg.Verify {
			fmt.Fprintf(stdout, ", verified %d blocks, %d mismatches", out.Verified, out.VerifyErrors)
		}
		fmt.Fprintln(stdout)
	}
	if runErr != nil {
		return fmt.Errorf("bench: %w", runErr)
	}
	return nil
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// parseSize reads 512, 4k, 128K, 1m, 2G.
func parseSize(s string) (int, error) {
	s = strings.TrimSpace(strings.ToLower(s))
	mult := 1
	switch {
	case strings.HasSuffix(s, "k"):
		mult, s = 1<<10, s[:len(s)-1]
	case strings.HasSuffix(s, "m"):
		mult, s = 1<<20, s[:len(s)-1]
	case strings.HasSuffix(s, "g"):
		mult, s = 1<<30, s[:len(s)-1]
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("size %q", s)
	}
	return n * mult, nil
}

// procCPU returns the user+system CPU seconds of process pid.
func procCPU(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// Fields after the command name, which may hold spaces: ") state ppid ...".
	i := strings.LastIndexByte(string(b), ')')
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("short /proc/%d/stat", pid)
	}
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100, nil // USER_HZ is 100 on Linux
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
