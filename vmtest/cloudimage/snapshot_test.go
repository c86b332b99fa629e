package cloudimage

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Snapshots of the running cloud image (issue 20): on its second boot the
// guest runs loadWriteFile's script, which writes files on its ext4 root
// until the host says stop; meanwhile the host takes snapshots of the
// served volume with hemd snapshot create --control (snapshotsUnderLoad)
// and checks each one as it goes.
//
// What "its ext4 is clean" means for a crash-consistent snapshot: the
// snapshot is the disk as a power cut would leave it, so its journal may
// hold committed transactions not yet written to their home blocks, and
// its orphan list files that were being deleted or truncated. That is a
// consistent ext4: mounting it replays the journal and finishes the
// orphans. e2fsck -n cannot tell: it does not replay the journal (it says
// "skipping journal recovery because doing a read-only filesystem
// check") and then reports the stale home blocks as errors. So each
// snapshot is checked as a boot would check it, on its own plaintext
// export (a private copy):
//   - e2fsck -fp replays the journal, finishes the orphans and fixes only
//     what preen mode may fix unasked (summary counters); anything else is
//     "UNEXPECTED INCONSISTENCY" and exit status 4. It must exit 0 or 1.
//   - e2fsck -fn then reads the whole filesystem and must find nothing at
//     all (exit status 0).
//   - Every file the guest synced (its console line arrived) before the
//     snapshot command started is there, byte for byte (debugfs dump).
//   - The chain of sequence numbers (seqWriteFile) is one state of the
//     chain (seqCut), at least as far as the guest had said before the
//     snapshot command started.
// Whether the journal needed replaying (dumpe2fs: needs_recovery) is
// logged: with the guest syncing all the time it usually does.
//
// The chain is what tells a torn snapshot: with copy-before-write turned
// off in storage/cow.go, the first snapshot's chain was broken while
// e2fsck found that snapshot clean (a journal replay hides much of a
// tear) and the files synced before it, which never change after, were
// intact.

// loadWriteFile is a cloud-config write_files entry: the script the second
// boot runs, in /hemd-load. Each round writes a new 1 MiB file of random bytes
// and copies a directory tree (523 files of cloud-init), removes the copy
// before last, syncs, and prints the new file's SHA-256 on the console.
// Meanwhile a second writer rewrites eight 256 KiB files in turn, each
// with an fsync (a journal commit each time), so that writes go on during
// the whole of each snapshot's copy. A third (seqWriteFile) writes a chain
// of sequence numbers. All stop when the host writes a line on the second
// serial port (ttyS1).
const loadWriteFile = `  - path: /usr/local/sbin/hemd-load
    permissions: '0755'
    content: |
      #!/bin/sh
      stop=/run/hemd-load-stop
      rm -f $stop
      stty -F /dev/ttyS1 raw -echo clocal || { echo "HEMD-LOAD-FAIL no /dev/ttyS1" > /dev/ttyS0; exit 1; }
      ( head -n 1 /dev/ttyS1 > /dev/null; touch $stop ) &
      mkdir -p /hemd-load && cd /hemd-load || exit 1
      ( j=0; while [ ! -e $stop ]; do dd if=/dev/urandom of=w.$((j%8)) bs=256k count=1 conv=fsync status=none; j=$((j+1)); done ) &
      mkdir -p /hemd-seq && dd if=/dev/zero of=/hemd-seq/s bs=1M count=128 status=none && sync
      ( /usr/local/sbin/hemd-seq || echo "HEMD-LOAD-FAIL sequence writer exit $?" > /dev/ttyS0 ) &
      echo "HEMD-LOAD-START" > /dev/ttyS0
      i=0
      while [ ! -e $stop ] && [ $i -lt 500 ]; do
        i=$((i+1))
        head -c 1048576 /dev/urandom > f.$i
        cp -a /usr/lib/python3/dist-packages/cloudinit t.$i
        rm -rf t.$((i-2))
        sync
        echo "HEMD-LOAD $i synced $(sha256sum f.$i | cut -c1-64)" > /dev/ttyS0
      done
      wait
      echo "HEMD-LOAD-END $i" > /dev/ttyS0
`

