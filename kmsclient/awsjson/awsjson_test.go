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
)

func serve(t *testing.T) (*httptest.Server, *hsm.KMS) {
	t.Helper()
	if _, err := os.Stat(hsm.DefaultModule); err != nil {
		t.Skipf("SoftHSM2 is not installed (%v): make test installs softhsm2", err)
	}
	t.Setenv("SOFTHSM2_CONF", "")
	os.Unsetenv("SOFTHSM2_CONF")
	k, err := hsm.Open(hsm.Config{}, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k.Close() })
	srv := httptest.NewServer(&Server{KMS: k, Region: "local",
		Principals: []Principal{{AccessKeyID: "AKIDHEMDTEST", SecretAccessKey: "s3cr3t", Name: "test"}}})
	t.Cleanup(srv.Close)
	return srv, k
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
