package hsm

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
)

// TestDeleteDueKeys: a key pending deletion survives until its date, then its
// backing keys leave the HSM and its blobs are dead; other keys are untouched.
func TestDeleteDueKeys(t *testing.T) {
	k, _ := open(t)
	ctx := context.Background()
	m, _ := k.CreateKey(ctx, "")
	keep, _ := k.CreateKey(ctx, "")
	k.CreateAlias(ctx, "alias/doomed", m.KeyID)
	k.RotateKey(ctx, m.KeyID)
	blob, _, _ := k.GenerateDataKeyWithoutPlaintext(ctx, keep.KeyID, vol)
	if err := k.ScheduleKeyDeletion(ctx, m.KeyID, 7); err != nil {
		t.Fatal(err)
	}
	if got, err := k.DeleteDueKeys(ctx, time.Now()); err != nil || len(got) != 0 {
		t.Fatalf("deleted before the date: %v %v", got, err)
	}
	got, err := k.DeleteDueKeys(ctx, time.Now().Add(8*24*time.Hour))
	if err != nil || len(got) != 1 || got[0] != m.Arn {
		t.Fatalf("DeleteDueKeys: %v %v", got, err)
	}
	if _, err := k.DescribeKey(ctx, m.KeyID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("DescribeKey of a deleted key: %v", err)
	}
	if _, err := k.DescribeKey(ctx, "alias/doomed"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("alias of a deleted key: %v", err)
	}
	k.withSession(ctx, func(sh pkcs11.SessionHandle) error {
		for v := uint32(1); v <= 2; v++ {
			if _, err := k.findKey(sh, m.KeyID, v); !errors.Is(err, ErrNotFound) {
				t.Errorf("backing key v%d still in the HSM: %v", v, err)
			}
		}
		return nil
	})
	if _, err := k.Decrypt(ctx, blob, vol, make([]byte, 64)); err != nil {
		t.Fatalf("another key's blob: %v", err)
	}
}

func TestListAliases(t *testing.T) {
	k, _ := open(t)
	ctx := context.Background()
	a, _ := k.CreateKey(ctx, "")
	b, _ := k.CreateKey(ctx, "")
	k.CreateAlias(ctx, "alias/b", b.KeyID)
	k.CreateAlias(ctx, "alias/a", a.KeyID)
	all, err := k.ListAliases(ctx, "")
	if err != nil || len(all) != 2 || all[0].AliasName != "alias/a" || all[0].TargetKeyID != a.KeyID ||
		all[0].AliasArn != "arn:aws:kms:local:000000000000:alias/a" {
		t.Fatalf("ListAliases: %+v %v", all, err)
	}
	one, err := k.ListAliases(ctx, b.Arn)
	if err != nil || len(one) != 1 || one[0].AliasName != "alias/b" {
		t.Fatalf("ListAliases(b): %+v %v", one, err)
	}
	if _, err := k.ListAliases(ctx, "alias/none"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("ListAliases(unknown): %v", err)
	}
}
