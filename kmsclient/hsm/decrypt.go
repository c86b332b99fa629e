package hsm

/*
#cgo LDFLAGS: -ldl
#include <dlfcn.h>
#include <stdlib.h>

typedef unsigned long ck_ulong;
typedef ck_ulong (*ck_decrypt_fn)(ck_ulong session, unsigned char *in, ck_ulong inlen, unsigned char *out, ck_ulong *outlen);
typedef ck_ulong (*ck_get_function_list_fn)(void **list);

// The CK_FUNCTION_LIST of PKCS#11 2.x: a CK_VERSION (2 bytes) then the
// function pointers in the order of the standard; C_Decrypt is the 35th.
struct ck_function_list {
	unsigned char version[2];
	void *fn[68];
};

static void *hemd_find_decrypt(const char *module) {
	void *h = dlopen(module, RTLD_NOW | RTLD_NOLOAD);
	if (h == NULL) return NULL;
	ck_get_function_list_fn gfl = (ck_get_function_list_fn)dlsym(h, "C_GetFunctionList");
	void *list = NULL;
	if (gfl == NULL || gfl(&list) != 0 || list == NULL) return NULL;
	return ((struct ck_function_list *)list)->fn[34];
}

static void *hemd_dlsym_decrypt(const char *module) {
	void *h = dlopen(module, RTLD_NOW | RTLD_NOLOAD);
	return h == NULL ? NULL : dlsym(h, "C_Decrypt");
}

static ck_ulong hemd_decrypt(void *fn, ck_ulong session, unsigned char *in, ck_ulong inlen, unsigned char *out, ck_ulong *outlen) {
	return ((ck_decrypt_fn)fn)(session, in, inlen, out, outlen);
}
*/
import "C"

import (
	"errors"
	"fmt"
	"sync"
	"unsafe"

	"github.com/miekg/pkcs11"
	"golang.org/x/sys/unix"
)

// lockedDecrypt calls the module's C_Decrypt with an output buffer in locked
// memory hemd owns. miekg/pkcs11's Decrypt returns the plaintext through a
// malloc'd buffer that it frees without wiping, which would leave a data key
// in the C heap; this path leaves none: the plaintext goes from the HSM into
// the locked scratch page, then into the caller's (locked) dst, and the
// scratch is wiped.
type lockedDecrypt struct {
	fn      unsafe.Pointer
	mu      sync.Mutex
	scratch []byte
	bufMu   sync.Mutex
	buf     []byte
}

func newLockedDecrypt(module string) (*lockedDecrypt, error) {
	cm := C.CString(module)
	defer C.free(unsafe.Pointer(cm))
	fn := C.hemd_find_decrypt(cm)
	if fn == nil {
		return nil, fmt.Errorf("kms: C_Decrypt not found in %s", module)
	}
	p, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, fmt.Errorf("kms: scratch page: %w", err)
	}
	if err := unix.Mlock(p); err != nil {
		unix.Munmap(p)
		return nil, fmt.Errorf("kms: mlock scratch page: %w (raise RLIMIT_MEMLOCK)", err)
	}
	unix.Madvise(p, unix.MADV_DONTDUMP)
	unix.Madvise(p, unix.MADV_DONTFORK)
	return &lockedDecrypt{fn: fn, scratch: p}, nil
}

// symbolDecrypt is C_Decrypt as the module exports it by name (tests check
// that the function list gives the same function).
func symbolDecrypt(module string) unsafe.Pointer {
	cm := C.CString(module)
	defer C.free(unsafe.Pointer(cm))
	return C.hemd_dlsym_decrypt(cm)
}

// decrypt runs C_Decrypt on a session on which C_DecryptInit succeeded and
// writes the plaintext into dst.
func (d *lockedDecrypt) decrypt(sh pkcs11.SessionHandle, ct, dst []byte) (int, error) {
	if len(ct) == 0 || len(ct) > len(d.scratch) {
		return 0, kmsErr(ErrInvalidCiphertext, "ciphertext of %d bytes", len(ct))
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	defer clear(d.scratch)
	in := C.CBytes(ct) // ciphertext: not secret
	defer C.free(in)
	outlen := C.ck_ulong(len(d.scratch))
	rv := C.hemd_decrypt(d.fn, C.ck_ulong(sh), (*C.uchar)(in), C.ck_ulong(len(ct)),
		(*C.uchar)(unsafe.Pointer(&d.scratch[0])), &outlen)
	if rv != 0 {
		return 0, pkcs11.Error(rv)
	}
	n := int(outlen)
	if n > len(dst) {
		return 0, kmsErr(ErrValidation, "plaintext of %d bytes does not fit %d", n, len(dst))
	}
	copy(dst, d.scratch[:n])
	return n, nil
}

func (d *lockedDecrypt) close() {
	if d != nil && d.scratch != nil {
		clear(d.scratch)
		unix.Munlock(d.scratch)
		unix.Munmap(d.scratch)
		d.scratch = nil
	}
}

// lockedBuf lends a second locked page for ReEncrypt's plaintext.
func (d *lockedDecrypt) lockedBuf() []byte {
	d.bufMu.Lock()
	if d.buf == nil {
		p, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
		if err == nil {
			unix.Mlock(p)
			unix.Madvise(p, unix.MADV_DONTDUMP)
			d.buf = p
		} else {
			d.buf = make([]byte, 4096)
		}
	}
	return d.buf
}

func (d *lockedDecrypt) releaseBuf(b []byte) {
	clear(b)
	d.bufMu.Unlock()
}

var errNoDecrypt = errors.New("kms: no locked decrypt")
