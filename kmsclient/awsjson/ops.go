package awsjson

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/hemd/hemd/hem/shield"
	"github.com/hemd/hemd/kmsclient/hsm"
	"github.com/hemd/hemd/kmsclient/recipient"
)

// request holds the fields of every operation served, as the AWS KMS API
// names them. []byte fields are base64 in JSON, as on AWS. Pointers tell an
// absent field from a zero one where the API does.
type request struct {
	KeyId                          string
	Description                    *string
	AliasName                      string
	TargetKeyId                    string
	PendingWindowInDays            *int
	EncryptionContext              map[string]string
	NumberOfBytes                  *int
	KeySpec                        string
	CustomerMasterKeySpec          string
	KeyUsage                       string
	Origin                         string
	MultiRegion                    *bool
	Policy                         string
	CustomKeyStoreId               string
	XksKeyId                       string
	CiphertextBlob                 []byte
	Plaintext                      []byte
	EncryptionAlgorithm            string
	SourceKeyId                    string
	DestinationKeyId               string
	SourceEncryptionContext        map[string]string
	DestinationEncryptionContext   map[string]string
	SourceEncryptionAlgorithm      string
	DestinationEncryptionAlgorithm string
	GranteePrincipal               string
	RetiringPrincipal              string
	Operations                     []string
	Constraints                    *hsm.GrantConstraints
	GrantId                        string
	GrantToken                     string
	Name                           string
	Tags                           []hsm.Tag
	TagKeys                        []string
	Limit                          *int
	Marker                         string
	DryRun                         *bool
	Recipient                      json.RawMessage
}

// keyMetadata is AWS's KeyMetadata for a hemd key: a symmetric
// ENCRYPT_DECRYPT key of spec SYMMETRIC_DEFAULT, made by the KMS.
type keyMetadata struct {
	AWSAccountId          string
	KeyId                 string
	Arn                   string
	CreationDate          float64
	Enabled               bool
	Description           string
	KeyUsage              string
	KeyState              string
	DeletionDate          float64 `json:",omitempty"`
	Origin                string
	KeyManager            string
	CustomerMasterKeySpec string
	KeySpec               string
	EncryptionAlgorithms  []string
	MultiRegion           bool
}

const symmetricDefault = "SYMMETRIC_DEFAULT"

func epoch(t time.Time) float64 { return float64(t.UnixNano()) / float64(time.Second) }

func (s *Server) wire(m hsm.KeyMetadata) keyMetadata {
	w := keyMetadata{AWSAccountId: s.account(), KeyId: m.KeyID, Arn: m.Arn, CreationDate: epoch(m.CreationDate),
		Enabled: m.Enabled, Description: m.Description, KeyUsage: m.KeyUsage, KeyState: m.KeyState, Origin: m.Origin,
		KeyManager: "CUSTOMER", CustomerMasterKeySpec: m.KeySpec, KeySpec: m.KeySpec,
		EncryptionAlgorithms: []string{symmetricDefault}}
	if m.DeletionDate != nil {
		w.DeletionDate = epoch(*m.DeletionDate)
	}
	// A key behind a reserved alias (alias/aws/ebs, hemd's default key) is
	// the service's own, as AWS's managed keys are.
	for _, a := range m.Aliases {
		if strings.HasPrefix(a, "alias/aws/") {
			w.KeyManager = "AWS"
		}
	}
	return w
}

// call is one request being served.
type call struct {
	s                *Server
	k                *hsm.KMS
	who              string
	grantsOnly       bool
	requireRecipient bool // the caller's plaintext-returning calls must name a Recipient
	secrets          [][]byte
	resp             *secretResponse
}

// wipe registers b to be zeroed once the response is written.
func (c *call) wipe(b []byte) { c.secrets = append(c.secrets, b) }

func (c *call) wipeAll() {
	for _, b := range c.secrets {
		clear(b)
	}
	if c.resp != nil {
		c.resp.release()
	}
}

// secret starts a response that will carry plaintext: pt is locked memory
// for the HSM to write it into.
func (c *call) secret(ctx context.Context) (*secretResponse, []byte, error) {
	r, pt, err := c.s.newSecret(ctx)
	if err == nil {
		c.resp = r
	}
	return r, pt, err
}

// recipientInfo is the request's Recipient (AWS's RecipientInfo).
type recipientInfo struct {
	KeyEncryptionAlgorithm string
	AttestationDocument    []byte
}

