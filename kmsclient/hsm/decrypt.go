package hsm

/*
#cgo LDFLAGS: -ldl
#include <dlfcn.h>
#include <stdlib.h>

typedef unsigned long ck_ulong;
// C_Encrypt and C_Decrypt have the same signature, as have C_EncryptInit and
// C_DecryptInit.
typedef ck_ulong (*ck_crypt_fn)(ck_ulong session, unsigned char *in, ck_ulong inlen, unsigned char *out, ck_ulong *outlen);
typedef ck_ulong (*ck_init_fn)(ck_ulong session, void *mechanism, ck_ulong key);
typedef ck_ulong (*ck_get_function_list_fn)(void **list);

// The CK_FUNCTION_LIST of PKCS#11 2.x: a CK_VERSION (2 bytes) then the
// function pointers in the order of the standard, counted from 0:
// C_EncryptInit is 29, C_Encrypt 30, C_DecryptInit 33, C_Decrypt 34.
struct ck_function_list {
	unsigned char version[2];
	void *fn[68];
};

static void *hemd_function_list(const char *module) {
	void *h = dlopen(module, RTLD_NOW | RTLD_NOLOAD);
	if (h == NULL) return NULL;
	ck_get_function_list_fn gfl = (ck_get_function_list_fn)dlsym(h, "C_GetFunctionList");
	void *list = NULL;
	if (gfl == NULL || gfl(&list) != 0) return NULL;
	return list;
}

static void *hemd_fn(void *list, int i) {
	return ((struct ck_function_list *)list)->fn[i];
}

static void *hemd_dlsym(const char *module, const char *name) {
	void *h = dlopen(module, RTLD_NOW | RTLD_NOLOAD);
	return h == NULL ? NULL : dlsym(h, name);
}

static ck_ulong hemd_crypt(void *fn, ck_ulong session, unsigned char *in, ck_ulong inlen, unsigned char *out, ck_ulong *outlen) {
	return ((ck_crypt_fn)fn)(session, in, inlen, out, outlen);
}

static ck_ulong hemd_init_null(void *fn, ck_ulong session) {
	return ((ck_init_fn)fn)(session, NULL, 0);
}
*/
import "C"

import (
	"fmt"
	"sync"
	"unsafe"

	"github.com/miekg/pkcs11"
	"golang.org/x/sys/unix"
)

// Indices in the CK_FUNCTION_LIST.
const (
	fnEncryptInit = 29
	fnEncrypt     = 30
	fnDecryptInit = 33
	fnDecrypt     = 34
)

// rawOps are the module's C_EncryptInit, C_Encrypt, C_DecryptInit and
// C_Decrypt, called directly: for the locked decrypt below, and to end an
// operation whose single-part call failed (see endOp), which needs calls
// miekg/pkcs11 does not make (a NULL mechanism, a NULL output buffer).
type rawOps struct {
	encryptInit, encrypt, decryptInit, decrypt unsafe.Pointer
	// cancelByInit: the module speaks Cryptoki 3.0, where C_EncryptInit or
	// C_DecryptInit with a NULL mechanism cancels the active operation.
	cancelByInit bool
}

func newRawOps(module string, cryptoki3 bool) (*rawOps, error) {
	cm := C.CString(module)
	defer C.free(unsafe.Pointer(cm))
	list := C.hemd_function_list(cm)
	if list == nil {
		return nil, fmt.Errorf("kms: no function list in %s", module)
	}
	r := &rawOps{
		encryptInit: C.hemd_fn(list, fnEncryptInit),
		encrypt:     C.hemd_fn(list, fnEncrypt),
		decryptInit: C.hemd_fn(list, fnDecryptInit),
		decrypt:     C.hemd_fn(list, fnDecrypt),
	}
	if r.encryptInit == nil || r.encrypt == nil || r.decryptInit == nil || r.decrypt == nil {
		return nil, fmt.Errorf("kms: C_Encrypt or C_Decrypt missing from %s's function list", module)
	}
	r.cancelByInit = cryptoki3
	return r, nil
}

// functions returns the functions of module's function list at the given
// indices (nil for one it lacks), or nil when the list cannot be had.
func functions(module string, idx ...int) []unsafe.Pointer {
	cm := C.CString(module)
	defer C.free(unsafe.Pointer(cm))
	list := C.hemd_function_list(cm)
	if list == nil {
		return nil
	}
	out := make([]unsafe.Pointer, len(idx))
	for i, x := range idx {
		out[i] = C.hemd_fn(list, C.int(x))
	}
	return out
}

// symbol is a function of the module as it exports it by name (tests check
// that the function list gives the same functions).
func symbol(module, name string) unsafe.Pointer {
	cm := C.CString(module)
	defer C.free(unsafe.Pointer(cm))
	cn := C.CString(name)
	defer C.free(unsafe.Pointer(cn))
	return C.hemd_dlsym(cm, cn)
}

// crypt calls C_Encrypt or C_Decrypt (fn) on in; out nil asks for the
// output length only.
func crypt(fn unsafe.Pointer, sh pkcs11.SessionHandle, in, out []byte) (int, pkcs11.Error) {
	var outp *C.uchar
	outlen := C.ck_ulong(len(out))
	if len(out) > 0 {
		outp = (*C.uchar)(unsafe.Pointer(&out[0]))
	}
	rv := C.hemd_crypt(fn, C.ck_ulong(sh), (*C.uchar)(unsafe.Pointer(&in[0])), C.ck_ulong(len(in)), outp, &outlen)
	return int(outlen), pkcs11.Error(rv)
}

