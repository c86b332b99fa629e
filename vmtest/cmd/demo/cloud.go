package main

import (
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/hemd/hemd/vmtest/cloudimage"
)

// greeting is what the guest writes; the host must never see it.
const greeting = "Hello from inside the VM, on a Debian cloud image whose root disk is a hemd volume: plaintext to the guest, AES-256-XTS ciphertext on the host."

// guestScript is what cloud-init runs in the guest (runcmd, first boot):
// it writes the file, fsyncs it, drops the caches and reads it back, finds
// where ext4 put its first block (filefrag), and reads the disk there with
// O_DIRECT, so the bytes come from hemd. GUEST| lines are for the user,
// GUEST-AT gives the demo the offset and the bytes.
const guestScript = `#!/bin/sh
say() { echo "GUEST|$*" > /dev/ttyS0; }
f=/root/hello.txt
say "\$ cat /sys/block/vda/serial        # the root disk's serial is the volume id"
say "$(cat /sys/block/vda/serial)"
say "\$ findmnt -n -o SOURCE,FSTYPE,OPTIONS /"
say "$(findmnt -n -o SOURCE,FSTYPE,OPTIONS /)"
echo '@GREETING@' > $f
sync $f
echo 3 > /proc/sys/vm/drop_caches
say "\$ echo '...' > $f; sync $f; echo 3 > /proc/sys/vm/drop_caches; cat $f"
say "$(cat $f)"
blk=$(filefrag -v -b4096 $f | awk '$1 == "0:" { sub(/\.\.$/, "", $4); print $4 }')
say "\$ filefrag -v -b4096 $f        # where ext4 put it: disk block $blk of 4096 bytes"
off=$((blk * 4096))
say "\$ dd if=/dev/vda bs=4096 skip=$blk count=1 iflag=direct | od -A d -t x1z -N 32"
dd if=/dev/vda bs=4096 skip=$blk count=1 iflag=direct 2>/dev/null | od -A d -t x1z -N 32 | while IFS= read -r l; do say "$l"; done
echo "GUEST-AT $off $(dd if=/dev/vda bs=4096 skip=$blk count=1 iflag=direct 2>/dev/null | od -A n -t x1 -N 32 -v | tr -d ' \n')" > /dev/ttyS0
`

// userData: the guest script, an autologin on the serial console for when
// the VM is booted again by hand (the VM has no network), and a poweroff
// once cloud-init is done (first boot only: power_state runs once per
// instance).
var userData = `#cloud-config
write_files:
  - path: /usr/local/sbin/hemd-demo
    permissions: '0755'
    content: |
` + indent(strings.ReplaceAll(guestScript, "@GREETING@", greeting), "      ") + `
  - path: /etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf
    content: |
      [Service]
      ExecStart=
      ExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 %I $TERM
runcmd:
  - [/usr/local/sbin/hemd-demo]
power_state:
  mode: poweroff
  delay: now
  condition: true
  timeout: 60
`

func indent(s, prefix string) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	for i, l := range lines {
		lines[i] = prefix + l
	}
	return strings.Join(lines, "\n")
}

// milestones are the console lines shown while the VM boots (all of them
// go to console.log).
var milestones = regexp.MustCompile(`Linux version \S+|EXT4-fs \(vda\): mounted.*|Cloud-init v\. \S+ (running '[^']+'|finished)|Reached target .*Multi-User.*|reboot: Power down`)

