package blk

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hemd/hemd/storage"
)

// goneStore is a Store whose storage cannot serve I/O now (an RBD image
// whose cluster is down).
type goneStore struct {
	*storage.File
	err error
}

func (s goneStore) Reachable(context.Context) error { return s.err }

// A volume whose storage is unreachable is refused before the front-end
// sees the disk, the error naming the volume and the storage's reason; once
// it is back, the volume is served.
func TestCheckRefusesUnreachableStore(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := storage.Open(path, storage.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	gone := errors.New("rbd:pool/img on cluster x: none of its 1 OSDs is up")
	st := &goneStore{File: f, err: gone}
	d, err := New(Config{ID: "vol-0123456789abcdef0", Store: st})
	if err != nil {
		t.Fatal(err)
	}
	err = d.Check(context.Background())
	if !errors.Is(err, gone) || !strings.Contains(err.Error(), "vol-0123456789abcdef0") {
		t.Fatalf("Check with the storage gone: %v", err)
	}
	st.err = nil
	if err := d.Check(context.Background()); err != nil {
		t.Fatalf("Check with the storage back: %v", err)
	}
}
