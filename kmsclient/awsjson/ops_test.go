package awsjson

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"
	"github.com/hemd/hemd/kmsclient/hsm"
)

// rawCall sends op with body signed by the test principal (region
// "local") and returns the HTTP status and the response body as JSON.
func rawCall(t *testing.T, url, op, body string) (int, map[string]any) {
	t.Helper()
	r, _ := http.NewRequest("POST", url+"/", strings.NewReader(body))
	r.Header.Set("Content-Type", "application/x-amz-json-1.1")
	r.Header.Set("X-Amz-Target", "TrentService."+op)
	sdkSign(t, r, []byte(body), "AKIDHEMDTEST", "s3cr3t", "local", "kms", time.Now())
	resp, err := http.DefaultClient.Do(r)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var out map[string]any
	if err := json.Unmarshal(raw, &out); err != nil {
		t.Fatalf("%s: response is not JSON: %s", op, raw)
	}
	return resp.StatusCode, out
}

// TestKeyMetadataOnTheWire: CreateKey and DescribeKey give every field of
// AWS's KeyMetadata that a symmetric key has.
func TestKeyMetadataOnTheWire(t *testing.T) {
	srv, _ := serve(t)
	_, out := rawCall(t, srv.URL, "CreateKey", `{"Description":"wire"}`)
	id := out["KeyMetadata"].(map[string]any)["KeyId"].(string)
	for _, op := range []string{"CreateKey", "DescribeKey"} {
		if op == "DescribeKey" {
			_, out = rawCall(t, srv.URL, "DescribeKey", `{"KeyId":"`+id+`"}`)
		}
		m := out["KeyMetadata"].(map[string]any)
		want := map[string]any{"AWSAccountId": "000000000000", "KeyManager": "CUSTOMER", "KeySpec": "SYMMETRIC_DEFAULT",
			"CustomerMasterKeySpec": "SYMMETRIC_DEFAULT", "KeyUsage": "ENCRYPT_DECRYPT", "Origin": "AWS_KMS",
			"MultiRegion": false, "Enabled": true, "KeyState": "Enabled", "Description": "wire", "KeyId": id,
			"Arn": "arn:aws:kms:local:000000000000:key/" + id}
		for k, v := range want {
			if m[k] != v {
				t.Errorf("%s: KeyMetadata.%s = %v, want %v", op, k, m[k], v)
			}
		}
		if algs, _ := m["EncryptionAlgorithms"].([]any); len(algs) != 1 || algs[0] != "SYMMETRIC_DEFAULT" {
			t.Errorf("%s: EncryptionAlgorithms %v", op, m["EncryptionAlgorithms"])
		}
		if c, _ := m["CreationDate"].(float64); time.Since(time.Unix(int64(c), 0)) > time.Minute {
			t.Errorf("%s: CreationDate %v", op, m["CreationDate"])
		}
	}
}

