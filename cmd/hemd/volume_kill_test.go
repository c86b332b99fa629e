package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hemd/hemd/hem/volume"
)

// killImageSize is the image the kill tests copy: big enough that a kill
// lands mid-copy, small enough for 80 runs in well under a minute.
const killImageSize = 64 << 20

// killRig runs a hemd binary built for the test against one state dir.
type killRig struct {
	t        *testing.T
	bin      string
	dir      string // scratch: volumes, images, exports
	stateDir string
	img      []byte
}

// buildHemd builds the hemd binary (not the race-instrumented test binary,
// so the copies run at their real speed) into a temp dir.
func buildHemd(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "hemd")
	cmd := exec.Command("go", "build", "-o", bin, ".")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// scratchDir is a temp dir on tmpfs when there is one. A kill -9 leaves the
// page cache whole, so what these tests check does not depend on fsync;
// on a disk every fsync of the 64 MiB copies costs seconds, 80 runs would
// take minutes.
func scratchDir(t *testing.T) string {
	t.Helper()
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		if d, err := os.MkdirTemp("/dev/shm", "hemd-kill-"); err == nil {
			t.Cleanup(func() { os.RemoveAll(d) })
			return d
		}
	}
	return t.TempDir()
}

func (r *killRig) command(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, r.bin, args...)
	cmd.Env = append(os.Environ(), "HEMD_STATE_DIR="+r.stateDir, "SOFTHSM2_CONF=")
	return cmd
}

// run runs hemd to the end and returns its stdout and stderr together.
func (r *killRig) run(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := r.command(ctx, args...).CombinedOutput()
	return string(out), err
}

