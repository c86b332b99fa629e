package hsm

/*
#include <stdlib.h>
#include <string.h>

typedef unsigned long ck_ulong;
typedef struct { ck_ulong type; void *value; ck_ulong len; } ck_attr;
typedef struct { ck_ulong mechanism; void *param; ck_ulong len; } ck_mech;
typedef struct { unsigned char *data; ck_ulong len; } ck_string_data;

typedef ck_ulong (*ck_derive_fn)(ck_ulong, ck_mech *, ck_ulong, ck_attr *, ck_ulong, ck_ulong *);
typedef ck_ulong (*ck_create_fn)(ck_ulong, ck_attr *, ck_ulong, ck_ulong *);
typedef ck_ulong (*ck_getattr_fn)(ck_ulong, ck_ulong, ck_attr *, ck_ulong);

enum {
	A_CLASS = 0x0, A_TOKEN = 0x1, A_PRIVATE = 0x2, A_VALUE = 0x11, A_KEY_TYPE = 0x100,
	A_SENSITIVE = 0x103, A_ENCRYPT = 0x104, A_DECRYPT = 0x105, A_WRAP = 0x106, A_UNWRAP = 0x107,
	A_SIGN = 0x108, A_VERIFY = 0x10a, A_DERIVE = 0x10c, A_VALUE_LEN = 0x161, A_EXTRACTABLE = 0x162,
	O_SECRET_KEY = 4, K_AES = 0x1f, M_AES_ECB_ENCRYPT_DATA = 0x1104,
};

// hemd_derive_kek derives from base (CKM_AES_ECB_ENCRYPT_DATA over data) an
// AES-256 session key that can wrap and unwrap, and nothing else; it is
// sensitive and not extractable.
static ck_ulong hemd_derive_kek(void *fn, ck_ulong session, ck_ulong base, unsigned char *data, ck_ulong len, ck_ulong *out) {
	ck_ulong cls = O_SECRET_KEY, kt = K_AES, vlen = 32;
	unsigned char t = 1, f = 0;
	ck_attr tmpl[] = {
		{A_CLASS, &cls, sizeof cls}, {A_KEY_TYPE, &kt, sizeof kt}, {A_VALUE_LEN, &vlen, sizeof vlen},
		{A_TOKEN, &f, 1}, {A_PRIVATE, &t, 1}, {A_SENSITIVE, &t, 1}, {A_EXTRACTABLE, &f, 1},
		{A_WRAP, &t, 1}, {A_UNWRAP, &t, 1}, {A_ENCRYPT, &f, 1}, {A_DECRYPT, &f, 1},
		{A_SIGN, &f, 1}, {A_VERIFY, &f, 1}, {A_DERIVE, &f, 1},
	};
	ck_string_data sd = {data, len};
	ck_mech m = {M_AES_ECB_ENCRYPT_DATA, &sd, sizeof sd};
	return ((ck_derive_fn)fn)(session, &m, base, tmpl, sizeof tmpl / sizeof tmpl[0], out);
}

// hemd_create_cek makes an AES session key from value (the caller's locked
// memory) that can wrap and encrypt, and nothing else; it is sensitive and
// not extractable.
static ck_ulong hemd_create_cek(void *fn, ck_ulong session, unsigned char *value, ck_ulong len, ck_ulong *out) {
	ck_ulong cls = O_SECRET_KEY, kt = K_AES;
	unsigned char t = 1, f = 0;
	ck_attr tmpl[] = {
		{A_CLASS, &cls, sizeof cls}, {A_KEY_TYPE, &kt, sizeof kt}, {A_TOKEN, &f, 1}, {A_PRIVATE, &t, 1},
		{A_SENSITIVE, &t, 1}, {A_EXTRACTABLE, &f, 1}, {A_WRAP, &t, 1}, {A_ENCRYPT, &t, 1},
		{A_UNWRAP, &f, 1}, {A_DECRYPT, &f, 1}, {A_SIGN, &f, 1}, {A_VERIFY, &f, 1}, {A_DERIVE, &f, 1},
		{A_VALUE, value, len},
	};
	return ((ck_create_fn)fn)(session, tmpl, sizeof tmpl / sizeof tmpl[0], out);
}

// hemd_get_value reads an object's CKA_VALUE into buf (*len bytes), or its
// length when buf is NULL.
static ck_ulong hemd_get_value(void *fn, ck_ulong session, ck_ulong obj, unsigned char *buf, ck_ulong *len) {
	ck_attr a = {A_VALUE, buf, *len};
	ck_ulong rv = ((ck_getattr_fn)fn)(session, obj, &a, 1);
	*len = a.len;
	return rv;
}
*/
import "C"