// seqWriteFile is the chain of sequence numbers: number j, padded to a 4
// KiB block, overwrites in place (O_DIRECT) slot j mod seqSlots of the
// file /hemd-seq/s, written whole before (so an overwrite goes to the
// block in place, with no allocation to journal), the slots seqSpan apart;
// j+1 is written only once the write of j has returned. Every 256th it says so on the console. Python: a
// shell loop of dd does a few writes a second under TCG, too few to land
// while a snapshot's copier passes the file.
const seqWriteFile = `  - path: /usr/local/sbin/hemd-seq
    permissions: '0755'
    content: |
      #!/usr/bin/python3
      import mmap, os
      fd = os.open('/hemd-seq/s', os.O_WRONLY | os.O_DIRECT)
      buf = mmap.mmap(-1, 4096)
      con = open('/dev/ttyS0', 'w')
      j = 0
      while j % 64 or not os.path.exists('/run/hemd-load-stop'):
          j += 1
          buf[:] = b'%-4095s\n' % (b'HEMD-SEQ %d' % j)
          os.pwrite(fd, buf, (j % @SLOTS@) * @SPAN@)
          if j % 256 == 0:
              print('HEMD-SEQ-DONE %d' % j, file=con, flush=True)
`

// seqSlots and seqSpan lay out the chain's file.
const (
	seqSlots = 32
	seqSpan  = 4 << 20
)

// loadFiles are the write_files entries of the load.
var loadFiles = loadWriteFile + strings.NewReplacer("@SLOTS@", strconv.Itoa(seqSlots), "@SPAN@", strconv.Itoa(seqSpan)).Replace(seqWriteFile)

// loadSnapshots is how many snapshots are taken while the guest writes.
const loadSnapshots = 3

// channelArgs gives the VM a second serial port (ttyS1) on a unix socket
// at path.
func channelArgs(path string) []string {
	return []string{"-chardev", "socket,id=hemdch,path=" + path + ",server=on,wait=off", "-device", "isa-serial,chardev=hemdch"}
}

var (
	loadLine = regexp.MustCompile(`^HEMD-LOAD (\d+) synced ([0-9a-f]{64})`)
	seqLine  = regexp.MustCompile(`^HEMD-SEQ-DONE (\d+)`)
)

// loadDone is what the guest said it had written, in the console lines so
// far: the files synced (round → SHA-256) and the highest sequence number
// written.
type loadDone struct {
	files map[int]string
	seq   int
}

func done(lines []Line) loadDone {
	d := loadDone{files: map[int]string{}}
	for _, l := range lines {
		if s := loadLine.FindStringSubmatch(l.Text); s != nil {
			i, _ := strconv.Atoi(s[1])
			d.files[i] = s[2]
		}
		if s := seqLine.FindStringSubmatch(l.Text); s != nil {
			j, _ := strconv.Atoi(s[1])
			d.seq = max(d.seq, j)
		}
	}
	return d
}

// seqCut checks the sequence chain in a snapshot: slots[k] is the number
// slot k holds (0: never written). Number j was written only once j-1 was,
// so a state the disk was in, with J the highest number, holds J-d in slot
// (J-d) mod n for d = 0..n-1 (0 where J-d < 1): the write in flight (J+1)
// is either in, and then it is the highest, or out. It returns J.
func seqCut(slots []int) (int, error) {
	n := len(slots)
	if n == 0 {
		return 0, errors.New("no slots")
	}
	top := slices.Max(slots)
	for d := range n {
		j := top - d
		k := ((j % n) + n) % n
		if want := max(j, 0); slots[k] != want {
			return 0, fmt.Errorf("the chain's highest number is %d, so slot %d should hold %d, but it holds %d (all slots: %v)", top, k, want, slots[k], slots)
		}
	}
	return top, nil
}

