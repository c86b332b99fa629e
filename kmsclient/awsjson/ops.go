package awsjson

import (
	"context"
	"encoding/json"
	"time"

	"github.com/hemd/hemd/kmsclient/hsm"
)

// Request and response shapes of the operations served, as the AWS KMS API
// names their fields. []byte fields are base64 in JSON, as on AWS.
type (
	keyRequest struct {
		KeyId                        string
		Description                  string
		AliasName                    string
		TargetKeyId                  string
		PendingWindowInDays          int
		EncryptionContext            map[string]string
		NumberOfBytes                int
		KeySpec                      string
		CiphertextBlob               []byte
		Plaintext                    []byte
		DestinationKeyId             string
		SourceEncryptionContext      map[string]string
		DestinationEncryptionContext map[string]string
		GranteePrincipal             string
		RetiringPrincipal            string
		Operations                   []string
		Constraints                  *hsm.GrantConstraints
		GrantId                      string
	}
	keyMetadata struct {
		KeyId        string
		Arn          string
		KeyState     string
		Enabled      bool
		Description  string
		CreationDate float64
		KeyUsage     string
		KeySpec      string
		Origin       string
		DeletionDate float64 `json:",omitempty"`
	}
)

func wire(m hsm.KeyMetadata) keyMetadata {
	w := keyMetadata{KeyId: m.KeyID, Arn: m.Arn, KeyState: m.KeyState, Enabled: m.Enabled, Description: m.Description,
		CreationDate: float64(m.CreationDate.UnixNano()) / float64(time.Second), KeyUsage: m.KeyUsage, KeySpec: m.KeySpec, Origin: m.Origin}
	if m.DeletionDate != nil {
		w.DeletionDate = float64(m.DeletionDate.Unix())
	}
	return w
}

// grantOp is the grant operation an API operation needs.
var grantOp = map[string]string{
	"Decrypt": "Decrypt", "Encrypt": "Encrypt", "GenerateDataKey": "GenerateDataKey",
	"GenerateDataKeyWithoutPlaintext": "GenerateDataKeyWithoutPlaintext", "DescribeKey": "DescribeKey",
	"ReEncrypt": "ReEncryptFrom", "RetireGrant": "RetireGrant",
}

// authorize checks a grants-only principal's grant for the operation.
func (s *Server) authorize(op string, in *keyRequest, who string) error {
	g, ok := grantOp[op]
	if !ok {
		return &apiError{Type: "AccessDeniedException", Message: who + " may only use keys through grants; " + op + " is not allowed"}
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
			if err := s.KMS.Authorize(in.DestinationKeyId, who, "ReEncryptTo", in.DestinationEncryptionContext); err != nil {
				return err
			}
		}
	}
	return s.KMS.Authorize(keyID, who, g, ectx)
}