// recipient parses the request's Recipient; nil when there is none. A
// caller that must use one and did not is refused.
func (c *call) recipient(op string, in *request) (*recipient.PublicKey, error) {
	if in.Recipient == nil || string(in.Recipient) == "null" {
		if c.requireRecipient {
			return nil, &apiError{Type: "AccessDeniedException", Message: fmt.Sprintf(
				"%s must call %s with a Recipient (require_recipient): this KMS sends it no plaintext key", c.who, op)}
		}
		return nil, nil
	}
	var ri recipientInfo
	if err := json.Unmarshal(in.Recipient, &ri); err != nil {
		return nil, &apiError{Type: "SerializationException", Message: "Recipient: " + err.Error()}
	}
	switch ri.KeyEncryptionAlgorithm {
	case "", recipient.KeyEncryptionAlgorithm:
	default:
		return nil, validation("Recipient KeyEncryptionAlgorithm %q is not %s", ri.KeyEncryptionAlgorithm, recipient.KeyEncryptionAlgorithm)
	}
	if len(ri.AttestationDocument) == 0 {
		return nil, validation("Recipient has no AttestationDocument")
	}
	to, err := recipient.ParseDocument(ri.AttestationDocument)
	if err != nil {
		return nil, validation("Recipient AttestationDocument: %v", err)
	}
	return to, nil
}

// op serves one operation.
type op func(c *call, ctx context.Context, in *request) (any, error)

// ops are the operations hemd serves.
var ops = map[string]op{
	"CreateKey":                       (*call).createKey,
	"DescribeKey":                     (*call).describeKey,
	"ListKeys":                        (*call).listKeys,
	"UpdateKeyDescription":            (*call).updateKeyDescription,
	"EnableKey":                       (*call).enableKey,
	"DisableKey":                      (*call).disableKey,
	"ScheduleKeyDeletion":             (*call).scheduleKeyDeletion,
	"CancelKeyDeletion":               (*call).cancelKeyDeletion,
	"EnableKeyRotation":               (*call).enableKeyRotation,
	"DisableKeyRotation":              (*call).disableKeyRotation,
	"GetKeyRotationStatus":            (*call).getKeyRotationStatus,
	"RotateKeyOnDemand":               (*call).rotateKeyOnDemand,
	"CreateAlias":                     (*call).createAlias,
	"UpdateAlias":                     (*call).updateAlias,
	"DeleteAlias":                     (*call).deleteAlias,
	"ListAliases":                     (*call).listAliases,
	"TagResource":                     (*call).tagResource,
	"UntagResource":                   (*call).untagResource,
	"ListResourceTags":                (*call).listResourceTags,
	"GenerateDataKey":                 (*call).generateDataKey,
	"GenerateDataKeyWithoutPlaintext": (*call).generateDataKeyWithoutPlaintext,
	"GenerateRandom":                  (*call).generateRandom,
	"Encrypt":                         (*call).encrypt,
	"Decrypt":                         (*call).decrypt,
	"ReEncrypt":                       (*call).reEncrypt,
	"CreateGrant":                     (*call).createGrant,
	"ListGrants":                      (*call).listGrants,
	"ListRetirableGrants":             (*call).listRetirableGrants,
	"RetireGrant":                     (*call).retireGrant,
	"RevokeGrant":                     (*call).revokeGrant,
}

// Operations returns the AWS KMS operations hemd kms serve implements,
// sorted.
func Operations() []string {
	out := make([]string, 0, len(ops))
	for name := range ops {
		out = append(out, name)
	}
	slices.Sort(out)
	return out
}

// Unsupported are the AWS KMS API's other operations: hemd answers them
// with UnsupportedOperationException, and anything else with
// UnknownOperationException.
var Unsupported = []string{
	"ConnectCustomKeyStore", "CreateCustomKeyStore", "DeleteCustomKeyStore", "DeleteImportedKeyMaterial",
	"DeriveSharedSecret", "DescribeCustomKeyStores", "DisconnectCustomKeyStore", "GenerateDataKeyPair",
	"GenerateDataKeyPairWithoutPlaintext", "GenerateMac", "GetKeyPolicy", "GetParametersForImport", "GetPublicKey",
	"ImportKeyMaterial", "ListKeyPolicies", "ListKeyRotations", "PutKeyPolicy", "ReplicateKey", "Sign",
	"UpdateCustomKeyStore", "UpdatePrimaryRegion", "Verify", "VerifyMac",
}

