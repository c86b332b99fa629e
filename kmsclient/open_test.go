package kmsclient

import (
	"context"
	"errors"
	"os"
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
`, &f)
	if err != nil || len(md.Undecoded()) != 0 {
		t.Fatalf("%v undecoded %v", err, md.Undecoded())
	}
	want := Config{Config: hsm.Config{Module: "/usr/lib/x/p11.so", TokenLabel: "prod", PIN: "0000", Region: "eu-west-1",
		Account: "123456789012"}, Endpoint: "https://kms.example:7788", AccessKeyID: "AKID", SecretAccessKey: "s"}
	if f.KMS != want {
		t.Fatalf("%+v", f.KMS)
	}
}
