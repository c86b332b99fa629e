package main

import (
	"context"
	"errors"

	"github.com/hemd/hemd/hem/volume"
	"github.com/hemd/hemd/kmsclient"
	"github.com/hemd/hemd/kmsclient/hsm"
)

// defaultKeyAlias names the key volumes are created under when none is
// given, as EBS's default key alias/aws/ebs. It is made on first use.
const defaultKeyAlias = "alias/aws/ebs"

// kmsConfig is the [kms] section with HEMD_PKCS11_* and HEMD_KMS_* on top.
func kmsConfig(g globalFlags) kmsclient.Config { return g.KMS.Config.FromEnv() }

// openKMS opens the KMS: a remote one (hemd kms serve) when an endpoint is
// configured ([kms] endpoint or HEMD_KMS_ENDPOINT), else the embedded
// SoftHSM2 token under the state directory or the configured PKCS#11 HSM.
func openKMS(ctx context.Context, g globalFlags) (volume.KMS, func(), error) {
	k, c, err := kmsclient.Open(ctx, kmsConfig(g), g.StateDir, g.Log)
	if err != nil {
		return nil, func() {}, err
	}
	return k, func() { c.Close() }, nil
}

// openHSM opens the PKCS#11 KMS itself (hemd key, hemd kms serve).
func openHSM(g globalFlags) (*hsm.KMS, error) {
	k, err := hsm.Open(kmsConfig(g).Config, g.StateDir)
	if err != nil {
		return nil, err
	}
	k.SetLogger(g.Log) // a PKCS#11 session replaced after a failure is logged
	return k, nil
}

// defaultKey returns the default key's id, creating it on first use.
func defaultKey(ctx context.Context, g globalFlags, kms volume.KMS) (string, error) {
	local, ok := kms.(kmsclient.Local)
	if !ok {
		return "", errors.New("no default key with a remote KMS: name one with --key")
	}
	k := local.KMS
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
