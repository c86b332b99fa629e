// Package vmtest boots real guests under QEMU (TCG) with their disk on a
// vhost-user-blk back-end — hemd, or qemu-storage-daemon as the peer that
// proves the harness — runs a scenario in the guest and reads its result off
// the serial console.
//
// The guest is built from Debian packages only: the kernel of
// linux-image-cloud-amd64 and busybox from busybox-static, fetched with
// apt-get download and cached under build/vmtest/ (keyed by package
// versions), plus a static Go agent (vmtest/agent) for the byte work.
//
// Environment:
//
//	HEMD_VMTEST_CACHE   where guests are cached (default <repo>/build/vmtest)
//	HEMD_VMTEST_TIMEOUT how long one VM may run (default 180s)
package vmtest

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// Guest is a kernel and a base initramfs.
type Guest struct {
	Kernel string
	Initrd string // newc cpio: busybox, /init, the virtio modules
	Agent  string // the static agent binary
}

// modules are loaded by /init in this order (those built in are skipped).
var modules = []string{
	"drivers/virtio/virtio_ring", "drivers/virtio/virtio", "drivers/virtio/virtio_pci_legacy_dev",
	"drivers/virtio/virtio_pci_modern_dev", "drivers/virtio/virtio_pci", "drivers/block/virtio_blk",
}

// RepoRoot finds the directory holding go.mod.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("vmtest: go.mod not found above the working directory")
		}
		dir = parent
	}
}

func cacheDir() (string, error) {
	if d := os.Getenv("HEMD_VMTEST_CACHE"); d != "" {
		return d, nil
	}
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, "build", "vmtest"), nil
}

var (
	guestOnce sync.Once
	guest     *Guest
	guestErr  error
)

// RequireQEMU skips the test when QEMU truly cannot run here.
func RequireQEMU(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("qemu-system-x86_64 is not installed: VM tests cannot run (make test installs it)")
	}
}

// BuildGuest returns the cached guest, building it on first use.
func BuildGuest(t testing.TB) *Guest {
	t.Helper()
	RequireQEMU(t)
	g, err := LoadGuest()
	if err != nil {
		t.Fatalf("vmtest: building the guest: %v", err)
	}
	return g
}

// LoadGuest is BuildGuest for programs: the cached guest, built on first use.
func LoadGuest() (*Guest, error) {
	guestOnce.Do(func() { guest, guestErr = buildGuest() })
	return guest, guestErr
}

