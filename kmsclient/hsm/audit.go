package hsm

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"
)

// auditLog appends one JSON record per operation, shaped like a CloudTrail
// KMS event. It never holds key material, plaintext or ciphertext.
type auditLog struct {
	mu sync.Mutex
	f  *os.File
	w  io.Writer // a second copy of every record (SetAuditWriter), or nil
}

// SetAuditWriter sends a copy of every audit record (one JSON line each) to
// w as well as to the audit log file. nil stops the copy.
func (k *KMS) SetAuditWriter(w io.Writer) {
	if k.audit == nil {
		return
	}
	k.audit.mu.Lock()
	k.audit.w = w
	k.audit.mu.Unlock()
}

// Principal is who called an operation, for the audit log's userIdentity.
type Principal struct {
	Type string // "IAMUser" for a SigV4 principal, "LocalUser" for a uid
	Name string // the principal's name, or uid:N
	// AccessKeyID is the SigV4 access key id the request was signed with.
	AccessKeyID string
}

type principalKey struct{}

// WithPrincipal returns ctx naming the caller that audit records of
// operations run under it attribute the operation to (hemd kms serve sets it
// per request). Without it, the caller is this process's uid.
func WithPrincipal(ctx context.Context, p Principal) context.Context {
	return context.WithValue(ctx, principalKey{}, p)
}

// PrincipalFrom returns the principal WithPrincipal put in ctx.
func PrincipalFrom(ctx context.Context) (Principal, bool) {
	p, ok := ctx.Value(principalKey{}).(Principal)
	return p, ok
}

// AuditRecord is one line of the audit log.
type AuditRecord struct {
	EventVersion      string            `json:"eventVersion"`
	EventTime         time.Time         `json:"eventTime"`
	EventSource       string            `json:"eventSource"`
	EventName         string            `json:"eventName"`
	AWSRegion         string            `json:"awsRegion"`
	UserIdentity      map[string]string `json:"userIdentity"`
	RequestParameters map[string]any    `json:"requestParameters"`
	// ResponseElements is null, as CloudTrail logs it for KMS's data
	// operations: hemd never logs what an operation returned.
	ResponseElements map[string]any      `json:"responseElements"`
	ErrorCode        string              `json:"errorCode,omitempty"`
	ErrorMessage     string              `json:"errorMessage,omitempty"`
	Resources        []map[string]string `json:"resources,omitempty"`
	EventID          string              `json:"eventID"`
	EventType        string              `json:"eventType"`
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
func (k *KMS) recordLocked(ctx context.Context, op, arn string, ectx map[string]string, err error) {
	k.record(ctx, op, arn, ectx, err)
}

func (k *KMS) record(ctx context.Context, op, arn string, ectx map[string]string, err error) {
	k.recordWith(ctx, op, arn, ectx, nil, err)
}

// recordWith is record with more request parameters (a recipient's).
func (k *KMS) recordWith(ctx context.Context, op, arn string, ectx map[string]string, extra map[string]any, err error) {
	if k.audit == nil {
		return
	}
	params := map[string]any{}
	for name, v := range extra {
		params[name] = v
	}
	if arn != "" {
		params["keyId"] = arn
	}
	if ectx != nil {
		params["encryptionContext"] = ectx
	}
	who := map[string]string{"type": "LocalUser", "principalId": k.caller}
	if p, ok := PrincipalFrom(ctx); ok {
		who = map[string]string{"type": p.Type, "principalId": p.Name, "userName": p.Name}
		if p.AccessKeyID != "" {
			who["accessKeyId"] = p.AccessKeyID
		}
	}
	var id [16]byte
	rand.Read(id[:])
	r := AuditRecord{
		EventVersion: "1.08", EventTime: time.Now().UTC(), EventSource: "kms.amazonaws.com", EventName: op,
		AWSRegion: k.cfg.Region, UserIdentity: who,
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
	b = append(b, '\n')
	a.f.Write(b)
	if a.w != nil {
		a.w.Write(b)
	}
	a.mu.Unlock()
}