// grantOp is the grant operation an API operation needs.
var grantOp = map[string]string{
	"Decrypt": "Decrypt", "Encrypt": "Encrypt", "GenerateDataKey": "GenerateDataKey",
	"GenerateDataKeyWithoutPlaintext": "GenerateDataKeyWithoutPlaintext", "DescribeKey": "DescribeKey",
	"ReEncrypt": "ReEncryptFrom", "RetireGrant": "RetireGrant",
}

// authorize checks a grants-only principal's grant for the operation.
func (c *call) authorize(op string, in *request) error {
	g, ok := grantOp[op]
	if !ok {
		return &apiError{Type: "AccessDeniedException", Message: c.who + " may only use keys through grants; " + op + " is not allowed"}
	}
	if op == "RetireGrant" {
		return nil // RetireGrant itself checks that who is the grantee or retiring principal
	}
	keyID, ectx := in.KeyId, in.EncryptionContext
	if op == "Decrypt" || op == "ReEncrypt" {
		id, err := hsm.BlobKeyID(in.CiphertextBlob)
		if err != nil {
			return err
		}
		keyID = id
		if op == "ReEncrypt" {
			ectx = in.SourceEncryptionContext
			if err := c.k.Authorize(in.DestinationKeyId, c.who, "ReEncryptTo", in.DestinationEncryptionContext); err != nil {
				return err
			}
		}
	}
	return c.k.Authorize(keyID, c.who, g, ectx)
}

func (c *call) dispatch(ctx context.Context, name string, body []byte) (any, error) {
	c.wipe(body) // Encrypt's body holds plaintext
	fn, ok := ops[name]
	if !ok {
		if slices.Contains(Unsupported, name) {
			return nil, unsupported("%s is not implemented by hemd kms serve", name)
		}
		return nil, &apiError{Type: "UnknownOperationException", Message: "operation " + name + " is not an AWS KMS operation"}
	}
	var in request
	if len(body) > 0 {
		if err := json.Unmarshal(body, &in); err != nil {
			return nil, &apiError{Type: "SerializationException", Message: err.Error()}
		}
	}
	c.wipe(in.Plaintext)
	if in.DryRun != nil && *in.DryRun {
		return nil, unsupported("DryRun is not supported by hemd kms serve")
	}
	if c.grantsOnly {
		if err := c.authorize(name, &in); err != nil {
			return nil, err
		}
	}
	return fn(c, ctx, &in)
}

func unsupported(format string, a ...any) *apiError {
	return &apiError{Type: "UnsupportedOperationException", Message: fmt.Sprintf(format, a...)}
}

func validation(format string, a ...any) *apiError {
	return &apiError{Type: "ValidationException", Message: fmt.Sprintf(format, a...)}
}

// required refuses a request that lacks a member the API requires, as AWS
// words it.
func required(members ...any) error {
	for i := 0; i+1 < len(members); i += 2 {
		name := members[i].(string)
		missing := false
		switch v := members[i+1].(type) {
		case string:
			missing = v == ""
		case []byte:
			missing = len(v) == 0
		case []string:
			missing = v == nil
		case []hsm.Tag:
			missing = v == nil
		case *int:
			missing = v == nil
		case *string:
			missing = v == nil
		}
		if missing {
			return validation("1 validation error detected: Value null at '%s' failed to satisfy constraint: Member must not be null",
				strings.ToLower(name[:1])+name[1:])
		}
	}
	return nil
}

// checkAlgorithm accepts the one encryption algorithm of symmetric keys.
func checkAlgorithm(field, alg string) error {
	switch alg {
	case "", symmetricDefault:
		return nil
	case "RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256", "SM2PKE":
		return &apiError{Type: "InvalidKeyUsageException", Message: fmt.Sprintf("%s %s is not valid for a symmetric key: use %s", field, alg, symmetricDefault)}
	}
	return validation("%s %q is not a valid encryption algorithm", field, alg)
}

func (c *call) metadata(ctx context.Context, key string) (any, error) {
	m, err := c.k.DescribeKey(ctx, key)
	if err != nil {
		return nil, err
	}
	return map[string]any{"KeyMetadata": c.s.wire(m)}, nil
}

