package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hemd/hemd/vhost/frontend"
)

// snapLog is a hemd's output, read while hemd writes it.
type snapLog struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *snapLog) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *snapLog) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// snapServe starts hemd serve with its state in state and waits for each
// of the paths in wait to appear.
func snapServe(t *testing.T, state string, wait []string, args ...string) (*exec.Cmd, *snapLog) {
	t.Helper()
	cmd := exec.Command(os.Args[0], append([]string{"serve"}, args...)...)
	cmd.Env = append(os.Environ(), "HEMD_TEST_MAIN=1", "HEMD_STATE_DIR="+state, "SOFTHSM2_CONF=")
	out := &snapLog{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for _, p := range wait {
		for i := 0; ; i++ {
			if _, err := os.Stat(p); err == nil {
				break
			}
			if i == 400 {
				t.Fatalf("hemd serve %v: no %s\n%s", args, p, out)
			}
			time.Sleep(25 * time.Millisecond)
		}
	}
	return cmd, out
}

// Block tags: each 4 KiB block the test writes says which block it is and
// which of that block's writes (its generation), and the rest of it is a
// filler that depends on both, so a torn or misplaced block is seen.
const snapBlock = 4096

func snapTag(p []byte, block, gen uint64) {
	binary.LittleEndian.PutUint64(p[0:], block)
	binary.LittleEndian.PutUint64(p[8:], gen)
	x := block*0x9e3779b97f4a7c15 ^ gen*0xbf58476d1ce4e5b9 | 1
	for i := 16; i+8 <= len(p); i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(p[i:], x)
	}
}

// snapUntag returns the generation block holds, 0 for a block never
// written: what it held at first, initial (what zeros decrypt to).
func snapUntag(p, initial []byte, block uint64) (uint64, error) {
	if bytes.Equal(p, initial) {
		return 0, nil
	}
	gen := binary.LittleEndian.Uint64(p[8:])
	want := make([]byte, len(p))
	snapTag(want, block, gen)
	if !bytes.Equal(p, want) {
		return 0, fmt.Errorf("block %d: not a whole block of generation %d (it says block %d)", block, gen, binary.LittleEndian.Uint64(p))
	}
	return gen, nil
}

// A block's writes, in generation order (one in flight at a time), with the
// event numbers of their issue and acknowledgement; one counter orders the
// events of both queues and the snapshot requests.
type snapWrite struct{ issue, ack int64 }

const snapPending = int64(1) << 62 // the ack of a write in flight

// snapCut checks that a snapshot holding generation got[b] of each block b
// is a state the disk was in between events req and ans: that there is a
// point P, req <= P < ans, such that every block's write got[b] was issued
// before P (generation 0: the zeros the disk started with) and its next
// write was acknowledged after it. So every write acknowledged before the
// snapshot was asked for is in it, none issued after the answer came, and
// the writes in between are one cut of the acknowledged order. It returns
// the range of such points.
func snapCut(req, ans int64, writes [][]snapWrite, got []uint64) (lo, hi int64, err error) {
	lo, hi = req, ans
	for b, ws := range writes {
		g := got[b]
		if g > uint64(len(ws)) {
			return 0, 0, fmt.Errorf("block %d holds generation %d, which was never written (%d writes)", b, g, len(ws))
		}
		from, to := int64(-1), snapPending
		if g > 0 {
			from = ws[g-1].issue
		}
		if g < uint64(len(ws)) {
			to = ws[g].ack
		}
		// P is in [from, to): after the issue of write g, before the ack
		// of write g+1.
		lo, hi = max(lo, from), min(hi, to)
		if lo >= hi {
			return 0, 0, fmt.Errorf("block %d at generation %d (issued at event %d, the next acknowledged at %d) leaves no point in events [%d, %d) consistent with the blocks before it",
				b, g, from, to, req, ans)
		}
	}
	return lo, hi, nil
}

