package main

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/hemd/hemd/hem/datakey"
	"github.com/hemd/hemd/hem/volume"
	"github.com/hemd/hemd/vhost/blk"
)

// keyChecker is a KMS that can tell whether a key is usable without
// unwrapping anything (DescribeKey).
type keyChecker interface {
	CheckKey(ctx context.Context, keyID string) error
}

// volumeKeys attaches an encrypted volume's data key for the blk device: a
// KMS Decrypt into locked memory when the front-end starts the device, and
// zeroization when it stops.
type volumeKeys struct {
	head *volume.Header
	kms  volume.KMS
	key  *datakey.Key
	log  *slog.Logger
}

func newVolumeKeys(h *volume.Header, kms volume.KMS, log *slog.Logger) *volumeKeys {
	return &volumeKeys{head: h, kms: kms, key: datakey.New(int(h.DataUnitSize)), log: log}
}

// Check implements blk.Keys.
func (k *volumeKeys) Check(ctx context.Context) error {
	c, ok := k.kms.(keyChecker)
	if !ok {
		return nil
	}
	if err := c.CheckKey(ctx, k.head.KeyID); err != nil {
		k.log.Error("event=attach-refused", "volume", k.head.VolumeID, "key", k.head.KeyID, "err", err)
		return fmt.Errorf("key %s: %w", k.head.KeyID, err)
	}
	return nil
}

// Attach implements blk.Keys.
func (k *volumeKeys) Attach(ctx context.Context) (blk.Transform, error) {
	x, err := k.key.Attach(ctx, volume.Unwrapper(k.head, k.kms))
	if err != nil {
		k.log.Error("event=attach-failed", "volume", k.head.VolumeID, "key", k.head.KeyID, "err", err)
		return nil, err
	}
	k.log.Info("event=attach", "volume", k.head.VolumeID, "key", k.head.KeyID, "cipher", x.Impl())
	return x, nil
}

// Detach implements blk.Keys.
func (k *volumeKeys) Detach() {
	if k.key.State() == datakey.Detached {
		return
	}
	k.log.Info("event=detach", "volume", k.head.VolumeID, "key", k.head.KeyID)
	k.key.Zeroize()
	k.log.Info("event=zeroize", "volume", k.head.VolumeID, "key", k.head.KeyID)
}
