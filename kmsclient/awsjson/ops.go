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
		KeyId               string
		Description         string
		AliasName           string
		TargetKeyId         string
		PendingWindowInDays int
		EncryptionContext   map[string]string
		NumberOfBytes       int
		KeySpec             string
		CiphertextBlob      []byte
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
	}
)

func wire(m hsm.KeyMetadata) keyMetadata {
	return keyMetadata{KeyId: m.KeyID, Arn: m.Arn, KeyState: m.KeyState, Enabled: m.Enabled, Description: m.Description,
		CreationDate: float64(m.CreationDate.UnixNano()) / float64(time.Second), KeyUsage: m.KeyUsage, KeySpec: m.KeySpec, Origin: m.Origin}
}

func (s *Server) dispatch(ctx context.Context, op string, body []byte) (any, error) {
	var in keyRequest
	if len(body) > 0 {
		if err := json.Unmarshal(body, &in); err != nil {
			return nil, &apiError{Type: "SerializationException", Message: err.Error()}
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
		return map[string]any{"KeyId": m.Arn, "KeyState": m.KeyState, "PendingWindowInDays": days}, nil
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
	}
	return nil, &apiError{Type: "UnknownOperationException", Message: "operation " + op + " is not supported"}
}
