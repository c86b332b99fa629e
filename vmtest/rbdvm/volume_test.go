package rbdvm

import (
	"bytes"
	"context"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hemd/hemd/vmtest"
)

// marker is plaintext the imported images carry: the cluster must never
// see it.
const marker = "HEMD-RBD-IMPORT-PLAINTEXT-MARKER-81d2"

// rawImage writes a raw image of size bytes with markers and random data.
func rawImage(t *testing.T, size int) (string, []byte) {
	t.Helper()
	b := make([]byte, size)
	rand.Read(b[size/2:])
	for off := 0; off < size/2; off += 64 << 10 {
		copy(b[off:], marker)
	}
	p := filepath.Join(t.TempDir(), "raw.img")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p, b
}

// exportOf exports a volume to a raw file and returns its bytes.
func exportOf(t *testing.T, state, name string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "export.img")
	cli(t, state, "volume", "export", name, "--to", out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestRBDVolumeCommands drives the volume commands on RBD: import and
// export between a file and RBD, inspect, an RBD snapshot (no data copied),
// a volume cloned from it (constant time), a snapshot copy under another
// key into a new image and a volume from that; the cluster holds only
// ciphertext; a file volume and an RBD volume move into each other.
func TestRBDVolumeCommands(t *testing.T) {
	state := filepath.Join(t.TempDir(), "state")
	cli(t, state, "key", "create", "--alias", "alias/rbd")
	cli(t, state, "key", "create", "--alias", "alias/rbd-2")
	raw, want := rawImage(t, 12<<20+512)

	// A raw image imported into a new RBD volume, and exported back.
	vol := imageName(t)
	id := cli(t, state, "volume", "import", "--from", raw, "--key", "alias/rbd", vol)
	h := inspect(t, state, vol)
	if h["volume_id"] != id || h["state"] != "available" || h["size_bytes"] != float64(len(want)) {
		t.Fatalf("inspect after import: %v", h)
	}
	if got := exportOf(t, state, vol); !bytes.Equal(got, want) {
		t.Fatal("the export of the RBD volume differs from the imported image")
	}
	stored := rbdExport(t, vol)
	if bytes.Contains(stored, []byte(marker)) {
		t.Fatal("the RBD image holds the plaintext")
	}
	if !bytes.HasPrefix(stored, []byte("HEMDVOL\x00")) || len(stored) != 1<<20+len(want) {
		t.Fatalf("the image is not a hemd volume of the right size (%d bytes)", len(stored))
	}
	// A volume grown offline (no hemd serves it): the image and both header
	// copies, the data kept. (The new blocks read as never-written blocks
	// do, as random data: docs/volume-format.md.)
	gvol := imageName(t)
	gid := cli(t, state, "volume", "import", "--from", raw, "--key", "alias/rbd", gvol)
	grown := cli(t, state, "volume", "resize", "--control", "none", "--size", "+4M", gvol)
	if !strings.Contains(grown, "grown offline") {
		t.Fatalf("volume resize printed %q", grown)
	}
	if gh := inspect(t, state, gvol); gh["size_bytes"] != float64(len(want)+4<<20) || gh["volume_id"] != gid {
		t.Fatalf("inspect after resize: %v", gh)
	}
	if got := exportOf(t, state, gvol); len(got) != len(want)+4<<20 || !bytes.Equal(got[:len(want)], want) {
		t.Fatalf("the export after the resize: %d bytes, the data kept %v", len(got), len(got) >= len(want) && bytes.Equal(got[:len(want)], want))
	}
	if out, err := cliErr(state, "volume", "resize", "--control", "none", "--size", "1M", gvol); err == nil || !strings.Contains(out, "shrink") {
		t.Fatalf("shrinking an RBD volume: %v\n%s", err, out)
	}
	// An import into an existing volume is refused while another process
	// holds it... and the holder is named.
	if out, err := cliErr(state, "volume", "create", "--size", "1M", "--key", "alias/rbd", vol); err == nil || !strings.Contains(out, "exist") {
		t.Fatalf("create over an existing image: %v\n%s", err, out)
	}

	// An RBD snapshot, and a volume cloned from it: no data copied.
	snap := cli(t, state, "snapshot", "create", vol)
	if !strings.HasPrefix(snap, vol+"@snap-") {
		t.Fatalf("snapshot create printed %q", snap)
	}
	sh := inspect(t, state, snap)
	if sh["volume_id"] != strings.TrimPrefix(snap, vol+"@") || sh["wrapped_dek"] != h["wrapped_dek"] {
		t.Fatalf("the snapshot reads as %v", sh)
	}
	clone := imageName(t)
	t0 := time.Now()
	cid := cli(t, state, "volume", "create", "--snapshot", snap, clone)
	took := time.Since(t0)
	ch := inspect(t, state, clone)
	if ch["volume_id"] != cid || ch["parent_snapshot"] != sh["volume_id"] || ch["wrapped_dek"] != h["wrapped_dek"] || ch["state"] != "available" {
		t.Fatalf("the clone reads as %v", ch)
	}
	info, err := cluster.RBD(context.Background(), "info", strings.TrimPrefix(clone, "rbd:"))
	if err != nil || !strings.Contains(string(info), "parent: "+strings.TrimPrefix(snap, "rbd:")) {
		t.Fatalf("the volume is not an RBD clone of the snapshot: %v\n%s", err, info)
	}
	t.Logf("volume cloned from the snapshot in %v", took.Round(time.Millisecond))
	if got := exportOf(t, state, clone); !bytes.Equal(got, want) {
		t.Fatal("the clone's export differs")
	}

	// A copy of the snapshot under another key, into a new image; a volume
	// cloned from the copy.
	cp := imageName(t)
	cpSnap := cli(t, state, "snapshot", "copy", "--key", "alias/rbd-2", snap, cp)
	if !strings.HasPrefix(cpSnap, cp+"@snap-") {
		t.Fatalf("snapshot copy printed %q", cpSnap)
	}
	cph := inspect(t, state, cpSnap)
	if cph["wrapped_dek"] == h["wrapped_dek"] || cph["key_id"] == h["key_id"] {
		t.Fatal("the copy kept the source's key")
	}
	vol3 := imageName(t)
	cli(t, state, "volume", "create", "--snapshot", cpSnap, vol3)
	if got := exportOf(t, state, vol3); !bytes.Equal(got, want) {
		t.Fatal("the volume from the copy differs")
	}
	if bytes.Contains(rbdExport(t, cp), []byte(marker)) {
		t.Fatal("the copy holds plaintext")
	}

	// Between a file and RBD: a snapshot copied out to a file; a volume on
	// RBD from a file snapshot (copied, not cloned).
	dir := t.TempDir()
	fileSnap := filepath.Join(dir, "snap.img")
	cli(t, state, "snapshot", "copy", snap, fileSnap)
	fileVol := filepath.Join(dir, "vol.img")
	cli(t, state, "volume", "create", "--snapshot", fileSnap, fileVol)
	if got := exportOf(t, state, fileVol); !bytes.Equal(got, want) {
		t.Fatal("the file volume from the RBD snapshot differs")
	}
	fileSnap2 := filepath.Join(dir, "snap2.img")
	cli(t, state, "snapshot", "create", fileVol, fileSnap2)
	back := imageName(t)
	cli(t, state, "volume", "create", "--snapshot", fileSnap2, back)
	if got := exportOf(t, state, back); !bytes.Equal(got, want) {
		t.Fatal("the RBD volume from the file snapshot differs")
	}
	if info, _ := cluster.RBD(context.Background(), "info", strings.TrimPrefix(back, "rbd:")); strings.Contains(string(info), "parent:") {
		t.Fatal("a volume from a file snapshot has an RBD parent")
	}

	// Names the operator gets wrong.
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"volume", "inspect", "rbd:" + cluster.Pool + "/no-such-image"}, "no such image"},
		{[]string{"volume", "inspect", "rbd:nopool/x"}, "pool nopool does not exist"},
		{[]string{"volume", "inspect", "rbd:" + cluster.Pool}, "want rbd:POOL/IMAGE"},
		{[]string{"snapshot", "create", vol, "daily"}, "not snap- and 17 hex digits"},
		{[]string{"snapshot", "create", vol, clone + "@snap-00000000000000001"}, "lives in its image"},
		{[]string{"volume", "create", "--snapshot", vol + "@snap-00000000000000002", imageName(t)}, "no such image or snapshot"},
	} {
		out, err := cliErr(state, tc.args...)
		if err == nil || !strings.Contains(out, tc.want) {
			t.Errorf("hemd %s: %v, want %q in:\n%s", strings.Join(tc.args, " "), err, tc.want, out)
		}
	}
}

