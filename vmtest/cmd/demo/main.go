// Command demo is `make demo`: it creates an HSM-backed key, imports a
// Debian 12 cloud image into an encrypted volume, boots a VM whose root disk
// is that volume served by hemd over vhost-user-blk, has the guest write a
// file, and then shows side by side what the guest read and what the host
// file holds at the same place, with the KMS audit records of the attach.
// --busybox runs the older, quicker demo on the small busybox test guest.
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

func main() {
	hemd := flag.String("hemd", "build/hemd", "hemd binary")
	dir := flag.String("dir", "build/demo", "where the demo keeps its state, volume and logs (emptied first)")
	busybox := flag.Bool("busybox", false, "boot the small busybox test guest on a new empty volume instead of the cloud image")
	flag.Parse()
	d, err := newDemo(*hemd, *dir)
	if err == nil {
		if *busybox {
			err = d.busybox()
		} else {
			err = d.cloud()
		}
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		os.Exit(1)
	}
}

// demo is one run: hemd's binary, and the directory with the state (the
// SoftHSM2 token and the audit log), the volume and the logs.
type demo struct {
	bin, dir, state string
	env             []string
}

func newDemo(bin, dir string) (*demo, error) {
	var err error
	if bin, err = filepath.Abs(bin); err != nil {
		return nil, err
	}
	if _, err := os.Stat(bin); err != nil {
		return nil, fmt.Errorf("no hemd binary (make build, or --hemd): %w", err)
	}
	if dir, err = filepath.Abs(dir); err != nil {
		return nil, err
	}
	if err := os.RemoveAll(dir); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	state := filepath.Join(dir, "state")
	// SOFTHSM2_CONF= lets hemd point SoftHSM2 at the state directory's
	// token even if the caller's environment names another configuration.
	env := append(os.Environ(), "HEMD_STATE_DIR="+state, "SOFTHSM2_CONF=")
	return &demo{bin: bin, dir: dir, state: state, env: env}, nil
}

func step(format string, a ...any) { fmt.Printf("\n==> "+format+"\n", a...) }

// hemd runs a hemd command, printing it and what it prints on stdout, and
// returns that output.
func (d *demo) hemd(args ...string) (string, error) {
	cmd := exec.Command(d.bin, args...)
	cmd.Env = d.env
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	fmt.Printf("$ hemd %s\n", shellJoin(args))
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("hemd %s: %v\n%s", strings.Join(args, " "), err, errb.String())
	}
	fmt.Print(out.String())
	return out.String(), nil
}

// serve starts hemd serve on sock with its output in hemd.log, waits for
// the socket, and returns the function that stops it (SIGTERM: the file
// is flushed and the socket removed).
func (d *demo) serve(vol, sock string, queues int) (stop func(), err error) {
	args := []string{"serve", "--socket", sock, "--volume", vol, "--queues", fmt.Sprint(queues)}
	fmt.Printf("$ hemd %s &   (log: %s)\n", shellJoin(args), d.path("hemd.log"))
	cmd := exec.Command(d.bin, args...)
	cmd.Env = d.env
	logf, err := os.Create(d.path("hemd.log"))
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait(); logf.Close() }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-exited:
			case <-time.After(15 * time.Second):
				cmd.Process.Kill()
				<-exited
			}
		})
	}
	for i := 0; i < 400; i++ {
		if _, err := os.Stat(sock); err == nil {
			return stop, nil
		}
		select {
		case err := <-exited:
			b, _ := os.ReadFile(d.path("hemd.log"))
			return nil, fmt.Errorf("hemd serve exited (%v):\n%s", err, b)
		case <-time.After(25 * time.Millisecond):
		}
	}
	stop()
	return nil, fmt.Errorf("hemd serve: socket %s did not appear", sock)
}

func (d *demo) path(name string) string { return filepath.Join(d.dir, name) }

// auditRecord is the part of a CloudTrail-shaped audit record the demo shows.
type auditRecord struct {
	EventTime         time.Time `json:"eventTime"`
	EventName         string    `json:"eventName"`
	ErrorCode         string    `json:"errorCode"`
	RequestParameters struct {
		KeyID             string            `json:"keyId"`
		EncryptionContext map[string]string `json:"encryptionContext"`
	} `json:"requestParameters"`
}

// printAudit prints the KMS audit log, one record a line, and returns how
// many Decrypt records came after attachFrom: the attaches of the VM.
func (d *demo) printAudit(attachFrom time.Time) (attaches int, err error) {
	b, err := os.ReadFile(filepath.Join(d.state, "audit.log"))
	if err != nil {
		return 0, err
	}
	fmt.Printf("  (%s: every KMS operation, CloudTrail-shaped JSON; never a key, plaintext or ciphertext)\n", filepath.Join(d.state, "audit.log"))
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		var r auditRecord
		if json.Unmarshal([]byte(line), &r) != nil {
			continue
		}
		ctx, note := "", ""
		if len(r.RequestParameters.EncryptionContext) > 0 {
			c, _ := json.Marshal(r.RequestParameters.EncryptionContext)
			ctx = string(c)
		}
		switch {
		case r.EventName == "Decrypt" && r.EventTime.After(attachFrom):
			attaches++
			note = fmt.Sprintf("<- attach %d: the disk started, hemd unwraps the data key", attaches)
		case r.EventName == "Decrypt":
			note = "<- hemd volume import"
		case r.EventName == "GenerateDataKeyWithoutPlaintext":
			note = "<- the volume's data key, returned only wrapped"
		}
		key := r.RequestParameters.KeyID
		if i := strings.LastIndex(key, "/"); i >= 0 {
			key = "key/" + key[i+1:i+1+min(8, len(key)-i-1)] + "…"
		}
		fmt.Println(strings.TrimRight(fmt.Sprintf("  %s %-31s %-14s %s %s %s", r.EventTime.Local().Format("15:04:05.000"), r.EventName, key, ctx, r.ErrorCode, note), " "))
	}
	return attaches, nil
}

// printEvents prints hemd's key events from its log.
func (d *demo) printEvents() {
	b, _ := os.ReadFile(d.path("hemd.log"))
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, "event=") {
			if i := strings.Index(l, " key="); i > 0 {
				l = l[:i] // the key ARN is in the audit records above
			}
			fmt.Println("  " + l)
		}
	}
}

// shellJoin quotes args for sh and joins them.
func shellJoin(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		q[i] = shellQuote(a)
	}
	return strings.Join(q, " ")
}

// shellQuote quotes an argument for sh when it needs it.
func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_=.,/:+@%") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