func (r *killRig) must(args ...string) string {
	r.t.Helper()
	out, err := r.run(args...)
	if err != nil {
		r.t.Fatalf("hemd %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// state returns the volume state `volume inspect --json` reports; "" when
// the header has none (what hemd wrote before states: taken as available).
func (r *killRig) volState(path string) (string, bool) {
	r.t.Helper()
	out, err := r.run("volume", "inspect", "--json", path)
	if err != nil {
		r.t.Fatalf("inspect %s: %v\n%s", path, err, out)
	}
	var h struct {
		State   string `json:"state"`
		Running *bool  `json:"operation_running"`
	}
	if err := json.Unmarshal([]byte(out[strings.IndexByte(out, '{'):]), &h); err != nil {
		r.t.Fatalf("inspect --json %s: %v\n%s", path, err, out)
	}
	return h.State, h.Running != nil && *h.Running
}

// exportEquals exports the volume at path and compares it with the image.
func (r *killRig) exportEquals(path string) {
	r.t.Helper()
	raw := path + ".raw"
	r.must("volume", "export", path, "--to", raw)
	got, err := os.ReadFile(raw)
	if err != nil {
		r.t.Fatal(err)
	}
	os.Remove(raw)
	if !bytes.Equal(got, r.img) {
		r.t.Fatalf("%s is available but its data is not the image", path)
	}
}

// refused checks that a volume marked incomplete is refused by hemd serve
// and shown as such by volume inspect, with what to do.
func (r *killRig) refused(path, state, hint string) {
	r.t.Helper()
	sock := filepath.Join(r.dir, "refused.sock")
	out, err := r.run("serve", "--socket", sock, "--volume", path)
	if err == nil || !strings.Contains(out, "is "+state) || !strings.Contains(out, hint) {
		r.t.Fatalf("hemd serve of a %s volume: %v\n%s", state, err, out)
	}
	out = r.must("volume", "inspect", path)
	if !strings.Contains(out, "state:              "+state) || !strings.Contains(out, hint) {
		r.t.Fatalf("volume inspect of a %s volume:\n%s", state, out)
	}
}

// killCase is one command killed at random points.
type killCase struct {
	name string
	args func(target string) []string
	// watch is the glob of the file whose appearance says the copy has
	// begun.
	watch func(target string) string
	// check judges what a (killed or finished) run left at target:
	// "absent", "complete" (data verified) or "incomplete" (marked and
	// refused); anything else fails the test.
	check func(r *killRig, target string) string
}

// TestKill9NoHalfMadeVolume kills import, snapshot create, snapshot copy and
// export with SIGKILL at random points, 20 times each. Every time, the
// target is absent, complete (its data checked), or marked creating and
// refused by hemd serve and shown so by volume inspect; an interrupted
// import resumes to the whole image.
func TestKill9NoHalfMadeVolume(t *testing.T) {
	if _, err := os.Stat("/usr/lib/softhsm/libsofthsm2.so"); err != nil {
		t.Skip("SoftHSM2 is not installed (make test installs softhsm2)")
	}
	began := time.Now()
	r := &killRig{t: t, bin: buildHemd(t), dir: scratchDir(t)}
	r.stateDir = filepath.Join(r.dir, "state")
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d, scratch %s, build %v", seed, r.dir, time.Since(began).Round(time.Millisecond))
	rng := rand.New(rand.NewPCG(seed, 0))
	r.img = make([]byte, killImageSize)
	rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)}).Read(r.img)
	img := filepath.Join(r.dir, "image.raw")
	if err := os.WriteFile(img, r.img, 0o600); err != nil {
		t.Fatal(err)
	}
	r.must("key", "create", "--alias", "alias/kill")
	r.must("key", "create", "--alias", "alias/kill2")
	vol, snap := filepath.Join(r.dir, "base.vol"), filepath.Join(r.dir, "base.snap")
	r.must("volume", "import", "--from", img, "--key", "alias/kill", vol)
	r.must("snapshot", "create", vol, snap)
	volData, _ := os.ReadFile(vol)

	cases := []killCase{{
		name: "import",
		args: func(t string) []string {
			return []string{"volume", "import", "--checkpoint", "8M", "--from", img, "--key", "alias/kill", t}
		},
		watch: func(t string) string { return t },
		check: func(r *killRig, target string) string {
			t := r.t
			if _, err := os.Stat(target); os.IsNotExist(err) {
				return "absent"
			}
			switch st, running := r.volState(target); {
			case running:
				t.Fatalf("%s: the killed import still holds the volume", target)
			case st == "available" || st == "":
				r.exportEquals(target)
				return "complete"
			case st == "creating":
				r.refused(target, "creating", "hemd volume import --resume --from "+img+" "+target)
				// The interrupted import resumes to the whole image.
				r.must("volume", "import", "--resume", target)
				if st, _ := r.volState(target); st != "available" {
					t.Fatalf("%s after --resume: %s", target, st)
				}
				r.exportEquals(target)
				return "incomplete"
			default:
				t.Fatalf("%s: state %q", target, st)
			}
			return ""
		},
	}, {
		name:  "snapshot create",
		args:  func(t string) []string { return []string{"snapshot", "create", vol, t} },
		watch: func(t string) string { return t },
		check: func(r *killRig, target string) string {
			t := r.t
			if _, err := os.Stat(target); os.IsNotExist(err) {
				return "absent"
			}
			switch st, _ := r.volState(target); st {
			case "available", "":
				// Same key, same ciphertext: the data area is the volume's.
				got, err := os.ReadFile(target)
				if err != nil {
					t.Fatal(err)
				}
				if len(got) != len(volData) || !bytes.Equal(got[volume.DataOffset:], volData[volume.DataOffset:]) {
					t.Fatalf("%s is available but its data is not the volume's", target)
				}
				return "complete"
			case "creating":
				r.refused(target, "creating", "delete "+target+" and run hemd snapshot create again")
				return "incomplete"
			default:
				t.Fatalf("%s: state %q", target, st)
			}
			return ""
		},
	}, {
		name:  "snapshot copy",
		args:  func(t string) []string { return []string{"snapshot", "copy", "--key", "alias/kill2", snap, t} },
		watch: func(t string) string { return t },
		check: func(r *killRig, target string) string {
			t := r.t
			if _, err := os.Stat(target); os.IsNotExist(err) {
				return "absent"
			}
			switch st, _ := r.volState(target); st {
			case "available", "":
				r.exportEquals(target)
				return "complete"
			case "creating":
				r.refused(target, "creating", "delete "+target+" and run hemd snapshot copy again")
				return "incomplete"
			default:
				t.Fatalf("%s: state %q", target, st)
			}
			return ""
		},
	}, {
		name:  "export",
		args:  func(t string) []string { return []string{"volume", "export", vol, "--to", t} },
		watch: func(t string) string { return t + ".partial-*" },
		check: func(r *killRig, target string) string {
			t := r.t
			got, err := os.ReadFile(target)
			if os.IsNotExist(err) {
				if m, _ := filepath.Glob(target + ".partial-*"); len(m) > 0 {
					return "incomplete" // killed mid-copy: only the partial file
				}
				return "absent"
			}
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, r.img) {
				t.Fatalf("%s exists but is not the whole export (%d bytes)", target, len(got))
			}
			return "complete"
		},
	}}
	for _, c := range cases {
		t.Run(strings.ReplaceAll(c.name, " ", "_"), func(t *testing.T) {
			rt := *r
			rt.t = t
			r := &rt
			// Uninterrupted runs: they must complete, and they time the
			// start (until the watched file appears) and the copy; the
			// faster of two, so that a cold first run does not aim the
			// kills past the end.
			startDur, copyDur := time.Duration(1<<62), time.Duration(1<<62)
			for i := range 2 {
				target := filepath.Join(r.dir, fmt.Sprintf("calibrate-%s-%d", strings.ReplaceAll(c.name, " ", "_"), i))
				s, d := r.killAt(c, target, -1)
				if got := c.check(r, target); got != "complete" {
					t.Fatalf("an uninterrupted %s left %s", c.name, got)
				}
				os.Remove(target)
				startDur, copyDur = min(startDur, s), min(copyDur, d)
			}
			t.Logf("start %v, copy %v", startDur.Round(time.Millisecond), copyDur.Round(time.Millisecond))
			counts := map[string]int{}
			for i := range 20 {
				target := filepath.Join(r.dir, fmt.Sprintf("%s-%d", strings.ReplaceAll(c.name, " ", "_"), i))
				var after time.Duration
				if i%5 == 0 {
					// From the start: the kill may land before or as the
					// target is made.
					after = -time.Duration(rng.Int64N(int64(startDur) + 1))
				} else {
					after = time.Duration(rng.Int64N(int64(copyDur)*6/5 + 1))
				}
				r.killAt(c, target, after)
				counts[c.check(r, target)]++
				os.Remove(target)
				leftovers, _ := filepath.Glob(target + ".*")
				for _, f := range leftovers {
					os.Remove(f)
				}
			}
			t.Logf("%s killed 20 times: %v", c.name, counts)
			// Most kills are aimed inside the copy: some must land there,
			// or the test has proved nothing.
			if counts["incomplete"] < 3 {
				t.Fatalf("only %d of 20 kills landed mid-copy: %v", counts["incomplete"], counts)
			}
		})
	}
	// SIGINT (or SIGTERM) mid-import: the import stops at its checkpoint,
	// says how to resume and exits 1, not 0 as a bare cancellation would.
	t.Run("import_sigint", func(t *testing.T) {
		for i := range 10 {
			target := filepath.Join(r.dir, fmt.Sprintf("sigint-%d", i))
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			cmd := r.command(ctx, "volume", "import", "--checkpoint", "4M", "--from", img, "--key", "alias/kill", target)
			var out bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &out
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Microsecond) {
				if _, err := os.Stat(target); err == nil {
					break
				}
				if time.Now().After(deadline) {
					cmd.Process.Kill()
					cmd.Wait()
					t.Fatalf("%s did not appear:\n%s", target, out.String())
				}
			}
			time.Sleep(time.Duration(i) * time.Millisecond)
			cmd.Process.Signal(os.Interrupt)
			err := cmd.Wait()
			cancel()
			st, _ := (&killRig{t: t, bin: r.bin, stateDir: r.stateDir}).volState(target)
			if st == "available" {
				continue // finished before the signal
			}
			if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(out.String(), "--resume --from "+img) {
				t.Fatalf("interrupted import: %v (state %s)\n%s", err, st, out.String())
			}
			return
		}
		t.Fatal("SIGINT never landed inside the import")
	})
	t.Logf("total %v", time.Since(began).Round(time.Millisecond))
}