// A guest writes generation-tagged blocks on two queues while snapshots of
// its encrypted volume are taken through hemd serve's control socket (and
// one through hemd snapshot create): each snapshot, read back through the
// volume's key, is a state the disk was in, the guest's writes going on
// during each.
func TestSnapshotOnlinePointInTime(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	if out, err := hemdCLI(t, state, "key", "create", "--alias", "alias/snap"); err != nil {
		t.Fatalf("key create: %v\n%s", err, out)
	}
	const volSize, blocks, queues, depth = 32 << 20, (32 << 20) / snapBlock, 2, 16
	vol := filepath.Join(dir, "vol.img")
	out, err := hemdCLI(t, state, "volume", "create", "--size", "32M", "--key", "alias/snap", vol)
	if err != nil {
		t.Fatalf("volume create: %v\n%s", err, out)
	}
	volID := strings.TrimSpace(out)
	// What the blocks hold before the guest writes them.
	initial := filepath.Join(dir, "initial.raw")
	if out, err := hemdCLI(t, state, "volume", "export", vol, "--to", initial); err != nil {
		t.Fatalf("export: %v\n%s", err, out)
	}
	before, err := os.ReadFile(initial)
	if err != nil || len(before) != volSize {
		t.Fatalf("export: %v, %d bytes", err, len(before))
	}
	os.Remove(initial)
	sock, ctl := filepath.Join(dir, "vol.sock"), filepath.Join(dir, "run", "control.sock")
	_, hemdOut := snapServe(t, state, []string{sock, ctl}, "--socket", sock, "--volume", vol, "--queues", "2", "--control", ctl)
	if st, err := os.Stat(ctl); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("control socket: %v, mode %v; want 0600", err, st.Mode())
	}
	if st, err := os.Stat(filepath.Dir(ctl)); err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("control socket directory: %v, mode %v; want 0700", err, st.Mode())
	}

	c, err := frontend.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Setup(frontend.Options{MemSize: 4 << 20, Queues: queues}); err != nil {
		t.Fatalf("setup: %v\n%s", err, hemdOut)
	}
	// Each queue has depth request slots in guest memory, laid out before
	// the queues start (Alloc is not for concurrent use).
	type slot struct{ hdr, data, status uint64 }
	slots := make([][]slot, queues)
	for q := range slots {
		for range depth {
			var s slot
			s.hdr, _ = c.Alloc(16, 16)
			s.data, _ = c.Alloc(snapBlock, 4096)
			s.status, err = c.Alloc(1, 1)
			if err != nil {
				t.Fatal(err)
			}
			slots[q] = append(slots[q], s)
		}
	}

	var events atomic.Int64
	var mu sync.Mutex // guards writes
	writes := make([][]snapWrite, blocks)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	werrs := make([]error, queues)
	acked := make([]int64, queues)
	for q := range queues {
		wg.Add(1)
		go func() {
			defer wg.Done()
			werrs[q] = func() error {
				// Queue q writes the blocks b with b%queues == q, at most
				// one write of a block in flight.
				qu := c.Queues[q]
				rng := rand.New(rand.NewPCG(uint64(q), 7))
				free := slices.Clone(slots[q])
				type flight struct {
					s     slot
					block int
					gen   int
				}
				inflight := map[uint16]flight{}
				busy := map[int]bool{}
				var used []frontend.Used
				for {
					stopping := false
					select {
					case <-stop:
						stopping = true
					default:
					}
					if stopping && len(inflight) == 0 {
						return nil
					}
					for !stopping && len(free) > 0 {
						b := rng.IntN(blocks/queues)*queues + q
						if busy[b] {
							continue
						}
						s := free[len(free)-1]
						free = free[:len(free)-1]
						mu.Lock()
						gen := len(writes[b]) + 1
						writes[b] = append(writes[b], snapWrite{issue: events.Add(1), ack: snapPending})
						mu.Unlock()
						binary.LittleEndian.PutUint32(c.Mem[s.hdr:], 1) // OUT
						binary.LittleEndian.PutUint32(c.Mem[s.hdr+4:], 0)
						binary.LittleEndian.PutUint64(c.Mem[s.hdr+8:], uint64(b)*snapBlock/512)
						snapTag(c.Mem[s.data:s.data+snapBlock], uint64(b), uint64(gen))
						c.Mem[s.status] = 0xee
						head, err := qu.Add([]frontend.Buf{{Addr: s.hdr, Len: 16}, {Addr: s.data, Len: snapBlock}, {Addr: s.status, Len: 1, Write: true}})
						if err != nil {
							return err
						}
						inflight[head] = flight{s, b, gen}
						busy[b] = true
					}
					if err := qu.Kick(); err != nil {
						return err
					}
					var err error
					if used, err = qu.Wait(ctx, used[:0]); err != nil {
						return fmt.Errorf("queue %d: %w (%d in flight)", q, err, len(inflight))
					}
					for _, u := range used {
						f, ok := inflight[u.Head]
						if !ok {
							return fmt.Errorf("queue %d: completion of unknown head %d", q, u.Head)
						}
						if st := c.Mem[f.s.status]; st != 0 {
							return fmt.Errorf("queue %d: write of block %d: status %d", q, f.block, st)
						}
						ack := events.Add(1)
						mu.Lock()
						writes[f.block][f.gen-1].ack = ack
						mu.Unlock()
						delete(inflight, u.Head)
						delete(busy, f.block)
						free = append(free, f.s)
						acked[q]++
					}
				}
			}()
		}()
	}
	stopWriters := func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		wg.Wait()
	}
	defer stopWriters()

	type snapTaken struct {
		path     string
		id       string
		req, ans int64
		answer   snapshotAnswer
		cli      bool
	}
	var snaps []snapTaken
	time.Sleep(200 * time.Millisecond) // the guest writes a while first
	for i := range 5 {
		time.Sleep(time.Duration(20+20*i) * time.Millisecond)
		s := snapTaken{path: filepath.Join(dir, fmt.Sprintf("snap%d.img", i)), cli: i == 2}
		s.req = events.Add(1)
		if s.cli {
			out, err := hemdCLI(t, state, "snapshot", "create", "--control", ctl, vol, s.path)
			if err != nil {
				t.Fatalf("hemd snapshot create: %v\n%s\nhemd serve:\n%s", err, out, hemdOut)
			}
			s.id = strings.TrimSpace(out)
		} else {
			err := controlCall(ctx, ctl, snapshotRequest{Op: "snapshot", Volume: vol, Target: s.path}, &s.answer)
			if err != nil {
				t.Fatalf("snapshot %d: %v\nhemd serve:\n%s", i, err, hemdOut)
			}
			s.id = s.answer.SnapshotID
		}
		s.ans = events.Add(1)
		snaps = append(snaps, s)
	}
	stopWriters()
	for q, err := range werrs {
		if err != nil {
			t.Fatalf("queue %d: %v\nhemd serve:\n%s", q, err, hemdOut)
		}
	}
	t.Logf("writes acknowledged: %v", acked)

	var volHead map[string]any
	out, err = hemdCLI(t, state, "volume", "inspect", "--json", vol)
	if err != nil || json.Unmarshal([]byte(out), &volHead) != nil {
		t.Fatalf("inspect volume: %v\n%s", err, out)
	}
	var paused []int64
	var copiedOnWrite int64
	for i, s := range snaps {
		// The snapshot is complete, and shares the volume's data key.
		var head map[string]any
		out, err := hemdCLI(t, state, "volume", "inspect", "--json", s.path)
		if err != nil || json.Unmarshal([]byte(out), &head) != nil {
			t.Fatalf("snapshot %d: inspect: %v\n%s", i, err, out)
		}
		if head["volume_id"] != s.id || head["state"] != "available" ||
			head["wrapped_dek"] != volHead["wrapped_dek"] || head["key_id"] != volHead["key_id"] ||
			fmt.Sprint(head["encryption_context"]) != fmt.Sprint(volHead["encryption_context"]) {
			t.Fatalf("snapshot %d: header %v, want id %s, available, the key of %v", i, head, s.id, volHead)
		}
		// Read back through the volume's key.
		raw := filepath.Join(dir, fmt.Sprintf("snap%d.raw", i))
		if out, err := hemdCLI(t, state, "volume", "export", s.path, "--to", raw); err != nil {
			t.Fatalf("snapshot %d: export: %v\n%s", i, err, out)
		}
		img, err := os.ReadFile(raw)
		if err != nil || len(img) != volSize {
			t.Fatalf("snapshot %d: export: %v, %d bytes", i, err, len(img))
		}
		os.Remove(raw)
		got := make([]uint64, blocks)
		for b := range blocks {
			if got[b], err = snapUntag(img[b*snapBlock:(b+1)*snapBlock], before[b*snapBlock:(b+1)*snapBlock], uint64(b)); err != nil {
				t.Fatalf("snapshot %d: %v", i, err)
			}
		}
		lo, hi, err := snapCut(s.req, s.ans, writes, got)
		if err != nil {
			t.Fatalf("snapshot %d (asked at event %d, answered at %d): not a state the disk was in: %v", i, s.req, s.ans, err)
		}
		during := 0
		for _, ws := range writes {
			for _, w := range ws {
				if w.ack > s.req && w.ack < s.ans {
					during++
				}
			}
		}
		how := fmt.Sprintf("paused %d µs, %d chunks copied on write, %.3f s", s.answer.PausedUS, s.answer.CopiedOnWrite, s.answer.Seconds)
		if s.cli {
			how = "through hemd snapshot create"
		}
		t.Logf("snapshot %d (%s): a cut at events [%d, %d) of [%d, %d); %d writes acknowledged while it was taken; %s",
			i, s.id, lo, hi, s.req, s.ans, during, how)
		if during == 0 {
			t.Errorf("snapshot %d: no write was acknowledged while it was taken: the guest stopped", i)
		}
		if !s.cli {
			paused = append(paused, s.answer.PausedUS)
			copiedOnWrite += s.answer.CopiedOnWrite
			if s.answer.Volume != volID || s.answer.ChunkSize <= 0 {
				t.Errorf("snapshot %d: answer %+v, want volume %s", i, s.answer, volID)
			}
		}
	}
	sort.Slice(paused, func(i, j int) bool { return paused[i] < paused[j] })
	median := paused[len(paused)/2]
	t.Logf("paused_us: median %d of %v; chunks copied on write in all: %d", median, paused, copiedOnWrite)
	if median > 20000 {
		t.Errorf("the guest's writes were held back %d µs (median): want a few milliseconds at most", median)
	}
	if !strings.Contains(hemdOut.String(), "snapshot created") {
		t.Errorf("hemd serve did not log the snapshots:\n%s", hemdOut)
	}
}

