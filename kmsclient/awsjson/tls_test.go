package awsjson

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"

	"github.com/hemd/hemd/kmsclient/hsm"
	"github.com/hemd/hemd/kmsclient/testpki"
)

// tlsServe serves k over mutual TLS 1.3 (certificates from ca) with an
// administrator and a grants-only host-1.
func tlsServe(t testing.TB, ca *testpki.CA, k *hsm.KMS) *httptest.Server {
	t.Helper()
	sp, err := ca.Server("kms")
	if err != nil {
		t.Fatal(err)
	}
	tc, err := TLSServer(sp.CertFile, sp.KeyFile, ca.CertFile)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(&Server{KMS: k, Principals: []Principal{
		{AccessKeyID: "AKIDADMIN", SecretAccessKey: "a", Name: "admin"},
		{AccessKeyID: "AKIDHOST1", SecretAccessKey: "h1", Name: "host-1", GrantsOnly: true},
	}})
	srv.TLS = tc
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // the refused handshakes below
	srv.Config.TLSNextProto = map[string]func(*http.Server, *tls.Conn, http.Handler){}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv
}

func openKMS(t testing.TB) *hsm.KMS {
	t.Helper()
	if _, err := os.Stat(hsm.DefaultModule); err != nil {
		t.Fatalf("SoftHSM2 is needed (%v)", err)
	}
	t.Setenv("SOFTHSM2_CONF", "")
	os.Unsetenv("SOFTHSM2_CONF")
	k, err := hsm.Open(hsm.Config{}, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k.Close() })
	return k
}

// TestTLSRecipient: a host with its certificate decrypts its volume's key
// for a recipient over mutual TLS 1.3; a certificate naming another
// principal, none, a CA the client does not trust and TLS 1.2 are refused.
func TestTLSRecipient(t *testing.T) {
	dir := t.TempDir()
	ca, err := testpki.NewCA(dir, "test")
	if err != nil {
		t.Fatal(err)
	}
	k := openKMS(t)
	srv := tlsServe(t, ca, k)
	ctx := context.Background()
	m, _ := k.CreateKey(ctx, "")
	blob, _, err := k.GenerateDataKeyWithoutPlaintext(ctx, m.KeyID, vol)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 64)
	k.Decrypt(ctx, blob, vol, want)
	if _, err := k.CreateGrant(ctx, m.KeyID, "host-1", "", []string{"Decrypt"},
		&hsm.GrantConstraints{EncryptionContextEquals: vol}); err != nil {
		t.Fatal(err)
	}
	if _, err := k.CreateGrant(ctx, m.KeyID, "host-1", "", []string{"DescribeKey"}, nil); err != nil {
		t.Fatal(err)
	}
	client := func(cn string, recipient bool) *Client {
		cfg := ClientConfig{Endpoint: srv.URL, AccessKeyID: "AKIDHOST1", SecretAccessKey: "h1", CAFile: ca.CertFile, Recipient: recipient}
		if cn != "" {
			p, err := ca.Client(cn)
			if err != nil {
				t.Fatal(err)
			}
			cfg.CertFile, cfg.KeyFile = p.CertFile, p.KeyFile
		}
		c, err := NewClientWith(cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	host := client("host-1", true)
	dst := make([]byte, 64)
	for range 3 { // over one kept-alive connection, a fresh key pair each time
		if _, err := host.Decrypt(ctx, blob, vol, dst); err != nil || !bytes.Equal(dst, want) {
			t.Fatalf("host-1 over mTLS: %v", err)
		}
	}
	if err := host.CheckKey(ctx, m.Arn); err != nil {
		t.Fatalf("CheckKey: %v", err)
	}
	if _, err := client("host-1", false).Decrypt(ctx, blob, vol, dst); !errors.Is(err, hsm.ErrAccessDenied) {
		t.Fatalf("host-1's plain Decrypt: %v", err)
	}
	if _, err := client("host-2", true).Decrypt(ctx, blob, vol, dst); !errors.Is(err, hsm.ErrAccessDenied) ||
		!strings.Contains(err.Error(), "does not name principal") {
		t.Fatalf("host-1's signature with host-2's certificate: %v", err)
	}
	if _, err := client("", true).Decrypt(ctx, blob, vol, dst); err == nil || !strings.Contains(err.Error(), "KMSUnreachable") {
		t.Fatalf("no client certificate: %v", err)
	}
	other, _ := testpki.NewCA(dir, "other")
	c, _ := NewClientWith(ClientConfig{Endpoint: srv.URL, AccessKeyID: "AKIDHOST1", SecretAccessKey: "h1", CAFile: other.CertFile})
	if _, err := c.Decrypt(ctx, blob, vol, dst); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("a KMS certificate from a CA the client does not trust: %v", err)
	}
	p, _ := ca.Client("host-1")
	cert, _ := tls.LoadX509KeyPair(p.CertFile, p.KeyFile)
	old := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{MaxVersion: tls.VersionTLS12,
		InsecureSkipVerify: true, Certificates: []tls.Certificate{cert}}}}
	if resp, err := old.Post(srv.URL, "application/x-amz-json-1.1", strings.NewReader("{}")); err == nil {
		resp.Body.Close()
		t.Fatal("a TLS 1.2 client was served")
	}
}
