package awsjson

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"
	"github.com/hemd/hemd/kmsclient/recipient"
)

// Issue 13.4 through the wire: requests that fail, each in its own way, sent
// to hemd kms serve over HTTP, must leave no PKCS#11 session of the server's
// pool with an operation active; the 100 good requests that follow all
// succeed. The pool is a FIFO of sessions, so any run of operations at least
// as long as the pool (4) takes every session once before any twice: 100
// requests exercise every session.

const (
	poisonAdminKey, poisonAdminSecret = "AKIDPOISONADMIN", "poison-admin-secret"
	poisonHostKey, poisonHostSecret   = "AKIDPOISONHOST", "poison-host-secret"
)

// poisonServe starts hemd kms serve on a fresh SoftHSM2 token, with an
// administrator and a grants-only host ("host-1").
func poisonServe(t *testing.T) string {
	t.Helper()
	k := openKMS(t)
	srv := httptest.NewServer(&Server{KMS: k, Region: "local", Principals: []Principal{
		{AccessKeyID: poisonAdminKey, SecretAccessKey: poisonAdminSecret, Name: "admin"},
		{AccessKeyID: poisonHostKey, SecretAccessKey: poisonHostSecret, Name: "host-1", GrantsOnly: true},
	}})
	t.Cleanup(srv.Close)
	return srv.URL
}

// poisonSDK is the AWS SDK without retries: a retried request would hide a
// failure on a poisoned session behind a success on another.
func poisonSDK(url, akid, secret string) *kms.Client {
	return kms.New(kms.Options{
		Region:       "local",
		BaseEndpoint: aws.String(url),
		Retryer:      aws.NopRetryer{},
		Credentials: aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) {
			return aws.Credentials{AccessKeyID: akid, SecretAccessKey: secret}, nil
		}),
	})
}

// errCode is the AWS error code of an SDK error ("" for none).
func errCode(err error) string {
	if err == nil {
		return ""
	}
	var coded interface{ ErrorCode() string }
	if errors.As(err, &coded) {
		return coded.ErrorCode()
	}
	return "not an API error: " + err.Error()
}

