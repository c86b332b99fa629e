// Package cloudimage builds a real Debian 12 cloud image — systemd,
// cloud-init, the linux-image-cloud-amd64 kernel, an ext4 root — from
// Debian's own packages with mmdebstrap, caches it, makes NoCloud seeds and
// gives the QEMU arguments to boot it with its root disk on vhost-user-blk.
//
// The image is a single ext4 filesystem with no partition table (label
// cloudimg-rootfs): the guest boots it by direct kernel boot (QEMU -kernel
// and -initrd, taken out of the image's /boot), so no bootloader and no
// partition are needed, the host can read files off the image with debugfs
// at offset 0, and hemd volume import sees exactly the filesystem.
//
// Packages come only from the Debian repositories configured for apt on
// this host (the deb.debian.org / snapshot entries in /etc/apt); nothing
// else is downloaded.
//
// Environment:
//
//	HEMD_CLOUDIMAGE_CACHE  where images are cached (default <repo>/build/cloudimage)
package cloudimage

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hemd/hemd/vmtest"
)

// Label is the root filesystem's label; RootArg names it.
const Label = "cloudimg-rootfs"

// DiskSize is the apparent size of the raw image (sparse on the host).
const DiskSize = 2 << 30

// recipe changes whenever the way the image is made changes, so that a
// cached image made by an older recipe is rebuilt.
const recipe = "r3"

// Packages installed on top of mmdebstrap's minbase variant (no recommends).
var Packages = []string{
	"linux-image-cloud-amd64", "initramfs-tools", "systemd", "systemd-sysv", "udev",
	"cloud-init", "e2fsprogs", "procps",
}

// HostPackages are the Debian packages the build and the tests need on the
// host (for the Makefile's apt-get list): mmdebstrap builds as root
// (--mode=root) and needs none of its recommends; e2fsprogs gives
// mkfs.ext4, e2fsck and debugfs; dosfstools and mtools make the seed;
// qemu-system-x86 pulls qemu-system-common (qemu-storage-daemon).
var HostPackages = []string{"mmdebstrap", "e2fsprogs", "dosfstools", "mtools", "qemu-system-x86"}

// Image is a built cloud image: the raw disk and the kernel and initrd
// taken out of it. Treat Disk as read-only: boot a copy (CopyTo).
type Image struct {
	Disk    string
	Kernel  string
	Initrd  string
	RootArg string // "root=LABEL=cloudimg-rootfs"
	Key     string // cache key: package versions and recipe
}

// Cmdline is the kernel command line for a direct kernel boot of im.
func (im *Image) Cmdline() string {
	return im.RootArg + " ro console=ttyS0,115200 panic=-1 net.ifnames=0 ds=nocloud"
}

// CacheDir is where images are cached.
func CacheDir() (string, error) {
	if d := os.Getenv("HEMD_CLOUDIMAGE_CACHE"); d != "" {
		return d, nil
	}
	root, err := vmtest.RepoRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, "build", "cloudimage"), nil
}

var (
	buildMu sync.Mutex
	built   *Image
)