// TestPagination: ListKeys, ListAliases, ListGrants and ListResourceTags
// return Limit items a page, NextMarker and Truncated until the last page,
// every item once.
func TestPagination(t *testing.T) {
	srv, _ := serve(t)
	ctx := context.Background()
	c := sdk(srv.URL, "AKIDHEMDTEST", "s3cr3t")
	var ids []string
	for i := range 5 {
		ck, err := c.CreateKey(ctx, &kms.CreateKeyInput{})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, *ck.KeyMetadata.KeyId)
		if _, err := c.CreateAlias(ctx, &kms.CreateAliasInput{AliasName: aws.String(fmt.Sprintf("alias/p%d", i)), TargetKeyId: ck.KeyMetadata.KeyId}); err != nil {
			t.Fatal(err)
		}
		if _, err := c.CreateGrant(ctx, &kms.CreateGrantInput{KeyId: &ids[0], GranteePrincipal: aws.String(fmt.Sprintf("host-%d", i)),
			Operations: []types.GrantOperation{types.GrantOperationDecrypt}}); err != nil {
			t.Fatal(err)
		}
		if _, err := c.TagResource(ctx, &kms.TagResourceInput{KeyId: &ids[0],
			Tags: []types.Tag{{TagKey: aws.String(fmt.Sprintf("k%d", i)), TagValue: aws.String("v")}}}); err != nil {
			t.Fatal(err)
		}
	}
	type page struct {
		n         int
		next      *string
		truncated bool
	}
	lists := map[string]func(marker *string) (page, error){
		"ListKeys": func(m *string) (page, error) {
			o, err := c.ListKeys(ctx, &kms.ListKeysInput{Limit: aws.Int32(2), Marker: m})
			if err != nil {
				return page{}, err
			}
			for _, k := range o.Keys {
				if !slices.Contains(ids, *k.KeyId) {
					t.Errorf("ListKeys: unknown key %s", *k.KeyId)
				}
			}
			return page{len(o.Keys), o.NextMarker, o.Truncated}, nil
		},
		"ListAliases": func(m *string) (page, error) {
			o, err := c.ListAliases(ctx, &kms.ListAliasesInput{Limit: aws.Int32(2), Marker: m})
			if err != nil {
				return page{}, err
			}
			return page{len(o.Aliases), o.NextMarker, o.Truncated}, nil
		},
		"ListGrants": func(m *string) (page, error) {
			o, err := c.ListGrants(ctx, &kms.ListGrantsInput{KeyId: &ids[0], Limit: aws.Int32(2), Marker: m})
			if err != nil {
				return page{}, err
			}
			return page{len(o.Grants), o.NextMarker, o.Truncated}, nil
		},
		"ListResourceTags": func(m *string) (page, error) {
			o, err := c.ListResourceTags(ctx, &kms.ListResourceTagsInput{KeyId: &ids[0], Limit: aws.Int32(2), Marker: m})
			if err != nil {
				return page{}, err
			}
			return page{len(o.Tags), o.NextMarker, o.Truncated}, nil
		},
	}
	for name, list := range lists {
		var sizes []int
		var marker *string
		for {
			p, err := list(marker)
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			sizes = append(sizes, p.n)
			if p.truncated != (p.next != nil) {
				t.Fatalf("%s: Truncated %v with NextMarker %v", name, p.truncated, p.next)
			}
			if !p.truncated {
				break
			}
			marker = p.next
		}
		if !slices.Equal(sizes, []int{2, 2, 1}) {
			t.Errorf("%s: pages of %v, want [2 2 1]", name, sizes)
		}
		if _, err := list(aws.String("not-a-marker!")); errCodeOf(err) != "InvalidMarkerException" {
			t.Errorf("%s with a bad marker: %v", name, err)
		}
	}
	if _, err := c.ListKeys(ctx, &kms.ListKeysInput{Limit: aws.Int32(1001)}); errCodeOf(err) != "ValidationException" {
		t.Errorf("ListKeys Limit 1001: %v", err)
	}
}

// errCodeOf is the AWS error code of an SDK error ("" for none).
func errCodeOf(err error) string {
	var coded interface{ ErrorCode() string }
	if errors.As(err, &coded) {
		return coded.ErrorCode()
	}
	if err != nil {
		return "not an API error: " + err.Error()
	}
	return ""
}