// poisonRaw sends body to the server as operation target, signed by the
// administrator unless unsigned, and returns the HTTP status and __type.
func poisonRaw(t *testing.T, url, method, target string, body []byte, unsigned bool) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, url+"/", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/x-amz-json-1.1")
	req.Header.Set("X-Amz-Target", target)
	if !unsigned {
		sum := sha256.Sum256(body)
		creds := aws.Credentials{AccessKeyID: poisonAdminKey, SecretAccessKey: poisonAdminSecret}
		if err := v4.NewSigner().SignHTTP(context.Background(), creds, req, hex.EncodeToString(sum[:]), "kms", "local", time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var e struct {
		Type string `json:"__type"`
	}
	json.Unmarshal(raw, &e)
	if i := strings.LastIndexByte(e.Type, '#'); i >= 0 {
		e.Type = e.Type[i+1:]
	}
	return resp.StatusCode, e.Type
}

func poisonRand(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func TestBadRequestsOverTheWire(t *testing.T) {
	url := poisonServe(t)
	ctx := context.Background()
	admin := poisonSDK(url, poisonAdminKey, poisonAdminSecret)
	host := poisonSDK(url, poisonHostKey, poisonHostSecret)
	kp, err := recipient.GenerateKeyPair()
	if err != nil {
		t.Fatal(err)
	}
	defer kp.Destroy()
	rcpt := &types.RecipientInfo{KeyEncryptionAlgorithm: types.KeyEncryptionMechanismRsaesOaepSha256, AttestationDocument: kp.Document()}
	vol := map[string]string{"aws:ebs:id": "vol-0123456789abcdef0"}
	volA := map[string]string{"aws:ebs:id": "vol-aaaaaaaaaaaaaaaaa"}
	volB := map[string]string{"aws:ebs:id": "vol-bbbbbbbbbbbbbbbbb"}
	snap := map[string]string{"aws:ebs:id": "snap-0123456789abcdef0"}

	// Keys in each state, and blobs made while they were enabled.
	mk := func() string {
		out, err := admin.CreateKey(ctx, &kms.CreateKeyInput{})
		if err != nil {
			t.Fatal(err)
		}
		return *out.KeyMetadata.KeyId
	}
	good, other, disabled, pending := mk(), mk(), mk(), mk()
	encrypt := func(key string, ectx map[string]string, pt []byte) []byte {
		out, err := admin.Encrypt(ctx, &kms.EncryptInput{KeyId: aws.String(key), Plaintext: pt, EncryptionContext: ectx})
		if err != nil {
			t.Fatalf("Encrypt of %d bytes: %v", len(pt), err)
		}
		return out.CiphertextBlob
	}
	smallPT, bigPT := poisonRand(64), poisonRand(4096)
	small, big := encrypt(good, vol, smallPT), encrypt(good, vol, bigPT)
	aPT := poisonRand(64)
	blobA, blobB := encrypt(good, volA, aPT), encrypt(good, volB, poisonRand(64))
	disBlob, pendBlob := encrypt(disabled, vol, []byte("x")), encrypt(pending, vol, []byte("x"))
	if _, err := admin.DisableKey(ctx, &kms.DisableKeyInput{KeyId: aws.String(disabled)}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.ScheduleKeyDeletion(ctx, &kms.ScheduleKeyDeletionInput{KeyId: aws.String(pending), PendingWindowInDays: aws.Int32(7)}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CreateAlias(ctx, &kms.CreateAliasInput{AliasName: aws.String("alias/poison"), TargetKeyId: aws.String(good)}); err != nil {
		t.Fatal(err)
	}
	grant, err := admin.CreateGrant(ctx, &kms.CreateGrantInput{KeyId: aws.String(good), GranteePrincipal: aws.String("host-1"),
		Operations:  []types.GrantOperation{types.GrantOperationDecrypt},
		Constraints: &types.GrantConstraints{EncryptionContextEquals: volA}})
	if err != nil {
		t.Fatal(err)
	}

	unknownBlob := bytes.Clone(small)
	copy(unknownBlob[6:22], bytes.Repeat([]byte{0x11}, 16))
	flipped := func(b []byte, i int) []byte { c := bytes.Clone(b); c[i] ^= 0x80; return c }
	many := map[string]string{}
	for i := range 65 {
		many[fmt.Sprint("k", i)] = "v"
	}
	dec := func(c *kms.Client, blob []byte, ectx map[string]string) func() error {
		return func() error {
			in := &kms.DecryptInput{CiphertextBlob: blob, EncryptionContext: ectx}
			if c == host { // a grants-only host names a recipient
				in.Recipient = rcpt
			}
			_, err := c.Decrypt(ctx, in)
			return err
		}
	}
	tooLong := []string{"InvalidCiphertextException", "ValidationException"}
	cases := []struct {
		name string
		run  func() error
		want []string
	}{
		{"Decrypt 4096-byte blob plus one byte", dec(admin, append(bytes.Clone(big), 0), vol), tooLong},
		{"Decrypt 6 KiB blob", dec(admin, append(bytes.Clone(small[:38]), poisonRand(6144-38)...), vol), tooLong},
		{"Decrypt 600 KiB blob", dec(admin, append(bytes.Clone(small[:38]), poisonRand(600<<10)...), vol), tooLong},
		{"Decrypt truncated blob", dec(admin, small[:len(small)-1], vol), []string{"InvalidCiphertextException"}},
		{"Decrypt 4096-byte blob truncated", dec(admin, big[:len(big)-100], vol), []string{"InvalidCiphertextException"}},
		{"Decrypt header only", dec(admin, small[:38], vol), []string{"InvalidCiphertextException"}},
		{"Decrypt flipped tag", dec(admin, flipped(small, len(small)-1), vol), []string{"InvalidCiphertextException"}},
		{"Decrypt 4096 bytes flipped tag", dec(admin, flipped(big, len(big)-1), vol), []string{"InvalidCiphertextException"}},
		{"Decrypt wrong context", dec(admin, small, volB), []string{"InvalidCiphertextException"}},
		{"Decrypt no context", dec(admin, big, nil), []string{"InvalidCiphertextException"}},
		{"Decrypt unknown key", dec(admin, unknownBlob, vol), []string{"NotFoundException"}},
		{"Decrypt under a disabled key", dec(admin, disBlob, vol), []string{"DisabledException"}},
		{"Decrypt under a key pending deletion", dec(admin, pendBlob, vol), []string{"KMSInvalidStateException"}},
		{"Decrypt naming another key", func() error {
			_, err := admin.Decrypt(ctx, &kms.DecryptInput{CiphertextBlob: small, EncryptionContext: vol, KeyId: aws.String(other)})
			return err
		}, []string{"IncorrectKeyException"}},
		{"Encrypt 4097 bytes", func() error {
			_, err := admin.Encrypt(ctx, &kms.EncryptInput{KeyId: aws.String(good), Plaintext: poisonRand(4097), EncryptionContext: vol})
			return err
		}, []string{"ValidationException"}},
		{"Encrypt 65 context pairs", func() error {
			_, err := admin.Encrypt(ctx, &kms.EncryptInput{KeyId: aws.String(good), Plaintext: []byte("x"), EncryptionContext: many})
			return err
		}, []string{"ValidationException"}},
		{"Encrypt under an unknown alias", func() error {
			_, err := admin.Encrypt(ctx, &kms.EncryptInput{KeyId: aws.String("alias/nope"), Plaintext: []byte("x")})
			return err
		}, []string{"NotFoundException"}},
		{"Encrypt under a disabled key", func() error {
			_, err := admin.Encrypt(ctx, &kms.EncryptInput{KeyId: aws.String(disabled), Plaintext: []byte("x")})
			return err
		}, []string{"DisabledException"}},
		{"Encrypt under a key pending deletion", func() error {
			_, err := admin.Encrypt(ctx, &kms.EncryptInput{KeyId: aws.String(pending), Plaintext: []byte("x")})
			return err
		}, []string{"KMSInvalidStateException"}},
		{"GenerateDataKeyWithoutPlaintext 1025 bytes", func() error {
			_, err := admin.GenerateDataKeyWithoutPlaintext(ctx, &kms.GenerateDataKeyWithoutPlaintextInput{KeyId: aws.String(good), NumberOfBytes: aws.Int32(1025)})
			return err
		}, []string{"ValidationException"}},
		{"GenerateDataKey 2000 bytes", func() error {
			_, err := admin.GenerateDataKey(ctx, &kms.GenerateDataKeyInput{KeyId: aws.String(good), NumberOfBytes: aws.Int32(2000)})
			return err
		}, []string{"ValidationException"}},
		{"GenerateDataKey under a disabled key", func() error {
			_, err := admin.GenerateDataKey(ctx, &kms.GenerateDataKeyInput{KeyId: aws.String(disabled), KeySpec: types.DataKeySpecAes256})
			return err
		}, []string{"DisabledException"}},
		{"ReEncrypt oversized blob", func() error {
			_, err := admin.ReEncrypt(ctx, &kms.ReEncryptInput{CiphertextBlob: append(bytes.Clone(big), 0), SourceEncryptionContext: vol, DestinationKeyId: aws.String(other)})
			return err
		}, tooLong},
		{"ReEncrypt wrong source context", func() error {
			_, err := admin.ReEncrypt(ctx, &kms.ReEncryptInput{CiphertextBlob: big, SourceEncryptionContext: volB, DestinationKeyId: aws.String(other)})
			return err
		}, []string{"InvalidCiphertextException"}},
		{"ReEncrypt to a key pending deletion", func() error {
			_, err := admin.ReEncrypt(ctx, &kms.ReEncryptInput{CiphertextBlob: big, SourceEncryptionContext: vol, DestinationKeyId: aws.String(pending)})
			return err
		}, []string{"KMSInvalidStateException"}},
		{"DescribeKey unknown", func() error {
			_, err := admin.DescribeKey(ctx, &kms.DescribeKeyInput{KeyId: aws.String("11111111-2222-4333-8444-555555555555")})
			return err
		}, []string{"NotFoundException"}},
		{"CreateAlias existing", func() error {
			_, err := admin.CreateAlias(ctx, &kms.CreateAliasInput{AliasName: aws.String("alias/poison"), TargetKeyId: aws.String(other)})
			return err
		}, []string{"AlreadyExistsException"}},
		{"ScheduleKeyDeletion 3 days", func() error {
			_, err := admin.ScheduleKeyDeletion(ctx, &kms.ScheduleKeyDeletionInput{KeyId: aws.String(good), PendingWindowInDays: aws.Int32(3)})
			return err
		}, []string{"ValidationException"}},
		{"EnableKey pending deletion", func() error {
			_, err := admin.EnableKey(ctx, &kms.EnableKeyInput{KeyId: aws.String(pending)})
			return err
		}, []string{"KMSInvalidStateException"}},
		{"CreateGrant bad operation", func() error {
			_, err := admin.CreateGrant(ctx, &kms.CreateGrantInput{KeyId: aws.String(good), GranteePrincipal: aws.String("h"), Operations: []types.GrantOperation{"Nope"}})
			return err
		}, []string{"ValidationException"}},
		{"RetireGrant unknown", func() error {
			_, err := admin.RetireGrant(ctx, &kms.RetireGrantInput{KeyId: aws.String(good), GrantId: aws.String(strings.Repeat("0", 64))})
			return err
		}, []string{"NotFoundException"}},
		{"RetireGrant by neither grantee nor retiring principal", func() error {
			_, err := admin.RetireGrant(ctx, &kms.RetireGrantInput{KeyId: aws.String(good), GrantId: grant.GrantId})
			return err
		}, []string{"AccessDeniedException"}},
		// A grants-only host: outside its grant, and bad blobs under it.
		{"host Decrypt without a Recipient", func() error {
			_, err := host.Decrypt(ctx, &kms.DecryptInput{CiphertextBlob: blobA, EncryptionContext: volA})
			return err
		}, []string{"AccessDeniedException"}},
		{"host Decrypt for a recipient without a document", func() error {
			_, err := host.Decrypt(ctx, &kms.DecryptInput{CiphertextBlob: blobA, EncryptionContext: volA, Recipient: &types.RecipientInfo{}})
			return err
		}, []string{"ValidationException"}},
		{"host Decrypt for a recipient with a Nitro document", func() error {
			_, err := host.Decrypt(ctx, &kms.DecryptInput{CiphertextBlob: blobA, EncryptionContext: volA,
				Recipient: &types.RecipientInfo{AttestationDocument: []byte{0x84, 0x44, 0xa1, 0x01, 0x38, 0x22}}})
			return err
		}, []string{"ValidationException"}},
		{"host Decrypt of another volume's key", dec(host, blobB, volB), []string{"AccessDeniedException"}},
		{"host Decrypt with another context", dec(host, blobA, volB), []string{"AccessDeniedException"}},
		{"host Decrypt of an oversized blob", dec(host, append(bytes.Clone(blobA), poisonRand(5000)...), volA), tooLong},
		{"host Decrypt of a truncated blob", dec(host, blobA[:20], volA), []string{"InvalidCiphertextException"}},
		{"host Decrypt of a tampered blob", dec(host, flipped(blobA, len(blobA)-1), volA), []string{"InvalidCiphertextException"}},
		{"host CreateKey", func() error { _, err := host.CreateKey(ctx, &kms.CreateKeyInput{}); return err }, []string{"AccessDeniedException"}},
		{"host Encrypt", func() error {
			_, err := host.Encrypt(ctx, &kms.EncryptInput{KeyId: aws.String(good), Plaintext: []byte("x"), EncryptionContext: volA})
			return err
		}, []string{"AccessDeniedException"}},
		// Callers the server does not know.
		{"wrong secret", dec(poisonSDK(url, poisonAdminKey, "wrong"), small, vol), []string{"InvalidSignatureException"}},
		{"unknown access key", dec(poisonSDK(url, "AKIDNOBODY", "x"), small, vol), []string{"UnrecognizedClientException"}},
	}
	for _, c := range cases {
		if code := errCode(c.run()); !slices.Contains(c.want, code) {
			t.Errorf("%s: %q, want %v", c.name, code, c.want)
		}
	}
	// Requests the SDK would not send.
	raw := []struct {
		name, method, target string
		body                 []byte
		unsigned             bool
		want                 string // "" when any 4xx error type will do
	}{
		{"unsigned", "POST", "TrentService.Decrypt", []byte(`{}`), true, ""},
		{"GET", "GET", "TrentService.Decrypt", nil, false, ""},
		{"malformed JSON", "POST", "TrentService.Decrypt", []byte(`{"CiphertextBlob":`), false, "SerializationException"},
		{"blob not base64", "POST", "TrentService.Decrypt", []byte(`{"CiphertextBlob":"%%%"}`), false, "SerializationException"},
		{"empty blob", "POST", "TrentService.Decrypt", []byte(`{"CiphertextBlob":""}`), false, ""},
		{"unknown operation", "POST", "TrentService.Nope", []byte(`{}`), false, "UnknownOperationException"},
		{"body over 1 MiB", "POST", "TrentService.Encrypt", append([]byte(`{"Plaintext":"`), bytes.Repeat([]byte("A"), 2<<20)...), false, ""},
	}
	for _, r := range raw {
		status, typ := poisonRaw(t, url, r.method, r.target, r.body, r.unsigned)
		if status < 400 || status > 499 || typ == "" || (r.want != "" && typ != r.want) {
			t.Errorf("%s: HTTP %d %q, want a 4xx %s", r.name, status, typ, r.want)
		}
	}

	// 100 good requests, 8 at a time, every answer checked.
	check := func(i int) error {
		switch i % 7 {
		case 0:
			out, err := admin.Decrypt(ctx, &kms.DecryptInput{CiphertextBlob: small, EncryptionContext: vol})
			if err == nil && !bytes.Equal(out.Plaintext, smallPT) {
				err = errors.New("wrong plaintext")
			}
			return err
		case 1:
			out, err := admin.Decrypt(ctx, &kms.DecryptInput{CiphertextBlob: big, EncryptionContext: vol, KeyId: aws.String("alias/poison")})
			if err == nil && !bytes.Equal(out.Plaintext, bigPT) {
				err = errors.New("wrong plaintext")
			}
			return err
		case 2:
			_, err := admin.Encrypt(ctx, &kms.EncryptInput{KeyId: aws.String(good), Plaintext: bigPT[:4081+i%16], EncryptionContext: vol})
			return err
		case 3:
			_, err := admin.GenerateDataKeyWithoutPlaintext(ctx, &kms.GenerateDataKeyWithoutPlaintextInput{KeyId: aws.String(good), NumberOfBytes: aws.Int32(64), EncryptionContext: vol})
			return err
		case 4:
			re, err := admin.ReEncrypt(ctx, &kms.ReEncryptInput{CiphertextBlob: big, SourceEncryptionContext: vol, DestinationKeyId: aws.String(other), DestinationEncryptionContext: snap})
			if err != nil {
				return err
			}
			out, err := admin.Decrypt(ctx, &kms.DecryptInput{CiphertextBlob: re.CiphertextBlob, EncryptionContext: snap})
			if err == nil && !bytes.Equal(out.Plaintext, bigPT) {
				err = errors.New("wrong plaintext after ReEncrypt")
			}
			return err
		case 5:
			out, err := admin.GenerateDataKey(ctx, &kms.GenerateDataKeyInput{KeyId: aws.String(good), KeySpec: types.DataKeySpecAes256, EncryptionContext: vol})
			if err == nil && len(out.Plaintext) != 32 {
				err = fmt.Errorf("%d-byte data key", len(out.Plaintext))
			}
			return err
		default:
			// The host's attach: the one thing its grant allows.
			out, err := host.Decrypt(ctx, &kms.DecryptInput{CiphertextBlob: blobA, EncryptionContext: volA, Recipient: rcpt})
			if err != nil {
				return err
			}
			got := make([]byte, 64)
			if n, err := kp.Open(out.CiphertextForRecipient, got); err != nil || !bytes.Equal(got[:n], aPT) {
				return fmt.Errorf("wrong plaintext for the recipient (%v)", err)
			}
			return nil
		}
	}
	jobs := make(chan int)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for i := range jobs {
				if err := check(i); err != nil {
					t.Errorf("good request %d (kind %d): %s: %v", i, i%7, errCode(err), err)
				}
			}
		})
	}
	for i := range 100 {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
}