func (s *Server) dispatch(ctx context.Context, op string, body []byte, who string, grantsOnly bool) (any, error) {
	var in keyRequest
	if len(body) > 0 {
		if err := json.Unmarshal(body, &in); err != nil {
			return nil, &apiError{Type: "SerializationException", Message: err.Error()}
		}
	}
	defer clear(in.Plaintext)
	if grantsOnly {
		if err := s.authorize(op, &in, who); err != nil {
			return nil, err
		}
	}
	k := s.KMS
	describe := func() (any, error) {
		m, err := k.DescribeKey(ctx, in.KeyId)
		if err != nil {
			return nil, err
		}
		return map[string]any{"KeyMetadata": wire(m)}, nil
	}
	empty := func(err error) (any, error) { return struct{}{}, err }
	switch op {
	case "CreateKey":
		m, err := k.CreateKey(ctx, in.Description)
		if err != nil {
			return nil, err
		}
		return map[string]any{"KeyMetadata": wire(m)}, nil
	case "DescribeKey":
		return describe()
	case "ListKeys":
		var keys []map[string]string
		for _, m := range k.ListKeys(ctx) {
			keys = append(keys, map[string]string{"KeyId": m.KeyID, "KeyArn": m.Arn})
		}
		return map[string]any{"Keys": keys, "Truncated": false}, nil
	case "EnableKey":
		return empty(k.EnableKey(ctx, in.KeyId))
	case "DisableKey":
		return empty(k.DisableKey(ctx, in.KeyId))
	case "ScheduleKeyDeletion":
		days := in.PendingWindowInDays
		if days == 0 {
			days = 30
		}
		if err := k.ScheduleKeyDeletion(ctx, in.KeyId, days); err != nil {
			return nil, err
		}
		m, _ := k.DescribeKey(ctx, in.KeyId)
		return map[string]any{"KeyId": m.Arn, "KeyState": m.KeyState, "PendingWindowInDays": days,
			"DeletionDate": wire(m).DeletionDate}, nil
	case "CancelKeyDeletion":
		if err := k.CancelKeyDeletion(ctx, in.KeyId); err != nil {
			return nil, err
		}
		m, _ := k.DescribeKey(ctx, in.KeyId)
		return map[string]any{"KeyId": m.Arn}, nil
	case "CreateAlias":
		return empty(k.CreateAlias(ctx, in.AliasName, in.TargetKeyId))
	case "GenerateDataKeyWithoutPlaintext":
		n := in.NumberOfBytes
		switch {
		case n == 0 && in.KeySpec == "AES_256":
			n = 32
		case n == 0 && in.KeySpec == "AES_128":
			n = 16
		case n == 0:
			return nil, &apiError{Type: "ValidationException", Message: "one of NumberOfBytes or KeySpec is required"}
		}
		blob, arn, err := k.GenerateDataKeyWithoutPlaintextN(ctx, in.KeyId, in.EncryptionContext, n)
		if err != nil {
			return nil, err
		}
		return map[string]any{"CiphertextBlob": blob, "KeyId": arn}, nil
	case "Decrypt":
		pt := make([]byte, 1024)
		defer clear(pt)
		n, arn, err := k.DecryptN(ctx, in.CiphertextBlob, in.EncryptionContext, pt)
		if err != nil {
			return nil, err
		}
		if in.KeyId != "" {
			if m, derr := k.DescribeKey(ctx, in.KeyId); derr != nil || m.Arn != arn {
				return nil, &apiError{Type: "IncorrectKeyException", Message: "the ciphertext was not encrypted under " + in.KeyId}
			}
		}
		return map[string]any{"Plaintext": append([]byte(nil), pt[:n]...), "KeyId": arn, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}, nil
	case "GenerateDataKey":
		n := in.NumberOfBytes
		if n == 0 {
			n = map[string]int{"AES_256": 32, "AES_128": 16}[in.KeySpec]
		}
		if n < 1 || n > 1024 {
			return nil, &apiError{Type: "ValidationException", Message: "one of NumberOfBytes (1..1024) or KeySpec is required"}
		}
		pt := make([]byte, n)
		blob, arn, err := k.GenerateDataKey(ctx, in.KeyId, in.EncryptionContext, pt)
		if err != nil {
			return nil, err
		}
		return map[string]any{"CiphertextBlob": blob, "Plaintext": pt, "KeyId": arn}, nil
	case "Encrypt":
		blob, arn, err := k.Encrypt(ctx, in.KeyId, in.EncryptionContext, in.Plaintext)
		if err != nil {
			return nil, err
		}
		return map[string]any{"CiphertextBlob": blob, "KeyId": arn, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}, nil
	case "ReEncrypt":
		blob, arn, err := k.ReEncrypt(ctx, in.CiphertextBlob, in.SourceEncryptionContext, in.DestinationKeyId, in.DestinationEncryptionContext)
		if err != nil {
			return nil, err
		}
		return map[string]any{"CiphertextBlob": blob, "KeyId": arn}, nil
	case "CreateGrant":
		id, err := k.CreateGrant(ctx, in.KeyId, in.GranteePrincipal, in.RetiringPrincipal, in.Operations, in.Constraints)
		if err != nil {
			return nil, err
		}
		return map[string]any{"GrantId": id, "GrantToken": id}, nil
	case "ListGrants":
		gs, err := k.ListGrants(ctx, in.KeyId)
		if err != nil {
			return nil, err
		}
		var out []map[string]any
		for _, g := range gs {
			out = append(out, map[string]any{"GrantId": g.GrantID, "KeyId": s.KMS.ARN(g.KeyID), "GranteePrincipal": g.GranteePrincipal,
				"RetiringPrincipal": g.RetiringPrincipal, "Operations": g.Operations, "Constraints": g.Constraints,
				"CreationDate": float64(g.CreationDate.Unix())})
		}
		return map[string]any{"Grants": out, "Truncated": false}, nil
	case "RetireGrant":
		return empty(k.RetireGrant(ctx, in.GrantId, who))
	case "RevokeGrant":
		return empty(k.RevokeGrant(ctx, in.KeyId, in.GrantId))
	case "ListAliases":
		out, err := k.ListAliases(ctx, in.KeyId)
		if err != nil {
			return nil, err
		}
		return map[string]any{"Aliases": out, "Truncated": false}, nil
	case "EnableKeyRotation", "DisableKeyRotation":
		return empty(k.EnableKeyRotation(ctx, in.KeyId, op == "EnableKeyRotation"))
	case "GetKeyRotationStatus":
		m, err := k.DescribeKey(ctx, in.KeyId)
		if err != nil {
			return nil, err
		}
		return map[string]any{"KeyRotationEnabled": m.RotationEnabled, "KeyId": m.Arn}, nil
	case "RotateKeyOnDemand":
		if err := k.RotateKey(ctx, in.KeyId); err != nil {
			return nil, err
		}
		m, _ := k.DescribeKey(ctx, in.KeyId)
		return map[string]any{"KeyId": m.Arn}, nil
	}
	return nil, &apiError{Type: "UnknownOperationException", Message: "operation " + op + " is not supported"}
}