func (c *call) createKey(ctx context.Context, in *request) (any, error) {
	for _, f := range []struct{ name, value, want string }{
		{"KeyUsage", in.KeyUsage, "ENCRYPT_DECRYPT"}, {"KeySpec", in.KeySpec, symmetricDefault},
		{"CustomerMasterKeySpec", in.CustomerMasterKeySpec, symmetricDefault}, {"Origin", in.Origin, "AWS_KMS"},
	} {
		if f.value != "" && f.value != f.want {
			return nil, unsupported("%s %s: hemd makes %s keys only (%s %s)", f.name, f.value, symmetricDefault, f.name, f.want)
		}
	}
	switch {
	case in.MultiRegion != nil && *in.MultiRegion:
		return nil, unsupported("multi-Region keys are not supported")
	case in.CustomKeyStoreId != "" || in.XksKeyId != "":
		return nil, &apiError{Type: "CustomKeyStoreNotFoundException", Message: "hemd has no custom key stores: its keys are in its own HSM"}
	case in.Policy != "":
		return nil, &apiError{Type: "MalformedPolicyDocumentException", Message: "hemd has no key policies: callers are the [[kms.principal]] entries and grants"}
	}
	desc := ""
	if in.Description != nil {
		desc = *in.Description
	}
	if utf8.RuneCountInString(desc) > 8192 {
		return nil, validation("Description is longer than 8192 characters")
	}
	if err := hsm.ValidateTags(in.Tags); err != nil {
		return nil, err
	}
	m, err := c.k.CreateKey(ctx, desc)
	if err != nil {
		return nil, err
	}
	if len(in.Tags) > 0 {
		if err := c.k.TagResource(ctx, m.KeyID, in.Tags); err != nil {
			return nil, err
		}
	}
	return map[string]any{"KeyMetadata": c.s.wire(m)}, nil
}

func (c *call) describeKey(ctx context.Context, in *request) (any, error) {
	if err := required("KeyId", in.KeyId); err != nil {
		return nil, err
	}
	return c.metadata(ctx, in.KeyId)
}

func (c *call) listKeys(ctx context.Context, in *request) (any, error) {
	keys := c.k.ListKeys(ctx)
	slices.SortFunc(keys, func(a, b hsm.KeyMetadata) int {
		if x := a.CreationDate.Compare(b.CreationDate); x != 0 {
			return x
		}
		return strings.Compare(a.KeyID, b.KeyID)
	})
	p, next, err := paginate(keys, func(m hsm.KeyMetadata) string {
		return fmt.Sprintf("%020d/%s", m.CreationDate.UnixNano(), m.KeyID)
	}, in, 1000, 100)
	if err != nil {
		return nil, err
	}
	out := make([]map[string]string, 0, len(p))
	for _, m := range p {
		out = append(out, map[string]string{"KeyId": m.KeyID, "KeyArn": m.Arn})
	}
	return listed("Keys", out, next), nil
}

func (c *call) updateKeyDescription(ctx context.Context, in *request) (any, error) {
	if err := required("KeyId", in.KeyId, "Description", in.Description); err != nil {
		return nil, err
	}
	return struct{}{}, c.k.UpdateKeyDescription(ctx, in.KeyId, *in.Description)
}

func (c *call) keyOnly(in *request, fn func() error) (any, error) {
	if err := required("KeyId", in.KeyId); err != nil {
		return nil, err
	}
	return struct{}{}, fn()
}

func (c *call) enableKey(ctx context.Context, in *request) (any, error) {
	return c.keyOnly(in, func() error { return c.k.EnableKey(ctx, in.KeyId) })
}

func (c *call) disableKey(ctx context.Context, in *request) (any, error) {
	return c.keyOnly(in, func() error { return c.k.DisableKey(ctx, in.KeyId) })
}

func (c *call) enableKeyRotation(ctx context.Context, in *request) (any, error) {
	return c.keyOnly(in, func() error { return c.k.EnableKeyRotation(ctx, in.KeyId, true) })
}

func (c *call) disableKeyRotation(ctx context.Context, in *request) (any, error) {
	return c.keyOnly(in, func() error { return c.k.EnableKeyRotation(ctx, in.KeyId, false) })
}

