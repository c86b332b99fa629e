package hem

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"encoding/hex"
	"errors"
	"math/rand/v2"
	"testing"
)

// TestDecryptCBCVector: NIST SP 800-38A, F.2.6 (CBC-AES256.Decrypt).
func TestDecryptCBCVector(t *testing.T) {
	h := func(s string) []byte { b, _ := hex.DecodeString(s); return b }
	key := h("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
	iv := h("000102030405060708090a0b0c0d0e0f")
	ct := h("f58c4c04d6e5f1ba779eabfb5f7bfbd69cfc4e967edb808d679f777bc6702c7d" +
		"39f23369a9d9bacfa530e26304231461b2eb05e2c39be9fcda6c19078c6a9d1b")
	pt := h("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51" +
		"30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710")
	mem := bytes.Repeat([]byte{0xaa}, CBCScheduleSize+7)
	if err := DecryptCBC(mem, key, iv, ct); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(ct, pt) {
		t.Fatalf("got %x\nwant %x", ct, pt)
	}
	if !bytes.Equal(mem[:CBCScheduleSize], make([]byte, CBCScheduleSize)) {
		t.Fatal("the key schedules were not wiped")
	}
}

// TestDecryptCBCCrossCheck against crypto/cipher on seeded random inputs.
func TestDecryptCBCCrossCheck(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	mem := make([]byte, CBCScheduleSize)
	for blocks := 1; blocks <= 9; blocks++ {
		key, iv, pt := make([]byte, 32), make([]byte, 16), make([]byte, 16*blocks)
		for _, b := range [][]byte{key, iv, pt} {
			for i := range b {
				b[i] = byte(r.Uint32())
			}
		}
		c, _ := aes.NewCipher(key)
		ct := make([]byte, len(pt))
		cipher.NewCBCEncrypter(c, iv).CryptBlocks(ct, pt)
		if err := DecryptCBC(mem, key, iv, ct); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(ct, pt) {
			t.Fatalf("%d blocks: mismatch", blocks)
		}
	}
}

func TestDecryptCBCBadInput(t *testing.T) {
	mem := make([]byte, CBCScheduleSize)
	for _, c := range []struct {
		name         string
		mem, key, iv []byte
		buf          []byte
		want         error
	}{
		{"short key", mem, make([]byte, 16), make([]byte, 16), make([]byte, 16), ErrCBCInput},
		{"short iv", mem, make([]byte, 32), make([]byte, 8), make([]byte, 16), ErrCBCInput},
		{"partial block", mem, make([]byte, 32), make([]byte, 16), make([]byte, 17), ErrCBCInput},
		{"small memory", mem[:100], make([]byte, 32), make([]byte, 16), make([]byte, 16), ErrKeyMemory},
	} {
		if err := DecryptCBC(c.mem, c.key, c.iv, c.buf); !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
	}
}
