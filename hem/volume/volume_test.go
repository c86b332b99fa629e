package volume

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// fakeKMS wraps data keys with AES-GCM under one key per CMK, with the
// encryption context as AAD: enough of the KMS's semantics for volumes.
type fakeKMS struct {
	keys     map[string][]byte
	decrypts int
}

var errContext = errors.New("InvalidCiphertextException")

func newFakeKMS(ids ...string) *fakeKMS {
	k := &fakeKMS{keys: map[string][]byte{}}
	for _, id := range ids {
		b := make([]byte, 32)
		rand.Read(b)
		k.keys[id] = b
	}
	return k
}

func (k *fakeKMS) gcm(id string) cipher.AEAD {
	b, _ := aes.NewCipher(k.keys[id])
	g, _ := cipher.NewGCM(b)
	return g
}

func aad(ectx map[string]string) []byte { b, _ := json.Marshal(ectx); return b }

func (k *fakeKMS) GenerateDataKeyWithoutPlaintext(_ context.Context, id string, ectx map[string]string) ([]byte, string, error) {
	if _, ok := k.keys[id]; !ok {
		return nil, "", errors.New("NotFoundException")
	}
	dek := make([]byte, 64)
	rand.Read(dek)
	nonce := make([]byte, 12)
	rand.Read(nonce)
	blob := append([]byte(id+"|"), nonce...)
	return k.gcm(id).Seal(blob, nonce, dek, aad(ectx)), "arn:" + id, nil
}

func (k *fakeKMS) Decrypt(_ context.Context, blob []byte, ectx map[string]string, dst []byte) (string, error) {
	k.decrypts++
	i := bytes.IndexByte(blob, '|')
	if i < 0 {
		return "", errContext
	}
	id := string(blob[:i])
	if _, ok := k.keys[id]; !ok {
		return "", errContext
	}
	pt, err := k.gcm(id).Open(nil, blob[i+1:i+13], blob[i+13:], aad(ectx))
	if err != nil {
		return "", errContext
	}
	copy(dst, pt)
	return "arn:" + id, nil
}

func image(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i/512) + byte(i%251)
	}
	copy(b, "HEMD PLAINTEXT MARKER")
	return b
}

