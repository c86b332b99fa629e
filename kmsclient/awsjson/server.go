// Package awsjson speaks the AWS KMS wire protocol (JSON 1.1 over HTTP,
// X-Amz-Target: TrentService.<Op>, base64 byte fields, {"__type","message"}
// errors): a server in front of hemd's PKCS#11 KMS, so that AWS tooling and
// other hosts can use it, and a client, so that hemd can use a remote KMS.
// TCP requests must be signed with AWS Signature V4 by a configured
// principal; callers on a unix socket are identified by their uid.
package awsjson

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"github.com/hemd/hemd/kmsclient/hsm"
	"golang.org/x/sys/unix"
)

// Principal is a caller allowed to sign requests.
type Principal struct {
	AccessKeyID     string `toml:"access_key_id"`
	SecretAccessKey string `toml:"secret_access_key"`
	Name            string `toml:"name"`
	// GrantsOnly principals (a host's hemd) may only use keys through
	// grants that name them, within the grants' context constraints.
	GrantsOnly bool `toml:"grants_only"`
}

// Server is the KMS's HTTP handler.
type Server struct {
	KMS        *hsm.KMS
	Region     string
	Principals []Principal
	// UnixUIDs may call over a unix socket (default: root and the server's
	// own uid).
	UnixUIDs []int
	Log      *slog.Logger
}

type ctxKey struct{}

// ConnContext records a unix-socket peer's credentials on the request
// context; use it as http.Server.ConnContext.
func ConnContext(ctx context.Context, c net.Conn) context.Context {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return ctx
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return ctx
	}
	var cred *unix.Ucred
	raw.Control(func(fd uintptr) { cred, _ = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) })
	if cred == nil {
		return ctx
	}
	return context.WithValue(ctx, ctxKey{}, cred)
}

// apiError is a KMS error on the wire.
type apiError struct {
	Type    string `json:"__type"`
	Message string `json:"message"`
	status  int
}

func (e *apiError) Error() string { return e.Type + ": " + e.Message }

func fail(w http.ResponseWriter, e *apiError) {
	w.Header().Set("Content-Type", "application/x-amz-json-1.1")
	if e.status == 0 {
		e.status = http.StatusBadRequest
	}
	w.WriteHeader(e.status)
	json.NewEncoder(w).Encode(e)
}

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		fail(w, &apiError{Type: "UnknownOperationException", Message: "POST only", status: http.StatusMethodNotAllowed})
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		fail(w, &apiError{Type: "SerializationException", Message: err.Error()})
		return
	}
	who, grantsOnly, aerr := s.authenticate(r, body)
	if aerr != nil {
		if s.Log != nil {
			s.Log.Warn("kms request refused", "remote", r.RemoteAddr, "err", aerr)
		}
		fail(w, aerr)
		return
	}
	op := strings.TrimPrefix(r.Header.Get("X-Amz-Target"), "TrentService.")
	out, err := s.dispatch(hsm.WithPrincipal(r.Context(), principalOf(r, who)), op, body, who, grantsOnly)
	if err != nil {
		var he *hsm.Error
		var ae *apiError
		switch {
		case errors.As(err, &ae):
			fail(w, ae)
		case errors.As(err, &he):
			fail(w, &apiError{Type: he.Type, Message: he.Message})
		default:
			fail(w, &apiError{Type: "KMSInternalException", Message: err.Error(), status: 500})
		}
		if s.Log != nil {
			s.Log.Info("kms request failed", "op", op, "caller", who, "err", err)
		}
		return
	}
	w.Header().Set("Content-Type", "application/x-amz-json-1.1")
	json.NewEncoder(w).Encode(out)
}

// principalOf names an authenticated caller for the audit log.
func principalOf(r *http.Request, who string) hsm.Principal {
	if strings.HasPrefix(who, "uid:") {
		return hsm.Principal{Type: "LocalUser", Name: who}
	}
	p := hsm.Principal{Type: "IAMUser", Name: who}
	if _, cred, ok := strings.Cut(r.Header.Get("Authorization"), "Credential="); ok {
		p.AccessKeyID, _, _ = strings.Cut(cred, "/")
	}
	return p
}