// The control socket says what is wrong with a request, naming the volume;
// hemd snapshot create copies a volume no hemd serves offline, as before,
// and refuses one that a hemd it cannot reach writes.
func TestSnapshotControlErrorsAndOffline(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	if out, err := hemdCLI(t, state, "key", "create", "--alias", "alias/snap"); err != nil {
		t.Fatalf("key create: %v\n%s", err, out)
	}
	vol, other := filepath.Join(dir, "vol.img"), filepath.Join(dir, "other.img")
	for _, p := range []string{vol, other} {
		if out, err := hemdCLI(t, state, "volume", "create", "--size", "4M", "--key", "alias/snap", p); err != nil {
			t.Fatalf("volume create: %v\n%s", err, out)
		}
	}
	sock, ctl := filepath.Join(dir, "vol.sock"), filepath.Join(dir, "control.sock")
	snapServe(t, state, []string{sock, ctl}, "--socket", sock, "--volume", vol, "--control", ctl)
	ctx := context.Background()

	ask := func(req string) map[string]any {
		t.Helper()
		c, err := net.Dial("unix", ctl)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte(req))
		c.(*net.UnixConn).CloseWrite()
		var ans map[string]any
		if err := json.NewDecoder(c).Decode(&ans); err != nil {
			t.Fatalf("%s: %v", req, err)
		}
		return ans
	}
	for _, c := range []struct{ req, code, want string }{
		{`{"op":"snapshot"`, codeBadRequest, "read request"},
		{`{"op":"defragment"}`, codeBadRequest, `unknown op "defragment"`},
		{`{"op":"snapshot","volume":"` + vol + `","target":"` + dir + `/x","color":"red"}`, codeBadRequest, "unknown field"},
		{`{"op":"snapshot","target":"` + dir + `/x"}`, codeBadRequest, "no volume"},
		{`{"op":"snapshot","volume":"` + vol + `","target":"rel.img"}`, codeBadRequest, "not an absolute path"},
		{`{"op":"snapshot","volume":"` + other + `","target":"` + dir + `/x"}`, codeNotServed, other + " is not served by this hemd"},
		{`{"op":"snapshot","volume":"vol-00000000000000000","target":"` + dir + `/x"}`, codeNotServed, "vol-00000000000000000 is not served"},
		{`{"op":"snapshot","volume":"` + vol + `","target":"` + vol + `"}`, codeFailed, "exists"},
		{`{"op":"snapshot","volume":"` + vol + `","target":"` + dir + `/x","snapshot_id":"snap-1"}`, codeFailed, "not snap- and 17 hex digits"},
	} {
		ans := ask(c.req)
		if ans["ok"] != false || ans["code"] != c.code || !strings.Contains(fmt.Sprint(ans["error"]), c.want) {
			t.Errorf("%s: answer %v, want code %s and %q", c.req, ans, c.code, c.want)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "x")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a refused snapshot left a file: %v", err)
	}
	// A client that shuts down its sending side after the request (socat
	// does) still gets its snapshot.
	if ans := ask(`{"op":"snapshot","volume":"` + vol + `","target":"` + dir + `/half"}`); ans["ok"] != true ||
		!strings.HasPrefix(fmt.Sprint(ans["snapshot_id"]), "snap-") {
		t.Fatalf("snapshot asked with the sending side shut down: %v", ans)
	}
	// By id, and with the id asked for.
	var ans snapshotAnswer
	snapID := "snap-0123456789abcdef0"
	if err := controlCall(ctx, ctl, snapshotRequest{Op: "snapshot", Volume: "", Target: filepath.Join(dir, "y")}, nil); err == nil {
		t.Fatal("a request without a volume was answered ok")
	}
	out, err := hemdCLI(t, state, "volume", "inspect", "--json", vol)
	if err != nil {
		t.Fatal(err)
	}
	var vh struct {
		VolumeID string `json:"volume_id"`
	}
	json.Unmarshal([]byte(out), &vh)
	if err := controlCall(ctx, ctl, snapshotRequest{Op: "snapshot", Volume: vh.VolumeID, Target: filepath.Join(dir, "y"), SnapshotID: snapID}, &ans); err != nil {
		t.Fatal(err)
	}
	if ans.SnapshotID != snapID || ans.Volume != vh.VolumeID {
		t.Fatalf("answer %+v", ans)
	}

	// Not served, no hemd at the control socket: offline, as before.
	out, err = hemdCLI(t, state, "snapshot", "create", "--control", filepath.Join(dir, "nobody.sock"), other, filepath.Join(dir, "o1"))
	if err != nil || !strings.HasPrefix(out, "snap-") {
		t.Fatalf("offline snapshot: %v\n%s", err, out)
	}
	// Not served by the hemd asked: offline too.
	out, err = hemdCLI(t, state, "snapshot", "create", "--control", ctl, other, filepath.Join(dir, "o2"))
	if err != nil || !strings.HasPrefix(out, "snap-") {
		t.Fatalf("snapshot of a volume the hemd asked does not serve: %v\n%s", err, out)
	}
	// Written by a hemd that cannot be asked: refused, naming it, and no
	// torn copy made.
	sock2 := filepath.Join(dir, "other.sock")
	cmd, _ := snapServe(t, state, []string{sock2}, "--socket", sock2, "--volume", other, "--control", "none")
	out, err = hemdCLI(t, state, "snapshot", "create", "--control", ctl, other, filepath.Join(dir, "o3"))
	if err == nil || !strings.Contains(out, "in use by") || !strings.Contains(out, fmt.Sprintf("pid %d", cmd.Process.Pid)) ||
		!strings.Contains(out, "does not serve it") {
		t.Fatalf("snapshot of a volume a hemd without a control socket writes: %v\n%s", err, out)
	}
	if _, err := os.Stat(filepath.Join(dir, "o3")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("refused snapshot left a file: %v", err)
	}
}