// seqNumber parses a sequence block: 0 for the zeros it starts as, else
// "HEMD-SEQ j" padded with spaces to 4095 bytes and a newline.
func seqNumber(b []byte) (int, error) {
	if len(b) == 4096 && bytes.Count(b, []byte{0}) == 4096 {
		return 0, nil
	}
	var j int
	if _, err := fmt.Sscanf(string(b), "HEMD-SEQ %d", &j); err != nil || j < 1 || string(b) != fmt.Sprintf("%-4095s\n", fmt.Sprintf("HEMD-SEQ %d", j)) {
		return 0, fmt.Errorf("neither zeros nor one whole sequence block (%d bytes: %.24q…)", len(b), b)
	}
	return j, nil
}

// snapshotsUnderLoad waits, from console line from on, for the guest's
// load to be under way, takes loadSnapshots snapshots of vol through the
// hemd at control socket ctl, checking each (checkSnapshot) while the
// guest goes on writing, then tells the guest to stop (on the channel
// socket chSock) and waits for it to say so. hemd runs bin with env.
func snapshotsUnderLoad(t *testing.T, vm *VM, from int, chSock, bin string, env []string, ctl, vol, dir string) {
	t.Helper()
	ch, err := net.Dial("unix", chSock)
	if err != nil {
		t.Fatalf("the guest's second serial port: %v", err)
	}
	defer ch.Close()
	go io.Copy(io.Discard, ch)
	start := expect(t, vm, from, `HEMD-LOAD-START|HEMD-LOAD-FAIL`)
	if !strings.HasPrefix(start.Text, "HEMD-LOAD-START") {
		t.Fatalf("the guest: %s", start.Text)
	}
	at := expect(t, vm, start.Next, `HEMD-LOAD 2 synced`).Next
	var cowTotal int64
	for k := range loadSnapshots {
		snap := filepath.Join(dir, fmt.Sprintf("load%d.img", k))
		before := done(vm.Lines())
		t0 := time.Now()
		cmd := exec.Command(bin, "snapshot", "create", "--control", ctl, vol, snap)
		cmd.Env = append(os.Environ(), env...)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		if err := cmd.Run(); err != nil || !strings.Contains(errb.String(), "online=true") {
			t.Fatalf("hemd snapshot create: %v\n%s%s", err, out.String(), errb.String())
		}
		took := time.Since(t0)
		paused := regexp.MustCompile(`paused_us=(\d+)`).FindStringSubmatch(errb.String())
		cow := regexp.MustCompile(`copied_on_write=(\d+)`).FindStringSubmatch(errb.String())
		if paused == nil || cow == nil {
			t.Fatalf("hemd snapshot create logged no paused_us and copied_on_write:\n%s", errb.String())
		}
		n, _ := strconv.ParseInt(cow[1], 10, 64)
		cowTotal += n
		// The guest goes on: a round finishes after the snapshot.
		next := expect(t, vm, max(at, len(vm.Lines())), `HEMD-LOAD \d+ synced`)
		at = next.Next
		t.Logf("snapshot %d (%s) of the running guest in %v: paused_us=%s copied_on_write=%s; %d rounds synced and sequence number %d written before it; the guest went on (%s)",
			k, strings.TrimSpace(out.String()), took.Round(time.Millisecond), paused[1], cow[1], len(before.files), before.seq, next.Text)
		checkSnapshot(t, bin, env, snap, before)
	}
	// A guest write that reached a chunk before the copier did is what a
	// torn snapshot would get wrong; without one, this run could not tell.
	if cowTotal == 0 {
		t.Errorf("no guest write reached a chunk before the snapshot's copier did, in %d snapshots: the guest's writes did not overlap the copies", loadSnapshots)
	}
	if _, err := ch.Write([]byte("stop\n")); err != nil {
		t.Fatalf("the guest's second serial port: %v", err)
	}
	end := expect(t, vm, at, `HEMD-LOAD-END (\d+)`)
	// The guest's kernel logs a failed request or a filesystem error on
	// the console (the cloud image boots without quiet).
	for _, l := range vm.Lines() {
		if strings.Contains(l.Text, "I/O error") || strings.Contains(l.Text, "EXT4-fs error") || strings.Contains(l.Text, "Remounting filesystem read-only") ||
			strings.Contains(l.Text, "HEMD-LOAD-FAIL") {
			t.Fatalf("the guest: %s", l.Text)
		}
	}
	t.Logf("the guest wrote %s rounds, with no I/O error", end.Sub[1])
}

