// Package recipient is Decrypt for a recipient, as AWS KMS does it for Nitro
// Enclaves, between a host's hemd and hemd kms serve: the host sends a
// public key (in a recipient document, below) and the KMS answers with the
// plaintext encrypted to it (CiphertextForRecipient, a CMS EnvelopedData as
// AWS's) instead of the plaintext. The private key, the padded plaintext
// and the content-encryption key live only in locked memory
// (hem/datakey.Locked), which is why this package has its own RSA: math/big
// and crypto/rsa would keep them on the Go heap.
package recipient

import (
	"bytes"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/x509"
	"errors"
	"fmt"
)

// A recipient document is what a caller sends as the Recipient's
// AttestationDocument: there is no Nitro attestation here, only the public
// key to encrypt to.
//
//	"HEMDRCP1"  (8 bytes, ASCII)
//	SubjectPublicKeyInfo (DER, RFC 5280) of an RSA key of 2048 to 4096 bits
//	with public exponent 65537
//
// Any AWS SDK sends it as the AttestationDocument bytes, e.g. in Python:
// b"HEMDRCP1" + key.public_key().public_bytes(Encoding.DER,
// PublicFormat.SubjectPublicKeyInfo).
const documentMagic = "HEMDRCP1"

// KeyEncryptionAlgorithm is the one algorithm a Recipient may name, as on
// AWS.
const KeyEncryptionAlgorithm = "RSAES_OAEP_SHA_256"

// Limits of a recipient's key and document.
const (
	MinBits     = 2048
	MaxBits     = 4096
	maxDocument = 4096
)

// ErrDocument is a recipient document that hemd cannot use.
var ErrDocument = errors.New("not a hemd recipient document")

// PublicKey is a recipient's RSA public key, from its document. It holds
// nothing secret.
type PublicKey struct {
	n   []byte // modulus, big-endian, no leading zeros
	ski []byte // SHA-1 of the RSAPublicKey, CMS's SubjectKeyIdentifier
}

// ParseDocument reads a recipient document.
func ParseDocument(doc []byte) (*PublicKey, error) {
	if len(doc) > maxDocument {
		return nil, fmt.Errorf("%w: %d bytes, more than %d", ErrDocument, len(doc), maxDocument)
	}
	der, ok := bytes.CutPrefix(doc, []byte(documentMagic))
	if !ok {
		return nil, fmt.Errorf("%w: it does not start with %q (Nitro attestation documents are not supported)", ErrDocument, documentMagic)
	}
	k, err := x509.ParsePKIXPublicKey(der)
	if err != nil {
		return nil, fmt.Errorf("%w: public key: %v", ErrDocument, err)
	}
	rk, ok := k.(*rsa.PublicKey)
	if !ok {
		return nil, fmt.Errorf("%w: the key is %T, not RSA", ErrDocument, k)
	}
	if b := rk.N.BitLen(); b < MinBits || b > MaxBits {
		return nil, fmt.Errorf("%w: RSA key of %d bits, want %d to %d", ErrDocument, b, MinBits, MaxBits)
	}
	if rk.E != publicE {
		return nil, fmt.Errorf("%w: public exponent %d, want %d", ErrDocument, rk.E, publicE)
	}
	if rk.N.Bit(0) == 0 {
		return nil, fmt.Errorf("%w: even modulus", ErrDocument)
	}
	return &PublicKey{n: rk.N.Bytes(), ski: subjectKeyID(rk)}, nil
}

// subjectKeyID is RFC 5280's first method: SHA-1 of the subjectPublicKey.
func subjectKeyID(k *rsa.PublicKey) []byte {
	h := sha1.Sum(x509.MarshalPKCS1PublicKey(k))
	return h[:]
}

// Size is the key's size in bytes (the length of an RSA ciphertext).
func (k *PublicKey) Size() int { return len(k.n) }

// SubjectKeyID is the key's identifier in CiphertextForRecipient.
func (k *PublicKey) SubjectKeyID() []byte { return bytes.Clone(k.ski) }

// document makes the recipient document of the public key (n, 65537).
func document(n []byte) ([]byte, []byte, error) {
	pub := &rsa.PublicKey{N: newInt(n), E: publicE}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, nil, err
	}
	return append([]byte(documentMagic), der...), subjectKeyID(pub), nil
}
