package blk

import (
	"bytes"
	"context"
	"errors"
	"os"
	"testing"

	"github.com/hemd/hemd/hem"
)

// testKeys attaches a fixed XTS key.
type testKeys struct {
	unit     int
	checkErr error
	attachEr error
	attached int
	detached int
}

func testXTSKey() []byte {
	k := make([]byte, 64)
	for i := range k {
		k[i] = byte(i + 1)
	}
	return k
}

func (k *testKeys) Check(context.Context) error { return k.checkErr }
func (k *testKeys) Attach(context.Context) (Transform, error) {
	if k.attachEr != nil {
		return nil, k.attachEr
	}
	k.attached++
	return hem.NewXTS(testXTSKey(), k.unit)
}
func (k *testKeys) Detach() { k.detached++ }

func TestEncryptedReadWrite(t *testing.T) {
	for _, bs := range []uint32{512, 4096} {
		keys := &testKeys{unit: int(bs)}
		r := newRig(t, rigOpts{cfg: Config{Keys: keys, BlockSize: bs}})
		want := pattern(32<<10, 3)
		// Odd buffer splits make data units straddle guest buffers.
		for _, split := range []int{0, 4096, 1000, 512 + 8} {
			if st, _, _ := r.do(0, blkIO{typ: TypeOut, sector: 16, data: want, split: split}); st != StatusOK {
				t.Fatalf("bs %d split %d: write status %d", bs, split, st)
			}
			st, _, got := r.do(0, blkIO{typ: TypeIn, sector: 16, data: make([]byte, len(want)), write: true, split: split + 24*boolInt(split > 0)})
			if st != StatusOK || !bytes.Equal(got, want) {
				t.Fatalf("bs %d split %d: read back status %d equal %v", bs, split, st, bytes.Equal(got, want))
			}
		}
		// The file holds ciphertext: XTS of the data at unit numbers from 16*512/bs.
		onDisk, _ := os.ReadFile(r.path)
		onDisk = onDisk[16*512 : 16*512+len(want)]
		if bytes.Contains(onDisk, want[:64]) {
			t.Fatal("plaintext on disk")
		}
		x, _ := hem.NewXTS(testXTSKey(), int(bs))
		dec := make([]byte, len(onDisk))
		x.Decrypt(dec, onDisk, uint64(16*512/int(bs)))
		if !bytes.Equal(dec, want) {
			t.Fatalf("bs %d: file is not XTS(data) at the data-unit numbers", bs)
		}
		// Write zeroes writes encrypted zeros.
		seg := append(append(make([]byte, 0, 16), le64(16)...), le32(uint32(bs/512), 0)...)
		if st, _, _ := r.do(0, blkIO{typ: TypeWriteZeroes, data: seg}); st != StatusOK {
			t.Fatalf("write zeroes: %d", st)
		}
		if _, _, got := r.do(0, blkIO{typ: TypeIn, sector: 16, data: make([]byte, bs), write: true}); !bytes.Equal(got, make([]byte, bs)) {
			t.Fatal("zeroed block does not read as zeros")
		}
		if keys.attached != 1 {
			t.Fatalf("attached %d times", keys.attached)
		}
		r.c.StopQueue(0)
		if keys.detached != 1 {
			t.Fatalf("detached %d times after the ring stopped", keys.detached)
		}
	}
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// A failed attach fails closed: every request completes with IOERR.
func TestAttachFailsClosed(t *testing.T) {
	keys := &testKeys{unit: 512, attachEr: errors.New("key alias/prod is Disabled")}
	r := newRig(t, rigOpts{cfg: Config{Keys: keys}})
	if st, _, _ := r.do(0, blkIO{typ: TypeIn, data: make([]byte, 512), write: true}); st != StatusIOErr {
		t.Fatalf("read with failed attach: %d", st)
	}
	if st, _, _ := r.do(0, blkIO{typ: TypeOut, data: make([]byte, 512)}); st != StatusIOErr {
		t.Fatalf("write with failed attach: %d", st)
	}
	b, _ := os.ReadFile(r.path)
	if !bytes.Equal(b[:512], make([]byte, 512)) {
		t.Fatal("a write reached the file although the attach failed")
	}
}

// A key that fails its check refuses the front-end at GET_CONFIG.
func TestCheckRefusesFrontend(t *testing.T) {
	keys := &testKeys{unit: 512, checkErr: errors.New("KMS key alias/prod is Disabled")}
	r := newRig(t, rigOpts{cfg: Config{Keys: keys}})
	if _, err := r.c.Config(0, 8); err == nil {
		t.Fatal("GET_CONFIG answered although the key check failed")
	}
}