func run(dir, name string, args ...string) ([]byte, error) {
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// kernelPackage resolves linux-image-cloud-amd64 to the package holding the
// kernel, with its version.
func kernelPackage() (name, version string, err error) {
	out, err := run("", "apt-cache", "depends", "linux-image-cloud-amd64")
	if err != nil {
		return "", "", err
	}
	m := regexp.MustCompile(`Depends: (linux-image-[0-9][^\s]*-cloud-amd64)`).FindSubmatch(out)
	if m == nil {
		return "", "", fmt.Errorf("no kernel dependency in: %s (run apt-get update)", out)
	}
	name = string(m[1])
	out, err = run("", "apt-cache", "policy", name)
	if err != nil {
		return "", "", err
	}
	v := regexp.MustCompile(`Candidate: (\S+)`).FindSubmatch(out)
	if v == nil || string(v[1]) == "(none)" {
		return "", "", fmt.Errorf("%s has no candidate version (run apt-get update)", name)
	}
	return name, string(v[1]), nil
}

func buildGuest() (*Guest, error) {
	cache, err := cacheDir()
	if err != nil {
		return nil, err
	}
	unlock, err := LockCache(cache)
	if err != nil {
		return nil, err
	}
	defer unlock()
	kpkg, kver, err := kernelPackage()
	if err != nil {
		return nil, err
	}
	bver := "none"
	if out, err := run("", "apt-cache", "policy", "busybox-static"); err == nil {
		if v := regexp.MustCompile(`Candidate: (\S+)`).FindSubmatch(out); v != nil {
			bver = string(v[1])
		}
	}
	key := sanitize(kpkg + "_" + kver + "_busybox_" + bver)
	dir := filepath.Join(cache, key)
	g := &Guest{Kernel: filepath.Join(dir, "vmlinuz"), Initrd: filepath.Join(dir, "initrd.cpio")}
	agent, err := buildAgent(cache)
	if err != nil {
		return nil, err
	}
	g.Agent = agent
	if _, err := os.Stat(filepath.Join(dir, "done")); err == nil {
		return g, nil
	}
	os.RemoveAll(dir)
	work := dir + ".tmp"
	os.RemoveAll(work)
	if err := os.MkdirAll(work, 0o755); err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)
	for _, p := range []string{kpkg + "=" + kver, "busybox-static"} {
		if _, err := run(work, "apt-get", "download", p); err != nil {
			return nil, fmt.Errorf("fetching %s from Debian: %w", p, err)
		}
	}
	debs, _ := filepath.Glob(filepath.Join(work, "*.deb"))
	root := filepath.Join(work, "root")
	for _, d := range debs {
		if _, err := run(work, "dpkg-deb", "-x", d, root); err != nil {
			return nil, err
		}
	}
	kernels, _ := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
	if len(kernels) != 1 {
		return nil, fmt.Errorf("%d kernels in %s", len(kernels), kpkg)
	}
	release := strings.TrimPrefix(filepath.Base(kernels[0]), "vmlinuz-")
	moddir := filepath.Join(root, "lib", "modules", release)
	var c cpioWriter
	c.dir("bin")
	c.dir("dev")
	c.dir("proc")
	c.dir("sys")
	c.dir("mnt")
	c.dir("lib")
	c.dir("lib/modules")
	bb, err := os.ReadFile(filepath.Join(root, "bin", "busybox"))
	if err != nil {
		return nil, fmt.Errorf("busybox-static: %w", err)
	}
	c.file("bin/busybox", bb, 0o755)
	builtin, _ := os.ReadFile(filepath.Join(moddir, "modules.builtin"))
	var load []string
	for _, m := range modules {
		if bytes.Contains(builtin, []byte("kernel/"+m+".ko")) {
			continue
		}
		ko, err := os.ReadFile(filepath.Join(moddir, "kernel", m+".ko"))
		if err != nil {
			// Debian 12's cloud kernel ships plain .ko files; busybox
			// insmod could not load a compressed one, so say so.
			if z, _ := filepath.Glob(filepath.Join(moddir, "kernel", m+".ko.*")); len(z) > 0 {
				return nil, fmt.Errorf("module %s is compressed (%s): the initramfs needs it decompressed", m, filepath.Base(z[0]))
			}
			return nil, fmt.Errorf("module %s: %w", m, err)
		}
		name := filepath.Base(m) + ".ko"
		c.file("lib/modules/"+name, ko, 0o644)
		load = append(load, name)
	}
	c.file("init", []byte(initScript(load)), 0o755)
	if err := os.MkdirAll(work+"/out", 0o755); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(work, "out", "initrd.cpio"), c.finish(), 0o644); err != nil {
		return nil, err
	}
	kb, err := os.ReadFile(kernels[0])
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(work, "out", "vmlinuz"), kb, 0o644); err != nil {
		return nil, err
	}
	os.WriteFile(filepath.Join(work, "out", "done"), []byte(key+"\n"), 0o644)
	if err := os.Rename(filepath.Join(work, "out"), dir); err != nil {
		return nil, err
	}
	return g, nil
}

// LockCache creates the cache directory dir and locks it: several test
// binaries may build guests at once, one at a time. Call the returned
// function to unlock.
func LockCache(dir string) (func(), error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		lock.Close()
		return nil, err
	}
	return func() { lock.Close() }, nil
}

func sanitize(s string) string {
	return regexp.MustCompile(`[^A-Za-z0-9._-]`).ReplaceAllString(s, "_")
}

// buildAgent builds the static guest agent into the cache (rebuilt each run:
// it is quick and follows the source).
func buildAgent(cache string) (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	out := filepath.Join(cache, "agent")
	cmd := exec.Command("go", "build", "-trimpath", "-o", out, "./vmtest/agent")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building the guest agent: %v: %s", err, b)
	}
	return out, nil
}

// initScript is the guest's /init: it loads the virtio modules, runs the
// scenario the test appended (/scenario.sh) and powers off.
func initScript(mods []string) string {
	return `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in ` + strings.Join(mods, " ") + `; do insmod /lib/modules/$m || echo "HEMD-RESULT fail insmod $m"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo "HEMD-BOOTED $(cat /proc/uptime)"
if [ -x /scenario.sh ]; then /scenario.sh; else echo "HEMD-RESULT fail no scenario"; fi
echo "HEMD-END"
sync
poweroff -f
`
}
