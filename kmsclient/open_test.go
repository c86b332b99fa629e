package kmsclient

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"strings"
	"testing"

	"github.com/BurntSushi/toml"
	"github.com/hemd/hemd/kmsclient/awsjson"
	"github.com/hemd/hemd/kmsclient/hsm"
)

// TestOpen opens the embedded SoftHSM2 KMS on a fresh state dir, wraps and
// unwraps a volume's data key through it, and checks CheckKey follows the
// key state; with an endpoint, Open returns the wire client.
func TestOpen(t *testing.T) {
	if _, err := os.Stat(hsm.DefaultModule); err != nil {
		t.Skipf("SoftHSM2 is not installed (%v): make test installs softhsm2", err)
	}
	t.Setenv("SOFTHSM2_CONF", "")
	os.Unsetenv("SOFTHSM2_CONF")
	ctx := context.Background()
	dk, c, err := Open(ctx, Config{}, t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	k := dk.(Local)
	m, err := k.CreateKey(ctx, "open test")
	if err != nil {
		t.Fatal(err)
	}
	vol := map[string]string{"aws:ebs:id": "vol-0123456789abcdef0"}
	blob, arn, err := dk.GenerateDataKeyWithoutPlaintext(ctx, m.Arn, vol)
	if err != nil || arn != m.Arn {
		t.Fatalf("generate: %v %q", err, arn)
	}
	dst := make([]byte, hsm.DataKeySize)
	if _, err := dk.Decrypt(ctx, blob, vol, dst); err != nil {
		t.Fatal(err)
	}
	if err := dk.CheckKey(ctx, m.KeyID); err != nil {
		t.Fatal(err)
	}
	if err := k.DisableKey(ctx, m.KeyID); err != nil {
		t.Fatal(err)
	}
	if err := dk.CheckKey(ctx, m.KeyID); !errors.Is(err, hsm.ErrDisabled) {
		t.Fatalf("CheckKey on a disabled key: %v", err)
	}
	if _, err := dk.Decrypt(ctx, blob, vol, dst); !errors.Is(err, hsm.ErrDisabled) {
		t.Fatalf("Decrypt under a disabled key: %v", err)
	}

	remote, rc, err := Open(ctx, Config{Endpoint: "http://127.0.0.1:1"}, t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	if _, ok := remote.(*awsjson.Client); !ok {
		t.Fatalf("Open with an endpoint returned %T", remote)
	}
}

func TestConfigFromEnv(t *testing.T) {
	t.Setenv("HEMD_PKCS11_MODULE", "/m.so")
	t.Setenv("HEMD_PKCS11_TOKEN", "tok")
	t.Setenv("HEMD_PKCS11_PIN", "1234")
	t.Setenv("HEMD_KMS_ENDPOINT", "unix:/run/kms.sock")
	t.Setenv("HEMD_KMS_REGION", "")
	c := Config{Config: hsm.Config{Module: "/file.so", Region: "eu-west-1"}}.FromEnv()
	if c.Module != "/m.so" || c.TokenLabel != "tok" || c.PIN != "1234" || c.Endpoint != "unix:/run/kms.sock" || c.Region != "eu-west-1" {
		t.Fatalf("%+v", c)
	}
	t.Setenv("HEMD_KMS_REGION", "ap-south-1")
	if c := c.FromEnv(); c.Region != "ap-south-1" {
		t.Fatalf("HEMD_KMS_REGION: %+v", c)
	}
}

// TestOpenRemoteRegion: the remote client Open returns signs for the
// configured region, HEMD_KMS_REGION on top of [kms] region; without
// either, "local".
func TestOpenRemoteRegion(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct{ file, env, want string }{
		{"", "", "local"}, {"eu-west-1", "", "eu-west-1"}, {"eu-west-1", "us-east-2", "us-east-2"}, {"", "us-east-2", "us-east-2"},
	} {
		t.Setenv("HEMD_KMS_REGION", tc.env)
		cfg := Config{Config: hsm.Config{Region: tc.file}, Endpoint: "http://127.0.0.1:1"}.FromEnv()
		dk, c, err := Open(ctx, cfg, t.TempDir(), nil)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		if got := dk.(*awsjson.Client).Region; got != tc.want {
			t.Errorf("[kms] region %q, HEMD_KMS_REGION %q: client signs for %q, want %q", tc.file, tc.env, got, tc.want)
		}
	}
}

// TestConfigTOML: Config embeds in the main config file as [kms].
func TestConfigTOML(t *testing.T) {
	var f struct {
		KMS Config `toml:"kms"`
	}
	md, err := toml.Decode(`
[kms]
module = "/usr/lib/x/p11.so"
token_label = "prod"
pin = "0000"
region = "eu-west-1"
account = "123456789012"
endpoint = "https://kms.example:7788"
access_key_id = "AKID"
secret_access_key = "s"
ca_file = "/etc/hemd/kms-ca.pem"
client_cert = "/etc/hemd/host.pem"
client_key = "/etc/hemd/host.key"
insecure_http = true
recipient = false
`, &f)
	if err != nil || len(md.Undecoded()) != 0 {
		t.Fatalf("%v undecoded %v", err, md.Undecoded())
	}
	want := Config{Config: hsm.Config{Module: "/usr/lib/x/p11.so", TokenLabel: "prod", PIN: "0000", Region: "eu-west-1",
		Account: "123456789012"}, Endpoint: "https://kms.example:7788", AccessKeyID: "AKID", SecretAccessKey: "s",
		CAFile: "/etc/hemd/kms-ca.pem", ClientCert: "/etc/hemd/host.pem", ClientKey: "/etc/hemd/host.key", InsecureHTTP: true,
		Recipient: f.KMS.Recipient}
	if f.KMS != want || f.KMS.Recipient == nil || *f.KMS.Recipient {
		t.Fatalf("%+v", f.KMS)
	}
}

// TestOpenEndpointPolicy: plain HTTP to another host is refused unless
// insecure_http, and then warned about; https, loopback and unix sockets
// are fine. The remote client names a Recipient unless recipient = false.
func TestOpenEndpointPolicy(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		endpoint string
		insecure bool
		refused  bool
		warned   bool
	}{
		{"http://10.1.2.3:7788", false, true, false},
		{"http://kms.example:7788", false, true, false},
		{"http://10.1.2.3:7788", true, false, true},
		{"http://127.0.0.1:7788", false, false, false},
		{"http://[::1]:7788", false, false, false},
		{"http://localhost:7788", false, false, false},
		{"https://kms.example:7788", false, false, false},
		{"unix:/run/hemd/kms.sock", false, false, false},
		{"ftp://kms.example", true, true, false},
		{"kms.example:7788", true, true, false},
	} {
		var log strings.Builder
		l := slog.New(slog.NewTextHandler(&log, nil))
		dk, c, err := Open(ctx, Config{Endpoint: tc.endpoint, InsecureHTTP: tc.insecure}, t.TempDir(), l)
		if (err != nil) != tc.refused {
			t.Errorf("%s (insecure_http %v): %v", tc.endpoint, tc.insecure, err)
			continue
		}
		if err != nil {
			if strings.HasPrefix(tc.endpoint, "http://") && !errors.Is(err, awsjson.ErrInsecureEndpoint) {
				t.Errorf("%s: %v", tc.endpoint, err)
			}
			continue
		}
		if warned := strings.Contains(log.String(), "insecure_http"); warned != tc.warned {
			t.Errorf("%s: warned %v:\n%s", tc.endpoint, warned, log.String())
		}
		if dk.(*awsjson.Client).Keys == nil {
			t.Errorf("%s: no recipient by default", tc.endpoint)
		}
		c.Close()
	}
	dk, c, err := Open(ctx, Config{Endpoint: "https://kms.example", Recipient: new(false)}, t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if dk.(*awsjson.Client).Keys != nil {
		t.Fatal("recipient = false still names a Recipient")
	}
	if _, _, err := Open(ctx, Config{Endpoint: "https://kms.example", ClientCert: "/x.pem"}, t.TempDir(), nil); err == nil {
		t.Fatal("a client certificate without its key was accepted")
	}
	if _, _, err := Open(ctx, Config{Endpoint: "https://kms.example", CAFile: "/nonexistent.pem"}, t.TempDir(), nil); err == nil {
		t.Fatal("a missing ca_file was accepted")
	}
}