// Build returns the cached image, building it first if needed (several
// minutes: mmdebstrap downloads ~300 MB of packages). An exclusive lock on
// the cache directory keeps two processes from building at once. logf
// receives progress lines; nil discards them.
func Build(logf func(string, ...any)) (*Image, error) {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	buildMu.Lock()
	defer buildMu.Unlock()
	if built != nil {
		return built, nil
	}
	im, err := build(logf)
	if err != nil {
		return nil, err
	}
	built = im
	return im, nil
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

// candidate is apt's candidate version of pkg.
func candidate(pkg string) (string, error) {
	out, err := run("", "apt-cache", "policy", pkg)
	if err != nil {
		return "", err
	}
	v := regexp.MustCompile(`Candidate: (\S+)`).FindSubmatch(out)
	if v == nil || string(v[1]) == "(none)" {
		return "", fmt.Errorf("%s has no candidate version in apt (run apt-get update)", pkg)
	}
	return string(v[1]), nil
}

var unsafe = regexp.MustCompile(`[^A-Za-z0-9._+-]`)

// cacheKey names the image by the versions that matter and the recipe.
func cacheKey() (string, error) {
	parts := []string{"bookworm"}
	for _, p := range []string{"linux-image-cloud-amd64", "cloud-init", "systemd"} {
		v, err := candidate(p)
		if err != nil {
			return "", err
		}
		parts = append(parts, p+"_"+v)
	}
	parts = append(parts, recipe)
	return unsafe.ReplaceAllString(strings.Join(parts, "_"), "_"), nil
}

// debianSources lists the host's apt source files that point at Debian's
// repositories (other vendors' repositories are left out).
func debianSources() ([]string, error) {
	var files []string
	cands := []string{"/etc/apt/sources.list"}
	more, _ := filepath.Glob("/etc/apt/sources.list.d/*")
	cands = append(cands, more...)
	for _, f := range cands {
		if !strings.HasSuffix(f, ".list") && !strings.HasSuffix(f, ".sources") {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		if bytes.Contains(b, []byte("debian.org/debian")) && bytes.Contains(b, []byte("bookworm")) {
			files = append(files, f)
		}
	}
	if len(files) == 0 {
		return nil, errors.New("no Debian bookworm repository configured in /etc/apt/sources.list(.d)")
	}
	return files, nil
}

// overlay is synced into the image by an mmdebstrap customize hook, before
// the initramfs is made again.
var overlay = map[string]string{
	"etc/fstab":    "LABEL=" + Label + " / ext4 defaults,errors=remount-ro 0 1\n",
	"etc/hostname": "hemd-cloud\n",
	"etc/hosts":    "127.0.0.1 localhost\n127.0.1.1 hemd-cloud\n",
	// The fsck hook cannot probe the root's type inside mmdebstrap's
	// chroot (there is no root device yet): name it, so the initrd
	// carries fsck.ext4 and checks the root before mounting it.
	"etc/initramfs-tools/conf.d/hemd-fstype": "FSTYPE=ext4\n",
	// NoCloud only, and no network configuration: the VM has no NIC and
	// the image no network renderer, so cloud-init must not wait or fail
	// on either.
	"etc/cloud/cloud.cfg.d/90_hemd.cfg": `# hemd vmtest: the seed is a local cidata disk; the VM has no network.
datasource_list: [ NoCloud, None ]
network: {config: disabled}
# No locales package in the image: C.UTF-8 is built into libc.
locale: C.UTF-8
`,
}

func build(logf func(string, ...any)) (*Image, error) {
	cache, err := CacheDir()
	if err != nil {
		return nil, err
	}
	unlock, err := vmtest.LockCache(cache)
	if err != nil {
		return nil, err
	}
	defer unlock()
	key, err := cacheKey()
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(cache, key)
	im := &Image{
		Disk:    filepath.Join(dir, "disk.img"),
		Kernel:  filepath.Join(dir, "vmlinuz"),
		Initrd:  filepath.Join(dir, "initrd.img"),
		RootArg: "root=LABEL=" + Label,
		Key:     key,
	}
	if _, err := os.Stat(filepath.Join(dir, "done")); err == nil {
		logf("cloudimage: reusing %s", dir)
		return im, nil
	}
	if _, err := exec.LookPath("mmdebstrap"); err != nil {
		return nil, fmt.Errorf("mmdebstrap is not installed (apt-get install %s): %w", strings.Join(HostPackages, " "), err)
	}
	sources, err := debianSources()
	if err != nil {
		return nil, err
	}
	os.RemoveAll(dir)
	work := dir + ".tmp"
	os.RemoveAll(work)
	if err := os.MkdirAll(filepath.Join(work, "out"), 0o755); err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)
	root := filepath.Join(work, "root")
	// The configuration goes in before the initramfs is made again, so
	// that it sees the fstab (and carries fsck.ext4 for the root).
	ov := filepath.Join(work, "overlay")
	for p, content := range overlay {
		if err := os.MkdirAll(filepath.Join(ov, filepath.Dir(p)), 0o755); err != nil {
			return nil, err
		}
		if err := os.WriteFile(filepath.Join(ov, p), []byte(content), 0o644); err != nil {
			return nil, err
		}
	}
	start := time.Now()
	args := []string{
		"--variant=minbase", "--mode=root", "--format=directory",
		"--include=" + strings.Join(Packages, ","),
		"--dpkgopt=path-exclude=/usr/share/man/*",
		"--dpkgopt=path-exclude=/usr/share/doc/*",
		"--dpkgopt=path-include=/usr/share/doc/*/copyright",
		"--dpkgopt=path-exclude=/usr/share/locale/*",
		"--dpkgopt=path-exclude=/usr/share/info/*",
		"--customize-hook=sync-in " + ov + " /",
		`--customize-hook=chroot "$1" update-initramfs -u -k all`,
		"bookworm", root,
	}
	args = append(args, sources...)
	logf("cloudimage: mmdebstrap %s", strings.Join(args, " "))
	cmd := exec.Command("mmdebstrap", args...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("mmdebstrap: %v: %s", err, tail(out.String(), 4000))
	}
	logf("cloudimage: mmdebstrap done in %v", time.Since(start).Round(time.Second))
	// Kernel and initrd out of /boot.
	kernels, _ := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
	if len(kernels) != 1 {
		return nil, fmt.Errorf("%d kernels in the image's /boot", len(kernels))
	}
	release := strings.TrimPrefix(filepath.Base(kernels[0]), "vmlinuz-")
	initrd := filepath.Join(root, "boot", "initrd.img-"+release)
	// The root disk is virtio-blk on virtio-pci: the initrd must carry both.
	list, err := run("", "chroot", root, "lsinitramfs", "/boot/initrd.img-"+release)
	if err != nil {
		return nil, fmt.Errorf("listing the initrd: %w", err)
	}
	for _, m := range []string{"virtio_blk.ko", "virtio_pci.ko"} {
		if !bytes.Contains(list, []byte(m)) {
			builtin, _ := os.ReadFile(filepath.Join(root, "lib", "modules", release, "modules.builtin"))
			if !bytes.Contains(builtin, []byte("/"+m)) {
				return nil, fmt.Errorf("the initrd of %s lacks %s", release, m)
			}
		}
	}
	if !bytes.Contains(list, []byte("fsck.ext4")) {
		logf("cloudimage: warning: the initrd has no fsck.ext4; the root is not checked at boot")
	}
	if err := copyFile(kernels[0], filepath.Join(work, "out", "vmlinuz")); err != nil {
		return nil, err
	}
	if err := copyFile(initrd, filepath.Join(work, "out", "initrd.img")); err != nil {
		return nil, err
	}
	// Leave no apt lists or caches in the image.
	for _, g := range []string{"var/lib/apt/lists/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb", "var/log/*.log"} {
		m, _ := filepath.Glob(filepath.Join(root, g))
		for _, f := range m {
			os.RemoveAll(f)
		}
	}
	// The filesystem, populated from the directory without mounting.
	disk := filepath.Join(work, "out", "disk.img")
	mk := time.Now()
	if _, err := run("", "mkfs.ext4", "-q", "-F", "-L", Label, "-d", root, disk, fmt.Sprint(DiskSize>>10)+"k"); err != nil {
		return nil, err
	}
	logf("cloudimage: mkfs.ext4 -d done in %v", time.Since(mk).Round(time.Second))
	if _, err := run("", "e2fsck", "-fn", disk); err != nil {
		return nil, fmt.Errorf("the new filesystem does not check clean: %w", err)
	}
	if err := os.WriteFile(filepath.Join(work, "out", "done"), []byte(key+"\n"+release+"\n"), 0o644); err != nil {
		return nil, err
	}
	if err := os.Rename(filepath.Join(work, "out"), dir); err != nil {
		return nil, err
	}
	logf("cloudimage: built %s (kernel %s) in %v", dir, release, time.Since(start).Round(time.Second))
	return im, nil
}

func tail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

func copyFile(from, to string) error {
	b, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	return os.WriteFile(to, b, 0o644)
}

// CopyTo writes a sparse copy of the image's disk to path: one test's
// writable root disk. Holes stay holes (SEEK_DATA/SEEK_HOLE).
func (im *Image) CopyTo(path string) error {
	return sparseCopy(im.Disk, path)
}

func sparseCopy(from, to string) error {
	src, err := os.Open(from)
	if err != nil {
		return err
	}
	defer src.Close()
	st, err := src.Stat()
	if err != nil {
		return err
	}
	dst, err := os.OpenFile(to, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	defer dst.Close()
	if err := dst.Truncate(st.Size()); err != nil {
		return err
	}
	fd := int(src.Fd())
	var off int64
	for off < st.Size() {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if err != nil {
			if errors.Is(err, unix.ENXIO) {
				break // only a hole is left
			}
			return err
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return err
		}
		if _, err := io.Copy(io.NewOffsetWriter(dst, data), io.NewSectionReader(src, data, hole-data)); err != nil {
			return err
		}
		off = hole
	}
	return dst.Close()
}

// Seed writes a NoCloud seed into dir and returns its path: a 2 MiB FAT
// disk image labelled CIDATA (cloud-init accepts cidata or CIDATA) holding
// user-data and meta-data, made with mkfs.vfat (dosfstools) and mcopy
// (mtools) — no mount, no root needed. FAT rather than ISO9660 because both
// tools are small and the result is a plain raw disk.
func Seed(dir, userData, metaData string) (string, error) {
	if metaData == "" {
		metaData = "instance-id: hemd-vmtest\nlocal-hostname: hemd-cloud\n"
	}
	tmp, err := os.MkdirTemp(dir, "seed-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	for name, content := range map[string]string{"user-data": userData, "meta-data": metaData} {
		if err := os.WriteFile(filepath.Join(tmp, name), []byte(content), 0o644); err != nil {
			return "", err
		}
	}
	path := filepath.Join(dir, "seed.img")
	os.Remove(path)
	if _, err := run("", "mkfs.vfat", "-n", "CIDATA", "-C", path, "2048"); err != nil {
		return "", err
	}
	if _, err := run("", "mcopy", "-o", "-i", path, filepath.Join(tmp, "user-data"), filepath.Join(tmp, "meta-data"), "::"); err != nil {
		return "", err
	}
	return path, nil
}

// BootArgs are the arguments of qemu-system-x86_64 for a direct kernel boot
// of im under TCG: 1 GiB of shared memfd guest RAM (vhost-user needs it),
// the root disk on vhost-user-blk-pci served at rootSocket with queues
// queues (the guest's /dev/vda), the seed (if any) as a read-only virtio
// disk, the serial console on stdio and no NIC. QEMU exits on guest reboot
// or poweroff (see Rebootable).
func BootArgs(im *Image, rootSocket string, queues int, seedPath string) []string {
	args := []string{
		"-machine", "q35,accel=tcg", "-cpu", "max", "-m", "1G", "-smp", "2",
		"-nographic", "-no-user-config", "-nodefaults", "-serial", "stdio", "-no-reboot",
		"-object", "memory-backend-memfd,id=mem,size=1G,share=on", "-numa", "node,memdev=mem",
		"-kernel", im.Kernel, "-initrd", im.Initrd, "-append", im.Cmdline(),
		"-chardev", "socket,id=root0,path=" + rootSocket,
		"-device", fmt.Sprintf("vhost-user-blk-pci,chardev=root0,num-queues=%d", queues),
	}
	if seedPath != "" {
		args = append(args, "-drive", "file="+seedPath+",if=virtio,format=raw,readonly=on")
	}
	return args
}

// Rebootable returns args without -no-reboot: a guest reboot then restarts
// the VM inside the same QEMU (the vhost-user device is reset and started
// again by the next boot), and only a poweroff ends QEMU.
func Rebootable(args []string) []string {
	var out []string
	for _, a := range args {
		if a != "-no-reboot" {
			out = append(out, a)
		}
	}
	return out
}

// Count counts the occurrences of needle in the file at path, reading it a
// few MiB at a time (a volume is gigabytes).
func Count(path string, needle []byte) (int, error) {
	if len(needle) == 0 {
		return 0, errors.New("count: empty needle")
	}
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	buf := make([]byte, 4<<20+len(needle)-1)
	n, keep := 0, 0
	for {
		m, err := io.ReadFull(f, buf[keep:])
		data := buf[:keep+m]
		end := 0 // where the last match counted ends
		for {
			i := bytes.Index(data[end:], needle)
			if i < 0 {
				break
			}
			n++
			end += i + len(needle)
		}
		// The last len(needle)-1 bytes may begin a match that the next
		// read completes (unless they belong to one already counted).
		keep = copy(buf, data[max(end, len(data)-(len(needle)-1)):])
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}
