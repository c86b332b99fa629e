package hsm

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

// TestBlobFields breaks one field of a real blob at a time, of each
// version (a data key is a version 2 blob, Encrypt's a version 1), and
// expects exactly one error, type and message, from Decrypt.
func TestBlobFields(t *testing.T) {
	k, _ := open(t)
	ctx := context.Background()
	m, err := k.CreateKey(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	v2, _, err := k.GenerateDataKeyWithoutPlaintext(ctx, m.KeyID, vol)
	if err != nil {
		t.Fatal(err)
	}
	v1, _, err := k.Encrypt(ctx, m.KeyID, vol, bytes.Repeat([]byte{1}, 64))
	if err != nil {
		t.Fatal(err)
	}
	if v1[4] != blobV1 || v2[4] != blobV2 || len(v2) != headerLen+72 {
		t.Fatalf("blob versions %d (Encrypt) and %d (data key, %d bytes)", v1[4], v2[4], len(v2))
	}
	const mismatch = "the ciphertext or its encryption context does not match"
	unknown := uuidBytes("11111111-2222-4333-8444-555555555555")
	cases := []struct {
		name   string
		mutate func(b []byte) []byte
		want   *Error
		v2Want *Error // where version 2 differs
	}{
		{"empty", func(b []byte) []byte { return nil },
			&Error{"InvalidCiphertextException", "ciphertext blob of 0 bytes is too short"}, nil},
		{"header only", func(b []byte) []byte { return b[:headerLen] },
			&Error{"InvalidCiphertextException", "ciphertext blob of 38 bytes is too short"}, nil},
		{"no ciphertext, tag only", func(b []byte) []byte { return b[:headerLen+tagLen] },
			&Error{"InvalidCiphertextException", "ciphertext blob of 54 bytes is too short"},
			&Error{"InvalidCiphertextException", mismatch}}, // the shortest key wrap
		{"one byte short of the shortest", func(b []byte) []byte { return b[:headerLen+tagLen-1] },
			&Error{"InvalidCiphertextException", "ciphertext blob of 53 bytes is too short"}, nil},
		{"magic", func(b []byte) []byte { b[1] = 'X'; return b },
			&Error{"InvalidCiphertextException", "ciphertext blob has a bad magic"}, nil},
		{"version", func(b []byte) []byte { b[4] = 3; return b },
			&Error{"InvalidCiphertextException", "ciphertext blob version 3 is not supported"}, nil},
		{"other version", func(b []byte) []byte { b[4] = 3 - b[4]; return b },
			&Error{"InvalidCiphertextException", "ciphertext blob algorithm 1 is not supported"},
			&Error{"InvalidCiphertextException", "ciphertext blob algorithm 2 is not supported"}},
		{"algorithm", func(b []byte) []byte { b[5] = 7; return b },
			&Error{"InvalidCiphertextException", "ciphertext blob algorithm 7 is not supported"}, nil},
		{"key id", func(b []byte) []byte { copy(b[6:22], unknown[:]); return b },
			&Error{"NotFoundException", ""}, nil},
		{"backing-key version 0", func(b []byte) []byte { binary.BigEndian.PutUint32(b[22:26], 0); return b },
			&Error{"InvalidCiphertextException", "ciphertext names backing key version 0 of " + m.Arn}, nil},
		{"backing-key version ahead", func(b []byte) []byte { binary.BigEndian.PutUint32(b[22:26], 9); return b },
			&Error{"InvalidCiphertextException", "ciphertext names backing key version 9 of " + m.Arn}, nil},
		{"IV", func(b []byte) []byte { b[30] ^= 0x80; return b }, &Error{"InvalidCiphertextException", mismatch}, nil},
		{"ciphertext", func(b []byte) []byte { b[headerLen] ^= 0x80; return b }, &Error{"InvalidCiphertextException", mismatch}, nil},
		{"tag", func(b []byte) []byte { b[len(b)-1] ^= 0x80; return b }, &Error{"InvalidCiphertextException", mismatch}, nil},
		{"truncated tag", func(b []byte) []byte { return b[:len(b)-1] }, &Error{"InvalidCiphertextException", mismatch},
			&Error{"InvalidCiphertextException", "ciphertext blob version 2 wraps 71 bytes: not a wrapped data key"}},
		{"trailing byte", func(b []byte) []byte { return append(b, 0) }, &Error{"InvalidCiphertextException", mismatch},
			&Error{"InvalidCiphertextException", "ciphertext blob version 2 wraps 73 bytes: not a wrapped data key"}},
		{"trailing block", func(b []byte) []byte { return append(b, make([]byte, 8)...) }, &Error{"InvalidCiphertextException", mismatch}, nil},
	}
	for _, good := range [][]byte{v1, v2} {
		for _, c := range cases {
			t.Run(fmt.Sprintf("v%d/%s", good[4], c.name), func(t *testing.T) {
				want := c.want
				if good[4] == blobV2 && c.v2Want != nil {
					want = c.v2Want
				}
				_, err := k.Decrypt(ctx, c.mutate(append([]byte(nil), good...)), vol, make([]byte, 64))
				var ke *Error
				if !errors.As(err, &ke) || ke.Type != want.Type || (want.Message != "" && ke.Message != want.Message) {
					t.Fatalf("got %v, want %v", err, want)
				}
			})
		}
		if _, err := k.Decrypt(ctx, good, vol, make([]byte, 64)); err != nil {
			t.Fatalf("the unbroken blob: %v", err)
		}
	}
}

// TestDeletionDate: ScheduleKeyDeletion sets the date AWS reports, and
// CancelKeyDeletion clears it.
func TestDeletionDate(t *testing.T) {
	k, _ := open(t)
	ctx := context.Background()
	m, _ := k.CreateKey(ctx, "")
	if err := k.ScheduleKeyDeletion(ctx, m.KeyID, 10); err != nil {
		t.Fatal(err)
	}
	d, _ := k.DescribeKey(ctx, m.KeyID)
	if d.DeletionDate == nil || d.Enabled {
		t.Fatalf("after ScheduleKeyDeletion: %+v", d)
	}
	if days := time.Until(*d.DeletionDate).Hours() / 24; days < 9.9 || days > 10.1 {
		t.Fatalf("deletion in %.2f days, want 10", days)
	}
	if err := k.CancelKeyDeletion(ctx, m.KeyID); err != nil {
		t.Fatal(err)
	}
	if d, _ := k.DescribeKey(ctx, m.KeyID); d.DeletionDate != nil || d.KeyState != Disabled || d.Enabled {
		t.Fatalf("after CancelKeyDeletion: %+v", d)
	}
}

// TestAuditRecords: the io.Writer copy matches the file, every record is a
// CloudTrail-shaped KMS event, the caller named by WithPrincipal is its
// userIdentity, and no plaintext or ciphertext appears, raw or base64.
func TestAuditRecords(t *testing.T) {
	k, dir := open(t)
	var copyBuf bytes.Buffer
	k.SetAuditWriter(&copyBuf)
	ctx := WithPrincipal(context.Background(), Principal{Type: "IAMUser", Name: "host-a", AccessKeyID: "AKIDHOSTA"})
	m, _ := k.CreateKey(ctx, "")
	var secrets [][]byte
	blob, _, err := k.GenerateDataKeyWithoutPlaintext(ctx, m.KeyID, vol)
	if err != nil {
		t.Fatal(err)
	}
	dek := make([]byte, DataKeySize)
	if _, err := k.Decrypt(ctx, blob, vol, dek); err != nil {
		t.Fatal(err)
	}
	pt := make([]byte, 32)
	b2, _, err := k.GenerateDataKey(ctx, m.KeyID, vol, pt)
	if err != nil {
		t.Fatal(err)
	}
	msg := []byte("a secret message of forty bytes or so..")
	b3, _, err := k.Encrypt(ctx, m.KeyID, vol, msg)
	if err != nil {
		t.Fatal(err)
	}
	b4, _, err := k.ReEncrypt(ctx, b3, vol, m.KeyID, map[string]string{"aws:ebs:id": "vol-1"})
	if err != nil {
		t.Fatal(err)
	}
	k.Decrypt(ctx, blob, map[string]string{"aws:ebs:id": "vol-x"}, make([]byte, 64))
	for _, s := range [][]byte{dek, pt, msg, blob, b2, b3, b4} {
		secrets = append(secrets, s, s[len(s)-16:], []byte(base64.StdEncoding.EncodeToString(s)),
			[]byte(base64.RawStdEncoding.EncodeToString(s[:15])))
	}
	file, err := os.ReadFile(AuditPath(dir))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(file, copyBuf.Bytes()) {
		t.Fatal("the audit writer's copy differs from the audit log")
	}
	for i, s := range secrets {
		if bytes.Contains(file, s) {
			t.Fatalf("audit log holds key material (secret %d)", i)
		}
	}
	lines := strings.Split(strings.TrimSpace(string(file)), "\n")
	if len(lines) != 7 {
		t.Fatalf("%d audit records, want 7:\n%s", len(lines), file)
	}
	for _, l := range lines {
		var r map[string]any
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			t.Fatal(err)
		}
		for _, f := range []string{"eventVersion", "eventTime", "eventSource", "eventName", "userIdentity",
			"requestParameters", "responseElements", "eventID", "eventType", "resources"} {
			if _, ok := r[f]; !ok {
				t.Errorf("record lacks %s: %s", f, l)
			}
		}
		if r["eventSource"] != "kms.amazonaws.com" || r["responseElements"] != nil {
			t.Errorf("record: %s", l)
		}
		u := r["userIdentity"].(map[string]any)
		if u["userName"] != "host-a" || u["accessKeyId"] != "AKIDHOSTA" || u["type"] != "IAMUser" {
			t.Errorf("userIdentity %v", u)
		}
	}
	var last map[string]any
	json.Unmarshal([]byte(lines[len(lines)-1]), &last)
	if last["errorCode"] != "InvalidCiphertextException" || last["eventName"] != "Decrypt" {
		t.Errorf("last record: %v", last)
	}
	p := last["requestParameters"].(map[string]any)
	if p["keyId"] != m.Arn || p["encryptionContext"].(map[string]any)["aws:ebs:id"] != "vol-x" {
		t.Errorf("requestParameters %v", p)
	}
}

