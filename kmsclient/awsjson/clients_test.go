package awsjson

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Clients we did not write, as Debian packages them: awscli (2.9) and
// python3-boto3 (1.26), each driving hemd kms serve through every
// operation hemd implements and the errors it returns.

const (
	debianAWS     = "/usr/bin/aws"
	debianPython3 = "/usr/bin/python3"
)

var (
	cliAdmin = Principal{AccessKeyID: "AKIDCLIADMIN", SecretAccessKey: "cli-admin-secret", Name: "admin"}
	// Debian 12's botocore (1.29) predates Decrypt's Recipient: its host
	// may receive plaintext (require_recipient = false).
	cliHost = Principal{AccessKeyID: "AKIDCLIHOST", SecretAccessKey: "cli-host-secret", Name: "host-1", GrantsOnly: true,
		RequireRecipient: new(false)}
)

// needDebian fails the test (never skips it) when a Debian package the
// test drives is missing.
func needDebian(t *testing.T, path, pkg string) {
	t.Helper()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("%s is missing (%v): Debian's %s is needed; make deps installs it", path, err, pkg)
	}
}

// clientEnv is a clean environment for an AWS client: no credentials,
// config or instance metadata of the machine's, no pager, no retries (a
// retried 500 would take seconds).
func clientEnv(t *testing.T, extra ...string) []string {
	home := t.TempDir()
	return append([]string{
		"PATH=/usr/bin:/bin", "HOME=" + home, "LANG=C.UTF-8",
		"AWS_CONFIG_FILE=" + filepath.Join(home, "config"), "AWS_SHARED_CREDENTIALS_FILE=" + filepath.Join(home, "credentials"),
		"AWS_EC2_METADATA_DISABLED=true", "AWS_PAGER=", "AWS_MAX_ATTEMPTS=1", "AWS_RETRY_MODE=standard",
	}, extra...)
}

// TestBoto3 runs testdata/boto3_kms.py: boto3 through every operation
// and error class, each response checked against botocore's KMS model.
func TestBoto3(t *testing.T) {
	needDebian(t, debianPython3, "python3")
	if out, err := exec.Command(debianPython3, "-c", "import boto3").CombinedOutput(); err != nil {
		t.Fatalf("Debian's python3-boto3 is needed (%v: %s); make deps installs it", err, out)
	}
	srv, _, dir := serveWith(t, "eu-west-1", cliAdmin, cliHost)
	cmd := exec.Command(debianPython3, "testdata/boto3_kms.py")
	cmd.Env = clientEnv(t, "KMS_URL="+srv.URL, "KMS_REGION=eu-west-1", "KMS_STATE_DIR="+dir,
		"ADMIN_KEY="+cliAdmin.AccessKeyID, "ADMIN_SECRET="+cliAdmin.SecretAccessKey,
		"HOST_KEY="+cliHost.AccessKeyID, "HOST_SECRET="+cliHost.SecretAccessKey)
	out, err := cmd.CombinedOutput()
	t.Logf("boto3_kms.py:\n%s", out)
	if err != nil {
		t.Fatalf("boto3_kms.py: %v", err)
	}
	var passed, failed int
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if _, err := fmt.Sscanf(lines[len(lines)-1][strings.Index(lines[len(lines)-1], ": ")+2:], "%d checks passed, %d failed", &passed, &failed); err != nil || failed != 0 || passed < 150 {
		t.Fatalf("boto3_kms.py summary %q: %v", lines[len(lines)-1], err)
	}
}

// awsCLI runs Debian's aws against a server: as the aws program, or (to
// spare Python's start-up on every command) through the same entry point in
// one Python process, testdata/awscli_driver.py.
type awsCLI struct {
	t   *testing.T
	url string
	env []string
	dir string
	// binary runs the next commands as /usr/bin/aws processes.
	binary bool
	in     io.Writer
	out    *bufio.Reader
}