func (c *call) scheduleKeyDeletion(ctx context.Context, in *request) (any, error) {
	if err := required("KeyId", in.KeyId); err != nil {
		return nil, err
	}
	days := 30
	if in.PendingWindowInDays != nil {
		days = *in.PendingWindowInDays
	}
	if err := c.k.ScheduleKeyDeletion(ctx, in.KeyId, days); err != nil {
		return nil, err
	}
	m, err := c.k.DescribeKey(ctx, in.KeyId)
	if err != nil {
		return nil, err
	}
	return map[string]any{"KeyId": m.Arn, "KeyState": m.KeyState, "PendingWindowInDays": days,
		"DeletionDate": c.s.wire(m).DeletionDate}, nil
}

func (c *call) cancelKeyDeletion(ctx context.Context, in *request) (any, error) {
	if err := required("KeyId", in.KeyId); err != nil {
		return nil, err
	}
	if err := c.k.CancelKeyDeletion(ctx, in.KeyId); err != nil {
		return nil, err
	}
	m, err := c.k.DescribeKey(ctx, in.KeyId)
	if err != nil {
		return nil, err
	}
	return map[string]any{"KeyId": m.Arn}, nil
}

func (c *call) getKeyRotationStatus(ctx context.Context, in *request) (any, error) {
	if err := required("KeyId", in.KeyId); err != nil {
		return nil, err
	}
	m, err := c.k.DescribeKey(ctx, in.KeyId)
	if err != nil {
		return nil, err
	}
	return map[string]any{"KeyRotationEnabled": m.RotationEnabled, "KeyId": m.Arn}, nil
}

func (c *call) rotateKeyOnDemand(ctx context.Context, in *request) (any, error) {
	if err := required("KeyId", in.KeyId); err != nil {
		return nil, err
	}
	if err := c.k.RotateKey(ctx, in.KeyId); err != nil {
		return nil, err
	}
	m, err := c.k.DescribeKey(ctx, in.KeyId)
	if err != nil {
		return nil, err
	}
	return map[string]any{"KeyId": m.Arn}, nil
}

func (c *call) createAlias(ctx context.Context, in *request) (any, error) {
	if err := required("AliasName", in.AliasName, "TargetKeyId", in.TargetKeyId); err != nil {
		return nil, err
	}
	return struct{}{}, c.k.CreateAlias(ctx, in.AliasName, in.TargetKeyId)
}

func (c *call) updateAlias(ctx context.Context, in *request) (any, error) {
	if err := required("AliasName", in.AliasName, "TargetKeyId", in.TargetKeyId); err != nil {
		return nil, err
	}
	return struct{}{}, c.k.UpdateAlias(ctx, in.AliasName, in.TargetKeyId)
}

func (c *call) deleteAlias(ctx context.Context, in *request) (any, error) {
	if err := required("AliasName", in.AliasName); err != nil {
		return nil, err
	}
	return struct{}{}, c.k.DeleteAlias(ctx, in.AliasName)
}

func (c *call) listAliases(ctx context.Context, in *request) (any, error) {
	all, err := c.k.ListAliases(ctx, in.KeyId)
	if err != nil {
		return nil, err
	}
	p, next, err := paginate(all, func(a hsm.Alias) string { return a.AliasName }, in, 100, 50)
	if err != nil {
		return nil, err
	}
	return listed("Aliases", p, next), nil
}

func (c *call) tagResource(ctx context.Context, in *request) (any, error) {
	if err := required("KeyId", in.KeyId, "Tags", in.Tags); err != nil {
		return nil, err
	}
	return struct{}{}, c.k.TagResource(ctx, in.KeyId, in.Tags)
}

func (c *call) untagResource(ctx context.Context, in *request) (any, error) {
	if err := required("KeyId", in.KeyId, "TagKeys", in.TagKeys); err != nil {
		return nil, err
	}
	return struct{}{}, c.k.UntagResource(ctx, in.KeyId, in.TagKeys)
}

func (c *call) listResourceTags(ctx context.Context, in *request) (any, error) {
	if err := required("KeyId", in.KeyId); err != nil {
		return nil, err
	}
	tags, err := c.k.ListResourceTags(ctx, in.KeyId)
	if err != nil {
		return nil, err
	}
	p, next, err := paginate(tags, func(t hsm.Tag) string { return t.TagKey }, in, 50, 50)
	if err != nil {
		return nil, err
	}
	return listed("Tags", p, next), nil
}