// TestRBDServeRefused: hemd serve on an RBD volume it cannot reach or open
// fails at start within a bounded time, naming the cluster and the image;
// no socket is made, so no guest ever sees the disk.
func TestRBDServeRefused(t *testing.T) {
	v := newRBDVolume(t, "16M")
	dir := t.TempDir()
	deadConf := filepath.Join(dir, "dead.conf")
	c, _ := os.ReadFile(cluster.Conf)
	os.WriteFile(deadConf, bytes.Replace(c, []byte(cluster.MonAddr), []byte("127.0.0.1:9"), 1), 0o644)
	wrongKeyring := filepath.Join(dir, "wrong.keyring")
	os.WriteFile(wrongKeyring, []byte("[client.hemd]\n\tkey = AQBjZ2JlAAAAABAAcHaxu0ZG5cK3dmVCCWVaUw==\n"), 0o600)
	for _, tc := range []struct {
		name  string
		image string
		args  []string
		want  []string
		limit time.Duration
	}{
		{"unreachable", v.name, []string{"--ceph-conf", deadConf}, []string{"127.0.0.1:9", v.name, "no monitor answered"}, 40 * time.Second},
		{"wrong keyring", v.name, []string{"--ceph-keyring", wrongKeyring}, []string{v.name, "client.hemd", "wrong client id or keyring"}, 40 * time.Second},
		{"missing image", "rbd:" + cluster.Pool + "/missing", nil, []string{"rbd:" + cluster.Pool + "/missing", "no such image"}, 20 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "hemd.sock")
			args := append([]string{"serve", "--socket", sock, "--volume", tc.image, "--control", "none"}, tc.args...)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, hemdBin, args...)
			cmd.Env = append(os.Environ(), env(v.state)...)
			t0 := time.Now()
			out, err := cmd.CombinedOutput()
			took := time.Since(t0)
			if err == nil || ctx.Err() != nil {
				t.Fatalf("hemd serve: %v after %v\n%s", err, took, out)
			}
			for _, w := range tc.want {
				if !strings.Contains(string(out), w) {
					t.Fatalf("refusal without %q:\n%s", w, out)
				}
			}
			if took > tc.limit {
				t.Fatalf("refused after %v, want within %v", took, tc.limit)
			}
			if _, err := os.Stat(sock); err == nil {
				t.Fatal("the refused hemd left a socket")
			}
			t.Logf("refused in %v: %s", took.Round(time.Millisecond), strings.TrimSpace(string(out)))
		})
	}
}

