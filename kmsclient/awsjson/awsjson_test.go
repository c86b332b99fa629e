package awsjson

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"
	"github.com/hemd/hemd/kmsclient/hsm"
	"github.com/hemd/hemd/kmsclient/recipient"
)

func serve(t testing.TB) (*httptest.Server, *hsm.KMS) {
	t.Helper()
	srv, k, _ := serveWith(t, "", Principal{AccessKeyID: "AKIDHEMDTEST", SecretAccessKey: "s3cr3t", Name: "test"})
	return srv, k
}

// serveWith starts hemd kms serve's handler on a loopback port over a fresh
// embedded SoftHSM2 KMS whose ARNs name region (default "local"), for the
// principals; it returns the server, the KMS and its state directory.
func serveWith(t testing.TB, region string, principals ...Principal) (*httptest.Server, *hsm.KMS, string) {
	t.Helper()
	if _, err := os.Stat(hsm.DefaultModule); err != nil {
		t.Skipf("SoftHSM2 is not installed (%v): make test installs softhsm2", err)
	}
	t.Setenv("SOFTHSM2_CONF", "")
	os.Unsetenv("SOFTHSM2_CONF")
	dir := t.TempDir()
	k, err := hsm.Open(hsm.Config{Region: region}, dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k.Close() })
	srv := httptest.NewServer(&Server{KMS: k, Principals: principals})
	t.Cleanup(srv.Close)
	return srv, k, dir
}

func sdk(endpoint, akid, secret string) *kms.Client {
	return kms.New(kms.Options{
		Region:       "local",
		BaseEndpoint: aws.String(endpoint),
		Credentials: aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) {
			return aws.Credentials{AccessKeyID: akid, SecretAccessKey: secret}, nil
		}),
	})
}

var vol = map[string]string{"aws:ebs:id": "vol-0123456789abcdef0"}

// TestAWSSDK drives hemd kms serve with the official AWS SDK for Go v2.
func TestAWSSDK(t *testing.T) {
	srv, _ := serve(t)
	ctx := context.Background()
	c := sdk(srv.URL, "AKIDHEMDTEST", "s3cr3t")
	ck, err := c.CreateKey(ctx, &kms.CreateKeyInput{Description: aws.String("sdk test")})
	if err != nil {
		t.Fatal(err)
	}
	keyID := *ck.KeyMetadata.KeyId
	g, err := c.GenerateDataKeyWithoutPlaintext(ctx, &kms.GenerateDataKeyWithoutPlaintextInput{
		KeyId: aws.String(keyID), KeySpec: types.DataKeySpecAes256, EncryptionContext: vol})
	if err != nil {
		t.Fatal(err)
	}
	d, err := c.Decrypt(ctx, &kms.DecryptInput{CiphertextBlob: g.CiphertextBlob, EncryptionContext: vol})
	if err != nil || len(d.Plaintext) != 32 || !strings.HasSuffix(*d.KeyId, keyID) {
		t.Fatalf("Decrypt with the right context: %v", err)
	}
	_, err = c.Decrypt(ctx, &kms.DecryptInput{CiphertextBlob: g.CiphertextBlob, EncryptionContext: map[string]string{"aws:ebs:id": "vol-other"}})
	var ice *types.InvalidCiphertextException
	if !errors.As(err, &ice) {
		t.Fatalf("Decrypt with the wrong context: %v", err)
	}
	if _, err := c.DisableKey(ctx, &kms.DisableKeyInput{KeyId: aws.String(keyID)}); err != nil {
		t.Fatal(err)
	}
	_, err = c.Decrypt(ctx, &kms.DecryptInput{CiphertextBlob: g.CiphertextBlob, EncryptionContext: vol})
	var de *types.DisabledException
	if !errors.As(err, &de) {
		t.Fatalf("Decrypt under a disabled key: %v", err)
	}
	dk, err := c.DescribeKey(ctx, &kms.DescribeKeyInput{KeyId: aws.String(keyID)})
	if err != nil || dk.KeyMetadata.KeyState != types.KeyStateDisabled {
		t.Fatalf("DescribeKey: %v", err)
	}
}

