// Package awsjson speaks the AWS KMS wire protocol (JSON 1.1 over HTTP,
// X-Amz-Target: TrentService.<Op>, base64 byte fields, {"__type","message"}
// errors): a server in front of hemd's PKCS#11 KMS, so that AWS tooling and
// other hosts can use it, and a client, so that hemd can use a remote KMS.
// TCP requests must be signed with AWS Signature V4 by a configured
// principal; callers on a unix socket are identified by their uid.
package awsjson

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

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
	// RequireRecipient: the principal's Decrypt and GenerateDataKey must
	// name a Recipient, so that no plaintext key is ever sent to it. The
	// default is GrantsOnly's value.
	RequireRecipient *bool `toml:"require_recipient"`
}

// MustUseRecipient reports whether p's plaintext-returning calls must name
// a Recipient.
func (p *Principal) MustUseRecipient() bool {
	if p.RequireRecipient != nil {
		return *p.RequireRecipient
	}
	return p.GrantsOnly
}

// certNames are the names a client certificate gives its holder: its
// subject's common name and its DNS and URI names.
func certNames(c *x509.Certificate) []string {
	names := append([]string{c.Subject.CommonName}, c.DNSNames...)
	for _, u := range c.URIs {
		names = append(names, u.String())
	}
	return names
}

// Server is the KMS's HTTP handler.
type Server struct {
	KMS *hsm.KMS
	// Region is the region requests must be signed for; empty means the
	// region of the KMS's key ARNs.
	Region     string
	Principals []Principal
	// UnixUIDs may call over a unix socket (default: root and the server's
	// own uid).
	UnixUIDs []int
	Log      *slog.Logger

	secretsOnce sync.Once
	secrets     *secretPool // locked memory of responses with plaintext
}

// maxBody is the largest request body read (Encrypt's 4096 bytes of
// plaintext take under 6 KiB of JSON).
const maxBody = 1 << 20

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

// statusOf is the HTTP status AWS KMS answers an error type with: 500 for
// the service's own failures, 400 for the caller's.
func statusOf(typ string) int {
	switch typ {
	case "KMSInternalException", "KeyUnavailableException", "DependencyTimeoutException":
		return http.StatusInternalServerError
	}
	return http.StatusBadRequest
}

// asAPIError turns any error of an operation into its wire form: KMS errors
// keep their type, anything else is a KMSInternalException.
func asAPIError(err error) *apiError {
	var ae *apiError
	var he *hsm.Error
	switch {
	case errors.As(err, &ae):
		return ae
	case errors.As(err, &he):
		return &apiError{Type: he.Type, Message: he.Message}
	}
	return &apiError{Type: "KMSInternalException", Message: err.Error()}
}

func (s *Server) fail(w http.ResponseWriter, e *apiError) {
	w.Header().Set("Content-Type", "application/x-amz-json-1.1")
	if e.status == 0 {
		e.status = statusOf(e.Type)
	}
	w.WriteHeader(e.status)
	json.NewEncoder(w).Encode(e)
}

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("X-Amzn-RequestId", requestID())
	if r.Method != http.MethodPost {
		s.fail(w, &apiError{Type: "UnknownOperationException", Message: "the AWS KMS protocol is POST only", status: http.StatusMethodNotAllowed})
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	if err != nil {
		s.fail(w, &apiError{Type: "SerializationException", Message: "reading the request: " + err.Error()})
		return
	}
	if len(body) > maxBody {
		s.fail(w, &apiError{Type: "ValidationException", Message: fmt.Sprintf("request body larger than %d bytes", maxBody), status: http.StatusRequestEntityTooLarge})
		return
	}
	who, p, aerr := s.authenticate(r, body)
	if aerr != nil {
		if s.Log != nil {
			s.Log.Warn("kms request refused", "remote", r.RemoteAddr, "err", aerr)
		}
		s.fail(w, aerr)
		return
	}
	target := r.Header.Get("X-Amz-Target")
	op, ok := strings.CutPrefix(target, "TrentService.")
	if !ok {
		s.fail(w, &apiError{Type: "UnknownOperationException", Message: fmt.Sprintf("X-Amz-Target %q is not TrentService.<operation>", target)})
		return
	}
	c := &call{s: s, k: s.KMS, who: who}
	if p != nil {
		c.grantsOnly, c.requireRecipient = p.GrantsOnly, p.MustUseRecipient()
	}
	defer c.wipeAll()
	out, err := c.dispatch(hsm.WithPrincipal(r.Context(), principalOf(r, who)), op, body)
	if err != nil {
		e := asAPIError(err)
		if s.Log != nil {
			s.Log.Info("kms request failed", "op", op, "caller", who, "err", e)
		}
		s.fail(w, e)
		return
	}
	if sr, ok := out.(*secretResponse); ok {
		sr.write(w) // plaintext: built and sent from locked memory
		return
	}
	b, err := json.Marshal(out)
	if err != nil {
		s.fail(w, asAPIError(err))
		return
	}
	c.wipe(b) // GenerateRandom's bytes
	w.Header().Set("Content-Type", "application/x-amz-json-1.1")
	w.Write(b)
}

// requestID is a fresh id in the form AWS's x-amzn-RequestId takes.
func requestID() string {
	var b [16]byte
	rand.Read(b[:])
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
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
// by its SigV4 signature, and, over mutual TLS, by a client certificate
// that must name the same principal.
func (s *Server) authenticate(r *http.Request, body []byte) (string, *Principal, *apiError) {
	if cred, ok := r.Context().Value(ctxKey{}).(*unix.Ucred); ok {
		uids := s.UnixUIDs
		if len(uids) == 0 {
			uids = []int{0, unix.Getuid()}
		}
		for _, u := range uids {
			if int(cred.Uid) == u {
				return fmt.Sprintf("uid:%d", cred.Uid), nil, nil
			}
		}
		return "", nil, &apiError{Type: "AccessDeniedException", Message: fmt.Sprintf("uid %d may not use this KMS", cred.Uid)}
	}
	p, err := s.verifySigV4(r, body, time.Now())
	if err != nil {
		return "", nil, err
	}
	if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
		leaf := r.TLS.PeerCertificates[0]
		if !slices.Contains(certNames(leaf), p.Name) {
			return "", nil, &apiError{Type: "AccessDeniedException", Message: fmt.Sprintf(
				"the client certificate (CN=%q) does not name principal %q, which signed the request", leaf.Subject.CommonName, p.Name)}
		}
	}
	return p.Name, p, nil
}

// SigningRegion is the region requests must be signed for.
func (s *Server) SigningRegion() string { return s.region() }

// region is the region requests are signed for and ARNs name.
func (s *Server) region() string {
	if s.Region != "" {
		return s.Region
	}
	if s.KMS != nil {
		if f := strings.Split(s.KMS.ARN("x"), ":"); len(f) > 3 {
			return f[3]
		}
	}
	return "local"
}

// account is the account id the KMS's ARNs name.
func (s *Server) account() string {
	if f := strings.Split(s.KMS.ARN("x"), ":"); len(f) > 4 {
		return f[4]
	}
	return ""
}