// authenticate identifies the caller: a unix-socket peer by uid, a TCP one
// by its SigV4 signature.
func (s *Server) authenticate(r *http.Request, body []byte) (string, bool, *apiError) {
	if cred, ok := r.Context().Value(ctxKey{}).(*unix.Ucred); ok {
		uids := s.UnixUIDs
		if len(uids) == 0 {
			uids = []int{0, unix.Getuid()}
		}
		for _, u := range uids {
			if int(cred.Uid) == u {
				return fmt.Sprintf("uid:%d", cred.Uid), false, nil
			}
		}
		return "", false, &apiError{Type: "AccessDeniedException", Message: fmt.Sprintf("uid %d may not use this KMS", cred.Uid)}
	}
	p, err := s.verifySigV4(r, body)
	if err != nil {
		return "", false, err
	}
	return p.Name, p.GrantsOnly, nil
}

// verifySigV4 re-signs the request with the principal's secret and compares.
func (s *Server) verifySigV4(r *http.Request, body []byte) (*Principal, *apiError) {
	auth := r.Header.Get("Authorization")
	if !strings.HasPrefix(auth, "AWS4-HMAC-SHA256 ") {
		return nil, &apiError{Type: "MissingAuthenticationTokenException", Message: "request is not signed (AWS Signature V4 required)"}
	}
	fields := map[string]string{}
	for _, f := range strings.Split(strings.TrimPrefix(auth, "AWS4-HMAC-SHA256 "), ",") {
		if k, v, ok := strings.Cut(strings.TrimSpace(f), "="); ok {
			fields[k] = v
		}
	}
	scope := strings.Split(fields["Credential"], "/")
	if len(scope) != 5 || scope[4] != "aws4_request" || fields["Signature"] == "" || fields["SignedHeaders"] == "" {
		return nil, &apiError{Type: "IncompleteSignatureException", Message: "malformed Authorization header"}
	}
	akid, region, service := scope[0], scope[2], scope[3]
	var p *Principal
	for i := range s.Principals {
		if s.Principals[i].AccessKeyID == akid {
			p = &s.Principals[i]
		}
	}
	if p == nil {
		return nil, &apiError{Type: "UnrecognizedClientException", Message: "the security token included in the request is invalid"}
	}
	t, err := time.Parse("20060102T150405Z", r.Header.Get("X-Amz-Date"))
	if err != nil || time.Since(t).Abs() > 15*time.Minute {
		return nil, &apiError{Type: "InvalidSignatureException", Message: "X-Amz-Date missing or more than 15 minutes off"}
	}
	sum := sha256.Sum256(body)
	hash := hex.EncodeToString(sum[:])
	again, _ := http.NewRequest(r.Method, "http://"+r.Host+r.URL.RequestURI(), bytes.NewReader(body))
	again.Host = r.Host
	for _, h := range strings.Split(fields["SignedHeaders"], ";") {
		if h != "host" {
			again.Header[http.CanonicalHeaderKey(h)] = r.Header.Values(h)
		}
		if h == "content-length" {
			again.ContentLength = int64(len(body))
		}
	}
	creds := aws.Credentials{AccessKeyID: akid, SecretAccessKey: p.SecretAccessKey}
	if err := v4.NewSigner().SignHTTP(r.Context(), creds, again, hash, service, region, t); err != nil {
		return nil, &apiError{Type: "InvalidSignatureException", Message: err.Error()}
	}
	mine := again.Header.Get("Authorization")
	want := "Signature=" + fields["Signature"]
	if i := strings.Index(mine, "Signature="); i < 0 || subtle.ConstantTimeCompare([]byte(mine[i:]), []byte(want)) != 1 {
		return nil, &apiError{Type: "InvalidSignatureException", Message: "the request signature does not match"}
	}
	return p, nil
}