// dataKeySize is the size a GenerateDataKey request asks for: NumberOfBytes
// or KeySpec, exactly one of them.
func dataKeySize(in *request) (int, error) {
	switch {
	case in.NumberOfBytes != nil && in.KeySpec != "":
		return 0, validation("specify either KeySpec or NumberOfBytes, not both")
	case in.NumberOfBytes != nil:
		if n := *in.NumberOfBytes; n < 1 || n > 1024 {
			return 0, validation("NumberOfBytes %d is not in 1..1024", n)
		}
		return *in.NumberOfBytes, nil
	case in.KeySpec == "AES_256":
		return 32, nil
	case in.KeySpec == "AES_128":
		return 16, nil
	case in.KeySpec != "":
		return 0, validation("KeySpec %q is not AES_256 or AES_128", in.KeySpec)
	}
	return 0, validation("specify either KeySpec or NumberOfBytes")
}

func (c *call) generateDataKey(ctx context.Context, in *request) (any, error) {
	if err := required("KeyId", in.KeyId); err != nil {
		return nil, err
	}
	n, err := dataKeySize(in)
	if err != nil {
		return nil, err
	}
	to, err := c.recipient("GenerateDataKey", in)
	if err != nil {
		return nil, err
	}
	if to != nil {
		blob, env, arn, err := c.k.GenerateDataKeyForRecipient(ctx, in.KeyId, in.EncryptionContext, n, to)
		if err != nil {
			return nil, err
		}
		return map[string]any{"CiphertextBlob": blob, "CiphertextForRecipient": env, "KeyId": arn}, nil
	}
	r, pt, err := c.secret(ctx)
	if err != nil {
		return nil, err
	}
	// Shielded: no signal frame keeps a register's worth of the plaintext.
	shield.Run(func() {
		var blob []byte
		var arn string
		if blob, arn, err = c.k.GenerateDataKey(ctx, in.KeyId, in.EncryptionContext, pt[:n]); err == nil {
			err = r.build(map[string]any{"CiphertextBlob": blob, "KeyId": arn}, pt[:n])
		}
	})
	if err != nil {
		return nil, err
	}
	return r, nil
}

func (c *call) generateDataKeyWithoutPlaintext(ctx context.Context, in *request) (any, error) {
	if err := required("KeyId", in.KeyId); err != nil {
		return nil, err
	}
	n, err := dataKeySize(in)
	if err != nil {
		return nil, err
	}
	blob, arn, err := c.k.GenerateDataKeyWithoutPlaintextN(ctx, in.KeyId, in.EncryptionContext, n)
	if err != nil {
		return nil, err
	}
	return map[string]any{"CiphertextBlob": blob, "KeyId": arn}, nil
}

func (c *call) generateRandom(ctx context.Context, in *request) (any, error) {
	if err := required("NumberOfBytes", in.NumberOfBytes); err != nil {
		return nil, err
	}
	switch {
	case in.CustomKeyStoreId != "":
		return nil, &apiError{Type: "CustomKeyStoreNotFoundException", Message: "hemd has no custom key stores"}
	case in.Recipient != nil:
		return nil, unsupported("Recipient (Nitro Enclaves attestation) is not supported")
	}
	b, err := c.k.GenerateRandom(ctx, *in.NumberOfBytes)
	if err != nil {
		return nil, err
	}
	c.wipe(b)
	return map[string]any{"Plaintext": b}, nil
}

func (c *call) encrypt(ctx context.Context, in *request) (any, error) {
	if err := required("KeyId", in.KeyId, "Plaintext", in.Plaintext); err != nil {
		return nil, err
	}
	if err := checkAlgorithm("EncryptionAlgorithm", in.EncryptionAlgorithm); err != nil {
		return nil, err
	}
	blob, arn, err := c.k.Encrypt(ctx, in.KeyId, in.EncryptionContext, in.Plaintext)
	if err != nil {
		return nil, err
	}
	return map[string]any{"CiphertextBlob": blob, "KeyId": arn, "EncryptionAlgorithm": symmetricDefault}, nil
}

// maxPlaintext is the most Encrypt takes, so the most Decrypt returns.
const maxPlaintext = 4096

