package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hemd/hemd/kmsclient/awsjson"
	"github.com/hemd/hemd/kmsclient/hsm"
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