// opKind is a kind of PKCS#11 operation hemd initialises on a session.
type opKind int

const (
	opEncrypt opKind = iota
	opDecrypt
)

func (o opKind) String() string { return [...]string{"encrypt", "decrypt"}[o] }

// endOp ends the encrypt or decrypt operation on sh that hemd initialised
// and whose single-part call failed, if it is still active: PKCS#11 keeps
// an operation active after CKR_BUFFER_TOO_SMALL, after a length query, and
// whenever the caller gives up between Init and the call. It returns nil
// only once the module has said there is no such operation on sh
// (CKR_OPERATION_NOT_INITIALIZED); otherwise the caller must not return sh
// to the pool.
//
// The ways, cheapest first: none (a failed C_Encrypt/C_Decrypt other than
// CKR_BUFFER_TOO_SMALL already ended it); C_*Init with a NULL mechanism
// (Cryptoki 3.0; SoftHSM2 2.6 answers CKR_ARGUMENTS_BAD, so it is only tried
// on 3.0 modules); a finishing single-part call with an output buffer large
// enough, which ends it whatever it returns. Its input is one GCM tag of
// zeros: decrypting it yields no plaintext (the tag does not match),
// encrypting it yields a ciphertext under an IV no blob uses, and both are
// discarded.
func (r *rawOps) endOp(sh pkcs11.SessionHandle, kind opKind) error {
	init, fn, name := r.encryptInit, r.encrypt, "C_Encrypt"
	if kind == opDecrypt {
		init, fn, name = r.decryptInit, r.decrypt, "C_Decrypt"
	}
	var in [tagLen]byte
	// A length query: CKR_OPERATION_NOT_INITIALIZED when no operation is
	// active; when one is, CKR_OK and the operation stays.
	probe := func() pkcs11.Error {
		_, rv := crypt(fn, sh, in[:], nil)
		return rv
	}
	rv := probe()
	if rv == pkcs11.CKR_OPERATION_NOT_INITIALIZED {
		return nil
	}
	if r.cancelByInit {
		C.hemd_init_null(init, C.ck_ulong(sh))
		if rv = probe(); rv == pkcs11.CKR_OPERATION_NOT_INITIALIZED {
			return nil
		}
	}
	out := make([]byte, 4*tagLen)
	_, frv := crypt(fn, sh, in[:], out)
	clear(out)
	if rv = probe(); rv == pkcs11.CKR_OPERATION_NOT_INITIALIZED {
		return nil
	}
	return fmt.Errorf("%s operation still active after a finishing %s (%v): the session answers %v", kind, name, frv, rv)
}

// scratchSize holds the longest plaintext (maxPlaintext) with room to spare:
// SoftHSM2 wants an output buffer as long as the ciphertext and its tag.
const scratchSize = 8192

// lockedDecrypt calls the module's C_Decrypt with an output buffer in locked
// memory hemd owns. miekg/pkcs11's Decrypt returns the plaintext through a
// malloc'd buffer that it frees without wiping, which would leave a data key
// in the C heap; this path leaves none: the plaintext goes from the HSM into
// the locked scratch pages, then into the caller's (locked) dst, and the
// scratch is wiped.
type lockedDecrypt struct {
	fn      unsafe.Pointer
	mu      sync.Mutex
	scratch []byte
	bufMu   sync.Mutex
	buf     []byte
}

func newLockedDecrypt(raw *rawOps) (*lockedDecrypt, error) {
	p, err := unix.Mmap(-1, 0, scratchSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, fmt.Errorf("kms: scratch pages: %w", err)
	}
	if err := unix.Mlock(p); err != nil {
		unix.Munmap(p)
		return nil, fmt.Errorf("kms: mlock scratch pages: %w (raise RLIMIT_MEMLOCK)", err)
	}
	unix.Madvise(p, unix.MADV_DONTDUMP)
	unix.Madvise(p, unix.MADV_DONTFORK)
	return &lockedDecrypt{fn: raw.decrypt, scratch: p}, nil
}

// decrypt runs C_Decrypt on a session on which C_DecryptInit succeeded and
// writes the plaintext into dst. On error the operation may still be active
// (CKR_BUFFER_TOO_SMALL, or a ciphertext refused here): the caller ends it.
func (d *lockedDecrypt) decrypt(sh pkcs11.SessionHandle, ct, dst []byte) (int, error) {
	if len(ct) == 0 || len(ct) > len(d.scratch) {
		return 0, kmsErr(ErrInvalidCiphertext, "ciphertext of %d bytes", len(ct))
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	defer clear(d.scratch)
	n, rv := crypt(d.fn, sh, ct, d.scratch) // ct is not secret and outlives the call
	if rv != pkcs11.CKR_OK {
		return 0, rv
	}
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

// lockedBuf lends a locked page for ReEncrypt's plaintext (maxPlaintext).
func (d *lockedDecrypt) lockedBuf() []byte {
	d.bufMu.Lock()
	if d.buf == nil {
		p, err := unix.Mmap(-1, 0, maxPlaintext, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
		if err == nil {
			unix.Mlock(p)
			unix.Madvise(p, unix.MADV_DONTDUMP)
			d.buf = p
		} else {
			d.buf = make([]byte, maxPlaintext)
		}
	}
	return d.buf
}

func (d *lockedDecrypt) releaseBuf(b []byte) {
	clear(b)
	d.bufMu.Unlock()
}
