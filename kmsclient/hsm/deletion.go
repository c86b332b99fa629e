package hsm

import (
	"context"
	"errors"
	"time"

	"github.com/miekg/pkcs11"
)

// DeleteDueKeys deletes every key whose pending-deletion window ended before
// now, as AWS KMS does when the waiting period is over: each backing-key
// version is destroyed inside the HSM (C_DestroyObject), then the key's
// metadata, aliases and grants are removed. Blobs wrapped under it can never
// be decrypted again. Open runs it; a long-running process may call it from
// time to time. It returns the ARNs deleted.
func (k *KMS) DeleteDueKeys(ctx context.Context, now time.Time) ([]string, error) {
	k.mu.Lock()
	k.refresh()
	var due []KeyMetadata
	for _, m := range k.meta {
		if m.KeyState == PendingDeletion && m.DeletionDate != nil && !m.DeletionDate.After(now) {
			due = append(due, *m)
		}
	}
	k.mu.Unlock()
	var deleted []string
	for _, m := range due {
		err := k.withSession(ctx, func(sh pkcs11.SessionHandle) error {
			for v := uint32(1); v <= m.Versions; v++ {
				obj, err := k.findKey(sh, m.KeyID, v)
				if errors.Is(err, ErrNotFound) {
					continue // destroyed by an earlier, interrupted run
				}
				if err != nil {
					return err
				}
				if err := k.p.DestroyObject(sh, obj); err != nil {
					return err
				}
			}
			return nil
		})
		if err == nil {
			k.mu.Lock()
			if cur, ok := k.meta[m.KeyID]; ok && cur.KeyState == PendingDeletion {
				delete(k.meta, m.KeyID)
				for a, id := range k.aliases {
					if id == m.KeyID {
						delete(k.aliases, a)
					}
				}
				grants := k.grants[:0]
				for _, g := range k.grants {
					if g.KeyID != m.KeyID {
						grants = append(grants, g)
					}
				}
				k.grants = grants
				err = k.saveMeta()
			}
			k.mu.Unlock()
		}
		k.record(ctx, "DeleteKey", m.Arn, nil, err)
		if err != nil {
			return deleted, kmsErr(ErrInternal, "deleting %s: %v", m.Arn, err)
		}
		deleted = append(deleted, m.Arn)
	}
	return deleted, nil
}