// Unsigned, wrongly signed and unknown-key requests are refused.
func TestAuthRefused(t *testing.T) {
	srv, _ := serve(t)
	ctx := context.Background()
	if _, err := sdk(srv.URL, "AKIDHEMDTEST", "wrong").ListKeys(ctx, &kms.ListKeysInput{}); err == nil || !strings.Contains(err.Error(), "InvalidSignatureException") {
		t.Fatalf("wrong secret: %v", err)
	}
	if _, err := sdk(srv.URL, "AKIDUNKNOWN", "s3cr3t").ListKeys(ctx, &kms.ListKeysInput{}); err == nil || !strings.Contains(err.Error(), "UnrecognizedClientException") {
		t.Fatalf("unknown access key: %v", err)
	}
	req, _ := http.NewRequest("POST", srv.URL+"/", strings.NewReader("{}"))
	req.Header.Set("X-Amz-Target", "TrentService.ListKeys")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 400 {
		t.Fatalf("unsigned request: HTTP %d", resp.StatusCode)
	}
	// A signed request whose body was changed in flight is refused.
	c := NewClient(srv.URL, "local", "AKIDHEMDTEST", "s3cr3t")
	c.HTTP.Transport = tamper{http.DefaultTransport}
	if err := c.call(ctx, "ListKeys", map[string]any{}, nil); err == nil || !strings.Contains(err.Error(), "InvalidSignatureException") {
		t.Fatalf("tampered body: %v", err)
	}
}

type tamper struct{ rt http.RoundTripper }

func (t tamper) RoundTrip(r *http.Request) (*http.Response, error) {
	r.Body = http.NoBody
	r.ContentLength = 0
	r.Body = readCloser{bytes.NewReader([]byte(`{"Limit":1}`))}
	r.ContentLength = 11
	return t.rt.RoundTrip(r)
}

type readCloser struct{ *bytes.Reader }

func (readCloser) Close() error { return nil }

