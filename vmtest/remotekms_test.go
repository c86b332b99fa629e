package vmtest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hemd/hemd/hem/datakey/memscan"
	"github.com/hemd/hemd/kmsclient/awsjson"
	"github.com/hemd/hemd/kmsclient/hsm"
	"github.com/hemd/hemd/kmsclient/testpki"
)

// TestLiveMigrationRemoteKMS is the live migration of TestLiveMigration
// between two hosts that share one hemd kms serve over mutual TLS, as a
// fleet runs: each host has its own state directory and a grants-only
// principal whose grant names the volume, and reaches the KMS through a
// proxy that terminates TLS (the hosts trust its certificate) and records
// everything that passes in plaintext. Every attach is a Decrypt for a
// recipient. While the guest runs on host B, the only copies of the data
// key's schedules are in B's locked key page; once the VM stops, a scan of
// the three processes finds no window of the data key, raw, base64 or hex,
// nor its schedules; the proxies saw none either.
func TestLiveMigrationRemoteKMS(t *testing.T) {
	dir := t.TempDir()
	kmsState := filepath.Join(dir, "kms")
	cli(t, kmsState, "key", "create", "--alias", "alias/vmtest")
	vol := filepath.Join(dir, "vol.img")
	volID := strings.TrimSpace(cli(t, kmsState, "volume", "create", "--size", "64M", "--key", "alias/vmtest", vol))
	dek := unwrapDEK(t, kmsState, vol)
	grantHosts(t, kmsState, vol, "host-a", "host-b")

	pki, err := testpki.NewCA(dir, "kms")
	if err != nil {
		t.Fatal(err)
	}
	proxyCA, err := testpki.NewCA(dir, "proxy")
	if err != nil {
		t.Fatal(err)
	}
	kms := startKMS(t, pki, kmsState)
	hosts := map[string]Hemd{}
	proxies := map[string]*recordingProxy{}
	for _, name := range []string{"host-a", "host-b"} {
		proxies[name] = startProxy(t, proxyCA, pki, name, kms.addr)
		hosts[name] = Hemd{Bin: hemdBin, Env: []string{
			"HEMD_STATE_DIR=" + filepath.Join(dir, name), "SOFTHSM2_CONF=",
			"HEMD_KMS_ENDPOINT=https://" + proxies[name].addr, "HEMD_KMS_CA_FILE=" + proxyCA.CertFile,
			"HEMD_KMS_ACCESS_KEY_ID=AKID" + strings.ToUpper(name[len(name)-1:]), "HEMD_KMS_SECRET_ACCESS_KEY=" + name + "-secret",
		}}
	}
	decrypts := auditCount(t, kmsState, "Decrypt")
	src, dst, dstVM := liveMigration(t, migration{kmsState: kmsState, vol: vol, volID: volID,
		src: hosts["host-a"], dst: hosts["host-b"], wins: windows(t, dek)})

	// Every Decrypt was for a recipient, by the host that attached.
	audit, err := os.ReadFile(filepath.Join(kmsState, "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	for _, host := range []string{"host-a", "host-b"} {
		if n := countDecrypts(audit, host, true); n == 0 || countDecrypts(audit, host, false) != n {
			t.Fatalf("%s: %d Decrypts for a recipient, %d in all", host, n, countDecrypts(audit, host, false))
		}
	}
	if auditCount(t, kmsState, "Decrypt") <= decrypts {
		t.Fatal("no Decrypt in the KMS's audit log")
	}

	wins := dekWindows(t, dek)
	// While the guest runs on B: its key schedules are in B's locked key
	// page and nowhere else; A and the KMS hold nothing.
	hits := scanProcess(t, "host-b (attached)", dst.Pid(), wins)
	if len(hits) == 0 {
		t.Fatal("no key schedule in host-b's memory while attached: the scan cannot see it")
	}
	for _, h := range hits {
		if !h.Locked || h.Kind == "base64" || h.Kind == "hex" {
			t.Errorf("host-b, attached: a copy outside the locked key page: %v", h)
		}
	}
	for name, pid := range map[string]int{"host-a (migrated away)": src.Pid(), "kms serve": kms.pid()} {
		if hits := scanProcess(t, name, pid, wins); len(hits) > 0 {
			t.Errorf("%s holds key material:\n%v", name, hits)
		}
	}

	// The VM stops: B zeroizes; no process holds any of it.
	dstVM.Kill()
	if !waitLog(dst, "event=zeroize", volID, 15*time.Second) {
		t.Fatal("host-b did not zeroize the data key after the VM stopped")
	}
	for name, pid := range map[string]int{"host-a": src.Pid(), "host-b": dst.Pid(), "kms serve": kms.pid()} {
		if hits := scanProcess(t, name, pid, wins); len(hits) > 0 {
			t.Errorf("%s holds key material after the VM stopped:\n%v", name, hits)
		}
	}
	for name, p := range proxies {
		seen := p.bytes()
		if !bytes.Contains(seen, []byte(`"CiphertextForRecipient"`)) {
			t.Errorf("proxy of %s saw no Decrypt for a recipient (%d bytes)", name, len(seen))
		}
		for _, w := range wins {
			if bytes.Contains(seen, w.Bytes) {
				t.Errorf("proxy of %s saw the data key in plaintext (%s)", name, w.Kind)
			}
		}
		t.Logf("proxy of %s: %d bytes in plaintext after TLS termination, no window of the data key", name, len(seen))
	}
}

// unwrapDEK returns the volume's data key, through the KMS in state (the
// test's reference for the scans).
func unwrapDEK(t *testing.T, state, vol string) []byte {
	t.Helper()
	h := inspect(t, state, vol)
	t.Setenv("SOFTHSM2_CONF", "")
	k, err := hsm.Open(hsm.Config{}, state)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	blob, _ := base64.StdEncoding.DecodeString(h["wrapped_dek"].(string))
	dek := make([]byte, 64)
	if _, err := k.Decrypt(context.Background(), blob, volumeContext(h), dek); err != nil {
		t.Fatal(err)
	}
	return dek
}

func volumeContext(h map[string]any) map[string]string {
	ectx := map[string]string{}
	for key, v := range h["encryption_context"].(map[string]any) {
		ectx[key] = v.(string)
	}
	return ectx
}

// grantHosts gives each host a grant to Decrypt the volume's key (its
// context only) and to DescribeKey it.
func grantHosts(t *testing.T, state, vol string, hosts ...string) {
	t.Helper()
	h := inspect(t, state, vol)
	t.Setenv("SOFTHSM2_CONF", "")
	k, err := hsm.Open(hsm.Config{}, state)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	ctx := context.Background()
	for _, host := range hosts {
		for _, g := range []struct {
			ops []string
			c   *hsm.GrantConstraints
		}{{[]string{"Decrypt"}, &hsm.GrantConstraints{EncryptionContextEquals: volumeContext(h)}}, {[]string{"DescribeKey"}, nil}} {
			if _, err := k.CreateGrant(ctx, h["key_id"].(string), host, "", g.ops, g.c); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// dekWindows are the windows of the data key (raw, base64, hex) and of the
// first round keys of its XTS schedules.
func dekWindows(t *testing.T, dek []byte) []memscan.Window {
	wins := memscan.Windows(dek)
	all := windows(t, dek)
	for _, w := range all[len(dek)/16:] { // after the key's own quarters: the schedules
		wins = append(wins, memscan.Window{Kind: "schedule", Bytes: w})
	}
	return wins
}

func scanProcess(t *testing.T, name string, pid int, wins []memscan.Window) []memscan.Hit {
	t.Helper()
	hits, scanned, err := memscan.Scan(pid, wins)
	if err != nil {
		t.Fatalf("scanning %s: %v", name, err)
	}
	t.Logf("scanned %d MiB of %s: %d windows", scanned>>20, name, len(hits))
	return hits
}

// countDecrypts counts the audit log's Decrypts by host, for a recipient
// only or all.
func countDecrypts(audit []byte, host string, recipient bool) int {
	n := 0
	for _, l := range bytes.Split(audit, []byte("\n")) {
		if bytes.Contains(l, []byte(`"eventName":"Decrypt"`)) && bytes.Contains(l, []byte(`"userName":"`+host+`"`)) &&
			(!recipient || bytes.Contains(l, []byte(`"recipient":{"keyEncryptionAlgorithm":"RSAES_OAEP_SHA_256"`))) {
			n++
		}
	}
	return n
}

// kmsServer is hemd kms serve, run from hemdBin.
type kmsServer struct {
	addr string
	cmd  *exec.Cmd
}

func (k *kmsServer) pid() int { return k.cmd.Process.Pid }

// startKMS runs hemd kms serve on state over mutual TLS (certificates from
// ca) with an admin and the grants-only principals host-a and host-b.
func startKMS(t *testing.T, ca *testpki.CA, state string) *kmsServer {
	t.Helper()
	srvPair, err := ca.Server("kms")
	if err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(filepath.Dir(state), "kms.toml")
	var principals strings.Builder
	for _, p := range []struct{ name, akid string }{{"admin", "AKIDADMIN"}, {"host-a", "AKIDA"}, {"host-b", "AKIDB"}} {
		fmt.Fprintf(&principals, "[[kms.principal]]\nname = %q\naccess_key_id = %q\nsecret_access_key = %q\ngrants_only = %v\n",
			p.name, p.akid, p.name+"-secret", p.name != "admin")
	}
	os.WriteFile(cfg, []byte(fmt.Sprintf("state_dir = %q\n[kms]\n%s", state, principals.String())), 0o600)
	k := &kmsServer{addr: FreeTCPAddr(t)}
	k.cmd = exec.Command(hemdBin, "kms", "serve", "--listen", k.addr, "--config", cfg,
		"--tls-cert", srvPair.CertFile, "--tls-key", srvPair.KeyFile, "--client-ca", ca.CertFile)
	k.cmd.Env = append(os.Environ(), "SOFTHSM2_CONF=")
	out, err := k.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	k.cmd.Stderr = k.cmd.Stdout
	t.Logf("vmtest: %s", strings.Join(k.cmd.Args, " "))
	if err := k.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			t.Logf("kms: %s", sc.Text())
		}
		k.cmd.Wait()
		close(done)
	}()
	t.Cleanup(func() { k.cmd.Process.Kill(); <-done })
	for i := 0; ; i++ {
		c, err := net.Dial("tcp", k.addr)
		if err == nil {
			c.Close()
			return k
		}
		select {
		case <-done:
			t.Fatal("vmtest: hemd kms serve exited")
		case <-time.After(50 * time.Millisecond):
		}
		if i == 400 {
			t.Fatalf("vmtest: hemd kms serve does not listen on %s", k.addr)
		}
	}
}

// recordingProxy terminates a host's TLS with a certificate of its own
// (from a CA the host trusts), forwards each connection to the KMS over TLS
// with the host's client certificate, and records what passes, both ways.
type recordingProxy struct {
	addr string
	mu   sync.Mutex
	seen bytes.Buffer
}

func (p *recordingProxy) bytes() []byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	return bytes.Clone(p.seen.Bytes())
}

func (p *recordingProxy) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.seen.Write(b)
}

func startProxy(t *testing.T, proxyCA, kmsCA *testpki.CA, host, kmsAddr string) *recordingProxy {
	t.Helper()
	front, err := proxyCA.Server("proxy-" + host)
	if err != nil {
		t.Fatal(err)
	}
	frontCert, err := tls.LoadX509KeyPair(front.CertFile, front.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	id, err := kmsCA.Client(host)
	if err != nil {
		t.Fatal(err)
	}
	back, err := awsjson.TLSClient(kmsCA.CertFile, id.CertFile, id.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{frontCert}, MinVersion: tls.VersionTLS13})
	if err != nil {
		t.Fatal(err)
	}
	p := &recordingProxy{addr: ln.Addr().String()}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				k, err := tls.Dial("tcp", kmsAddr, back)
				if err != nil {
					t.Logf("proxy %s: %v", host, err)
					return
				}
				defer k.Close()
				go func() {
					io.Copy(io.MultiWriter(k, p), c)
					k.CloseWrite()
				}()
				io.Copy(io.MultiWriter(c, p), k)
			})
		}
	})
	return p
}