// checkBlobKey refuses a ciphertext that was not made under the key the
// caller named (Decrypt's KeyId, ReEncrypt's SourceKeyId).
func (c *call) checkBlobKey(ctx context.Context, field, key string, blob []byte) error {
	if key == "" {
		return nil
	}
	id, err := hsm.BlobKeyID(blob)
	if err != nil {
		return err
	}
	m, err := c.k.DescribeKey(ctx, key)
	if err != nil {
		return err
	}
	if m.KeyID != id {
		return &apiError{Type: "IncorrectKeyException", Message: fmt.Sprintf("the ciphertext was not encrypted under %s %s", field, key)}
	}
	return nil
}

func (c *call) decrypt(ctx context.Context, in *request) (any, error) {
	if err := required("CiphertextBlob", in.CiphertextBlob); err != nil {
		return nil, err
	}
	if err := checkAlgorithm("EncryptionAlgorithm", in.EncryptionAlgorithm); err != nil {
		return nil, err
	}
	to, err := c.recipient("Decrypt", in)
	if err != nil {
		return nil, err
	}
	if err := c.checkBlobKey(ctx, "KeyId", in.KeyId, in.CiphertextBlob); err != nil {
		return nil, err
	}
	if to != nil {
		env, arn, err := c.k.DecryptForRecipient(ctx, in.CiphertextBlob, in.EncryptionContext, to)
		if err != nil {
			return nil, err
		}
		return map[string]any{"CiphertextForRecipient": env, "KeyId": arn, "EncryptionAlgorithm": symmetricDefault}, nil
	}
	r, pt, err := c.secret(ctx)
	if err != nil {
		return nil, err
	}
	shield.Run(func() {
		var n int
		var arn string
		if n, arn, err = c.k.DecryptN(ctx, in.CiphertextBlob, in.EncryptionContext, pt[:maxPlaintext]); err == nil {
			err = r.build(map[string]any{"KeyId": arn, "EncryptionAlgorithm": symmetricDefault}, pt[:n])
		}
	})
	if err != nil {
		return nil, err
	}
	return r, nil
}

func (c *call) reEncrypt(ctx context.Context, in *request) (any, error) {
	if err := required("CiphertextBlob", in.CiphertextBlob, "DestinationKeyId", in.DestinationKeyId); err != nil {
		return nil, err
	}
	for _, a := range [][2]string{{"SourceEncryptionAlgorithm", in.SourceEncryptionAlgorithm},
		{"DestinationEncryptionAlgorithm", in.DestinationEncryptionAlgorithm}} {
		if err := checkAlgorithm(a[0], a[1]); err != nil {
			return nil, err
		}
	}
	if err := c.checkBlobKey(ctx, "SourceKeyId", in.SourceKeyId, in.CiphertextBlob); err != nil {
		return nil, err
	}
	src, err := hsm.BlobKeyID(in.CiphertextBlob)
	if err != nil {
		return nil, err
	}
	blob, arn, err := c.k.ReEncrypt(ctx, in.CiphertextBlob, in.SourceEncryptionContext, in.DestinationKeyId, in.DestinationEncryptionContext)
	if err != nil {
		return nil, err
	}
	return map[string]any{"CiphertextBlob": blob, "SourceKeyId": c.k.ARN(src), "KeyId": arn,
		"SourceEncryptionAlgorithm": symmetricDefault, "DestinationEncryptionAlgorithm": symmetricDefault}, nil
}

func (c *call) createGrant(ctx context.Context, in *request) (any, error) {
	if err := required("KeyId", in.KeyId, "GranteePrincipal", in.GranteePrincipal, "Operations", in.Operations); err != nil {
		return nil, err
	}
	id, err := c.k.CreateGrant(ctx, in.KeyId, in.GranteePrincipal, in.RetiringPrincipal, in.Operations, in.Constraints)
	if err != nil {
		return nil, err
	}
	// A grant is in effect at once, so its token is its id.
	return map[string]any{"GrantId": id, "GrantToken": id}, nil
}

// grantEntry is a grant as ListGrants shows it.
func (c *call) grantEntry(g hsm.Grant) map[string]any {
	e := map[string]any{"GrantId": g.GrantID, "KeyId": c.k.ARN(g.KeyID), "GranteePrincipal": g.GranteePrincipal,
		"Operations": g.Operations, "CreationDate": epoch(g.CreationDate),
		"IssuingAccount": "arn:aws:iam::" + c.s.account() + ":root"}
	if e["Operations"] == nil {
		e["Operations"] = []string{}
	}
	if g.RetiringPrincipal != "" {
		e["RetiringPrincipal"] = g.RetiringPrincipal
	}
	if g.Constraints != nil {
		e["Constraints"] = g.Constraints
	}
	return e
}

