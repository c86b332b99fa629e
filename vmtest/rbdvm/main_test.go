package rbdvm

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hemd/hemd/storage/rbd/cephtest"
	"github.com/hemd/hemd/vmtest"
)

var (
	hemdBin string
	cluster *cephtest.Cluster
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "hemd-rbdvm")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	hemdBin, err = vmtest.BuildHemd(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// 12 GiB (sparse): the cloud image is imported whole (2 GiB written).
	code := cephtest.Main(cephtest.Options{OSDSize: 12 << 30}, func(c *cephtest.Cluster) int {
		cluster = c
		return m.Run()
	})
	os.RemoveAll(dir)
	os.Exit(code)
}

// cephEnv points hemd at the test cluster as client.hemd, through the
// environment defaults of the --ceph-* flags.
func cephEnv() []string {
	return []string{"HEMD_CEPH_CONF=" + cluster.Conf, "HEMD_CEPH_ID=" + cluster.ClientID, "HEMD_CEPH_KEYRING=" + cluster.Keyring}
}

// env is hemd's environment with its state in state.
func env(state string) []string {
	return append([]string{"HEMD_STATE_DIR=" + state, "SOFTHSM2_CONF="}, cephEnv()...)
}

// cli runs hemd with its state in state and fails the test on error; it
// returns standard output.
func cli(t *testing.T, state string, args ...string) string {
	t.Helper()
	out, err := cliErr(state, args...)
	if err != nil {
		t.Fatalf("hemd %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(out)
}

// cliErr runs hemd; on error it returns standard output and error together.
func cliErr(state string, args ...string) (string, error) {
	cmd := exec.Command(hemdBin, args...)
	cmd.Env = append(os.Environ(), env(state)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String() + errb.String(), err
	}
	return out.String(), nil
}

var imageSeq atomic.Int64

// imageName returns a new image name in the test pool.
func imageName(t *testing.T) string {
	n := strings.NewReplacer("/", "-", "=", "-").Replace(t.Name())
	return fmt.Sprintf("rbd:%s/%s-%d", cluster.Pool, strings.ToLower(n), imageSeq.Add(1))
}

// rbdVolume is an encrypted hemd volume on an RBD image, its KMS state and
// a hemd to serve it.
type rbdVolume struct {
	state, name, id string
	hemd            vmtest.Hemd
}

func newRBDVolume(t *testing.T, size string) rbdVolume {
	t.Helper()
	v := rbdVolume{state: filepath.Join(t.TempDir(), "state"), name: imageName(t)}
	cli(t, v.state, "key", "create", "--alias", "alias/rbd")
	v.id = cli(t, v.state, "volume", "create", "--size", size, "--key", "alias/rbd", v.name)
	v.hemd = vmtest.Hemd{Bin: hemdBin, Env: env(v.state)}
	return v
}

// inspect returns hemd volume inspect --json of name.
func inspect(t *testing.T, state, name string) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal([]byte(cli(t, state, "volume", "inspect", "--json", name)), &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// rbdExport reads an image whole as the cluster's admin (what the cluster
// stores), into a file.
func rbdExport(t *testing.T, name string) []byte {
	t.Helper()
	p := filepath.Join(t.TempDir(), "export")
	if _, err := cluster.RBD(context.Background(), "export", strings.TrimPrefix(name, "rbd:"), p); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// soakScript runs the guest agent's soak on the first 16 MiB of the disk
// (as vmtest's migration and restart tests do).
func soakScript(seconds, workers int, seed uint64) string {
	return "agent soak /dev/vda " + strconv.Itoa(seconds) + " " + strconv.Itoa(workers) +
		" 0 16777216 " + strconv.FormatUint(seed, 10) + "\nsleep 600\n"
}

// waitEvent waits for event about volID in s's log.
func waitEvent(s *vmtest.Served, event, volID string, d time.Duration) bool {
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		if vmtest.HasEvent(s.Log(), event, volID) {
			return true
		}
	}
	return false
}
