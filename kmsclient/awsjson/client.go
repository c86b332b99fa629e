package awsjson

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"github.com/hemd/hemd/kmsclient/hsm"
	"github.com/hemd/hemd/kmsclient/recipient"
)

// Client calls a KMS that speaks the AWS protocol: hemd kms serve (or AWS
// KMS itself). Its errors are *hsm.Error with the server's __type.
type Client struct {
	// Endpoint is http(s)://host:port, or unix:/path for hemd kms serve on
	// a unix socket (the caller is then known by its uid; no signature).
	Endpoint string
	// Region is the region requests are signed for, unless the key a
	// request names is an ARN of another region: the ARN's region wins.
	Region          string
	AccessKeyID     string
	SecretAccessKey string
	HTTP            *http.Client
	// Log, when set, is warned when a key ARN's region overrides Region.
	Log *slog.Logger
	// Keys, when set, makes Decrypt name a Recipient: a fresh key pair per
	// call, whose private key is only in locked memory, so that the
	// response carries the data key encrypted to it and no plaintext.
	Keys *recipient.Keys

	// keyRegions maps key ids to the region of their ARN (seen in requests
	// and responses), so that Decrypt, which names no key, signs for the
	// region of the key in the ciphertext; warned holds the regions Log was
	// warned of.
	keyRegions, warned sync.Map
}

// NewClient returns a client for endpoint, without TLS settings or a
// recipient (tests, tools); hosts use NewClientWith.
func NewClient(endpoint, region, akid, secret string) *Client {
	c, _ := newClient(ClientConfig{Endpoint: endpoint, Region: region, AccessKeyID: akid, SecretAccessKey: secret})
	return c
}

// ClientConfig is a host's way to its KMS.
type ClientConfig struct {
	Endpoint, Region, AccessKeyID, SecretAccessKey string
	// CAFile holds the PEM certificates an https endpoint's certificate
	// must chain to; empty: the system's.
	CAFile string
	// CertFile and KeyFile are the host's certificate and key (PEM) for a
	// KMS that asks for one (mutual TLS).
	CertFile, KeyFile string
	// InsecureHTTP allows http:// to a host that is not loopback.
	InsecureHTTP bool
	// Recipient makes Decrypt name a Recipient (Client.Keys).
	Recipient bool
	Log       *slog.Logger
}

// ErrInsecureEndpoint is plain HTTP to a KMS on another host.
var ErrInsecureEndpoint = errors.New("plain http:// to a KMS that is not on this host")

// CheckEndpoint says whether endpoint may be used: unix sockets, https, and
// http to a loopback address are; http to anything else only with
// insecure, and then warn is true.
func CheckEndpoint(endpoint string, insecure bool) (warn bool, err error) {
	if strings.HasPrefix(endpoint, "unix:") {
		return false, nil
	}
	u, err := url.Parse(endpoint)
	if err != nil || u.Host == "" {
		return false, fmt.Errorf("kms endpoint %q: want https://HOST:PORT, http://HOST:PORT or unix:PATH", endpoint)
	}
	switch u.Scheme {
	case "https":
		return false, nil
	case "http":
		if loopback(u.Hostname()) {
			return false, nil
		}
		if !insecure {
			return false, fmt.Errorf("kms endpoint %s: %w: use https:// (hemd kms serve --tls-cert), or set [kms] insecure_http = true", endpoint, ErrInsecureEndpoint)
		}
		return true, nil
	}
	return false, fmt.Errorf("kms endpoint %q: scheme %q is not https, http or unix", endpoint, u.Scheme)
}

// loopback reports whether host is this machine for certain: localhost or
// a loopback address (a name could resolve anywhere).
func loopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// NewClientWith returns a client for cfg: TLS 1.3 to an https endpoint,
// with cfg's CAs and client certificate.
func NewClientWith(cfg ClientConfig) (*Client, error) {
	warn, err := CheckEndpoint(cfg.Endpoint, cfg.InsecureHTTP)
	if err != nil {
		return nil, err
	}
	if warn && cfg.Log != nil {
		cfg.Log.Warn("kms: plain HTTP to a KMS on another host (insecure_http): requests and the keys' envelopes cross the network unencrypted and unauthenticated",
			"endpoint", cfg.Endpoint)
	}
	return newClient(cfg)
}

