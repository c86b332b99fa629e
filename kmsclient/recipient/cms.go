package recipient

import (
	"bytes"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
)

// CiphertextForRecipient is, as on AWS KMS, a CMS ContentInfo (RFC 5652)
// holding an EnvelopedData with one KeyTransRecipientInfo: the recipient is
// named by its SubjectKeyIdentifier (version 2), the content-encryption key
// (AES-256) is encrypted with RSAES-OAEP (SHA-256, MGF1 with SHA-256, empty
// label; RFC 3560/4055), and the plaintext with AES-256-CBC and PKCS #7
// padding (RFC 3565). hemd writes DER; `openssl cms -decrypt -inform DER
// -inkey KEY.pem` reads it.

var (
	oidData          = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 7, 1}
	oidEnvelopedData = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 7, 3}
	oidRSAESOAEP     = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 7}
	oidMGF1          = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 8}
	oidSHA256        = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 2, 1}
	oidAES256CBC     = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 1, 42}
)

type contentInfo struct {
	ContentType asn1.ObjectIdentifier
	Content     asn1.RawValue // [0] EXPLICIT
}

type envelopedData struct {
	Version              int
	RecipientInfos       []asn1.RawValue `asn1:"set"`
	EncryptedContentInfo encryptedContentInfo
}

type keyTransRecipientInfo struct {
	Version                int
	RID                    asn1.RawValue
	KeyEncryptionAlgorithm pkix.AlgorithmIdentifier
	EncryptedKey           []byte
}

type encryptedContentInfo struct {
	ContentType                asn1.ObjectIdentifier
	ContentEncryptionAlgorithm pkix.AlgorithmIdentifier
	EncryptedContent           []byte `asn1:"tag:0,optional"`
}

type oaepParams struct {
	Hash pkix.AlgorithmIdentifier `asn1:"explicit,tag:0"`
	MGF  pkix.AlgorithmIdentifier `asn1:"explicit,tag:1"`
}

var sha256ID = pkix.AlgorithmIdentifier{Algorithm: oidSHA256, Parameters: asn1.NullRawValue}

// oaepAlgorithm is the keyEncryptionAlgorithm: RSAES-OAEP with SHA-256.
func oaepAlgorithm() (pkix.AlgorithmIdentifier, error) {
	h, err := asn1.Marshal(sha256ID)
	if err != nil {
		return pkix.AlgorithmIdentifier{}, err
	}
	p, err := asn1.Marshal(oaepParams{Hash: sha256ID,
		MGF: pkix.AlgorithmIdentifier{Algorithm: oidMGF1, Parameters: asn1.RawValue{FullBytes: h}}})
	if err != nil {
		return pkix.AlgorithmIdentifier{}, err
	}
	return pkix.AlgorithmIdentifier{Algorithm: oidRSAESOAEP, Parameters: asn1.RawValue{FullBytes: p}}, nil
}

// Envelope is CiphertextForRecipient taken apart: all of it is public.
type Envelope struct {
	SubjectKeyID     []byte // nil when the recipient was named otherwise
	EncryptedKey     []byte // the content-encryption key, RSA-OAEP
	IV               []byte // AES-256-CBC's
	EncryptedContent []byte // the plaintext, AES-256-CBC, PKCS #7 padded
}

// Marshal encodes e as CMS (DER).
func (e *Envelope) Marshal() ([]byte, error) {
	alg, err := oaepAlgorithm()
	if err != nil {
		return nil, err
	}
	ri, err := asn1.Marshal(keyTransRecipientInfo{Version: 2,
		RID:                    asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 0, Bytes: e.SubjectKeyID},
		KeyEncryptionAlgorithm: alg, EncryptedKey: e.EncryptedKey})
	if err != nil {
		return nil, err
	}
	iv, err := asn1.Marshal(e.IV)
	if err != nil {
		return nil, err
	}
	ed, err := asn1.Marshal(envelopedData{Version: 2, RecipientInfos: []asn1.RawValue{{FullBytes: ri}},
		EncryptedContentInfo: encryptedContentInfo{ContentType: oidData,
			ContentEncryptionAlgorithm: pkix.AlgorithmIdentifier{Algorithm: oidAES256CBC, Parameters: asn1.RawValue{FullBytes: iv}},
			EncryptedContent:           e.EncryptedContent}})
	if err != nil {
		return nil, err
	}
	return asn1.Marshal(contentInfo{ContentType: oidEnvelopedData,
		Content: asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 0, IsCompound: true, Bytes: ed}})
}

// ErrEnvelope is a CiphertextForRecipient hemd cannot read.
var ErrEnvelope = errors.New("CiphertextForRecipient is not a CMS EnvelopedData hemd reads")

func envErr(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrEnvelope, fmt.Sprintf(format, a...))
}