func grantOrder(g hsm.Grant) string {
	return fmt.Sprintf("%020d/%s", g.CreationDate.UnixNano(), g.GrantID)
}

func (c *call) listGrants(ctx context.Context, in *request) (any, error) {
	if err := required("KeyId", in.KeyId); err != nil {
		return nil, err
	}
	all, err := c.k.ListGrants(ctx, in.KeyId)
	if err != nil {
		return nil, err
	}
	var gs []hsm.Grant
	for _, g := range all {
		if (in.GrantId == "" || g.GrantID == in.GrantId) && (in.GranteePrincipal == "" || g.GranteePrincipal == in.GranteePrincipal) {
			gs = append(gs, g)
		}
	}
	return c.grantPage(gs, in)
}

func (c *call) grantPage(gs []hsm.Grant, in *request) (any, error) {
	slices.SortFunc(gs, func(a, b hsm.Grant) int { return strings.Compare(grantOrder(a), grantOrder(b)) })
	p, next, err := paginate(gs, grantOrder, in, 100, 50)
	if err != nil {
		return nil, err
	}
	out := make([]map[string]any, 0, len(p))
	for _, g := range p {
		out = append(out, c.grantEntry(g))
	}
	return listed("Grants", out, next), nil
}

func (c *call) listRetirableGrants(ctx context.Context, in *request) (any, error) {
	if err := required("RetiringPrincipal", in.RetiringPrincipal); err != nil {
		return nil, err
	}
	var gs []hsm.Grant
	for _, m := range c.k.ListKeys(ctx) {
		all, err := c.k.ListGrants(ctx, m.KeyID)
		if err != nil {
			continue // deleted meanwhile
		}
		for _, g := range all {
			if g.RetiringPrincipal == in.RetiringPrincipal {
				gs = append(gs, g)
			}
		}
	}
	return c.grantPage(gs, in)
}

// validGrantID reports whether s has the form of hemd's grant ids (and
// tokens): 64 hex digits.
func validGrantID(s string) bool {
	if len(s) != 64 {
		return false
	}
	for _, r := range s {
		if !strings.ContainsRune("0123456789abcdef", r) {
			return false
		}
	}
	return true
}

// retireGrant retires a grant named by its token, or by key and grant id.
func (c *call) retireGrant(ctx context.Context, in *request) (any, error) {
	id := in.GrantId
	switch {
	case in.GrantToken != "":
		if !validGrantID(in.GrantToken) {
			return nil, &apiError{Type: "InvalidGrantTokenException", Message: "the grant token is not valid"}
		}
		if id != "" && id != in.GrantToken {
			return nil, &apiError{Type: "InvalidGrantTokenException", Message: "GrantToken and GrantId name different grants"}
		}
		id = in.GrantToken
	case id == "" || in.KeyId == "":
		return nil, validation("specify GrantToken, or KeyId and GrantId")
	}
	if !validGrantID(id) {
		return nil, &apiError{Type: "InvalidGrantIdException", Message: fmt.Sprintf("grant id %q is not valid", id)}
	}
	if in.KeyId != "" {
		gs, err := c.k.ListGrants(ctx, in.KeyId)
		if err != nil {
			return nil, err
		}
		if !slices.ContainsFunc(gs, func(g hsm.Grant) bool { return g.GrantID == id }) {
			return nil, &apiError{Type: "NotFoundException", Message: fmt.Sprintf("grant %s is not on key %s", id, in.KeyId)}
		}
	}
	return struct{}{}, c.k.RetireGrant(ctx, id, c.who)
}

func (c *call) revokeGrant(ctx context.Context, in *request) (any, error) {
	if err := required("KeyId", in.KeyId, "GrantId", in.GrantId); err != nil {
		return nil, err
	}
	if !validGrantID(in.GrantId) {
		return nil, &apiError{Type: "InvalidGrantIdException", Message: fmt.Sprintf("grant id %q is not valid", in.GrantId)}
	}
	return struct{}{}, c.k.RevokeGrant(ctx, in.KeyId, in.GrantId)
}
