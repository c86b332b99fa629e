package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/hemd/hemd/vhost/frontend"
)

// getUnix fetches path from an HTTP server on a unix socket.
func getUnix(t *testing.T, sock, path string) string {
	t.Helper()
	c := http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	resp, err := c.Get("http://hemd" + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("GET %s: %s", path, resp.Status)
	}
	return string(b)
}

// metric returns the value of the sample line matching re, or "" if none.
func metric(body, re string) string {
	m := regexp.MustCompile(`(?m)^` + re + ` (\S+)$`).FindStringSubmatch(body)
	if m == nil {
		return ""
	}
	return m[1]
}

// TestMetricsAndStatus: hemd serve --metrics exposes per-volume and
// per-queue counters, latency histograms, the attach state and the KMS call
// latency; hemd status lists the volume, its key and attach state.
func TestMetricsAndStatus(t *testing.T) {
	if _, err := os.Stat("/usr/lib/softhsm/libsofthsm2.so"); err != nil {
		t.Skip("SoftHSM2 is not installed (make test installs softhsm2)")
	}
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	vol := filepath.Join(dir, "vol.img")
	if out, err := hemdCLI(t, state, "key", "create", "--alias", "alias/m"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	out, err := hemdCLI(t, state, "volume", "create", "--size", "8M", "--key", "alias/m", vol)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	volID := strings.TrimSpace(out)
	sock, msock := filepath.Join(dir, "v.sock"), filepath.Join(dir, "metrics.sock")
	t.Setenv("HEMD_STATE_DIR", state)
	t.Setenv("SOFTHSM2_CONF", "")
	_, log := startHemd(t, "serve", "--socket", sock, "--volume", vol, "--queues", "2", "--metrics", "unix:"+msock)
	waitSocket(t, sock)
	waitSocket(t, msock)

	status := func() string {
		t.Helper()
		out, err := hemdCLI(t, state, "status", "--metrics", "unix:"+msock)
		if err != nil {
			t.Fatalf("hemd status: %v\n%s", err, out)
		}
		return out
	}
	if s := status(); !regexp.MustCompile(volID + `\s+detached\s+arn:aws:kms:`).MatchString(s) {
		t.Fatalf("hemd status before attach:\n%s", s)
	}

	c, err := frontend.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Setup(frontend.Options{MemSize: 4 << 20}); err != nil {
		t.Fatalf("%v\n%s", err, log)
	}
	if _, err := c.Config(0, 8); err != nil { // as QEMU does: the key is checked
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	q := c.Queues[0]
	for i, typ := range []uint32{1, 0} { // OUT then IN, 4 KiB at sector 8
		hdr, _ := c.Alloc(16, 16)
		binary.LittleEndian.PutUint32(c.Mem[hdr:], typ)
		binary.LittleEndian.PutUint64(c.Mem[hdr+8:], 8)
		data, _ := c.Alloc(4096, 4096)
		copy(c.Mem[data:], bytes.Repeat([]byte("hemd"), 1024))
		st, _ := c.Alloc(1, 1)
		c.Mem[st] = 0xff
		q.Add([]frontend.Buf{{Addr: hdr, Len: 16}, {Addr: data, Len: 4096, Write: typ == 0}, {Addr: st, Len: 1, Write: true}})
		q.Kick()
		if _, err := q.Wait(ctx, nil); err != nil || c.Mem[st] != 0 {
			t.Fatalf("request %d: %v status %d", i, err, c.Mem[st])
		}
	}

	body := getUnix(t, msock, "/metrics")
	l := `\{op="%s",queue="0",volume="` + volID + `"\}`
	for re, want := range map[string]string{
		`hemd_volume_attached\{volume="` + volID + `"\}`:                                       "1",
		`hemd_volume_info\{encrypted="true",io="uring",[^}]*volume="` + volID + `"\}`:          "1",
		`hemd_requests_total` + fmt.Sprintf(l, "write"):                                        "1",
		`hemd_requests_total` + fmt.Sprintf(l, "read"):                                         "1",
		`hemd_bytes_total\{direction="read",queue="0",volume="` + volID + `"\}`:                "4096",
		`hemd_request_errors_total\{kind="io",queue="0",volume="` + volID + `"\}`:              "0",
		`hemd_request_duration_seconds_count\{class="read",queue="0",volume="` + volID + `"\}`: "1",
		`hemd_sessions_total\{volume="` + volID + `"\}`:                                        "1",
		`hemd_kms_request_duration_seconds_count\{op="Decrypt",outcome="ok"\}`:                 "1",
		`hemd_kms_request_duration_seconds_count\{op="DescribeKey",outcome="ok"\}`:             "1",
	} {
		if got := metric(body, re); got != want {
			t.Errorf("%s = %q, want %q", re, got, want)
		}
	}
	if t.Failed() {
		t.Logf("metrics:\n%s", body)
	}
	if s := status(); !regexp.MustCompile(volID + `\s+attached\s+arn:aws:kms:\S+\s+` + regexp.QuoteMeta(sock) + `\s+8\.0 MiB\s+uring\s+1\s+1\s+1\s+0`).MatchString(s) {
		t.Fatalf("hemd status while attached:\n%s", s)
	}
	c.Close()
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(status(), "detached") {
		if time.Now().After(deadline) {
			t.Fatalf("still attached after the front-end left:\n%s", status())
		}
		time.Sleep(50 * time.Millisecond)
	}
}
