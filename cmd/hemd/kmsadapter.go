package main

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/hemd/hemd/hem/volume"
	"github.com/hemd/hemd/kmsclient/awsjson"
	"github.com/hemd/hemd/kmsclient/hsm"
)

// defaultKeyAlias names the key volumes are created under when none is
// given, as EBS's default key alias/aws/ebs. It is made on first use.
const defaultKeyAlias = "alias/aws/ebs"

// kmsConfig is the KMS configuration: the [kms] section of the config file,
// with HEMD_PKCS11_MODULE, HEMD_PKCS11_TOKEN and HEMD_PKCS11_PIN on top.
func kmsConfig(g globalFlags) hsm.Config {
	c := g.KMS.Config
	if v := os.Getenv("HEMD_PKCS11_MODULE"); v != "" {
		c.Module = v
	}
	if v := os.Getenv("HEMD_PKCS11_TOKEN"); v != "" {
		c.TokenLabel = v
	}
	if v := os.Getenv("HEMD_PKCS11_PIN"); v != "" {
		c.PIN = v
	}
	return c
}

// hsmKMS adapts the PKCS#11 KMS to what volumes and serve need.
type hsmKMS struct{ *hsm.KMS }

// CheckKey implements keyChecker: the key exists and is Enabled.
func (k hsmKMS) CheckKey(ctx context.Context, keyID string) error {
	m, err := k.DescribeKey(ctx, keyID)
	if err != nil {
		return err
	}
	if m.KeyState != hsm.Enabled {
		return fmt.Errorf("KMS key %s is %s", m.Arn, m.KeyState)
	}
	return nil
}

// openKMS opens the KMS: a remote one (hemd kms serve) when an endpoint is
// configured ([kms] endpoint or HEMD_KMS_ENDPOINT), else the embedded
// SoftHSM2 token under the state directory or the configured PKCS#11 HSM.
func openKMS(ctx context.Context, g globalFlags) (volume.KMS, func(), error) {
	s := g.KMS
	if v := os.Getenv("HEMD_KMS_ENDPOINT"); v != "" {
		s.Endpoint = v
	}
	if v := os.Getenv("HEMD_KMS_ACCESS_KEY_ID"); v != "" {
		s.AccessKeyID = v
	}
	if v := os.Getenv("HEMD_KMS_SECRET_ACCESS_KEY"); v != "" {
		s.SecretAccessKey = v
	}
	if s.Endpoint != "" {
		return awsjson.NewClient(s.Endpoint, s.Region, s.AccessKeyID, s.SecretAccessKey), func() {}, nil
	}
	k, err := hsm.Open(kmsConfig(g), g.StateDir)
	if err != nil {
		return nil, func() {}, err
	}
	return hsmKMS{k}, func() { k.Close() }, nil
}

// defaultKey returns the default key's id, creating it on first use.
func defaultKey(ctx context.Context, g globalFlags, kms volume.KMS) (string, error) {
	hk, ok := kms.(hsmKMS)
	if !ok {
		return "", errors.New("no default key: name one with --key")
	}
	k := hk.KMS
	m, err := k.DescribeKey(ctx, defaultKeyAlias)
	if err == nil {
		return m.Arn, nil
	}
	if !errors.Is(err, hsm.ErrNotFound) {
		return "", err
	}
	m, err = k.CreateKey(ctx, "Default key for hemd volumes")
	if err != nil {
		return "", err
	}
	if err := k.CreateReservedAlias(ctx, defaultKeyAlias, m.KeyID); err != nil {
		return "", err
	}
	g.Log.Info("default key created", "key", m.Arn, "alias", defaultKeyAlias)
	return m.Arn, nil
}
