package awsjson

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
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
	Endpoint        string
	Region          string
	AccessKeyID     string
	SecretAccessKey string
	HTTP            *http.Client
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

func (c *Client) call(ctx context.Context, op string, in, out any) error {
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
		if err := v4.NewSigner().SignHTTP(ctx, creds, req, hex.EncodeToString(sum[:]), "kms", c.Region, time.Now()); err != nil {
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
	err := c.call(ctx, "GenerateDataKeyWithoutPlaintext", map[string]any{"KeyId": keyID, "EncryptionContext": ectx, "NumberOfBytes": hsm.DataKeySize}, &out)
	return out.CiphertextBlob, out.KeyId, err
}

// Decrypt unwraps blob into dst and wipes the copies it made.
func (c *Client) Decrypt(ctx context.Context, blob []byte, ectx map[string]string, dst []byte) (string, error) {
	var out struct {
		Plaintext []byte
		KeyId     string
	}
	err := c.call(ctx, "Decrypt", map[string]any{"CiphertextBlob": blob, "EncryptionContext": ectx}, &out)
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
	if err := c.call(ctx, "DescribeKey", map[string]any{"KeyId": keyID}, &out); err != nil {
		return err
	}
	if out.KeyMetadata.KeyState != hsm.Enabled {
		return fmt.Errorf("KMS key %s is %s", out.KeyMetadata.Arn, out.KeyMetadata.KeyState)
	}
	return nil
}