// newClient is NewClientWith without the endpoint check.
func newClient(cfg ClientConfig) (*Client, error) {
	var err error
	c := &Client{Endpoint: cfg.Endpoint, Region: cfg.Region, AccessKeyID: cfg.AccessKeyID, SecretAccessKey: cfg.SecretAccessKey, Log: cfg.Log}
	if c.Region == "" {
		c.Region = "local"
	}
	tr := &http.Transport{MaxIdleConnsPerHost: 8, IdleConnTimeout: 90 * time.Second}
	if path, ok := strings.CutPrefix(cfg.Endpoint, "unix:"); ok {
		tr.DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", path)
		}
		c.Endpoint = "http://kms.unix"
	}
	if tr.TLSClientConfig, err = TLSClient(cfg.CAFile, cfg.CertFile, cfg.KeyFile); err != nil {
		return nil, err
	}
	c.HTTP = &http.Client{Transport: tr, Timeout: 30 * time.Second}
	if cfg.Recipient {
		c.Keys = recipient.NewKeys()
	}
	return c, nil
}

// TLSClient is the TLS configuration of a KMS client: TLS 1.3, the CAs in
// caFile (else the system's), and a client certificate if one is given.
func TLSClient(caFile, certFile, keyFile string) (*tls.Config, error) {
	tc := &tls.Config{MinVersion: tls.VersionTLS13}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("kms ca_file: %w", err)
		}
		tc.RootCAs = x509.NewCertPool()
		if !tc.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("kms ca_file %s: no PEM certificate in it", caFile)
		}
	}
	switch {
	case certFile != "" && keyFile != "":
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("kms client certificate: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	case certFile != "" || keyFile != "":
		return nil, errors.New("kms client certificate: client_cert and client_key go together")
	}
	return tc, nil
}

// Close stops the background work of the client (the recipient key pair
// made ahead) and wipes it.
func (c *Client) Close() error {
	if c.Keys != nil {
		c.Keys.Close()
	}
	c.HTTP.CloseIdleConnections()
	return nil
}

// keyARN splits a key or alias ARN (arn:PARTITION:kms:REGION:ACCOUNT:
// key/ID or :alias/NAME) into its region and resource.
func keyARN(ref string) (region, resource string, ok bool) {
	f := strings.SplitN(ref, ":", 6)
	if len(f) != 6 || f[0] != "arn" || f[2] != "kms" || f[3] == "" {
		return "", "", false
	}
	return f[3], f[5], true
}

// learn records the region of a key ARN for the key's id.
func (c *Client) learn(arn string) {
	if region, res, ok := keyARN(arn); ok {
		if id, ok := strings.CutPrefix(res, "key/"); ok {
			c.keyRegions.Store(id, region)
		}
	}
}

// regionFor is the region to sign a request about key for: the region of
// key's ARN (or of the ARN seen for key's id) when there is one, else
// c.Region. Where the two differ the ARN wins, with a warning (once per
// region).
func (c *Client) regionFor(key string) string {
	region, _, ok := keyARN(key)
	if !ok {
		if v, seen := c.keyRegions.Load(key); seen {
			region, ok = v.(string), true
		}
	}
	if !ok || region == c.Region {
		return c.Region
	}
	c.learn(key)
	if _, done := c.warned.LoadOrStore(region, true); !done && c.Log != nil {
		c.Log.Warn("kms: signing for the key ARN's region, not the configured one",
			"key", key, "key_region", region, "configured_region", c.Region)
	}
	return region
}

func (c *Client) call(ctx context.Context, op string, in, out any) error {
	return c.callIn(ctx, c.Region, op, in, out)
}

