package vmtest

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
)

// Helpers of the volume-operation VM tests (hot-plug, online resize,
// libvirt): hemd's status through its control socket, and a guest with
// e2fsprogs for an online resize2fs.

// volStatus is one volume of hemd status --json.
type volStatus struct {
	Volume        string `json:"volume"`
	Socket        string `json:"socket"`
	SizeBytes     int64  `json:"size_bytes"`
	Connected     bool   `json:"connected"`
	Attached      bool   `json:"attached"`
	Reads         uint64 `json:"reads"`
	Writes        uint64 `json:"writes"`
	ResizePending string `json:"resize_pending"`
}

// hemdStatus asks the hemd at control socket ctl for its volumes, by id.
func hemdStatus(t *testing.T, state, ctl string) map[string]volStatus {
	t.Helper()
	out := cli(t, state, "status", "--json", "--control", ctl)
	var st struct {
		Volumes []volStatus `json:"volumes"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("hemd status --json: %v\n%s", err, out)
	}
	m := map[string]volStatus{}
	for _, v := range st.Volumes {
		m[v.Volume] = v
	}
	return m
}

// ioGoesOn fails the test unless volume id's writes went on since before
// (what an earlier hemdStatus said): "the other volume's I/O never stops".
func ioGoesOn(t *testing.T, state, ctl, id string, before volStatus, step string) volStatus {
	t.Helper()
	for end := time.Now().Add(20 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		now := hemdStatus(t, state, ctl)[id]
		if now.Writes > before.Writes && now.Reads > before.Reads {
			t.Logf("%s: %s did %d writes and %d reads meanwhile", step, id, now.Writes-before.Writes, now.Reads-before.Reads)
			return now
		}
		if time.Now().After(end) {
			t.Fatalf("%s: %s's I/O stopped (writes %d, reads %d, as before)", step, id, now.Writes, now.Reads)
		}
	}
}

// waitDeleted waits for QEMU's DEVICE_DELETED event of device id.
func waitDeleted(t *testing.T, q *QMP, id string, d time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	if _, err := q.WaitEventMatch(ctx, "DEVICE_DELETED", func(e qmp.Event) bool { return e.Data["device"] == id }); err != nil {
		t.Fatalf("device_del %s: %v", id, err)
	}
}

// e2fsGuest is g with mke2fs and resize2fs of the host's e2fsprogs (Debian's
// package, as the guest's kernel and busybox are) and the libraries they
// load, under /usr/sbin, and /etc/mtab: busybox has no resize2fs, and its
// mke2fs makes no ext4 with room for online growth.
func e2fsGuest(t *testing.T, g *Guest) *Guest {
	t.Helper()
	var c cpioWriter
	for _, d := range []string{"usr", "usr/sbin", "etc", "lib64", "lib/x86_64-linux-gnu", "tmp"} {
		c.dir(d)
	}
	c.entry("etc/mtab", 0o120777, []byte("/proc/mounts"))
	libs := map[string]bool{}
	for _, bin := range []string{"/sbin/mke2fs", "/sbin/resize2fs"} {
		b, err := os.ReadFile(bin)
		if err != nil {
			t.Fatalf("vmtest: %s (Debian's e2fsprogs; make test installs it): %v", bin, err)
		}
		c.file("usr/sbin/"+filepath.Base(bin), b, 0o755)
		out, err := exec.Command("ldd", bin).Output()
		if err != nil {
			t.Fatalf("vmtest: ldd %s: %v", bin, err)
		}
		for _, m := range regexp.MustCompile(`(/\S+\.so[.\d]*) \(0x`).FindAllStringSubmatch(string(out), -1) {
			libs[m[1]] = true
		}
	}
	for lib := range libs {
		real, err := filepath.EvalSymlinks(lib)
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(real)
		if err != nil {
			t.Fatal(err)
		}
		dst := "lib/x86_64-linux-gnu/" + filepath.Base(lib)
		if strings.HasPrefix(lib, "/lib64/") {
			dst = "lib64/" + filepath.Base(lib)
		}
		c.file(dst, b, 0o755)
	}
	base, err := os.ReadFile(g.Initrd)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "initrd-e2fs.cpio")
	if err := os.WriteFile(p, append(base, c.finish()...), 0o644); err != nil {
		t.Fatal(err)
	}
	return &Guest{Kernel: g.Kernel, Initrd: p, Agent: g.Agent}
}

// qmpDo runs a QMP command and fails the test on error.
func qmpDo(t *testing.T, q *QMP, cmd string, args any) {
	t.Helper()
	if err := q.Execute(context.Background(), cmd, args, nil); err != nil {
		t.Fatalf("qmp %s %v: %v", cmd, args, err)
	}
}