// ParseEnvelope reads CiphertextForRecipient (DER, or BER without
// indefinite lengths) for the recipient ski: the KeyTransRecipientInfo
// that names ski, or the only one when none names a key identifier. Its
// algorithms must be RSAES-OAEP with SHA-256 and AES-256-CBC.
func ParseEnvelope(b []byte, ski []byte) (*Envelope, error) {
	var ci contentInfo
	if rest, err := asn1.Unmarshal(b, &ci); err != nil || len(rest) > 0 {
		return nil, envErr("ContentInfo: %v", errOr(err, "trailing data"))
	}
	if ci.Content.Class != asn1.ClassContextSpecific || ci.Content.Tag != 0 || !ci.Content.IsCompound {
		return nil, envErr("ContentInfo's content is not [0] EXPLICIT")
	}
	if !ci.ContentType.Equal(oidEnvelopedData) {
		return nil, envErr("content type %v, want envelopedData", ci.ContentType)
	}
	var ed envelopedData
	if rest, err := asn1.Unmarshal(ci.Content.Bytes, &ed); err != nil || len(rest) > 0 {
		return nil, envErr("EnvelopedData: %v", errOr(err, "trailing data"))
	}
	var ri *keyTransRecipientInfo
	for _, raw := range ed.RecipientInfos {
		var k keyTransRecipientInfo
		if rest, err := asn1.Unmarshal(raw.FullBytes, &k); err != nil || len(rest) > 0 {
			continue // another kind of RecipientInfo
		}
		named := k.RID.Class == asn1.ClassContextSpecific && k.RID.Tag == 0
		if named && bytes.Equal(k.RID.Bytes, ski) || !named && len(ed.RecipientInfos) == 1 {
			ri = &k
			break
		}
	}
	if ri == nil {
		return nil, envErr("no KeyTransRecipientInfo for this recipient")
	}
	if !ri.KeyEncryptionAlgorithm.Algorithm.Equal(oidRSAESOAEP) || !oaepSHA256(ri.KeyEncryptionAlgorithm.Parameters.FullBytes) {
		return nil, envErr("key encryption %v is not RSAES-OAEP with SHA-256 and MGF1-SHA-256", ri.KeyEncryptionAlgorithm.Algorithm)
	}
	eci := ed.EncryptedContentInfo
	if !eci.ContentEncryptionAlgorithm.Algorithm.Equal(oidAES256CBC) {
		return nil, envErr("content encryption %v is not AES-256-CBC", eci.ContentEncryptionAlgorithm.Algorithm)
	}
	var iv []byte
	if rest, err := asn1.Unmarshal(eci.ContentEncryptionAlgorithm.Parameters.FullBytes, &iv); err != nil || len(rest) > 0 || len(iv) != 16 {
		return nil, envErr("AES-256-CBC needs a 16-byte IV")
	}
	if n := len(eci.EncryptedContent); n == 0 || n%16 != 0 {
		return nil, envErr("encrypted content of %d bytes is not whole AES blocks", n)
	}
	e := &Envelope{EncryptedKey: ri.EncryptedKey, IV: iv, EncryptedContent: eci.EncryptedContent}
	if ri.RID.Class == asn1.ClassContextSpecific {
		e.SubjectKeyID = ri.RID.Bytes
	}
	return e, nil
}

// oaepSHA256 reports whether RSAES-OAEP-params say SHA-256, MGF1 with
// SHA-256 and the default (empty) label; SHA-256's parameters may be NULL
// or absent (RFC 4055 allows both).
func oaepSHA256(der []byte) bool {
	var p struct {
		Hash   pkix.AlgorithmIdentifier `asn1:"explicit,tag:0"`
		MGF    pkix.AlgorithmIdentifier `asn1:"explicit,tag:1"`
		Source asn1.RawValue            `asn1:"explicit,tag:2,optional"`
	}
	if rest, err := asn1.Unmarshal(der, &p); err != nil || len(rest) > 0 || len(p.Source.FullBytes) > 0 {
		return false
	}
	var mgfHash pkix.AlgorithmIdentifier
	if rest, err := asn1.Unmarshal(p.MGF.Parameters.FullBytes, &mgfHash); err != nil || len(rest) > 0 {
		return false
	}
	return isSHA256(p.Hash) && p.MGF.Algorithm.Equal(oidMGF1) && isSHA256(mgfHash)
}

func isSHA256(a pkix.AlgorithmIdentifier) bool {
	null := len(a.Parameters.FullBytes) == 0 || bytes.Equal(a.Parameters.FullBytes, asn1.NullBytes)
	return a.Algorithm.Equal(oidSHA256) && null
}

func errOr(err error, s string) any {
	if err != nil {
		return err
	}
	return s
}
