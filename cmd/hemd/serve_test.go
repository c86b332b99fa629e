package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hemd/hemd/vhost/frontend"
)

// TestMain lets a test run the test binary as hemd itself.
func TestMain(m *testing.M) {
	if os.Getenv("HEMD_TEST_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func startHemd(t *testing.T, args ...string) (*exec.Cmd, *bytes.Buffer) {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "HEMD_TEST_MAIN=1")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd, &out
}

func waitSocket(t *testing.T, path string) {
	t.Helper()
	for i := 0; i < 200; i++ {
		if _, err := os.Stat(path); err == nil {
			return
		}
		time.Sleep(25 * time.Millisecond)
	}
	t.Fatalf("socket %s did not appear", path)
}

func sparse(t *testing.T, path string, size int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
}

// TestServeSocketAndSigterm: the socket is 0600; a second hemd on it is
// refused with a clear error; SIGTERM stops hemd cleanly with the data on
// disk.
func TestServeSocketAndSigterm(t *testing.T) {
	dir := t.TempDir()
	img, sock := filepath.Join(dir, "disk.img"), filepath.Join(dir, "s.sock")
	sparse(t, img, 4<<20)
	cmd, out := startHemd(t, "serve", "--socket", sock, "--volume", img)
	waitSocket(t, sock)
	st, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want 0600", st.Mode().Perm())
	}

	// Another volume on the same socket (the same volume would be refused
	// for its lock first: TestServeOneWriter).
	img2 := filepath.Join(dir, "disk2.img")
	sparse(t, img2, 4<<20)
	second := exec.Command(os.Args[0], "serve", "--socket", sock, "--volume", img2)
	second.Env = append(os.Environ(), "HEMD_TEST_MAIN=1")
	msg, err := second.CombinedOutput()
	if err == nil || !strings.Contains(string(msg), "in use by another process") {
		t.Fatalf("second hemd: err %v, output %q", err, msg)
	}

	c, err := frontend.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Setup(frontend.Options{MemSize: 4 << 20}); err != nil {
		t.Fatal(err)
	}
	hdr, _ := c.Alloc(16, 16)
	binary.LittleEndian.PutUint32(c.Mem[hdr:], 1) // OUT
	binary.LittleEndian.PutUint64(c.Mem[hdr+8:], 4)
	data, _ := c.Alloc(4096, 4096)
	copy(c.Mem[data:], bytes.Repeat([]byte("hemd"), 1024))
	status, _ := c.Alloc(1, 1)
	c.Mem[status] = 0xff
	q := c.Queues[0]
	q.Add([]frontend.Buf{{Addr: hdr, Len: 16}, {Addr: data, Len: 4096}, {Addr: status, Len: 1, Write: true}})
	q.Kick()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := q.Wait(ctx, nil); err != nil || c.Mem[status] != 0 {
		t.Fatalf("write: %v status %d", err, c.Mem[status])
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("hemd exit after SIGTERM: %v\n%s", err, out)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("hemd did not stop on SIGTERM\n%s", out)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left behind: %v", err)
	}
	b, _ := os.ReadFile(img)
	if !bytes.Equal(b[4*512:4*512+4096], bytes.Repeat([]byte("hemd"), 1024)) {
		t.Fatal("written data not in the volume file after SIGTERM")
	}
}

func TestServeConfig(t *testing.T) {
	dir := t.TempDir()
	var cfg strings.Builder
	for i, n := range []string{"a", "b"} {
		sparse(t, filepath.Join(dir, n+".img"), 1<<20)
		cfg.WriteString("[[volume]]\n")
		cfg.WriteString("socket = \"" + filepath.Join(dir, n+".sock") + "\"\n")
		cfg.WriteString("path = \"" + filepath.Join(dir, n+".img") + "\"\n")
		if i == 1 {
			cfg.WriteString("queues = 2\nread_only = true\nid = \"vol-00000000000000001\"\n")
		}
	}
	cfgPath := filepath.Join(dir, "hemd.toml")
	os.WriteFile(cfgPath, []byte(cfg.String()), 0o600)
	startHemd(t, "serve", "--config", cfgPath)
	for _, n := range []string{"a", "b"} {
		waitSocket(t, filepath.Join(dir, n+".sock"))
	}
	c, err := frontend.Dial(filepath.Join(dir, "b.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Setup(frontend.Options{MemSize: 4 << 20, Queues: 2}); err != nil {
		t.Fatal(err)
	}
	if c.Features&(1<<5) == 0 {
		t.Fatal("read_only volume does not offer VIRTIO_BLK_F_RO")
	}
}

func TestConfigErrors(t *testing.T) {
	dir := t.TempDir()
	cases := map[string]string{
		"unknown key":  "[[volume]]\nsocket = \"/tmp/x\"\npath = \"/tmp/y\"\nqueus = 2\n",
		"no volume":    "state_dir = \"/tmp\"\n",
		"no socket":    "[[volume]]\npath = \"/tmp/y\"\n",
		"same socket":  "[[volume]]\nsocket = \"/tmp/x\"\npath = \"/tmp/y\"\n[[volume]]\nsocket = \"/tmp/x\"\npath = \"/tmp/z\"\n",
		"syntax error": "[[volume]\n",
	}
	want := map[string]string{
		"unknown key": "unknown key", "no volume": "no [[volume]]", "no socket": "no socket",
		"same socket": "used twice", "syntax error": "config",
	}
	for name, body := range cases {
		p := filepath.Join(dir, strings.ReplaceAll(name, " ", "_")+".toml")
		os.WriteFile(p, []byte(body), 0o600)
		_, err := loadConfig(p)
		if err == nil || !strings.Contains(err.Error(), want[name]) {
			t.Errorf("%s: %v, want %q", name, err, want[name])
		}
	}
}