import (
	"fmt"
	"unsafe"

	"github.com/miekg/pkcs11"
)

// Indices in the CK_FUNCTION_LIST of the functions called directly here.
const (
	fnCreateObject      = 20
	fnGetAttributeValue = 24
	fnDeriveKey         = 62
)

// keyOps are C_CreateObject, C_GetAttributeValue and C_DeriveKey called
// directly: miekg/pkcs11 copies attribute values into C memory that it frees
// without wiping, and has no parameters for CKM_AES_ECB_ENCRYPT_DATA. Here a
// key's value goes between the HSM and hemd's locked memory only.
type keyOps struct {
	create, getAttr, derive unsafe.Pointer
}

func newKeyOps(module string) (*keyOps, error) {
	f := functions(module, fnCreateObject, fnGetAttributeValue, fnDeriveKey)
	if f == nil || f[0] == nil || f[1] == nil || f[2] == nil {
		return nil, fmt.Errorf("kms: C_CreateObject, C_GetAttributeValue or C_DeriveKey missing from %s's function list", module)
	}
	return &keyOps{create: f[0], getAttr: f[1], derive: f[2]}, nil
}

// deriveKEK derives the key-encryption key of a v2 blob from the CMK
// version base and data (32 bytes, not secret).
func (o *keyOps) deriveKEK(sh pkcs11.SessionHandle, base pkcs11.ObjectHandle, data []byte) (pkcs11.ObjectHandle, error) {
	cdata := C.CBytes(data)
	defer C.free(cdata)
	var out C.ck_ulong
	rv := C.hemd_derive_kek(o.derive, C.ck_ulong(sh), C.ck_ulong(base), (*C.uchar)(cdata), C.ck_ulong(len(data)), &out)
	if rv != 0 {
		return 0, pkcs11.Error(rv)
	}
	return pkcs11.ObjectHandle(out), nil
}

// createCEK makes an AES session key from value, which must be memory
// outside the Go heap (locked): the HSM copies it from there.
func (o *keyOps) createCEK(sh pkcs11.SessionHandle, value []byte) (pkcs11.ObjectHandle, error) {
	var out C.ck_ulong
	rv := C.hemd_create_cek(o.create, C.ck_ulong(sh), (*C.uchar)(unsafe.Pointer(&value[0])), C.ck_ulong(len(value)), &out)
	if rv != 0 {
		return 0, pkcs11.Error(rv)
	}
	return pkcs11.ObjectHandle(out), nil
}

// value reads obj's CKA_VALUE into dst, which must be memory outside the Go
// heap (locked), and returns its length.
func (o *keyOps) value(sh pkcs11.SessionHandle, obj pkcs11.ObjectHandle, dst []byte) (int, error) {
	n := C.ck_ulong(0)
	if rv := C.hemd_get_value(o.getAttr, C.ck_ulong(sh), C.ck_ulong(obj), nil, &n); rv != 0 {
		return 0, pkcs11.Error(rv)
	}
	if int(n) > len(dst) {
		return 0, kmsErr(ErrValidation, "plaintext of %d bytes does not fit %d", n, len(dst))
	}
	if rv := C.hemd_get_value(o.getAttr, C.ck_ulong(sh), C.ck_ulong(obj), (*C.uchar)(unsafe.Pointer(&dst[0])), &n); rv != 0 {
		return 0, pkcs11.Error(rv)
	}
	return int(n), nil
}
