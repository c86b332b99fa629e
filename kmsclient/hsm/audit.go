package hsm

import (
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"
)

// auditLog appends one JSON record per operation, shaped like a CloudTrail
// KMS event. It never holds key material, plaintext or ciphertext.
type auditLog struct {
	mu sync.Mutex
	f  *os.File
}

// AuditRecord is one line of the audit log.
type AuditRecord struct {
	EventVersion      string              `json:"eventVersion"`
	EventTime         time.Time           `json:"eventTime"`
	EventSource       string              `json:"eventSource"`
	EventName         string              `json:"eventName"`
	AWSRegion         string              `json:"awsRegion"`
	UserIdentity      map[string]string   `json:"userIdentity"`
	RequestParameters map[string]any      `json:"requestParameters"`
	ErrorCode         string              `json:"errorCode,omitempty"`
	ErrorMessage      string              `json:"errorMessage,omitempty"`
	Resources         []map[string]string `json:"resources,omitempty"`
	EventID           string              `json:"eventID"`
	EventType         string              `json:"eventType"`
}

func openAudit(path string) (*auditLog, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("kms: audit log: %w", err)
	}
	return &auditLog{f: f}, nil
}

func (a *auditLog) close() { a.f.Close() }

// AuditPath is where the audit log of a state directory is.
func AuditPath(stateDir string) string { return stateDir + "/audit.log" }

// recordLocked is record for callers holding k.mu (record takes no lock of
// k's, so it is the same).
func (k *KMS) recordLocked(op, arn string, ectx map[string]string, err error) {
	k.record(op, arn, ectx, err)
}

func (k *KMS) record(op, arn string, ectx map[string]string, err error) {
	if k.audit == nil {
		return
	}
	params := map[string]any{}
	if arn != "" {
		params["keyId"] = arn
	}
	if ectx != nil {
		params["encryptionContext"] = ectx
	}
	var id [16]byte
	rand.Read(id[:])
	r := AuditRecord{
		EventVersion: "1.08", EventTime: time.Now().UTC(), EventSource: "kms.amazonaws.com", EventName: op,
		AWSRegion: k.cfg.Region, UserIdentity: map[string]string{"type": "LocalUser", "principalId": k.caller},
		RequestParameters: params, EventID: uuidString(id), EventType: "AwsApiCall",
	}
	if arn != "" {
		r.Resources = []map[string]string{{"type": "AWS::KMS::Key", "ARN": arn}}
	}
	if err != nil {
		var ke *Error
		if errors.As(err, &ke) {
			r.ErrorCode, r.ErrorMessage = ke.Type, ke.Message
		} else {
			r.ErrorCode, r.ErrorMessage = "InternalError", err.Error()
		}
	}
	b, _ := json.Marshal(r)
	a := k.audit
	a.mu.Lock()
	a.f.Write(append(b, '\n'))
	a.mu.Unlock()
}
