// Package kmsclient is hemd's key management service: the operations of AWS
// KMS that an EBS-style block store needs, with their semantics (key states,
// encryption context as AAD, grants, audit). hsm implements them on a
// PKCS#11 HSM (SoftHSM2 embedded by default); awsjson serves them over the
// AWS KMS wire protocol and is the client a host uses for a remote KMS.
// Open picks between them from a Config (the [kms] section).
package kmsclient

import (
	"context"

	"github.com/hemd/hemd/kmsclient/hsm"
)

// KMS is the whole service, as hsm.KMS implements it.
type KMS interface {
	CreateKey(ctx context.Context, description string) (hsm.KeyMetadata, error)
	DescribeKey(ctx context.Context, key string) (hsm.KeyMetadata, error)
	ListKeys(ctx context.Context) []hsm.KeyMetadata
	UpdateKeyDescription(ctx context.Context, key, description string) error
	CreateAlias(ctx context.Context, alias, key string) error
	UpdateAlias(ctx context.Context, alias, key string) error
	DeleteAlias(ctx context.Context, alias string) error
	ListAliases(ctx context.Context, key string) ([]hsm.Alias, error)
	TagResource(ctx context.Context, key string, tags []hsm.Tag) error
	UntagResource(ctx context.Context, key string, tagKeys []string) error
	ListResourceTags(ctx context.Context, key string) ([]hsm.Tag, error)
	EnableKey(ctx context.Context, key string) error
	DisableKey(ctx context.Context, key string) error
	ScheduleKeyDeletion(ctx context.Context, key string, days int) error
	CancelKeyDeletion(ctx context.Context, key string) error
	EnableKeyRotation(ctx context.Context, key string, on bool) error
	RotateKey(ctx context.Context, key string) error
	GenerateDataKey(ctx context.Context, key string, ectx map[string]string, dst []byte) ([]byte, string, error)
	GenerateDataKeyWithoutPlaintext(ctx context.Context, key string, ectx map[string]string) ([]byte, string, error)
	Encrypt(ctx context.Context, key string, ectx map[string]string, plaintext []byte) ([]byte, string, error)
	Decrypt(ctx context.Context, blob []byte, ectx map[string]string, dst []byte) (string, error)
	ReEncrypt(ctx context.Context, blob []byte, srcCtx map[string]string, dstKey string, dstCtx map[string]string) ([]byte, string, error)
	CreateGrant(ctx context.Context, key, grantee, retiring string, ops []string, c *hsm.GrantConstraints) (string, error)
	ListGrants(ctx context.Context, key string) ([]hsm.Grant, error)
	RetireGrant(ctx context.Context, grantID, caller string) error
	RevokeGrant(ctx context.Context, key, grantID string) error
	GenerateRandom(ctx context.Context, n int) ([]byte, error)
}

// DataKeys is what a host needs to attach volumes; hsm.KMS and the remote
// awsjson.Client both provide it.
type DataKeys interface {
	GenerateDataKeyWithoutPlaintext(ctx context.Context, key string, ectx map[string]string) ([]byte, string, error)
	Decrypt(ctx context.Context, blob []byte, ectx map[string]string, dst []byte) (string, error)
	CheckKey(ctx context.Context, key string) error
}

var _ KMS = (*hsm.KMS)(nil)