// checkSnapshot exports the snapshot at snap through its key and checks
// its ext4 as a boot would (see the top of this file), that it holds every
// file synced before it (want.files) as the guest wrote it, and that its
// sequence chain is one state of the chain, at want.seq at least. It
// removes the snapshot and its export after.
func checkSnapshot(t *testing.T, bin string, env []string, snap string, want loadDone) {
	t.Helper()
	defer os.Remove(snap)
	hemd := func(args ...string) string {
		t.Helper()
		cmd := exec.Command(bin, args...)
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("hemd %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	var head struct {
		State string `json:"state"`
	}
	if st := hemd("volume", "inspect", "--json", snap); json.Unmarshal([]byte(st), &head) != nil || head.State != "available" {
		t.Fatalf("snapshot %s is not available:\n%s", snap, st)
	}
	raw := snap + ".raw"
	hemd("volume", "export", snap, "--to", raw)
	defer os.Remove(raw)

	sb, err := exec.Command("dumpe2fs", "-h", raw).CombinedOutput()
	if err != nil {
		t.Fatalf("dumpe2fs -h on the snapshot %s: %v\n%s", snap, err, sb)
	}
	recovery := regexp.MustCompile(`(?m)^Filesystem features:.*\bneeds_recovery\b`).Match(sb)
	preen, code := e2fsck(t, "-fp", raw)
	if code > 1 {
		t.Fatalf("snapshot %s: e2fsck -fp (journal replay, then what a boot fixes unasked) exits %d: not a consistent ext4\n%s", snap, code, preen)
	}
	check, code := e2fsck(t, "-fn", raw)
	if code != 0 {
		t.Fatalf("snapshot %s: after the journal replay e2fsck -fn exits %d\n%s", snap, code, check)
	}

	// The files synced before the snapshot, in one debugfs run.
	files := filepath.Join(filepath.Dir(raw), filepath.Base(snap)+".files")
	if err := os.Mkdir(files, 0o755); err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(files)
	var cmds strings.Builder
	for i := range want.files {
		fmt.Fprintf(&cmds, "dump /hemd-load/f.%d %s/f.%d\n", i, files, i)
	}
	fmt.Fprintf(&cmds, "dump /hemd-seq/s %s/seq\n", files)
	cmdFile := files + ".cmd"
	if err := os.WriteFile(cmdFile, []byte(cmds.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(cmdFile)
	if out, err := exec.Command("debugfs", "-f", cmdFile, raw).CombinedOutput(); err != nil {
		t.Fatalf("debugfs on snapshot %s: %v\n%s", snap, err, out)
	}
	for i, sum := range want.files {
		b, err := os.ReadFile(filepath.Join(files, fmt.Sprintf("f.%d", i)))
		if err != nil {
			t.Fatalf("snapshot %s: /hemd-load/f.%d, synced before the snapshot, is not in it: %v", snap, i, err)
		}
		if got := sha256.Sum256(b); hex.EncodeToString(got[:]) != sum {
			t.Fatalf("snapshot %s: /hemd-load/f.%d (%d bytes) differs from what the guest synced before the snapshot", snap, i, len(b))
		}
	}
	seq, err := os.ReadFile(filepath.Join(files, "seq"))
	if err != nil || len(seq) != seqSlots*seqSpan {
		t.Fatalf("snapshot %s: /hemd-seq/s: %v, %d bytes", snap, err, len(seq))
	}
	slots := make([]int, seqSlots)
	for k := range slots {
		if slots[k], err = seqNumber(seq[k*seqSpan : k*seqSpan+4096]); err != nil {
			t.Fatalf("snapshot %s: /hemd-seq/s slot %d: %v", snap, k, err)
		}
	}
	top, err := seqCut(slots)
	if err != nil {
		t.Fatalf("snapshot %s: not a state the disk was in: %v", snap, err)
	}
	if top < want.seq {
		t.Fatalf("snapshot %s: the sequence chain stops at %d, but the guest had written %d before the snapshot was asked for", snap, top, want.seq)
	}
	firstLines := func(s string) string {
		l := strings.Split(strings.TrimSpace(s), "\n")
		if len(l) > 4 {
			l = append(l[:4], "…")
		}
		return strings.Join(l, " | ")
	}
	t.Logf("snapshot %s: journal needed replaying: %v; e2fsck -fp: %s; e2fsck -fn: clean; the %d files synced before it intact; the sequence chain at %d (%d written before), whole",
		filepath.Base(snap), recovery, firstLines(preen), len(want.files), top, want.seq)
}

// e2fsck runs e2fsck with flag on img and returns its output and exit
// status.
func e2fsck(t *testing.T, flag, img string) (string, int) {
	t.Helper()
	out, err := exec.Command("e2fsck", flag, img).CombinedOutput()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return string(out), 0
	case errors.As(err, &ee):
		return string(out), ee.ExitCode()
	}
	t.Fatalf("e2fsck %s %s: %v", flag, img, err)
	return "", 0
}

func TestSeqCut(t *testing.T) {
	for _, c := range []struct {
		slots []int
		top   int
		ok    bool
	}{
		{[]int{0, 0, 0, 0, 0, 0, 0, 0}, 0, true},
		{[]int{0, 1, 2, 3, 0, 0, 0, 0}, 3, true},
		{[]int{8, 1, 2, 3, 4, 5, 6, 7}, 8, true},
		{[]int{16, 17, 10, 11, 12, 13, 14, 15}, 17, true},
		{[]int{0, 1, 0, 3, 0, 0, 0, 0}, 0, false},        // 2 lost
		{[]int{8, 1, 2, 3, 4, 13, 6, 7}, 0, false},       // 13 in, 9..12 not
		{[]int{16, 9, 10, 11, 12, 13, 14, 15}, 16, true}, // 16 overwrote 8
		{[]int{16, 1, 10, 11, 12, 13, 14, 15}, 0, false}, // 9 lost
		{[]int{}, 0, false},
	} {
		top, err := seqCut(c.slots)
		if (err == nil) != c.ok || (c.ok && top != c.top) {
			t.Errorf("seqCut(%v) = %d, %v; want %d, ok %v", c.slots, top, err, c.top, c.ok)
		}
	}
	block := func(s string) []byte { return []byte(fmt.Sprintf("%-4095s\n", s)) }
	for _, c := range []struct {
		b    []byte
		want int
		ok   bool
	}{
		{make([]byte, 4096), 0, true},
		{block("HEMD-SEQ 5"), 5, true},
		{block("HEMD-SEQ 0"), 0, false},
		{append(block("HEMD-SEQ 12")[:2048], block("HEMD-SEQ 4")[2048:]...), 12, true}, // padding alike: whole
		{append(block("HEMD-SEQ 12")[:2048], make([]byte, 2048)...), 0, false},         // half written
		{block("HEMD-SEQ 5")[:4000], 0, false},
	} {
		j, err := seqNumber(c.b)
		if (err == nil) != c.ok || (c.ok && j != c.want) {
			t.Errorf("seqNumber(%.20q…) = %d, %v; want %d, ok %v", c.b, j, err, c.want, c.ok)
		}
	}
}