// FuzzContextRoundTrip: the context encoding decodes back to the same map,
// so two different contexts can never share an AAD.
func FuzzContextRoundTrip(f *testing.F) {
	f.Add("ab", "c", "a", "bc")
	f.Add("aws:ebs:id", "vol-0123456789abcdef0", "AWS:EBS:ID", "")
	f.Fuzz(func(t *testing.T, k1, v1, k2, v2 string) {
		in := map[string]string{k1: v1, k2: v2}
		p := canonicalContext(in)
		next := func() string {
			if len(p) < 4 {
				t.Fatalf("truncated encoding")
			}
			n := binary.BigEndian.Uint32(p)
			if uint32(len(p)-4) < n {
				t.Fatalf("truncated encoding")
			}
			s := string(p[4 : 4+n])
			p = p[4+n:]
			return s
		}
		n := binary.BigEndian.Uint32(p)
		p = p[4:]
		out := map[string]string{}
		prev := ""
		for i := uint32(0); i < n; i++ {
			k := next()
			if i > 0 && k <= prev {
				t.Fatalf("keys not strictly sorted: %q after %q", k, prev)
			}
			prev = k
			out[k] = next()
		}
		if len(p) != 0 || len(out) != len(in) {
			t.Fatalf("%q: %d trailing bytes, %d pairs", in, len(p), len(out))
		}
		for k, v := range in {
			if out[k] != v {
				t.Fatalf("%q decoded as %q", in, out)
			}
		}
	})
}
