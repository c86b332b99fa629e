package kmsclient

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"

	"github.com/hemd/hemd/kmsclient/awsjson"
	"github.com/hemd/hemd/kmsclient/hsm"
)

// Config is the [kms] section of hemd's config file: the embedded or
// configured PKCS#11 HSM, or a remote KMS (hemd kms serve) to use instead.
type Config struct {
	hsm.Config
	// Endpoint of a remote KMS (http(s)://HOST:PORT or unix:PATH); empty
	// means the PKCS#11 HSM (by default SoftHSM2 under the state dir).
	Endpoint        string `toml:"endpoint"`
	AccessKeyID     string `toml:"access_key_id"`
	SecretAccessKey string `toml:"secret_access_key"`
	// CAFile: the PEM certificates an https endpoint must chain to
	// (default: the system's).
	CAFile string `toml:"ca_file"`
	// ClientCert and ClientKey: this host's certificate and key (PEM), for
	// a KMS that requires mutual TLS (hemd kms serve --client-ca).
	ClientCert string `toml:"client_cert"`
	ClientKey  string `toml:"client_key"`
	// InsecureHTTP allows plain http:// to a KMS that is not on this host
	// (and hemd kms serve to listen without TLS on a non-loopback
	// address); hemd warns about it at every start.
	InsecureHTTP bool `toml:"insecure_http"`
	// Recipient: Decrypt names a Recipient (a fresh key pair per attach),
	// so that the data key never crosses the wire in plaintext. Default
	// true; false for a KMS that does not do it (AWS KMS outside Nitro).
	Recipient *bool `toml:"recipient"`
}

// FromEnv returns c with the environment on top: HEMD_PKCS11_MODULE,
// HEMD_PKCS11_TOKEN, HEMD_PKCS11_PIN, HEMD_KMS_ENDPOINT, HEMD_KMS_REGION,
// HEMD_KMS_ACCESS_KEY_ID, HEMD_KMS_SECRET_ACCESS_KEY, HEMD_KMS_CA_FILE,
// HEMD_KMS_CLIENT_CERT and HEMD_KMS_CLIENT_KEY.
//
// The region ([kms] region, HEMD_KMS_REGION) is the one the remote KMS's
// requests are signed for and the embedded KMS's ARNs name; a remote key
// named by an ARN of another region is signed for the ARN's region.
func (c Config) FromEnv() Config {
	for _, e := range []struct {
		name string
		dst  *string
	}{
		{"HEMD_PKCS11_MODULE", &c.Module},
		{"HEMD_PKCS11_TOKEN", &c.TokenLabel},
		{"HEMD_PKCS11_PIN", &c.PIN},
		{"HEMD_KMS_ENDPOINT", &c.Endpoint},
		{"HEMD_KMS_REGION", &c.Region},
		{"HEMD_KMS_ACCESS_KEY_ID", &c.AccessKeyID},
		{"HEMD_KMS_SECRET_ACCESS_KEY", &c.SecretAccessKey},
		{"HEMD_KMS_CA_FILE", &c.CAFile},
		{"HEMD_KMS_CLIENT_CERT", &c.ClientCert},
		{"HEMD_KMS_CLIENT_KEY", &c.ClientKey},
	} {
		if v := os.Getenv(e.name); v != "" {
			*e.dst = v
		}
	}
	return c
}

// Open returns the KMS a host uses at attach time: the remote client when
// cfg names an endpoint, else the PKCS#11 KMS (initialising the embedded
// SoftHSM2 token under stateDir on first use). Close the io.Closer when done.
// cfg is used as given; call cfg.FromEnv() first to honour the environment.
func Open(ctx context.Context, cfg Config, stateDir string, log *slog.Logger) (DataKeys, io.Closer, error) {
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.Endpoint != "" {
		c, err := awsjson.NewClientWith(awsjson.ClientConfig{Endpoint: cfg.Endpoint, Region: cfg.Region,
			AccessKeyID: cfg.AccessKeyID, SecretAccessKey: cfg.SecretAccessKey, CAFile: cfg.CAFile,
			CertFile: cfg.ClientCert, KeyFile: cfg.ClientKey, InsecureHTTP: cfg.InsecureHTTP,
			Recipient: cfg.Recipient == nil || *cfg.Recipient, Log: log})
		if err != nil {
			return nil, nil, err
		}
		log.Debug("kms: remote", "endpoint", cfg.Endpoint, "region", c.Region, "recipient", c.Keys != nil)
		return c, c, nil
	}
	k, err := hsm.Open(cfg.Config, stateDir)
	if err != nil {
		return nil, nil, err
	}
	log.Debug("kms: PKCS#11", "module", firstOf(cfg.Module, hsm.DefaultModule), "state_dir", stateDir)
	return Local{k}, k, nil
}

// Local is the PKCS#11 KMS as a DataKeys (and a KMS).
type Local struct{ *hsm.KMS }

// CheckKey reports whether key exists and is Enabled, without unwrapping
// anything (DescribeKey).
func (l Local) CheckKey(ctx context.Context, key string) error {
	m, err := l.DescribeKey(ctx, key)
	if err != nil {
		return err
	}
	if m.KeyState != hsm.Enabled {
		return fmt.Errorf("KMS key %s is %s: %w", m.Arn, m.KeyState, stateErr(m.KeyState))
	}
	return nil
}

func stateErr(state string) error {
	if state == hsm.Disabled {
		return hsm.ErrDisabled
	}
	return hsm.ErrInvalidState
}

func firstOf(s ...string) string {
	for _, v := range s {
		if v != "" {
			return v
		}
	}
	return ""
}

var (
	_ DataKeys = Local{}
	_ KMS      = Local{}
	_ DataKeys = (*awsjson.Client)(nil)
)
