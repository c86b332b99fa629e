package awsjson

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"github.com/hemd/hemd/kmsclient/hsm"
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

	// keyRegions maps key ids to the region of their ARN (seen in requests
	// and responses), so that Decrypt, which names no key, signs for the
	// region of the key in the ciphertext; warned holds the regions Log was
	// warned of.
	keyRegions, warned sync.Map
}

// NewClient returns a client for endpoint.
func NewClient(endpoint, region, akid, secret string) *Client {
	c := &Client{Endpoint: endpoint, Region: region, AccessKeyID: akid, SecretAccessKey: secret}
	if c.Region == "" {
		c.Region = "local"
	}
	tr := &http.Transport{}
	if path, ok := strings.CutPrefix(endpoint, "unix:"); ok {
		tr.DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", path)
		}
		c.Endpoint = "http://kms.unix"
	}
	c.HTTP = &http.Client{Transport: tr, Timeout: 30 * time.Second}
	return c
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

// Decrypt unwraps blob into dst and wipes the copies it made.
func (c *Client) Decrypt(ctx context.Context, blob []byte, ectx map[string]string, dst []byte) (string, error) {
	var out struct {
		Plaintext []byte
		KeyId     string
	}
	region := c.Region
	if id, err := hsm.BlobKeyID(blob); err == nil {
		region = c.regionFor(id)
	}
	err := c.callIn(ctx, region, "Decrypt", map[string]any{"CiphertextBlob": blob, "EncryptionContext": ectx}, &out)
	defer clear(out.Plaintext)
	if err != nil {
		return out.KeyId, err
	}
	if len(out.Plaintext) > len(dst) {
		return out.KeyId, &hsm.Error{Type: "ValidationException", Message: "plaintext larger than expected"}
	}
	copy(dst, out.Plaintext)
	return out.KeyId, nil
}

// CheckKey reports whether keyID exists and is Enabled.
func (c *Client) CheckKey(ctx context.Context, keyID string) error {
	var out struct{ KeyMetadata keyMetadata }
	if err := c.callIn(ctx, c.regionFor(keyID), "DescribeKey", map[string]any{"KeyId": keyID}, &out); err != nil {
		return err
	}
	c.learn(out.KeyMetadata.Arn)
	if out.KeyMetadata.KeyState != hsm.Enabled {
		return fmt.Errorf("KMS key %s is %s", out.KeyMetadata.Arn, out.KeyMetadata.KeyState)
	}
	return nil
}
