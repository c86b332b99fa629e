package loadgen

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/hemd/hemd/hem"
	"github.com/hemd/hemd/storage"
	"github.com/hemd/hemd/vhost"
	"github.com/hemd/hemd/vhost/blk"
)

// serveHemd serves a sparse file with hemd's vhost and blk packages, its
// I/O batched through io_uring as hemd serve does.
func serveHemd(t *testing.T, size int64, queues int) string {
	return serveHemdWith(t, size, queues, true, nil)
}

// fixedKeys attaches one XTS key: an encrypted disk without a KMS.
type fixedKeys struct{}

func (fixedKeys) Check(context.Context) error { return nil }
func (fixedKeys) Attach(context.Context) (blk.Transform, error) {
	k := make([]byte, 64)
	for i := range k {
		k[i] = byte(i*7 + 1)
	}
	return hem.NewXTS(k, 512)
}
func (fixedKeys) Detach() {}

func serveHemdWith(t *testing.T, size int64, queues int, batches bool, keys blk.Keys) string {
	t.Helper()
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	os.WriteFile(img, nil, 0o600)
	os.Truncate(img, size)
	st, err := storage.Open(img, storage.Options{})
	if err != nil {
		t.Fatal(err)
	}
	var store blk.Store = st
	if batches {
		store = blk.WithBatches(st, func(d int) blk.Batch { return st.NewBatch(d, false) })
	}
	dev, err := blk.New(blk.Config{ID: "vol-00000000000000001", Store: store, Queues: queues, Keys: keys})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "s.sock")
	ln, err := vhost.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		(&vhost.Server{Device: dev, Log: slog.New(slog.DiscardHandler)}).Serve(ctx, ln)
		close(done)
	}()
	t.Cleanup(func() { cancel(); <-done; ln.Close(); st.Close() })
	return sock
}

// serveQSD serves a sparse file with qemu-storage-daemon's vhost-user-blk
// export: the peer that proves loadgen is a correct front-end.
func serveQSD(t *testing.T, size int64, queues int) string {
	t.Helper()
	bin, err := exec.LookPath("qemu-storage-daemon")
	if err != nil {
		t.Skip("qemu-storage-daemon is not installed (make test installs it)")
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	os.WriteFile(img, nil, 0o600)
	os.Truncate(img, size)
	sock := filepath.Join(dir, "qsd.sock")
	cmd := exec.Command(bin,
		"--blockdev", "driver=file,node-name=f0,filename="+img,
		"--export", "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path="+sock+",writable=on,num-queues="+itoa(queues))
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for i := 0; i < 200; i++ {
		if _, err := os.Stat(sock); err == nil {
			return sock
		}
		time.Sleep(25 * time.Millisecond)
	}
	t.Fatal("qemu-storage-daemon socket did not appear")
	return ""
}

func itoa(n int) string { return string(rune('0' + n)) }

func TestVerify(t *testing.T) {
	backends := map[string]func(*testing.T, int64, int) string{
		"hemd": serveHemd,
		"hemd-sync": func(t *testing.T, size int64, q int) string {
			return serveHemdWith(t, size, q, false, nil)
		},
		"hemd-enc": func(t *testing.T, size int64, q int) string {
			return serveHemdWith(t, size, q, true, fixedKeys{})
		},
		"qsd": serveQSD,
	}
	for name, serve := range backends {
		for _, rw := range []string{"randrw", "write"} {
			t.Run(name+"/"+rw, func(t *testing.T) {
				sock := serve(t, 16<<20, 2)
				res, err := Run(context.Background(), Config{Socket: sock, Queues: 2, Depth: 32, BS: 4096,
					RW: rw, RWMixRead: 50, Runtime: 500 * time.Millisecond, Verify: true, Seed: 1})
				if err != nil {
					t.Fatal(err)
				}
				if res.Writes == 0 || res.Verified == 0 || res.VerifyErrors != 0 {
					t.Fatalf("%d writes, %d blocks verified, %d mismatches", res.Writes, res.Verified, res.VerifyErrors)
				}
				t.Logf("%.0f IOPS, %d verified", res.IOPS, res.Verified)
			})
		}
	}
}

// Fsync sends a flush after every N writes of a queue, and verification
// still holds.
func TestFsync(t *testing.T) {
	sock := serveHemd(t, 16<<20, 2)
	res, err := Run(context.Background(), Config{Socket: sock, Queues: 2, Depth: 8, BS: 4096,
		RW: "randwrite", Runtime: 300 * time.Millisecond, Fsync: 4, Verify: true, Seed: 1})
	if err != nil {
		t.Fatal(err)
	}
	// Each queue flushes after its 4th, 8th, ... write submitted; the
	// last writes of the run may go unflushed.
	if lo, hi := res.Writes/4-2*8, res.Writes/4+2; res.Flushes < lo || res.Flushes > hi || res.Flushes == 0 {
		t.Fatalf("%d writes, %d flushes: want about a quarter", res.Writes, res.Flushes)
	}
	if res.IOs != res.Writes || res.VerifyErrors != 0 {
		t.Fatalf("%d I/Os for %d writes (flushes are not I/Os), %d mismatches", res.IOs, res.Writes, res.VerifyErrors)
	}
}

// Verify mode catches a back-end that loses writes: writes to a read-only
// disk fail, and reads of data that was never written are not counted.
func TestVerifyCatchesFailure(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	os.WriteFile(img, nil, 0o600)
	os.Truncate(img, 4<<20)
	st, _ := storage.Open(img, storage.Options{ReadOnly: true})
	defer st.Close()
	dev, _ := blk.New(blk.Config{Store: st, ReadOnly: true})
	sock := filepath.Join(dir, "s.sock")
	ln, _ := vhost.Listen(sock)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go (&vhost.Server{Device: dev}).Serve(ctx, ln)
	_, err := Run(context.Background(), Config{Socket: sock, Queues: 1, Depth: 4, BS: 4096, RW: "randwrite",
		Runtime: 200 * time.Millisecond, Verify: true})
	if !errors.Is(err, ErrIOStatus) {
		t.Fatalf("writes to a read-only disk: %v, want ErrIOStatus", err)
	}
}

func TestBadConfig(t *testing.T) {
	for _, c := range []Config{
		{Queues: 0, Depth: 1, BS: 4096, RW: "read", Runtime: time.Second},
		{Queues: 1, Depth: 1, BS: 1000, RW: "read", Runtime: time.Second},
		{Queues: 1, Depth: 1, BS: 4096, RW: "trim", Runtime: time.Second},
		{Queues: 1, Depth: 1, BS: 4096, RW: "randrw", RWMixRead: 101, Runtime: time.Second},
		{Queues: 1, Depth: 1, BS: 4096, RW: "write", Fsync: -1, Runtime: time.Second},
	} {
		if _, err := Run(context.Background(), c); !errors.Is(err, ErrBadConfig) {
			t.Errorf("%+v: %v", c, err)
		}
	}
}