func newAWSCLI(t *testing.T, url string) *awsCLI {
	needDebian(t, debianAWS, "awscli")
	a := &awsCLI{t: t, url: url, env: clientEnv(t), dir: t.TempDir()}
	driver := exec.Command(debianPython3, "testdata/awscli_driver.py")
	driver.Env, driver.Stderr = a.env, os.Stderr
	in, err := driver.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := driver.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := driver.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		in.Close()
		driver.Wait()
	})
	a.in, a.out = in, bufio.NewReader(out)
	var config, creds strings.Builder
	for name, p := range map[string]Principal{"hemd": cliAdmin, "hemd-host": cliHost,
		"hemd-wrong":  {AccessKeyID: cliAdmin.AccessKeyID, SecretAccessKey: "wrong"},
		"hemd-nobody": {AccessKeyID: "AKIDNOBODY", SecretAccessKey: "x"}} {
		// endpoint_url in a profile needs awscli 2.13; Debian 12's 2.9
		// takes --endpoint-url only, which run passes as well.
		fmt.Fprintf(&config, "[profile %s]\nregion = eu-west-1\noutput = json\nendpoint_url = %s\n\n", name, url)
		fmt.Fprintf(&creds, "[%s]\naws_access_key_id = %s\naws_secret_access_key = %s\n\n", name, p.AccessKeyID, p.SecretAccessKey)
	}
	for _, kv := range a.env {
		if f, ok := strings.CutPrefix(kv, "AWS_CONFIG_FILE="); ok {
			os.WriteFile(f, []byte(config.String()), 0o600)
		}
		if f, ok := strings.CutPrefix(kv, "AWS_SHARED_CREDENTIALS_FILE="); ok {
			os.WriteFile(f, []byte(creds.String()), 0o600)
		}
	}
	return a
}

// run runs `aws --profile PROFILE --endpoint-url URL kms ARGS...`.
func (a *awsCLI) run(profile string, args ...string) (string, string, int) {
	a.t.Helper()
	argv := append([]string{"--profile", profile, "--endpoint-url", a.url, "kms"}, args...)
	if !a.binary {
		line, _ := json.Marshal(argv)
		if _, err := a.in.Write(append(line, '\n')); err != nil {
			a.t.Fatalf("awscli_driver.py: %v", err)
		}
		reply, err := a.out.ReadBytes('\n')
		var r struct {
			RC             int
			Stdout, Stderr string
		}
		if err != nil || json.Unmarshal(reply, &r) != nil {
			a.t.Fatalf("awscli_driver.py: %v %q", err, reply)
		}
		return r.Stdout, r.Stderr, r.RC
	}
	cmd := exec.Command(debianAWS, argv...)
	cmd.Env = a.env
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		a.t.Fatalf("aws %v: %v", args, err)
	}
	return stdout.String(), stderr.String(), cmd.ProcessState.ExitCode()
}

// ok runs a command that must succeed and returns its JSON output.
func (a *awsCLI) ok(profile string, args ...string) map[string]any {
	a.t.Helper()
	stdout, stderr, code := a.run(profile, args...)
	if code != 0 {
		a.t.Fatalf("aws kms %s: exit %d\n%s", strings.Join(args, " "), code, stderr)
	}
	out := map[string]any{}
	if strings.TrimSpace(stdout) != "" {
		if err := json.Unmarshal([]byte(stdout), &out); err != nil {
			a.t.Fatalf("aws kms %s: %v\n%s", strings.Join(args, " "), err, stdout)
		}
	}
	return out
}

// fails runs a command that must fail with the AWS error code.
func (a *awsCLI) fails(code, profile string, args ...string) {
	a.t.Helper()
	_, stderr, exit := a.run(profile, args...)
	if exit != 254 || !strings.Contains(stderr, "An error occurred ("+code+")") {
		a.t.Errorf("aws kms %s: exit %d, want 254 with %s:\n%s", strings.Join(args, " "), exit, code, stderr)
	}
}

// file writes b to a temporary file and returns it as fileb://PATH.
func (a *awsCLI) file(name string, b []byte) string {
	p := filepath.Join(a.dir, name)
	if err := os.WriteFile(p, b, 0o600); err != nil {
		a.t.Fatal(err)
	}
	return "fileb://" + p
}

func str(m map[string]any, path ...string) string {
	var v any = m
	for _, p := range path {
		mm, _ := v.(map[string]any)
		v = mm[p]
	}
	s, _ := v.(string)
	return s
}

// b64 decodes a base64 field of awscli's JSON output.
func b64(t *testing.T, m map[string]any, field string) []byte {
	t.Helper()
	b, err := base64.StdEncoding.DecodeString(str(m, field))
	if err != nil {
		t.Fatalf("%s: %v", field, err)
	}
	return b
}

