package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// hemdCLI runs the test binary as hemd with its state in state.
func hemdCLI(t *testing.T, state string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "HEMD_TEST_MAIN=1", "HEMD_STATE_DIR="+state, "SOFTHSM2_CONF=")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		return out.String() + errb.String(), err
	}
	return out.String(), nil
}

func TestKeyAndVolumeCommands(t *testing.T) {
	if _, err := os.Stat("/usr/lib/softhsm/libsofthsm2.so"); err != nil {
		t.Skip("SoftHSM2 is not installed (make test installs softhsm2)")
	}
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	out, err := hemdCLI(t, state, "key", "create", "--alias", "alias/t", "--json")
	if err != nil {
		t.Fatalf("key create: %v\n%s", err, out)
	}
	var km struct {
		KeyMetadata struct{ KeyID, Arn, KeyState string }
	}
	if err := json.Unmarshal([]byte(out), &km); err != nil || km.KeyMetadata.KeyState != "Enabled" {
		t.Fatalf("key create --json: %v %s", err, out)
	}
	// PINs and token are made on first use, 0600.
	if st, err := os.Stat(filepath.Join(state, "pins.json")); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("pins.json: %v %v", st, err)
	}
	img := filepath.Join(dir, "raw.img")
	raw := bytes.Repeat([]byte("raw image data. "), 100000) // 1.6 MB, not a whole number of blocks
	os.WriteFile(img, raw[:len(raw)-7], 0o600)
	vol := filepath.Join(dir, "vol.img")
	if out, err := hemdCLI(t, state, "volume", "import", "--from", img, "--key", "alias/t", vol); err != nil {
		t.Fatalf("import: %v\n%s", err, out)
	}
	b, _ := os.ReadFile(vol)
	if bytes.Contains(b, []byte("raw image data")) {
		t.Fatal("plaintext in the imported volume")
	}
	exp := filepath.Join(dir, "out.img")
	if out, err := hemdCLI(t, state, "volume", "export", vol, "--to", exp); err != nil {
		t.Fatalf("export: %v\n%s", err, out)
	}
	got, _ := os.ReadFile(exp)
	if !bytes.Equal(got[:len(raw)-7], raw[:len(raw)-7]) || len(got)%512 != 0 {
		t.Fatal("export differs from the imported image")
	}
	out, err = hemdCLI(t, state, "volume", "inspect", "--json", vol)
	if err != nil || !strings.Contains(out, `"key_id": "`+km.KeyMetadata.Arn+`"`) || !strings.Contains(out, `"wrapped_dek"`) {
		t.Fatalf("inspect: %v\n%s", err, out)
	}
	// A disabled key refuses the export with the key named.
	hemdCLI(t, state, "key", "disable", "alias/t")
	out, err = hemdCLI(t, state, "volume", "export", vol, "--to", filepath.Join(dir, "x.img"))
	if err == nil || !strings.Contains(out, "DisabledException") || !strings.Contains(out, km.KeyMetadata.KeyID) {
		t.Fatalf("export with a disabled key: %v\n%s", err, out)
	}
	if _, err := os.Stat(filepath.Join(dir, "x.img")); err == nil {
		t.Fatal("a failed export left its output behind")
	}
	// A corrupt header is a clear error.
	f, _ := os.OpenFile(vol, os.O_RDWR, 0)
	f.WriteAt([]byte("XX"), 100)
	f.WriteAt([]byte("XX"), 512<<10+100)
	f.Close()
	out, err = hemdCLI(t, state, "volume", "inspect", vol)
	if err == nil || !strings.Contains(out, "both header copies are corrupt") {
		t.Fatalf("corrupt header: %v\n%s", err, out)
	}
}

// hemds that share a state dir and start together (hemd@ instances at
// boot) make one token with one set of PINs, and all of them open it.
func TestConcurrentFirstStart(t *testing.T) {
	if _, err := os.Stat("/usr/lib/softhsm/libsofthsm2.so"); err != nil {
		t.Skip("SoftHSM2 is not installed (make test installs softhsm2)")
	}
	for round := range 3 {
		state := t.TempDir()
		errs := make(chan error, 6)
		for range cap(errs) {
			go func() {
				out, err := hemdCLI(t, state, "key", "list")
				if err != nil {
					err = fmt.Errorf("%v: %s", err, out)
				}
				errs <- err
			}()
		}
		for range cap(errs) {
			if err := <-errs; err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
		}
		tokens, _ := os.ReadDir(filepath.Join(state, "tokens"))
		if len(tokens) != 1 {
			t.Fatalf("round %d: %d tokens, want 1", round, len(tokens))
		}
	}
}
