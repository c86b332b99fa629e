package hsm

import (
	"context"
	"slices"
	"time"
)

// GrantConstraints narrow a grant to some encryption contexts, as AWS KMS's
// EncryptionContextEquals and EncryptionContextSubset.
type GrantConstraints struct {
	EncryptionContextEquals map[string]string `json:"EncryptionContextEquals,omitempty"`
	EncryptionContextSubset map[string]string `json:"EncryptionContextSubset,omitempty"`
}

// Grant lets a grantee principal use a key for some operations.
type Grant struct {
	GrantID           string            `json:"GrantId"`
	KeyID             string            `json:"KeyId"`
	GranteePrincipal  string            `json:"GranteePrincipal"`
	RetiringPrincipal string            `json:"RetiringPrincipal,omitempty"`
	Operations        []string          `json:"Operations"`
	Constraints       *GrantConstraints `json:"Constraints,omitempty"`
	CreationDate      time.Time         `json:"CreationDate"`
}

var grantOps = []string{"Decrypt", "Encrypt", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext", "ReEncryptFrom", "ReEncryptTo", "DescribeKey", "CreateGrant", "RetireGrant"}

// matches reports whether ectx satisfies the constraints.
func (c *GrantConstraints) matches(ectx map[string]string) bool {
	if c == nil {
		return true
	}
	if c.EncryptionContextEquals != nil {
		if len(ectx) != len(c.EncryptionContextEquals) {
			return false
		}
		for k, v := range c.EncryptionContextEquals {
			if w, ok := ectx[k]; !ok || w != v {
				return false
			}
		}
	}
	for k, v := range c.EncryptionContextSubset {
		if w, ok := ectx[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// CreateGrant gives grantee the operations on a key, optionally only for
// matching encryption contexts.
func (k *KMS) CreateGrant(ctx context.Context, ref, grantee, retiring string, ops []string, c *GrantConstraints) (string, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	m, err := k.resolve(ref)
	if err == nil && grantee == "" {
		err = kmsErr(ErrValidation, "GranteePrincipal is required")
	}
	for _, op := range ops {
		if err == nil && !slices.Contains(grantOps, op) {
			err = kmsErr(ErrValidation, "grant operation %q is not valid", op)
		}
	}
	if err == nil && len(ops) == 0 {
		err = kmsErr(ErrValidation, "a grant needs at least one operation")
	}
	if err == nil && m.KeyState == PendingDeletion {
		err = kmsErr(ErrInvalidState, "%s is pending deletion", m.Arn)
	}
	var id string
	if err == nil {
		id = randomHex(32)
		k.grants = append(k.grants, &Grant{GrantID: id, KeyID: m.KeyID, GranteePrincipal: grantee, RetiringPrincipal: retiring,
			Operations: ops, Constraints: c, CreationDate: time.Now().UTC().Truncate(time.Second)})
		err = k.saveMeta()
	}
	k.recordLocked(ctx, "CreateGrant", arnOf(m), nil, err)
	return id, err
}

// ListGrants lists a key's grants.
func (k *KMS) ListGrants(ctx context.Context, ref string) ([]Grant, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	m, err := k.resolve(ref)
	if err != nil {
		return nil, err
	}
	var out []Grant
	for _, g := range k.grants {
		if g.KeyID == m.KeyID {
			out = append(out, *g)
		}
	}
	return out, nil
}

// RevokeGrant deletes a grant (the key's administrator does this).
func (k *KMS) RevokeGrant(ctx context.Context, ref, grantID string) error {
	return k.dropGrant(ctx, "RevokeGrant", ref, grantID, "")
}

// RetireGrant deletes a grant on behalf of its retiring or grantee principal.
func (k *KMS) RetireGrant(ctx context.Context, grantID, caller string) error {
	return k.dropGrant(ctx, "RetireGrant", "", grantID, caller)
}

func (k *KMS) dropGrant(ctx context.Context, op, ref, grantID, caller string) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.refresh()
	for i, g := range k.grants {
		if g.GrantID != grantID {
			continue
		}
		if ref != "" {
			if m, err := k.resolve(ref); err != nil || m.KeyID != g.KeyID {
				return kmsErr(ErrNotFound, "grant %s is not on key %s", grantID, ref)
			}
		}
		if caller != "" && caller != g.RetiringPrincipal && caller != g.GranteePrincipal {
			return &Error{Type: "AccessDeniedException", Message: caller + " may not retire grant " + grantID}
		}
		k.grants = append(k.grants[:i], k.grants[i+1:]...)
		err := k.saveMeta()
		k.recordLocked(ctx, op, k.arn(g.KeyID), nil, err)
		return err
	}
	return kmsErr(ErrNotFound, "grant %s does not exist", grantID)
}

// Authorize reports whether principal holds a grant for op on the key that
// wrapped (or will wrap) under ectx. Callers that are not the key's
// administrators (hemd kms serve's grants-only principals) need one.
func (k *KMS) Authorize(ref, principal, op string, ectx map[string]string) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	m, err := k.resolve(ref)
	if err != nil {
		return err
	}
	for _, g := range k.grants {
		if g.KeyID == m.KeyID && g.GranteePrincipal == principal && slices.Contains(g.Operations, op) && g.Constraints.matches(ectx) {
			return nil
		}
	}
	return &Error{Type: "AccessDeniedException", Message: principal + " is not allowed " + op + " on " + m.Arn + " with this encryption context"}
}

// BlobKeyID returns the key id a ciphertext blob names.
func BlobKeyID(blob []byte) (string, error) {
	b, err := decodeBlob(blob)
	if err != nil {
		return "", err
	}
	return uuidString(b.keyID), nil
}