// TestTags: tags given to CreateKey are kept; TagResource adds and
// replaces, UntagResource removes; bad tags are refused with AWS's errors.
func TestTags(t *testing.T) {
	srv, _ := serve(t)
	ctx := context.Background()
	c := sdk(srv.URL, "AKIDHEMDTEST", "s3cr3t")
	tag := func(k, v string) types.Tag { return types.Tag{TagKey: aws.String(k), TagValue: aws.String(v)} }
	ck, err := c.CreateKey(ctx, &kms.CreateKeyInput{Tags: []types.Tag{tag("env", "prod"), tag("team", "storage")}})
	if err != nil {
		t.Fatal(err)
	}
	key := ck.KeyMetadata.KeyId
	list := func() string {
		o, err := c.ListResourceTags(ctx, &kms.ListResourceTagsInput{KeyId: key})
		if err != nil {
			t.Fatal(err)
		}
		var s []string
		for _, t := range o.Tags {
			s = append(s, *t.TagKey+"="+*t.TagValue)
		}
		return strings.Join(s, ",")
	}
	if got := list(); got != "env=prod,team=storage" {
		t.Fatalf("tags after CreateKey: %s", got)
	}
	if _, err := c.TagResource(ctx, &kms.TagResourceInput{KeyId: ck.KeyMetadata.Arn, Tags: []types.Tag{tag("env", "test"), tag("a", "")}}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.UntagResource(ctx, &kms.UntagResourceInput{KeyId: key, TagKeys: []string{"team", "absent"}}); err != nil {
		t.Fatal(err)
	}
	if got := list(); got != "a=,env=test" {
		t.Fatalf("tags after TagResource and UntagResource: %s", got)
	}
	for _, bad := range [][]types.Tag{{tag("aws:x", "v")}, {tag(strings.Repeat("k", 129), "v")}, {tag("k", strings.Repeat("v", 257))}} {
		if _, err := c.TagResource(ctx, &kms.TagResourceInput{KeyId: key, Tags: bad}); errCodeOf(err) != "TagException" {
			t.Errorf("TagResource %s: %v", *bad[0].TagKey, err)
		}
		if _, err := c.CreateKey(ctx, &kms.CreateKeyInput{Tags: bad}); errCodeOf(err) != "TagException" {
			t.Errorf("CreateKey with tag %s: %v", *bad[0].TagKey, err)
		}
	}
	var many []types.Tag
	for i := range 50 {
		many = append(many, tag(fmt.Sprint("n", i), "v"))
	}
	if _, err := c.TagResource(ctx, &kms.TagResourceInput{KeyId: key, Tags: many}); errCodeOf(err) != "LimitExceededException" {
		t.Errorf("52 tags: %v", err)
	}
	if _, err := c.ListResourceTags(ctx, &kms.ListResourceTagsInput{KeyId: aws.String("00000000-0000-4000-8000-000000000000")}); errCodeOf(err) != "NotFoundException" {
		t.Errorf("tags of an unknown key: %v", err)
	}
	if _, err := c.ScheduleKeyDeletion(ctx, &kms.ScheduleKeyDeletionInput{KeyId: key, PendingWindowInDays: aws.Int32(7)}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.TagResource(ctx, &kms.TagResourceInput{KeyId: key, Tags: []types.Tag{tag("x", "y")}}); errCodeOf(err) != "KMSInvalidStateException" {
		t.Errorf("tagging a key pending deletion: %v", err)
	}
}

// TestAliasLifecycle: UpdateAlias moves an alias, DeleteAlias removes it.
func TestAliasLifecycle(t *testing.T) {
	srv, _ := serve(t)
	ctx := context.Background()
	c := sdk(srv.URL, "AKIDHEMDTEST", "s3cr3t")
	a, _ := c.CreateKey(ctx, &kms.CreateKeyInput{})
	b, _ := c.CreateKey(ctx, &kms.CreateKeyInput{})
	if _, err := c.CreateAlias(ctx, &kms.CreateAliasInput{AliasName: aws.String("alias/app"), TargetKeyId: a.KeyMetadata.KeyId}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.UpdateAlias(ctx, &kms.UpdateAliasInput{AliasName: aws.String("alias/app"), TargetKeyId: b.KeyMetadata.Arn}); err != nil {
		t.Fatal(err)
	}
	d, err := c.DescribeKey(ctx, &kms.DescribeKeyInput{KeyId: aws.String("alias/app")})
	if err != nil || *d.KeyMetadata.KeyId != *b.KeyMetadata.KeyId {
		t.Fatalf("alias/app after UpdateAlias: %v", err)
	}
	if _, err := c.UpdateAlias(ctx, &kms.UpdateAliasInput{AliasName: aws.String("alias/none"), TargetKeyId: b.KeyMetadata.KeyId}); errCodeOf(err) != "NotFoundException" {
		t.Errorf("UpdateAlias of a missing alias: %v", err)
	}
	if _, err := c.DeleteAlias(ctx, &kms.DeleteAliasInput{AliasName: aws.String("alias/app")}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.DescribeKey(ctx, &kms.DescribeKeyInput{KeyId: aws.String("alias/app")}); errCodeOf(err) != "NotFoundException" {
		t.Errorf("a deleted alias: %v", err)
	}
	if _, err := c.DeleteAlias(ctx, &kms.DeleteAliasInput{AliasName: aws.String("alias/app")}); errCodeOf(err) != "NotFoundException" {
		t.Errorf("deleting it again: %v", err)
	}
	if _, err := c.DescribeKey(ctx, &kms.DescribeKeyInput{KeyId: b.KeyMetadata.KeyId}); err != nil {
		t.Errorf("the key behind a deleted alias: %v", err)
	}
}

// TestDataSizes: whatever Encrypt accepts (1 to 4096 bytes), Decrypt and
// ReEncrypt return; GenerateRandom gives 1 to 1024 random bytes.
func TestDataSizes(t *testing.T) {
	srv, _ := serve(t)
	ctx := context.Background()
	c := sdk(srv.URL, "AKIDHEMDTEST", "s3cr3t")
	k1, _ := c.CreateKey(ctx, &kms.CreateKeyInput{})
	k2, _ := c.CreateKey(ctx, &kms.CreateKeyInput{})
	for _, n := range []int{1, 1024, 1025, 2000, 4095, 4096} {
		pt := bytes.Repeat([]byte{byte(n)}, n)
		enc, err := c.Encrypt(ctx, &kms.EncryptInput{KeyId: k1.KeyMetadata.KeyId, Plaintext: pt, EncryptionContext: vol})
		if err != nil {
			t.Fatalf("Encrypt %d bytes: %v", n, err)
		}
		d, err := c.Decrypt(ctx, &kms.DecryptInput{CiphertextBlob: enc.CiphertextBlob, EncryptionContext: vol, KeyId: k1.KeyMetadata.Arn})
		if err != nil || !bytes.Equal(d.Plaintext, pt) {
			t.Fatalf("Decrypt %d bytes: %v", n, err)
		}
		re, err := c.ReEncrypt(ctx, &kms.ReEncryptInput{CiphertextBlob: enc.CiphertextBlob, SourceEncryptionContext: vol,
			DestinationKeyId: k2.KeyMetadata.KeyId, SourceKeyId: k1.KeyMetadata.KeyId})
		if err != nil || *re.SourceKeyId != *k1.KeyMetadata.Arn || *re.KeyId != *k2.KeyMetadata.Arn {
			t.Fatalf("ReEncrypt %d bytes: %+v %v", n, re, err)
		}
		d2, err := c.Decrypt(ctx, &kms.DecryptInput{CiphertextBlob: re.CiphertextBlob})
		if err != nil || !bytes.Equal(d2.Plaintext, pt) {
			t.Fatalf("Decrypt %d bytes re-encrypted: %v", n, err)
		}
	}
	if _, err := c.Encrypt(ctx, &kms.EncryptInput{KeyId: k1.KeyMetadata.KeyId, Plaintext: make([]byte, 4097)}); errCodeOf(err) != "ValidationException" {
		t.Errorf("Encrypt 4097 bytes: %v", err)
	}
	enc, _ := c.Encrypt(ctx, &kms.EncryptInput{KeyId: k1.KeyMetadata.KeyId, Plaintext: []byte("x")})
	if _, err := c.Decrypt(ctx, &kms.DecryptInput{CiphertextBlob: enc.CiphertextBlob, KeyId: k2.KeyMetadata.KeyId}); errCodeOf(err) != "IncorrectKeyException" {
		t.Errorf("Decrypt naming another key: %v", err)
	}
	if _, err := c.ReEncrypt(ctx, &kms.ReEncryptInput{CiphertextBlob: enc.CiphertextBlob, SourceKeyId: k2.KeyMetadata.KeyId, DestinationKeyId: k2.KeyMetadata.KeyId}); errCodeOf(err) != "IncorrectKeyException" {
		t.Errorf("ReEncrypt naming another source key: %v", err)
	}
	r1, err := c.GenerateRandom(ctx, &kms.GenerateRandomInput{NumberOfBytes: aws.Int32(32)})
	if err != nil || len(r1.Plaintext) != 32 {
		t.Fatalf("GenerateRandom: %v", err)
	}
	r2, _ := c.GenerateRandom(ctx, &kms.GenerateRandomInput{NumberOfBytes: aws.Int32(32)})
	if bytes.Equal(r1.Plaintext, r2.Plaintext) {
		t.Fatal("GenerateRandom returned the same bytes twice")
	}
	for _, n := range []int32{0, 1025} {
		if _, err := c.GenerateRandom(ctx, &kms.GenerateRandomInput{NumberOfBytes: aws.Int32(n)}); errCodeOf(err) != "ValidationException" {
			t.Errorf("GenerateRandom %d: %v", n, err)
		}
	}
	if _, err := c.GenerateDataKey(ctx, &kms.GenerateDataKeyInput{KeyId: k1.KeyMetadata.KeyId, KeySpec: types.DataKeySpecAes256, NumberOfBytes: aws.Int32(32)}); errCodeOf(err) != "ValidationException" {
		t.Errorf("GenerateDataKey with KeySpec and NumberOfBytes: %v", err)
	}
}

// TestRetireGrantByToken: a grant's retiring principal retires it by the
// token CreateGrant returned.
func TestRetireGrantByToken(t *testing.T) {
	srv, _, _ := serveWith(t, "", Principal{AccessKeyID: "AKIDADMIN", SecretAccessKey: "a", Name: "admin"},
		Principal{AccessKeyID: "AKIDHOST", SecretAccessKey: "h", Name: "host-1", GrantsOnly: true})
	ctx := context.Background()
	admin, host := sdk(srv.URL, "AKIDADMIN", "a"), sdk(srv.URL, "AKIDHOST", "h")
	ck, _ := admin.CreateKey(ctx, &kms.CreateKeyInput{})
	g, err := admin.CreateGrant(ctx, &kms.CreateGrantInput{KeyId: ck.KeyMetadata.KeyId, GranteePrincipal: aws.String("host-1"),
		RetiringPrincipal: aws.String("host-1"), Operations: []types.GrantOperation{types.GrantOperationDecrypt}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := host.RetireGrant(ctx, &kms.RetireGrantInput{GrantToken: aws.String("bogus")}); errCodeOf(err) != "InvalidGrantTokenException" {
		t.Errorf("a bogus token: %v", err)
	}
	if _, err := host.RetireGrant(ctx, &kms.RetireGrantInput{GrantToken: g.GrantToken}); err != nil {
		t.Fatalf("RetireGrant by token: %v", err)
	}
	lg, err := admin.ListGrants(ctx, &kms.ListGrantsInput{KeyId: ck.KeyMetadata.KeyId})
	if err != nil || len(lg.Grants) != 0 {
		t.Fatalf("grants after retiring: %+v %v", lg, err)
	}
	if _, err := host.RetireGrant(ctx, &kms.RetireGrantInput{GrantToken: g.GrantToken}); errCodeOf(err) != "NotFoundException" {
		t.Errorf("retiring it again: %v", err)
	}
}

// TestWireShapes: empty lists are [], not null; client errors are HTTP 400
// and the KMS's own failures 500; AWS operations hemd lacks are
// UnsupportedOperationException, other names UnknownOperationException.
func TestWireShapes(t *testing.T) {
	srv, _, dir := serveWith(t, "", Principal{AccessKeyID: "AKIDHEMDTEST", SecretAccessKey: "s3cr3t", Name: "test"})
	_, out := rawCall(t, srv.URL, "CreateKey", `{}`)
	id := out["KeyMetadata"].(map[string]any)["KeyId"].(string)
	for op, field := range map[string]string{"ListAliases": "Aliases", "ListGrants": "Grants", "ListResourceTags": "Tags", "ListRetirableGrants": "Grants"} {
		status, out := rawCall(t, srv.URL, op, `{"KeyId":"`+id+`","RetiringPrincipal":"nobody"}`)
		if list, ok := out[field].([]any); status != 200 || !ok || len(list) != 0 || out["Truncated"] != false {
			t.Errorf("%s: HTTP %d %v", op, status, out)
		}
	}
	for _, tc := range []struct {
		op, body, typ string
		status        int
	}{
		{"DescribeKey", `{"KeyId":"alias/none"}`, "NotFoundException", 400},
		{"DescribeKey", `{}`, "ValidationException", 400},
		{"DescribeKey", `{"KeyId":`, "SerializationException", 400},
		{"GetKeyPolicy", `{"KeyId":"` + id + `","PolicyName":"default"}`, "UnsupportedOperationException", 400},
		{"Frobnicate", `{}`, "UnknownOperationException", 400},
		{"CreateKey", `{"KeySpec":"RSA_2048"}`, "UnsupportedOperationException", 400},
		{"CreateKey", `{"Policy":"{}"}`, "MalformedPolicyDocumentException", 400},
		{"Encrypt", `{"KeyId":"` + id + `","Plaintext":"eA==","EncryptionAlgorithm":"RSAES_OAEP_SHA_256"}`, "InvalidKeyUsageException", 400},
		{"Decrypt", `{"CiphertextBlob":"eA==","DryRun":true}`, "UnsupportedOperationException", 400},
	} {
		status, out := rawCall(t, srv.URL, tc.op, tc.body)
		if status != tc.status || out["__type"] != tc.typ || out["message"] == "" {
			t.Errorf("%s %s: HTTP %d %v, want %d %s", tc.op, tc.body, status, out, tc.status, tc.typ)
		}
	}
	// The KMS's own failure (its tag store unreadable): HTTP 500.
	if err := os.Mkdir(filepath.Join(dir, "tags.json"), 0o700); err != nil {
		t.Fatal(err)
	}
	status, out := rawCall(t, srv.URL, "ListResourceTags", `{"KeyId":"`+id+`"}`)
	if status != 500 || out["__type"] != "KMSInternalException" {
		t.Errorf("internal failure: HTTP %d %v", status, out)
	}
}

// TestClientRegion: the client signs for the configured region, except
// for a key whose ARN names another: the ARN wins, with one warning, and
// Decrypt of a blob under that key follows it.
func TestClientRegion(t *testing.T) {
	srv, k, _ := serveWith(t, "eu-west-1", Principal{AccessKeyID: "AKIDHEMDTEST", SecretAccessKey: "s3cr3t", Name: "test"})
	ctx := context.Background()
	m, err := k.CreateKey(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	c := NewClient(srv.URL, "local", "AKIDHEMDTEST", "s3cr3t")
	c.Log = slog.New(slog.NewTextHandler(&logs, nil))
	if _, _, err := c.GenerateDataKeyWithoutPlaintext(ctx, m.KeyID, vol); !errors.Is(err, &hsm.Error{Type: "InvalidSignatureException"}) ||
		!strings.Contains(err.Error(), "valid region, not 'local'") {
		t.Fatalf("a bare key id signed for the configured region: %v", err)
	}
	blob, arn, err := c.GenerateDataKeyWithoutPlaintext(ctx, m.Arn, vol)
	if err != nil || arn != m.Arn {
		t.Fatalf("by ARN: %v", err)
	}
	fresh := NewClient(srv.URL, "local", "AKIDHEMDTEST", "s3cr3t")
	if err := fresh.CheckKey(ctx, m.Arn); err != nil {
		t.Fatalf("CheckKey by ARN: %v", err)
	}
	dst := make([]byte, hsm.DataKeySize)
	for _, cl := range []*Client{c, fresh} {
		if _, err := cl.Decrypt(ctx, blob, vol, dst); err != nil {
			t.Fatalf("Decrypt after the key's ARN was seen: %v", err)
		}
	}
	if n := strings.Count(logs.String(), "key_region=eu-west-1"); n != 1 {
		t.Fatalf("%d warnings:\n%s", n, logs.String())
	}
	same := NewClient(srv.URL, "eu-west-1", "AKIDHEMDTEST", "s3cr3t")
	same.Log = c.Log
	if _, _, err := same.GenerateDataKeyWithoutPlaintext(ctx, m.KeyID, vol); err != nil {
		t.Fatalf("configured region: %v", err)
	}
	if _, _, err := same.GenerateDataKeyWithoutPlaintext(ctx, m.Arn, vol); err != nil || strings.Count(logs.String(), "key_region") != 1 {
		t.Fatalf("ARN of the configured region: %v\n%s", err, logs.String())
	}
}
