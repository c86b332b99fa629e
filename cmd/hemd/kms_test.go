package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/hemd/hemd/hem/datakey/memscan"
	"github.com/hemd/hemd/kmsclient"
	"github.com/hemd/hemd/kmsclient/awsjson"
	"github.com/hemd/hemd/kmsclient/hsm"
	"github.com/hemd/hemd/kmsclient/testpki"
)

// lockedBuffer collects a command's log from its goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// startKMSServe runs `hemd kms serve` with a config naming region and one
// principal, on a free loopback port, until the test ends; it returns the
// endpoint.
func startKMSServe(t *testing.T, region string) string {
	t.Helper()
	if _, err := os.Stat(hsm.DefaultModule); err != nil {
		t.Fatalf("SoftHSM2 is needed (%v): make deps installs softhsm2", err)
	}
	t.Setenv("SOFTHSM2_CONF", "")
	os.Unsetenv("SOFTHSM2_CONF")
	dir := t.TempDir()
	cfg := filepath.Join(dir, "kms.toml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`state_dir = %q
[kms]
region = %q
[[kms.principal]]
name = "admin"
access_key_id = "AKIDSERVE"
secret_access_key = "serve-secret"
`, filepath.Join(dir, "state"), region)), 0o600)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	ctx, cancel := context.WithCancel(context.Background())
	var log lockedBuffer
	done := make(chan error, 1)
	go func() { done <- run(ctx, []string{"kms", "serve", "--listen", addr, "--config", cfg}, &log, &log) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("kms serve: %v\n%s", err, log.String())
		}
	})
	for i := 0; ; i++ {
		resp, err := http.Post("http://"+addr+"/", "application/x-amz-json-1.1", strings.NewReader("{}"))
		if err == nil {
			resp.Body.Close()
			break
		}
		if i == 100 {
			t.Fatalf("kms serve did not start: %v\n%s", err, log.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	return "http://" + addr
}

// TestKMSServeRegion: hemd kms serve in region eu-west-1, driven by
// Debian's awscli, and hemd volume create against it signing for the
// configured region (HEMD_KMS_REGION), or for a key ARN's region when the
// two differ, with a warning.
func TestKMSServeRegion(t *testing.T) {
	endpoint := startKMSServe(t, "eu-west-1")
	if _, err := os.Stat("/usr/bin/aws"); err != nil {
		t.Fatalf("Debian's awscli is needed (%v): make deps installs it", err)
	}
	home := t.TempDir()
	aws := exec.Command("/usr/bin/aws", "--endpoint-url", endpoint, "--region", "eu-west-1", "--output", "text",
		"kms", "create-key", "--query", "KeyMetadata.Arn")
	aws.Env = []string{"PATH=/usr/bin:/bin", "HOME=" + home, "AWS_ACCESS_KEY_ID=AKIDSERVE", "AWS_SECRET_ACCESS_KEY=serve-secret",
		"AWS_CONFIG_FILE=" + filepath.Join(home, "none"), "AWS_EC2_METADATA_DISABLED=true", "AWS_PAGER="}
	out, err := aws.CombinedOutput()
	if err != nil {
		t.Fatalf("aws kms create-key: %v\n%s", err, out)
	}
	arn := strings.TrimSpace(string(out))
	keyID := arn[strings.LastIndex(arn, "/")+1:]
	if !strings.HasPrefix(arn, "arn:aws:kms:eu-west-1:") {
		t.Fatalf("create-key: %q", arn)
	}
	t.Setenv("HEMD_KMS_ENDPOINT", endpoint)
	t.Setenv("HEMD_KMS_ACCESS_KEY_ID", "AKIDSERVE")
	t.Setenv("HEMD_KMS_SECRET_ACCESS_KEY", "serve-secret")
	volumes := t.TempDir()
	create := func(name, key, region string) (string, error) {
		t.Setenv("HEMD_KMS_REGION", region)
		var log lockedBuffer
		err := run(context.Background(), []string{"--state-dir", t.TempDir(), "volume", "create", "--size", "1M", "--key", key,
			filepath.Join(volumes, name)}, &log, &log)
		return log.String(), err
	}
	// The configured region is the KMS's: a key id is enough.
	if log, err := create("a.img", keyID, "eu-west-1"); err != nil || strings.Contains(log, "key_region") {
		t.Fatalf("HEMD_KMS_REGION=eu-west-1: %v\n%s", err, log)
	}
	// No region configured ("local"): a key id is signed for "local" and
	// refused, as AWS KMS would.
	if log, err := create("b.img", keyID, ""); err == nil || !strings.Contains(err.Error(), "valid region, not 'local'") {
		t.Fatalf("no region, key id: %v\n%s", err, log)
	}
	// A key ARN: its region wins, with a warning.
	if log, err := create("c.img", arn, "us-east-1"); err != nil || !strings.Contains(log, "key_region=eu-west-1") ||
		!strings.Contains(log, "configured_region=us-east-1") {
		t.Fatalf("HEMD_KMS_REGION=us-east-1, key ARN: %v\n%s", err, log)
	}
}

// checkPrincipals refuses principals that could never sign a request.
func TestCheckPrincipals(t *testing.T) {
	good := awsjson.Principal{Name: "a", AccessKeyID: "AKIDA", SecretAccessKey: "s"}
	for _, tc := range []struct {
		ps   []awsjson.Principal
		want string
	}{
		{[]awsjson.Principal{good}, ""},
		{[]awsjson.Principal{good, {Name: "b", AccessKeyID: "AKIDB"}}, "secret_access_key are required"},
		{[]awsjson.Principal{{Name: "b", SecretAccessKey: "s"}}, "access_key_id and"},
		{[]awsjson.Principal{{Name: "b", AccessKeyID: "AKID/B", SecretAccessKey: "s"}}, "cannot carry"},
		{[]awsjson.Principal{good, good}, "used twice"},
	} {
		err := checkPrincipals(tc.ps)
		if (tc.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%+v: %v, want %q", tc.ps, err, tc.want)
		}
	}
}

// kmsTLSRig is hemd kms serve's state, certificates and config for the
// TLS tests: a key with a 64-byte data key wrapped both ways (a version 2
// blob, GenerateDataKeyWithoutPlaintext's, and a version 1 blob, as volumes
// made before had), grants for the grants-only host-1, an admin.
type kmsTLSRig struct {
	dir, cfg     string
	ca           *testpki.CA
	server       testpki.Pair
	keyArn       string
	v1, v2       []byte // blobs
	pt1, pt2     []byte // their plaintexts
	admin, host1 testpki.Pair
}

var rigVol = map[string]string{"aws:ebs:id": "vol-0123456789abcdef0"}

func newKMSTLSRig(t *testing.T, extra string) *kmsTLSRig {
	t.Helper()
	if _, err := os.Stat(hsm.DefaultModule); err != nil {
		t.Fatalf("SoftHSM2 is needed (%v): make deps installs softhsm2", err)
	}
	t.Setenv("SOFTHSM2_CONF", "")
	os.Unsetenv("SOFTHSM2_CONF")
	r := &kmsTLSRig{dir: t.TempDir()}
	state := filepath.Join(r.dir, "state")
	k, err := hsm.Open(hsm.Config{}, state)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	m, err := k.CreateKey(ctx, "tls test")
	if err != nil {
		t.Fatal(err)
	}
	r.keyArn = m.Arn
	r.pt1, r.pt2 = make([]byte, 64), make([]byte, 64)
	rand.Read(r.pt1)
	if r.v1, _, err = k.Encrypt(ctx, m.KeyID, rigVol, r.pt1); err != nil {
		t.Fatal(err)
	}
	if r.v2, _, err = k.GenerateDataKeyWithoutPlaintext(ctx, m.KeyID, rigVol); err != nil {
		t.Fatal(err)
	}
	if _, err := k.Decrypt(ctx, r.v2, rigVol, r.pt2); err != nil {
		t.Fatal(err)
	}
	for _, g := range []struct {
		ops []string
		c   *hsm.GrantConstraints
	}{{[]string{"Decrypt"}, &hsm.GrantConstraints{EncryptionContextEquals: rigVol}}, {[]string{"DescribeKey"}, nil}} {
		if _, err := k.CreateGrant(ctx, m.KeyID, "host-1", "", g.ops, g.c); err != nil {
			t.Fatal(err)
		}
	}
	k.Close()
	if r.ca, err = testpki.NewCA(r.dir, "kms"); err != nil {
		t.Fatal(err)
	}
	for _, p := range []struct {
		dst *testpki.Pair
		cn  string
	}{{&r.admin, "admin"}, {&r.host1, "host-1"}} {
		if *p.dst, err = r.ca.Client(p.cn); err != nil {
			t.Fatal(err)
		}
	}
	if r.server, err = r.ca.Server("kms"); err != nil {
		t.Fatal(err)
	}
	r.cfg = filepath.Join(r.dir, "kms.toml")
	os.WriteFile(r.cfg, []byte(fmt.Sprintf(`state_dir = %q
[kms]
%s
[[kms.principal]]
name = "admin"
access_key_id = "AKIDADMIN"
secret_access_key = "admin-secret"
[[kms.principal]]
name = "host-1"
access_key_id = "AKIDHOST1"
secret_access_key = "host-1-secret"
grants_only = true
`, state, extra)), 0o600)
	return r
}

// tlsArgs are kms serve's TLS flags, mutual TLS included.
func (r *kmsTLSRig) tlsArgs() []string {
	return []string{"--tls-cert", r.server.CertFile, "--tls-key", r.server.KeyFile, "--client-ca", r.ca.CertFile}
}

// client is a host's or the admin's KMS client over mutual TLS.
func (r *kmsTLSRig) client(t *testing.T, endpoint string, who testpki.Pair, akid, secret string, recipient bool) *awsjson.Client {
	t.Helper()
	c, err := awsjson.NewClientWith(awsjson.ClientConfig{Endpoint: endpoint, AccessKeyID: akid, SecretAccessKey: secret,
		CAFile: r.ca.CertFile, CertFile: who.CertFile, KeyFile: who.KeyFile, Recipient: recipient})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// freeAddr is a free loopback TCP address.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// waitTLS waits until a TLS server answers on addr.
func waitTLS(t *testing.T, addr string, exited func() string) {
	t.Helper()
	for i := 0; ; i++ {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			return
		}
		if msg := exited(); msg != "" || i == 200 {
			t.Fatalf("kms serve did not start: %v\n%s", err, msg)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestKMSServeTLS: hemd kms serve with --tls-cert, --tls-key and
// --client-ca serves TLS 1.3 with client certificates: a host decrypts its
// volume's key for a recipient through kmsclient.Open as hemd serve would,
// its plain Decrypt is refused (require_recipient), the admin's works; a
// certificate naming another principal, no certificate and plain HTTP are
// refused.
func TestKMSServeTLS(t *testing.T) {
	r := newKMSTLSRig(t, "")
	addr := freeAddr(t)
	ctx, cancel := context.WithCancel(context.Background())
	var log lockedBuffer
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, append([]string{"kms", "serve", "--listen", addr, "--config", r.cfg}, r.tlsArgs()...), &log, &log)
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("kms serve: %v\n%s", err, log.String())
		}
	})
	waitTLS(t, addr, func() string { return "" })
	endpoint := "https://" + addr
	if !strings.Contains(log.String(), "mutual_tls=true") {
		t.Errorf("kms serve does not log mutual TLS:\n%s", log.String())
	}
	cfg := kmsclient.Config{Endpoint: endpoint, AccessKeyID: "AKIDHOST1", SecretAccessKey: "host-1-secret",
		CAFile: r.ca.CertFile, ClientCert: r.host1.CertFile, ClientKey: r.host1.KeyFile}
	dk, closer, err := kmsclient.Open(ctx, cfg, t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer closer.Close()
	if err := dk.CheckKey(ctx, r.keyArn); err != nil {
		t.Fatalf("host-1 CheckKey: %v", err)
	}
	for _, b := range []struct{ blob, pt []byte }{{r.v1, r.pt1}, {r.v2, r.pt2}} {
		dst := make([]byte, 64)
		if _, err := dk.Decrypt(ctx, b.blob, rigVol, dst); err != nil || !bytes.Equal(dst, b.pt) {
			t.Fatalf("host-1 Decrypt for a recipient (blob version %d): %v", b.blob[4], err)
		}
	}
	dst := make([]byte, 64)
	if _, err := r.client(t, endpoint, r.host1, "AKIDHOST1", "host-1-secret", false).Decrypt(ctx, r.v2, rigVol, dst); !errors.Is(err, hsm.ErrAccessDenied) {
		t.Fatalf("host-1's plain Decrypt: %v", err)
	}
	if _, err := r.client(t, endpoint, r.admin, "AKIDADMIN", "admin-secret", false).Decrypt(ctx, r.v2, rigVol, dst); err != nil || !bytes.Equal(dst, r.pt2) {
		t.Fatalf("the admin's plain Decrypt: %v", err)
	}
	if _, err := r.client(t, endpoint, r.admin, "AKIDHOST1", "host-1-secret", true).Decrypt(ctx, r.v2, rigVol, dst); !errors.Is(err, hsm.ErrAccessDenied) {
		t.Fatalf("host-1's signature with the admin's certificate: %v", err)
	}
	noCert, _ := awsjson.NewClientWith(awsjson.ClientConfig{Endpoint: endpoint, AccessKeyID: "AKIDADMIN", SecretAccessKey: "admin-secret", CAFile: r.ca.CertFile})
	if _, err := noCert.Decrypt(ctx, r.v2, rigVol, dst); err == nil {
		t.Fatal("a client without a certificate was served")
	}
	if resp, err := http.Post("http://"+addr+"/", "application/x-amz-json-1.1", strings.NewReader("{}")); err == nil {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK || !strings.Contains(string(b), "HTTP request to an HTTPS server") {
			t.Fatalf("plain HTTP to the TLS port: %d %s", resp.StatusCode, b)
		}
	}
}

// TestKMSServeInsecureHTTP: kms serve without TLS on a network address is
// refused unless [kms] insecure_http = true, and then warned about; on
// loopback it serves plain HTTP as before. TLS flags must come in pairs.
func TestKMSServeInsecureHTTP(t *testing.T) {
	r := newKMSTLSRig(t, "")
	port := freeAddr(t)[len("127.0.0.1:"):]
	err := run(context.Background(), []string{"kms", "serve", "--listen", "0.0.0.0:" + port, "--config", r.cfg}, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "insecure_http") {
		t.Fatalf("plain HTTP on 0.0.0.0: %v", err)
	}
	if err := run(context.Background(), []string{"kms", "serve", "--listen", "127.0.0.1:" + port, "--config", r.cfg,
		"--tls-cert", r.server.CertFile}, io.Discard, io.Discard); err == nil || !strings.Contains(err.Error(), "go together") {
		t.Fatalf("--tls-cert alone: %v", err)
	}
	insecure := newKMSTLSRig(t, "insecure_http = true")
	ctx, cancel := context.WithCancel(context.Background())
	var log lockedBuffer
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"kms", "serve", "--listen", "0.0.0.0:" + port, "--config", insecure.cfg}, &log, &log)
	}()
	waitTLS(t, "127.0.0.1:"+port, func() string { return "" })
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("kms serve with insecure_http: %v", err)
	}
	if !strings.Contains(log.String(), "insecure_http") || !strings.Contains(log.String(), "level=WARN") {
		t.Fatalf("no warning about plain HTTP:\n%s", log.String())
	}
}

// TestKMSServeKeepsNoPlaintext runs hemd kms serve (the binary) over mutual
// TLS and has it unwrap data keys many ways: for host-1's recipient and in
// plaintext for the admin, version 1 and version 2 blobs, and a
// GenerateDataKey. Its memory then holds no window of any of those keys,
// raw, base64 or hex: the plaintext was only in the HSM or in locked
// memory wiped at once, and the responses that carried it never went
// through net/http's buffers. As a control, the plaintext of an Encrypt
// (the caller's data, in the request) is found: net/http's read buffer
// keeps it, and the scan sees it.
func TestKMSServeKeepsNoPlaintext(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("reading hemd kms serve's memory needs root (it is non-dumpable)")
	}
	r := newKMSTLSRig(t, "")
	bin := buildHemd(t)
	addr := freeAddr(t)
	cmd := exec.Command(bin, append([]string{"kms", "serve", "--listen", addr, "--config", r.cfg}, r.tlsArgs()...)...)
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF=")
	var log lockedBuffer
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-exited })
	waitTLS(t, addr, func() string {
		select {
		case <-exited:
			return log.String()
		default:
			return ""
		}
	})
	ctx := context.Background()
	endpoint := "https://" + addr
	host := r.client(t, endpoint, r.host1, "AKIDHOST1", "host-1-secret", true)
	admin := r.client(t, endpoint, r.admin, "AKIDADMIN", "admin-secret", false)
	dst := make([]byte, 64)
	for range 3 {
		for _, b := range []struct{ blob, pt []byte }{{r.v1, r.pt1}, {r.v2, r.pt2}} {
			for _, c := range []*awsjson.Client{host, admin} {
				if _, err := c.Decrypt(ctx, b.blob, rigVol, dst); err != nil || !bytes.Equal(dst, b.pt) {
					t.Fatalf("Decrypt (blob version %d, recipient %v): %v", b.blob[4], c.Keys != nil, err)
				}
			}
		}
	}
	tc, err := awsjson.TLSClient(r.ca.CertFile, r.admin.CertFile, r.admin.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	sdk := kms.New(kms.Options{Region: "local", BaseEndpoint: aws.String(endpoint),
		HTTPClient: &http.Client{Transport: &http.Transport{TLSClientConfig: tc}},
		Credentials: aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) {
			return aws.Credentials{AccessKeyID: "AKIDADMIN", SecretAccessKey: "admin-secret"}, nil
		})})
	gd, err := sdk.GenerateDataKey(ctx, &kms.GenerateDataKeyInput{KeyId: aws.String(r.keyArn), NumberOfBytes: aws.Int32(64), EncryptionContext: rigVol})
	if err != nil {
		t.Fatal(err)
	}
	control := make([]byte, 64)
	rand.Read(control)
	if _, err := sdk.Encrypt(ctx, &kms.EncryptInput{KeyId: aws.String(r.keyArn), Plaintext: control}); err != nil {
		t.Fatal(err)
	}
	var wins, controlWins []memscan.Window
	for _, k := range [][]byte{r.pt1, r.pt2, gd.Plaintext} {
		wins = append(wins, memscan.Windows(k)...)
	}
	controlWins = memscan.Windows(control)
	hits, scanned, err := memscan.Scan(cmd.Process.Pid, append(wins, controlWins...))
	if err != nil {
		t.Fatal(err)
	}
	found, controls := 0, 0
	for _, h := range hits {
		if h.Window < len(wins) {
			found++
			t.Errorf("a data key in kms serve's memory: %v", h)
		} else {
			controls++
		}
	}
	t.Logf("scanned %d MiB of hemd kms serve: %d windows of the data keys, %d of the Encrypt control", scanned>>20, found, controls)
	if controls == 0 {
		t.Fatal("the scan did not find the Encrypt control: it cannot see the process's buffers")
	}
}