// killAt runs c against target and SIGKILLs it: after > 0 that long after
// the watched file appeared, after <= 0 that long (negated) after the start,
// after == -1 never. It returns how long the start took (until the watched
// file appeared) and the copy (from then to the exit).
func (r *killRig) killAt(c killCase, target string, after time.Duration) (startDur, copyDur time.Duration) {
	r.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := r.command(ctx, c.args(target)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		r.t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	kill := func() {
		cmd.Process.Signal(syscall.SIGKILL)
		<-exited
	}
	if after <= 0 && after != -1 {
		time.Sleep(-after)
		kill()
		return 0, 0
	}
	var appeared time.Time
	for appeared.IsZero() {
		if m, _ := filepath.Glob(c.watch(target)); len(m) > 0 {
			appeared = time.Now()
			break
		}
		select {
		case err := <-exited:
			if after == -1 {
				r.t.Fatalf("%s exited (%v) before %s appeared:\n%s", c.name, err, c.watch(target), out.String())
			}
			return 0, 0 // done before the watch saw it
		case <-time.After(100 * time.Microsecond):
		}
	}
	if after == -1 {
		if err := <-exited; err != nil {
			r.t.Fatalf("%s: %v\n%s", c.name, err, out.String())
		}
		return appeared.Sub(t0), time.Since(appeared)
	}
	select {
	case <-exited: // finished first: a complete result to check
	case <-time.After(after):
		kill()
	}
	return 0, 0
}