// TestAWSCLI drives hemd kms serve with Debian's awscli as an operator
// would: every operation hemd implements, and the errors a CLI user meets.
func TestAWSCLI(t *testing.T) {
	srv, _, dir := serveWith(t, "eu-west-1", cliAdmin, cliHost)
	a := newAWSCLI(t, srv.URL)
	const ectx = "aws:ebs:id=vol-0123456789abcdef0"

	// The aws program itself: a success, a service error (exit 254), an
	// unsigned request.
	a.binary = true
	k1 := a.ok("hemd", "create-key", "--description", "cli", "--tags", "TagKey=env,TagValue=test")
	a.fails("NotFoundException", "hemd", "describe-key", "--key-id", "alias/none")
	a.fails("MissingAuthenticationTokenException", "hemd", "list-keys", "--no-sign-request")
	a.binary = false

	// Keys.
	m := k1["KeyMetadata"].(map[string]any)
	for field, want := range map[string]any{"AWSAccountId": "000000000000", "KeyManager": "CUSTOMER", "KeySpec": "SYMMETRIC_DEFAULT",
		"KeyUsage": "ENCRYPT_DECRYPT", "Origin": "AWS_KMS", "MultiRegion": false, "Description": "cli"} {
		if m[field] != want {
			t.Errorf("create-key: KeyMetadata.%s = %v, want %v", field, m[field], want)
		}
	}
	if algs, _ := m["EncryptionAlgorithms"].([]any); len(algs) != 1 || algs[0] != "SYMMETRIC_DEFAULT" {
		t.Errorf("create-key: EncryptionAlgorithms %v", m["EncryptionAlgorithms"])
	}
	id1, arn1 := m["KeyId"].(string), m["Arn"].(string)
	if !strings.HasPrefix(arn1, "arn:aws:kms:eu-west-1:000000000000:key/") {
		t.Errorf("ARN %s", arn1)
	}
	k2 := a.ok("hemd", "create-key")
	id2 := str(k2, "KeyMetadata", "KeyId")
	if str(a.ok("hemd", "describe-key", "--key-id", arn1), "KeyMetadata", "KeyId") != id1 {
		t.Error("describe-key by ARN")
	}
	a.ok("hemd", "update-key-description", "--key-id", id1, "--description", "renamed")
	if got := str(a.ok("hemd", "describe-key", "--key-id", id1), "KeyMetadata", "Description"); got != "renamed" {
		t.Errorf("update-key-description: %q", got)
	}
	if keys := a.ok("hemd", "list-keys", "--page-size", "1")["Keys"].([]any); len(keys) != 2 {
		t.Errorf("list-keys one key a page: %v", keys)
	}
	if first := a.ok("hemd", "list-keys", "--max-items", "1"); len(first["Keys"].([]any)) != 1 || first["NextToken"] == nil {
		t.Errorf("list-keys --max-items 1: %v", first)
	}

	// Aliases and tags.
	a.ok("hemd", "create-alias", "--alias-name", "alias/cli", "--target-key-id", id1)
	a.fails("AlreadyExistsException", "hemd", "create-alias", "--alias-name", "alias/cli", "--target-key-id", id2)
	a.ok("hemd", "update-alias", "--alias-name", "alias/cli", "--target-key-id", id2)
	if al := a.ok("hemd", "list-aliases", "--key-id", id2)["Aliases"].([]any); len(al) != 1 {
		t.Errorf("list-aliases after update-alias: %v", al)
	}
	a.ok("hemd", "delete-alias", "--alias-name", "alias/cli")
	if al := a.ok("hemd", "list-aliases")["Aliases"].([]any); len(al) != 0 {
		t.Errorf("list-aliases after delete-alias: %v", al)
	}
	a.fails("NotFoundException", "hemd", "describe-key", "--key-id", "alias/cli")
	a.ok("hemd", "tag-resource", "--key-id", id1, "--tags", "TagKey=team,TagValue=storage")
	a.ok("hemd", "untag-resource", "--key-id", id1, "--tag-keys", "env")
	if tags, _ := json.Marshal(a.ok("hemd", "list-resource-tags", "--key-id", id1)["Tags"]); string(tags) != `[{"TagKey":"team","TagValue":"storage"}]` {
		t.Errorf("list-resource-tags: %s", tags)
	}
	a.fails("TagException", "hemd", "tag-resource", "--key-id", id1, "--tags", "TagKey=aws:x,TagValue=y")

	// Data: data keys, the sizes of issue 14, re-encryption, random bytes.
	dk := a.ok("hemd", "generate-data-key", "--key-id", id1, "--key-spec", "AES_256", "--encryption-context", ectx)
	blob := a.file("dk.blob", b64(t, dk, "CiphertextBlob"))
	d := a.ok("hemd", "decrypt", "--ciphertext-blob", blob, "--encryption-context", ectx)
	if !bytes.Equal(b64(t, d, "Plaintext"), b64(t, dk, "Plaintext")) || str(d, "KeyId") != arn1 {
		t.Error("decrypt of generate-data-key's blob")
	}
	a.fails("InvalidCiphertextException", "hemd", "decrypt", "--ciphertext-blob", blob, "--encryption-context", "aws:ebs:id=vol-other")
	if n := len(b64(t, a.ok("hemd", "generate-data-key-without-plaintext", "--key-id", arn1, "--number-of-bytes", "64"), "CiphertextBlob")); n < 64 {
		t.Errorf("generate-data-key-without-plaintext: %d-byte blob", n)
	}
	for _, n := range []int{2000, 4096} {
		pt := make([]byte, n)
		rand.Read(pt)
		enc := a.ok("hemd", "encrypt", "--key-id", id1, "--plaintext", a.file("pt", pt))
		ct := a.file("ct", b64(t, enc, "CiphertextBlob"))
		if got := b64(t, a.ok("hemd", "decrypt", "--ciphertext-blob", ct), "Plaintext"); !bytes.Equal(got, pt) {
			t.Errorf("decrypt of %d bytes: %d bytes back", n, len(got))
		}
		re := a.ok("hemd", "re-encrypt", "--ciphertext-blob", ct, "--destination-key-id", id2)
		if str(re, "SourceKeyId") != arn1 || !strings.HasSuffix(str(re, "KeyId"), id2) {
			t.Errorf("re-encrypt: %v", re)
		}
	}
	if r := b64(t, a.ok("hemd", "generate-random", "--number-of-bytes", "32"), "Plaintext"); len(r) != 32 {
		t.Errorf("generate-random: %d bytes", len(r))
	}

	// Rotation and grants.
	a.ok("hemd", "enable-key-rotation", "--key-id", id1)
	if on := a.ok("hemd", "get-key-rotation-status", "--key-id", id1)["KeyRotationEnabled"]; on != true {
		t.Errorf("get-key-rotation-status: %v", on)
	}
	a.ok("hemd", "disable-key-rotation", "--key-id", id1)
	g := a.ok("hemd", "create-grant", "--key-id", id1, "--grantee-principal", "host-1", "--retiring-principal", "host-1",
		"--operations", "Decrypt", "RetireGrant", "--constraints", "EncryptionContextEquals={aws:ebs:id=vol-0123456789abcdef0}")
	g2 := a.ok("hemd", "create-grant", "--key-id", id1, "--grantee-principal", "host-2", "--operations", "Decrypt")
	if gs := a.ok("hemd", "list-grants", "--key-id", id1)["Grants"].([]any); len(gs) != 2 {
		t.Errorf("list-grants: %v", gs)
	}
	if gs := a.ok("hemd", "list-retirable-grants", "--retiring-principal", "host-1")["Grants"].([]any); len(gs) != 1 {
		t.Errorf("list-retirable-grants: %v", gs)
	}
	a.ok("hemd-host", "decrypt", "--ciphertext-blob", blob, "--encryption-context", ectx)
	a.fails("AccessDeniedException", "hemd-host", "create-key")
	a.ok("hemd-host", "retire-grant", "--grant-token", str(g, "GrantToken"))
	a.fails("AccessDeniedException", "hemd-host", "decrypt", "--ciphertext-blob", blob, "--encryption-context", ectx)
	a.ok("hemd", "revoke-grant", "--key-id", id1, "--grant-id", str(g2, "GrantId"))
	if gs := a.ok("hemd", "list-grants", "--key-id", id1)["Grants"].([]any); len(gs) != 0 {
		t.Errorf("list-grants after retire-grant and revoke-grant: %v", gs)
	}

	// Key states.
	a.ok("hemd", "disable-key", "--key-id", id2)
	a.fails("DisabledException", "hemd", "encrypt", "--key-id", id2, "--plaintext", a.file("x", []byte("x")))
	a.ok("hemd", "enable-key", "--key-id", id2)
	if sk := a.ok("hemd", "schedule-key-deletion", "--key-id", id2, "--pending-window-in-days", "7"); str(sk, "KeyState") != "PendingDeletion" {
		t.Errorf("schedule-key-deletion: %v", sk)
	}
	a.fails("KMSInvalidStateException", "hemd", "encrypt", "--key-id", id2, "--plaintext", a.file("x", []byte("x")))
	a.ok("hemd", "cancel-key-deletion", "--key-id", id2)

	// What hemd does not do, and who may not call.
	a.fails("UnsupportedOperationException", "hemd", "get-key-policy", "--key-id", id1, "--policy-name", "default")
	a.fails("InvalidSignatureException", "hemd-wrong", "list-keys")
	a.fails("UnrecognizedClientException", "hemd-nobody", "list-keys")

	// The KMS's own failure: awscli shows KMSInternalException.
	os.Remove(filepath.Join(dir, "tags.json"))
	if err := os.Mkdir(filepath.Join(dir, "tags.json"), 0o700); err != nil {
		t.Fatal(err)
	}
	a.fails("KMSInternalException", "hemd", "list-resource-tags", "--key-id", id1)
}
