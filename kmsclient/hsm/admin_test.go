package hsm

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestAdminOps: tags, alias changes and descriptions persist across a
// reopen, a deleted key's tags go with it, each change is audited, and
// GenerateRandom draws from the HSM.
func TestAdminOps(t *testing.T) {
	k, dir := open(t)
	var audit bytes.Buffer
	k.SetAuditWriter(&audit)
	ctx := context.Background()
	a, _ := k.CreateKey(ctx, "a")
	b, _ := k.CreateKey(ctx, "b")
	if err := k.TagResource(ctx, a.KeyID, []Tag{{"env", "prod"}, {"team", "x"}}); err != nil {
		t.Fatal(err)
	}
	if err := k.TagResource(ctx, a.Arn, []Tag{{"team", "storage"}}); err != nil {
		t.Fatal(err)
	}
	if err := k.UntagResource(ctx, a.KeyID, []string{"env", "absent"}); err != nil {
		t.Fatal(err)
	}
	if err := k.TagResource(ctx, b.KeyID, []Tag{{"doomed", "1"}}); err != nil {
		t.Fatal(err)
	}
	if err := k.CreateAlias(ctx, "alias/app", a.KeyID); err != nil {
		t.Fatal(err)
	}
	if err := k.UpdateAlias(ctx, "alias/app", b.Arn); err != nil {
		t.Fatal(err)
	}
	if err := k.UpdateAlias(ctx, "alias/app", "alias/app"); !errIs(err, ErrValidation) {
		t.Fatalf("UpdateAlias to an alias: %v", err)
	}
	if err := k.CreateAlias(ctx, "alias/gone", a.KeyID); err != nil {
		t.Fatal(err)
	}
	if err := k.DeleteAlias(ctx, "alias/gone"); err != nil {
		t.Fatal(err)
	}
	if err := k.DeleteAlias(ctx, "alias/gone"); !errIs(err, ErrNotFound) {
		t.Fatalf("DeleteAlias twice: %v", err)
	}
	if err := k.UpdateKeyDescription(ctx, a.KeyID, "renamed"); err != nil {
		t.Fatal(err)
	}
	r1, err := k.GenerateRandom(ctx, 32)
	r2, _ := k.GenerateRandom(ctx, 32)
	if err != nil || len(r1) != 32 || bytes.Equal(r1, r2) {
		t.Fatalf("GenerateRandom: %v", err)
	}
	if _, err := k.GenerateRandom(ctx, 0); !errIs(err, ErrValidation) {
		t.Fatalf("GenerateRandom 0: %v", err)
	}
	for _, op := range []string{"TagResource", "UntagResource", "UpdateAlias", "DeleteAlias", "UpdateKeyDescription", "GenerateRandom"} {
		if !strings.Contains(audit.String(), `"eventName":"`+op+`"`) {
			t.Errorf("no audit record of %s", op)
		}
	}
	// b is deleted: its tags go with it.
	if err := k.ScheduleKeyDeletion(ctx, b.KeyID, 7); err != nil {
		t.Fatal(err)
	}
	if _, err := k.DeleteDueKeys(ctx, time.Now().Add(8*24*time.Hour)); err != nil {
		t.Fatal(err)
	}
	k.Close()
	k2, err := Open(Config{}, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer k2.Close()
	tags, err := k2.ListResourceTags(ctx, a.KeyID)
	if err != nil || len(tags) != 1 || tags[0] != (Tag{"team", "storage"}) {
		t.Fatalf("tags after reopen: %v %v", tags, err)
	}
	if m, _ := k2.DescribeKey(ctx, a.KeyID); m.Description != "renamed" {
		t.Fatalf("description after reopen: %q", m.Description)
	}
	if err := k2.TagResource(ctx, a.KeyID, []Tag{{"x", "y"}}); err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(filepath.Join(dir, "tags.json"))
	if strings.Contains(string(raw), b.KeyID) {
		t.Fatalf("tags.json keeps a deleted key's tags:\n%s", raw)
	}
}

func TestValidateTags(t *testing.T) {
	for _, tc := range []struct {
		tags []Tag
		ok   bool
	}{
		{[]Tag{{"k", ""}, {strings.Repeat("k", 128), strings.Repeat("v", 256)}}, true},
		{[]Tag{{"", "v"}}, false},
		{[]Tag{{strings.Repeat("k", 129), "v"}}, false},
		{[]Tag{{"k", strings.Repeat("v", 257)}}, false},
		{[]Tag{{"AWS:x", "v"}}, false},
		{[]Tag{{"k", "a"}, {"k", "b"}}, false},
	} {
		if err := ValidateTags(tc.tags); (err == nil) != tc.ok || (err != nil && !errIs(err, ErrTag)) {
			t.Errorf("%v: %v", tc.tags, err)
		}
	}
}