// hemd's own client: the volume path over TCP and over a unix socket.
func TestClient(t *testing.T) {
	srv, k := serve(t)
	ctx := context.Background()
	m, _ := k.CreateKey(ctx, "")
	c := NewClient(srv.URL, "local", "AKIDHEMDTEST", "s3cr3t")
	blob, arn, err := c.GenerateDataKeyWithoutPlaintext(ctx, m.KeyID, vol)
	if err != nil || arn != m.Arn {
		t.Fatal(err)
	}
	dst := make([]byte, 64)
	if _, err := c.Decrypt(ctx, blob, vol, dst); err != nil || bytes.Equal(dst, make([]byte, 64)) {
		t.Fatalf("Decrypt: %v", err)
	}
	if err := c.CheckKey(ctx, m.KeyID); err != nil {
		t.Fatal(err)
	}
	// Over a unix socket the caller is known by its uid: no signature.
	sock := filepath.Join(t.TempDir(), "kms.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	us := &http.Server{Handler: &Server{KMS: k}, ConnContext: ConnContext}
	go us.Serve(ln)
	defer us.Close()
	uc := NewClient("unix:"+sock, "local", "", "")
	if _, err := uc.Decrypt(ctx, blob, vol, dst); err != nil {
		t.Fatalf("Decrypt over the unix socket: %v", err)
	}
	denied := &http.Server{Handler: &Server{KMS: k, UnixUIDs: []int{4242}}, ConnContext: ConnContext}
	sock2 := filepath.Join(t.TempDir(), "kms2.sock")
	ln2, _ := net.Listen("unix", sock2)
	go denied.Serve(ln2)
	defer denied.Close()
	if _, err := NewClient("unix:"+sock2, "local", "", "").Decrypt(ctx, blob, vol, dst); !errors.Is(err, &hsm.Error{Type: "AccessDeniedException"}) {
		t.Fatalf("a uid not allowed: %v", err)
	}
	// An unreachable KMS is a clear error.
	if _, err := NewClient("http://127.0.0.1:1", "local", "a", "b").Decrypt(ctx, blob, vol, dst); err == nil || !strings.Contains(err.Error(), "KMSUnreachable") {
		t.Fatalf("unreachable: %v", err)
	}
}

// A host's principal that may only use keys through grants: a grant
// constrained to vol-A decrypts vol-A's key and not vol-B's.
func TestGrants(t *testing.T) {
	if _, err := os.Stat(hsm.DefaultModule); err != nil {
		t.Skip("SoftHSM2 is not installed")
	}
	t.Setenv("SOFTHSM2_CONF", "")
	os.Unsetenv("SOFTHSM2_CONF")
	k, err := hsm.Open(hsm.Config{}, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	srv := httptest.NewServer(&Server{KMS: k, Principals: []Principal{
		{AccessKeyID: "AKIDADMIN", SecretAccessKey: "a", Name: "admin"},
		{AccessKeyID: "AKIDHOST", SecretAccessKey: "h", Name: "host-1", GrantsOnly: true},
	}})
	defer srv.Close()
	ctx := context.Background()
	admin, host := sdk(srv.URL, "AKIDADMIN", "a"), sdk(srv.URL, "AKIDHOST", "h")
	ck, _ := admin.CreateKey(ctx, &kms.CreateKeyInput{})
	key := ck.KeyMetadata.KeyId
	volA := map[string]string{"aws:ebs:id": "vol-aaaaaaaaaaaaaaaaa"}
	volB := map[string]string{"aws:ebs:id": "vol-bbbbbbbbbbbbbbbbb"}
	a, _ := admin.GenerateDataKeyWithoutPlaintext(ctx, &kms.GenerateDataKeyWithoutPlaintextInput{KeyId: key, NumberOfBytes: aws.Int32(64), EncryptionContext: volA})
	b, _ := admin.GenerateDataKeyWithoutPlaintext(ctx, &kms.GenerateDataKeyWithoutPlaintextInput{KeyId: key, NumberOfBytes: aws.Int32(64), EncryptionContext: volB})
	// No grant yet: refused.
	if _, err := host.Decrypt(ctx, &kms.DecryptInput{CiphertextBlob: a.CiphertextBlob, EncryptionContext: volA}); err == nil || !strings.Contains(err.Error(), "AccessDenied") {
		t.Fatalf("decrypt without a grant: %v", err)
	}
	g, err := admin.CreateGrant(ctx, &kms.CreateGrantInput{KeyId: key, GranteePrincipal: aws.String("host-1"),
		Operations:  []types.GrantOperation{types.GrantOperationDecrypt},
		Constraints: &types.GrantConstraints{EncryptionContextEquals: volA}})
	if err != nil {
		t.Fatal(err)
	}
	// A grants-only host must name a Recipient (require_recipient's
	// default): a plain Decrypt is refused even under its grant.
	if _, err := host.Decrypt(ctx, &kms.DecryptInput{CiphertextBlob: a.CiphertextBlob, EncryptionContext: volA}); errCodeOf(err) != "AccessDeniedException" ||
		!strings.Contains(err.Error(), "Recipient") {
		t.Fatalf("a plain decrypt by a grants-only host: %v", err)
	}
	kp, err := recipient.GenerateKeyPair()
	if err != nil {
		t.Fatal(err)
	}
	defer kp.Destroy()
	rcpt := &types.RecipientInfo{KeyEncryptionAlgorithm: types.KeyEncryptionMechanismRsaesOaepSha256, AttestationDocument: kp.Document()}
	d, err := host.Decrypt(ctx, &kms.DecryptInput{CiphertextBlob: a.CiphertextBlob, EncryptionContext: volA, Recipient: rcpt})
	if err != nil {
		t.Fatalf("decrypt vol-A's key under the grant: %v", err)
	}
	want, _ := admin.Decrypt(ctx, &kms.DecryptInput{CiphertextBlob: a.CiphertextBlob, EncryptionContext: volA})
	got := make([]byte, 64)
	if d.Plaintext != nil || len(d.CiphertextForRecipient) == 0 {
		t.Fatalf("Decrypt for a recipient answered Plaintext %d bytes, CiphertextForRecipient %d", len(d.Plaintext), len(d.CiphertextForRecipient))
	}
	if n, err := kp.Open(d.CiphertextForRecipient, got); err != nil || !bytes.Equal(got[:n], want.Plaintext) {
		t.Fatalf("the host's envelope: %v", err)
	}
	if _, err := host.Decrypt(ctx, &kms.DecryptInput{CiphertextBlob: b.CiphertextBlob, EncryptionContext: volB, Recipient: rcpt}); err == nil || !strings.Contains(err.Error(), "AccessDenied") {
		t.Fatalf("vol-B's key through a grant for vol-A: %v", err)
	}
	if _, err := host.CreateKey(ctx, &kms.CreateKeyInput{}); err == nil {
		t.Fatal("a grants-only principal created a key")
	}
	lg, err := admin.ListGrants(ctx, &kms.ListGrantsInput{KeyId: key})
	if err != nil || len(lg.Grants) != 1 || *lg.Grants[0].GrantId != *g.GrantId {
		t.Fatalf("ListGrants: %v", err)
	}
	if _, err := admin.RevokeGrant(ctx, &kms.RevokeGrantInput{KeyId: key, GrantId: g.GrantId}); err != nil {
		t.Fatal(err)
	}
	if _, err := host.Decrypt(ctx, &kms.DecryptInput{CiphertextBlob: a.CiphertextBlob, EncryptionContext: volA, Recipient: rcpt}); err == nil {
		t.Fatal("decrypt after the grant was revoked")
	}
}

// GenerateDataKey, Encrypt and ReEncrypt; blobs from before a rotation.
func TestDataOps(t *testing.T) {
	srv, _ := serve(t)
	ctx := context.Background()
	c := sdk(srv.URL, "AKIDHEMDTEST", "s3cr3t")
	k1, _ := c.CreateKey(ctx, &kms.CreateKeyInput{})
	k2, _ := c.CreateKey(ctx, &kms.CreateKeyInput{})
	gd, err := c.GenerateDataKey(ctx, &kms.GenerateDataKeyInput{KeyId: k1.KeyMetadata.KeyId, KeySpec: types.DataKeySpecAes256, EncryptionContext: vol})
	if err != nil || len(gd.Plaintext) != 32 {
		t.Fatalf("GenerateDataKey: %v", err)
	}
	if _, err := c.RotateKeyOnDemand(ctx, &kms.RotateKeyOnDemandInput{KeyId: k1.KeyMetadata.KeyId}); err != nil {
		t.Fatal(err)
	}
	d, err := c.Decrypt(ctx, &kms.DecryptInput{CiphertextBlob: gd.CiphertextBlob, EncryptionContext: vol})
	if err != nil || !bytes.Equal(d.Plaintext, gd.Plaintext) {
		t.Fatalf("a blob from before the rotation: %v", err)
	}
	enc, err := c.Encrypt(ctx, &kms.EncryptInput{KeyId: k1.KeyMetadata.KeyId, Plaintext: []byte("hello"), EncryptionContext: vol})
	if err != nil {
		t.Fatal(err)
	}
	snap := map[string]string{"aws:ebs:id": "snap-0123456789abcdef0"}
	re, err := c.ReEncrypt(ctx, &kms.ReEncryptInput{CiphertextBlob: enc.CiphertextBlob, SourceEncryptionContext: vol,
		DestinationKeyId: k2.KeyMetadata.KeyId, DestinationEncryptionContext: snap})
	if err != nil {
		t.Fatal(err)
	}
	d2, err := c.Decrypt(ctx, &kms.DecryptInput{CiphertextBlob: re.CiphertextBlob, EncryptionContext: snap})
	if err != nil || string(d2.Plaintext) != "hello" || !strings.HasSuffix(*d2.KeyId, *k2.KeyMetadata.KeyId) {
		t.Fatalf("ReEncrypt: %v", err)
	}
}