func export(t *testing.T, kms KMS, v *Volume) []byte {
	t.Helper()
	var out bytes.Buffer
	if err := v.Export(context.Background(), kms, &out, nil); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

func TestCreateImportExport(t *testing.T) {
	dir := t.TempDir()
	kms := newFakeKMS("k1")
	v, err := Create(context.Background(), kms, filepath.Join(dir, "v"), CreateOptions{Size: 4 << 20, KeyID: "k1"})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	h := v.Head
	if !ValidVolumeID(h.VolumeID) || h.EncryptionContext[ContextKey] != h.VolumeID || h.KeyID != "arn:k1" {
		t.Fatalf("header %+v", h)
	}
	img := image(3<<20 + 1000) // not a whole number of blocks: padded
	var steps int
	if err := v.Import(context.Background(), kms, bytes.NewReader(img), int64(len(img)), ImportOptions{Source: "img", Progress: func(done, total int64) { steps++ }}); err != nil {
		t.Fatal(err)
	}
	if steps < 4 {
		t.Fatalf("progress called %d times", steps)
	}
	raw, _ := os.ReadFile(v.Path())
	if bytes.Contains(raw, []byte("HEMD PLAINTEXT MARKER")) || bytes.Contains(raw, img[4096:4096+64]) {
		t.Fatal("plaintext in the volume file")
	}
	got := export(t, kms, v)
	want := append(append([]byte(nil), img...), make([]byte, 4<<20-len(img))...)
	if !bytes.Equal(got[:len(img)], img) || len(got) != 4<<20 || !bytes.Equal(got[len(img):len(img)+24], want[len(img):len(img)+24]) {
		t.Fatal("export differs from the imported image")
	}
	// Reopened, the header is the same.
	v2, err := Open(v.Path(), true)
	if err != nil {
		t.Fatal(err)
	}
	defer v2.Close()
	if v2.Head.VolumeID != h.VolumeID || !bytes.Equal(v2.Head.WrappedDEK, h.WrappedDEK) {
		t.Fatal("reopened header differs")
	}
}

func TestSnapshots(t *testing.T) {
	dir := t.TempDir()
	kms := newFakeKMS("k1", "k2")
	ctx := context.Background()
	v, err := Create(ctx, kms, filepath.Join(dir, "v"), CreateOptions{Size: 2 << 20, KeyID: "k1"})
	if err != nil {
		t.Fatal(err)
	}
	img := image(2 << 20)
	if err := v.Import(ctx, kms, bytes.NewReader(img), int64(len(img)), ImportOptions{Source: "img"}); err != nil {
		t.Fatal(err)
	}
	snap, err := v.Snapshot(ctx, filepath.Join(dir, "s"), "")
	if err != nil {
		t.Fatal(err)
	}
	if !ValidSnapshotID(snap.Head.VolumeID) || !bytes.Equal(snap.Head.WrappedDEK, v.Head.WrappedDEK) ||
		snap.Head.EncryptionContext[ContextKey] != v.Head.VolumeID {
		t.Fatalf("snapshot does not share the volume's key: %+v", snap.Head)
	}
	// A volume from the snapshot: same key, same data, parent recorded.
	v2, err := Create(ctx, kms, filepath.Join(dir, "v2"), CreateOptions{Parent: snap.Path()})
	if err != nil {
		t.Fatal(err)
	}
	if v2.Head.ParentSnapshot != snap.Head.VolumeID || !bytes.Equal(v2.Head.WrappedDEK, v.Head.WrappedDEK) {
		t.Fatalf("volume from snapshot: %+v", v2.Head)
	}
	if !bytes.Equal(export(t, kms, v2), img) {
		t.Fatal("volume from snapshot reads different data")
	}
	// A copy under another key: new wrapped key and context, same data.
	cp, err := snap.CopySnapshot(ctx, kms, filepath.Join(dir, "c"), "k2", "")
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(cp.Head.WrappedDEK, snap.Head.WrappedDEK) || cp.Head.KeyID != "arn:k2" ||
		cp.Head.EncryptionContext[ContextKey] != cp.Head.VolumeID {
		t.Fatalf("copy header: %+v", cp.Head)
	}
	if !bytes.Equal(export(t, kms, cp), img) {
		t.Fatal("copied snapshot reads different data")
	}
	a, _ := os.ReadFile(snap.Path())
	b, _ := os.ReadFile(cp.Path())
	if bytes.Equal(a[DataOffset:DataOffset+4096], b[DataOffset:DataOffset+4096]) {
		t.Fatal("copy was not re-encrypted")
	}
	if _, err := Create(ctx, kms, filepath.Join(dir, "bad"), CreateOptions{Parent: v.Path()}); err == nil {
		t.Fatal("created a volume from a volume that is not a snapshot")
	}
}

// A wrapped key swapped in from another volume does not unwrap: its
// encryption context names the other volume.
func TestSwappedKeyFails(t *testing.T) {
	dir := t.TempDir()
	kms := newFakeKMS("k1")
	ctx := context.Background()
	a, _ := Create(ctx, kms, filepath.Join(dir, "a"), CreateOptions{Size: 1 << 20, KeyID: "k1"})
	b, _ := Create(ctx, kms, filepath.Join(dir, "b"), CreateOptions{Size: 1 << 20, KeyID: "k1"})
	h := *a.Head
	h.WrappedDEK = b.Head.WrappedDEK
	if err := Write(a.f, &h); err != nil {
		t.Fatal(err)
	}
	a.Close()
	a, err := Open(a.Path(), false)
	if err != nil {
		t.Fatal(err)
	}
	err = a.Export(ctx, kms, new(bytes.Buffer), nil)
	if !errors.Is(err, errContext) {
		t.Fatalf("swapped key: %v", err)
	}
}

func TestCreateErrors(t *testing.T) {
	dir := t.TempDir()
	kms := newFakeKMS("k1")
	ctx := context.Background()
	cases := map[string]CreateOptions{
		"no key":       {Size: 1 << 20},
		"unknown key":  {Size: 1 << 20, KeyID: "nope"},
		"bad size":     {Size: 1000, KeyID: "k1"},
		"bad block":    {Size: 1 << 20, KeyID: "k1", BlockSize: 1024},
		"bad id":       {Size: 1 << 20, KeyID: "k1", ID: "vol-1"},
		"missing snap": {Parent: filepath.Join(dir, "missing")},
	}
	for name, o := range cases {
		if _, err := Create(ctx, kms, filepath.Join(dir, name), o); err == nil {
			t.Errorf("%s: created", name)
		}
		if _, err := os.Stat(filepath.Join(dir, name)); err == nil {
			t.Errorf("%s: file left behind", name)
		}
	}
	if _, err := Create(ctx, kms, filepath.Join(dir, "x"), CreateOptions{Size: 1 << 20, KeyID: "k1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := Create(ctx, kms, filepath.Join(dir, "x"), CreateOptions{Size: 1 << 20, KeyID: "k1"}); err == nil {
		t.Fatal("overwrote an existing file")
	}
}