// callIn calls op with requests signed for region.
func (c *Client) callIn(ctx context.Context, region, op string, in, out any) error {
	body, err := json.Marshal(in)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.Endpoint+"/", bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/x-amz-json-1.1")
	req.Header.Set("X-Amz-Target", "TrentService."+op)
	if c.AccessKeyID != "" {
		sum := sha256.Sum256(body)
		creds := aws.Credentials{AccessKeyID: c.AccessKeyID, SecretAccessKey: c.SecretAccessKey}
		if err := v4.NewSigner().SignHTTP(ctx, creds, req, hex.EncodeToString(sum[:]), "kms", region, time.Now()); err != nil {
			return fmt.Errorf("kms %s: sign: %w", op, err)
		}
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return &hsm.Error{Type: "KMSUnreachable", Message: fmt.Sprintf("%s: %v", c.Endpoint, err)}
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	defer clear(raw) // a Decrypt response holds a data key
	if err != nil {
		return fmt.Errorf("kms %s: %w", op, err)
	}
	if resp.StatusCode != http.StatusOK {
		var e apiError
		if json.Unmarshal(raw, &e) != nil || e.Type == "" {
			return &hsm.Error{Type: "KMSInternalException", Message: fmt.Sprintf("HTTP %d", resp.StatusCode)}
		}
		t := e.Type
		if i := strings.LastIndexByte(t, '#'); i >= 0 {
			t = t[i+1:]
		}
		return &hsm.Error{Type: t, Message: e.Message}
	}
	if out != nil {
		return json.Unmarshal(raw, out)
	}
	return nil
}

// GenerateDataKeyWithoutPlaintext asks for a 64-byte data key, wrapped.
func (c *Client) GenerateDataKeyWithoutPlaintext(ctx context.Context, keyID string, ectx map[string]string) ([]byte, string, error) {
	var out struct {
		CiphertextBlob []byte
		KeyId          string
	}
	err := c.callIn(ctx, c.regionFor(keyID), "GenerateDataKeyWithoutPlaintext",
		map[string]any{"KeyId": keyID, "EncryptionContext": ectx, "NumberOfBytes": hsm.DataKeySize}, &out)
	c.learn(out.KeyId)
	return out.CiphertextBlob, out.KeyId, err
}

// Decrypt unwraps blob into dst. With Keys it names a Recipient: the KMS
// answers with the key encrypted to a fresh key pair, opened here in
// locked memory, and no plaintext crosses the wire or lands in a buffer of
// net/http. Without, it wipes the copies it made (net/http's own buffers
// it cannot reach).
func (c *Client) Decrypt(ctx context.Context, blob []byte, ectx map[string]string, dst []byte) (string, error) {
	var out struct {
		Plaintext              []byte
		CiphertextForRecipient []byte
		KeyId                  string
	}
	region := c.Region
	if id, err := hsm.BlobKeyID(blob); err == nil {
		region = c.regionFor(id)
	}
	in := map[string]any{"CiphertextBlob": blob, "EncryptionContext": ectx}
	var kp *recipient.KeyPair
	if c.Keys != nil {
		var err error
		if kp, err = c.Keys.Get(ctx); err != nil {
			return "", fmt.Errorf("kms Decrypt: recipient key pair: %w", err)
		}
		defer c.Keys.Warm() // the next attach's, once this one is done
		defer kp.Destroy()
		in["Recipient"] = map[string]any{"KeyEncryptionAlgorithm": recipient.KeyEncryptionAlgorithm, "AttestationDocument": kp.Document()}
	}
	err := c.callIn(ctx, region, "Decrypt", in, &out)
	defer clear(out.Plaintext)
	if err != nil {
		var he *hsm.Error
		if kp != nil && errors.As(err, &he) && he.Type == "UnsupportedOperationException" {
			he.Message += " (the KMS does not do Decrypt for a recipient: upgrade it, or set [kms] recipient = false)"
		}
		return out.KeyId, err
	}
	if kp == nil {
		if len(out.Plaintext) > len(dst) {
			return out.KeyId, &hsm.Error{Type: "ValidationException", Message: "plaintext larger than expected"}
		}
		copy(dst, out.Plaintext)
		return out.KeyId, nil
	}
	if len(out.Plaintext) > 0 || len(out.CiphertextForRecipient) == 0 {
		return out.KeyId, &hsm.Error{Type: "KMSInternalException",
			Message: "the KMS answered Decrypt for a recipient with no CiphertextForRecipient: it ignored the Recipient"}
	}
	if _, err := kp.Open(out.CiphertextForRecipient, dst); err != nil {
		return out.KeyId, fmt.Errorf("kms Decrypt: %w", err)
	}
	return out.KeyId, nil
}

// CheckKey reports whether keyID exists and is Enabled.
func (c *Client) CheckKey(ctx context.Context, keyID string) error {
	var out struct{ KeyMetadata keyMetadata }
	if c.Keys != nil {
		c.Keys.Warm() // an attach follows: have its key pair ready
	}
	if err := c.callIn(ctx, c.regionFor(keyID), "DescribeKey", map[string]any{"KeyId": keyID}, &out); err != nil {
		return err
	}
	c.learn(out.KeyMetadata.Arn)
	if out.KeyMetadata.KeyState != hsm.Enabled {
		return fmt.Errorf("KMS key %s is %s", out.KeyMetadata.Arn, out.KeyMetadata.KeyState)
	}
	return nil
}