// TestRBDReadersAndWriter: read-only hemds share an RBD volume and keep a
// writer out, naming a reader; a SIGKILLed reader's claim goes with it (on
// this host); once no reader is left the writer serves, and then a reader
// is kept out, naming the writer. No VM is needed: claims are taken at
// start.
func TestRBDReadersAndWriter(t *testing.T) {
	v := newRBDVolume(t, "16M")
	reader := vmtest.Hemd{Bin: hemdBin, Env: v.hemd.Env, Args: []string{"--read-only", "--control", "none"}}
	writer := vmtest.Hemd{Bin: hemdBin, Env: v.hemd.Env, Args: []string{"--control", "none"}}
	r1 := reader.Serve(t, v.name, 1)
	r2 := reader.Serve(t, v.name, 1)
	out := writer.Refused(t, v.name)
	if !strings.Contains(out, "read-only since") ||
		!strings.Contains(out, "pid "+strconv.Itoa(r1.Pid())) && !strings.Contains(out, "pid "+strconv.Itoa(r2.Pid())) {
		t.Fatalf("a writer refused without naming a reader (pids %d, %d):\n%s", r1.Pid(), r2.Pid(), out)
	}
	r1.Kill()
	out = writer.Refused(t, v.name)
	if !strings.Contains(out, "pid "+strconv.Itoa(r2.Pid())) {
		t.Fatalf("with one reader left, a writer refused without naming it (pid %d):\n%s", r2.Pid(), out)
	}
	r2.Kill()
	w := writer.Serve(t, v.name, 1)
	out = reader.Refused(t, v.name)
	if !strings.Contains(out, "pid "+strconv.Itoa(w.Pid())) || !strings.Contains(out, "writing since") {
		t.Fatalf("a reader refused without naming the writer (pid %d):\n%s", w.Pid(), out)
	}
	w.Stop(t)
	reader.Serve(t, v.name, 1).Stop(t)
}
