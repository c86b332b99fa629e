package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hemd/hemd/vmtest"
)

const message = "Hello from inside the VM. This sentence is plaintext to the guest; hemd stores only AES-256-XTS ciphertext."

// busybox is the quick demo (--busybox): a new empty volume, the small
// busybox test guest (about 3 s to a shell under TCG) makes a filesystem on
// it and writes a file.
func (d *demo) busybox() error {
	state, vol, sock, dir, hemdBin, hemd := d.state, d.path("vol.img"), d.path("vol.sock"), d.dir, d.bin, d.hemd
	step("1. A customer master key, created inside the HSM (SoftHSM2 token under %s)", state)
	if _, err := hemd("key", "create", "--alias", "alias/demo", "--description", "hemd demo"); err != nil {
		return err
	}
	step("2. An encrypted volume: its data key comes from the KMS, stored only wrapped")
	if _, err := hemd("volume", "create", "--size", "64M", "--key", "alias/demo", vol); err != nil {
		return err
	}
	if _, err := hemd("volume", "inspect", vol); err != nil {
		return err
	}

	step("3. hemd serves the volume on %s; a VM boots with its disk there", sock)
	stop, err := d.serve(vol, sock, 2)
	if err != nil {
		return err
	}
	defer stop()
	served := time.Now()
	fmt.Println("building (or reusing) the guest from Debian packages...")
	g, err := vmtest.LoadGuest()
	if err != nil {
		return err
	}
	var console []string
	offset := -1
	vm, err := vmtest.Boot(g, func(format string, a ...any) {
		line := fmt.Sprintf(format, a...)
		if strings.HasPrefix(line, "console") {
			if i := strings.Index(line, "s: "); i > 0 {
				line = line[i+3:]
			}
			fmt.Sscanf(line, "GUEST-OFFSET %d", &offset)
			if strings.HasPrefix(line, "GUEST|") {
				console = append(console, strings.TrimPrefix(line, "GUEST|"))
				fmt.Println("  guest> " + strings.TrimPrefix(line, "GUEST|"))
			}
		}
	}, dir, vmtest.WithDisk(sock, 2), vmtest.WithScript(`
mke2fs -q /dev/vda && mount -t ext4 /dev/vda /mnt
echo "`+message+`" > /mnt/hello.txt
sync
echo "GUEST|$ cat /mnt/hello.txt"
echo "GUEST|$(cat /mnt/hello.txt)"
echo "GUEST|$ ls -l /mnt"
ls -l /mnt | sed 's/^/GUEST|/'
umount /mnt
off=$(agent find /dev/vda 'Hello from inside the VM')
echo "GUEST|the file's first bytes are at disk offset $off; the guest reads there:"
dd if=/dev/vda bs=1 skip=$off count=32 2>/dev/null | hexdump -C | head -2 | sed 's/^/GUEST|/'
echo "GUEST-OFFSET $off"
echo "HEMD-RESULT ok demo"
`))
	if err != nil {
		return err
	}
	if _, _, err := vm.ExpectErr(0, `HEMD-RESULT ok demo`, 3*time.Minute); err != nil {
		vm.Kill()
		return err
	}
	if err := vm.WaitErr(time.Minute); err != nil {
		return err
	}

	step("4. Side by side: what the guest saw, and what the host file holds")
	raw, err := os.ReadFile(vol)
	if err != nil {
		return err
	}
	found := bytes.Contains(raw, []byte("Hello from inside the VM"))
	fmt.Printf("  guest reads:  %s\n", message)
	fmt.Printf("  host file:    %s (%d bytes; the guest's disk starts at offset 1 MiB, after the header)\n", vol, len(raw))
	if offset >= 0 {
		at := 1<<20 + offset
		fmt.Printf("  the same 32 bytes read on the host at file offset %d:\n", at)
		for i := 0; i < 32; i += 16 {
			fmt.Printf("    %08x  % x\n", offset+i, raw[at+i:at+i+16])
		}
	}
	fmt.Printf("  plaintext of the guest's file on the host: %v (grep -c 'Hello from inside the VM' finds %d)\n",
		map[bool]string{true: "FOUND — something is wrong", false: "nowhere"}[found], bytes.Count(raw, []byte("Hello from inside the VM")))
	if found {
		return fmt.Errorf("the guest's plaintext is in the host file")
	}

	stop()
	step("5. The KMS audit log: the attach unwrapped the data key through the HSM (Decrypt)")
	if _, err := d.printAudit(served); err != nil {
		return err
	}
	step("6. hemd's own events (attach = KMS Decrypt into locked memory, zeroize = key wiped at stop)")
	d.printEvents()

	step("Where the pieces are, and how to boot the VM again by hand")
	fmt.Printf(`  state (SoftHSM2 token, PINs 0600, key metadata, audit log): %s
  encrypted volume: %s
  hemd log: %s
  guest kernel and initramfs: %s, %s

  HEMD_STATE_DIR=%s %s serve --socket %s --volume %s &
  qemu-system-x86_64 -machine q35,accel=tcg -cpu max -m 512 -smp 2 -nographic \
    -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
    -kernel %s -initrd %s -append console=ttyS0 \
    -chardev socket,id=c0,path=%s -device vhost-user-blk-pci,chardev=c0,num-queues=2
  (the busybox guest's /init looks for /scenario.sh; without one it says so and powers off)
`, state, vol, filepath.Join(dir, "hemd.log"), g.Kernel, g.Initrd, state, hemdBin, sock, vol, g.Kernel, g.Initrd, sock)
	return nil
}