// cloud is the default demo: the cloud image, imported into an encrypted
// volume, booted from it.
func (d *demo) cloud() error {
	step("0. The guest: a Debian 12 cloud image (systemd, cloud-init, ext4 root), built from Debian's packages")
	t0 := time.Now()
	im, err := cloudimage.Build(func(format string, a ...any) { fmt.Printf("  "+format+"\n", a...) })
	if err != nil {
		return fmt.Errorf("building the cloud image: %w", err)
	}
	fmt.Printf("  %s (raw ext4, %d MiB; kernel and initrd beside it), ready in %v\n", im.Disk, cloudimage.DiskSize>>20, time.Since(t0).Round(100*time.Millisecond))

	step("1. A customer master key, created inside the HSM (SoftHSM2 token under %s)", d.state)
	if _, err := d.hemd("key", "create", "--alias", "alias/demo", "--description", "hemd demo"); err != nil {
		return err
	}

	vol := d.path("vol.img")
	step("2. The image imported into an encrypted volume: a data key from the KMS, stored only wrapped; every sector encrypted")
	args := []string{"volume", "import", "--from", im.Disk, "--key", "alias/demo", vol}
	fmt.Printf("$ hemd %s\n", shellJoin(args))
	cmd := exec.Command(d.bin, args...)
	cmd.Env = d.env
	cmd.Stderr = os.Stderr // the progress bar, on a terminal
	t1 := time.Now()
	out, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("hemd volume import: %w", err)
	}
	took := time.Since(t1)
	fmt.Printf("%s  (%d MiB encrypted in %.1f s, %.0f MiB/s)\n", strings.TrimSpace(string(out)), cloudimage.DiskSize>>20, took.Seconds(), float64(cloudimage.DiskSize>>20)/took.Seconds())
	insp, err := d.hemd("volume", "inspect", "--json", vol)
	if err != nil {
		return err
	}
	var head struct {
		VolumeID   string `json:"volume_id"`
		DataOffset int64  `json:"data_offset"`
	}
	if err := json.Unmarshal([]byte(insp), &head); err != nil {
		return fmt.Errorf("hemd volume inspect --json: %w", err)
	}

	step("3. hemd serves the volume; the VM boots from it (TCG: a minute or two) and cloud-init runs the guest's part")
	seed, err := cloudimage.Seed(d.dir, userData, "instance-id: hemd-demo\nlocal-hostname: hemd-demo\n")
	if err != nil {
		return err
	}
	sock := d.path("vol.sock")
	stop, err := d.serve(vol, sock, 2)
	if err != nil {
		return err
	}
	defer stop()
	served := time.Now()
	qemuArgs := cloudimage.BootArgs(im, sock, 2, seed)
	console, err := os.Create(d.path("console.log"))
	if err != nil {
		return err
	}
	defer console.Close()
	fmt.Printf("$ qemu-system-x86_64 ... -chardev socket,id=root0,path=%s -device vhost-user-blk-pci,chardev=root0,num-queues=2 ...   (console: %s)\n",
		sock, d.path("console.log"))
	offset, guestBytes := int64(-1), []byte(nil)
	vm, err := cloudimage.Start(func(format string, a ...any) {
		line := fmt.Sprintf(format, a...)
		fmt.Fprintln(console, line)
		text := line[strings.Index(line, "s: ")+3:]
		if i := strings.Index(text, "GUEST|"); i >= 0 {
			g := text[i+len("GUEST|"):]
			fmt.Println("  guest> " + g)
		} else if i := strings.Index(text, "GUEST-AT "); i >= 0 {
			f := strings.Fields(text[i:])
			if len(f) == 3 {
				offset, _ = strconv.ParseInt(f[1], 10, 64)
				guestBytes, _ = hex.DecodeString(f[2])
			}
		} else if m := milestones.FindString(text); m != "" {
			fmt.Printf("  [%5s] %s\n", strings.TrimSpace(line[len("console"):strings.Index(line, "s: ")]), m)
		}
	}, qemuArgs)
	if err != nil {
		return err
	}
	fin, err := vm.Expect(0, `Cloud-init v\. .* finished`, 8*time.Minute)
	if err != nil {
		vm.Kill()
		return fmt.Errorf("%w (console: %s)", err, d.path("console.log"))
	}
	fmt.Printf("  booted to the end of cloud-init in %.1f s (QEMU start → \"Cloud-init ... finished\"); the guest powers off\n", fin.At.Seconds())
	if err := vm.Wait(2 * time.Minute); err != nil {
		return err
	}
	stop() // hemd flushes the volume and removes the socket
	if offset < 0 || len(guestBytes) != 32 {
		return fmt.Errorf("the guest did not report where its file is (console: %s)", d.path("console.log"))
	}
	if !strings.HasPrefix(greeting, string(guestBytes)) {
		return fmt.Errorf("the guest read %q at disk offset %d, not its file's first bytes", guestBytes, offset)
	}

	step("4. Side by side: what the guest read at disk offset %d, and what the host file holds there", offset)
	f, err := os.Open(vol)
	if err != nil {
		return err
	}
	host := make([]byte, 32)
	at := head.DataOffset + offset
	_, err = f.ReadAt(host, at)
	f.Close()
	if err != nil {
		return err
	}
	fmt.Printf("  the host file is %s; the guest's disk starts after the volume header, at offset %d\n", vol, head.DataOffset)
	fmt.Printf("  %-12s %-36s   %-12s %s\n", "disk offset", "the guest reads (/dev/vda via hemd)", "file offset", "the host file holds")
	for i := 0; i < 32; i += 8 {
		fmt.Printf("  %-12d %s   %-12d %s\n", offset+int64(i), hexLine(guestBytes[i:i+8]), at+int64(i), hexLine(host[i:i+8]))
	}
	needle := greeting[:24]
	n, err := cloudimage.Count(vol, []byte(needle))
	if err != nil {
		return err
	}
	verdict := "nowhere"
	if n > 0 {
		verdict = "FOUND — something is wrong"
	}
	fmt.Printf("  plaintext of the guest's file on the host: %s (%q occurs %d times in the %d MiB of %s)\n", verdict, needle, n, (head.DataOffset+cloudimage.DiskSize)>>20, vol)
	if n > 0 {
		return fmt.Errorf("the guest's plaintext is in the host file")
	}

	step("5. The KMS audit log: each attach unwrapped the data key through the HSM (Decrypt, context = the volume id)")
	attaches, err := d.printAudit(served)
	if err != nil {
		return err
	}
	if attaches == 2 {
		fmt.Println("  (two attaches: the firmware starts the disk to boot from it, then the guest's kernel resets it — hemd\n" +
			"   zeroizes the key — and starts it again; each start asks the KMS)")
	}
	step("6. hemd's own events (attach = data key unwrapped into locked memory; zeroize = wiped when the device stops)")
	d.printEvents()

	step("Where the pieces are, and how to boot the VM again by hand")
	fmt.Printf(`  state directory (SoftHSM2 token, PINs 0600, key metadata, KMS audit log): %s
  encrypted volume %s: %s   (hemd volume inspect %s)
  the cloud image it was imported from (plaintext; kernel and initrd beside it): %s
  NoCloud seed (user-data with the guest's script): %s
  logs: %s, %s

  HEMD_STATE_DIR=%s %s serve --socket %s --volume %s --queues 2 &
  %s
  The guest logs root in on the console (no network, no password); cat /root/hello.txt, then poweroff
  (or Ctrl-A X to quit QEMU). Stop hemd afterwards with kill %%1 (SIGTERM: the volume is flushed).
`, d.state, head.VolumeID, vol, vol, im.Disk, seed, d.path("hemd.log"), d.path("console.log"),
		d.state, d.bin, sock, vol, wrap("qemu-system-x86_64", qemuArgs))
	return nil
}

// hexLine is 8 bytes in hex and as text.
func hexLine(b []byte) string {
	text := []byte(string(b))
	for i, c := range text {
		if c < 0x20 || c > 0x7e {
			text[i] = '.'
		}
	}
	return fmt.Sprintf("% x  |%s|", b, text)
}

// wrap is a shell command, options kept with their values, broken with
// backslashes into lines of about 100 characters.
func wrap(name string, args []string) string {
	var b strings.Builder
	b.WriteString(name)
	col := len(name)
	for i := 0; i < len(args); i++ {
		w := shellQuote(args[i])
		if strings.HasPrefix(args[i], "-") && i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") {
			i++
			w += " " + shellQuote(args[i])
		}
		if col+1+len(w) > 100 {
			b.WriteString(" \\\n     ")
			col = 5
		}
		b.WriteString(" " + w)
		col += 1 + len(w)
	}
	return b.String()
}
