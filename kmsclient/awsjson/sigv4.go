package awsjson

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
)

// AWS Signature Version 4, verified as the SigV4 documentation describes it
// ("Create a signed AWS API request"): the canonical request is built from
// the request as received, over exactly the headers the client lists in
// SignedHeaders, and the signature is compared in constant time.

const (
	sigV4Algorithm = "AWS4-HMAC-SHA256"
	amzDateLayout  = "20060102T150405Z"
	// maxClockSkew is how far X-Amz-Date may be from the server's clock.
	maxClockSkew = 5 * time.Minute
	// kmsService is the service name a request's credential scope must name.
	kmsService = "kms"
)

// sigV4Auth is a parsed Authorization header.
type sigV4Auth struct {
	AccessKeyID   string
	Date          string // the scope's YYYYMMDD
	Region        string
	Service       string
	SignedHeaders []string
	Signature     string // hex, as sent
}

func incomplete(format string, a ...any) *apiError {
	return &apiError{Type: "IncompleteSignatureException", Message: fmt.Sprintf(format, a...)}
}

func invalidSig(format string, a ...any) *apiError {
	return &apiError{Type: "InvalidSignatureException", Message: fmt.Sprintf(format, a...)}
}

// parseAuthorization parses "AWS4-HMAC-SHA256 Credential=AKID/DATE/REGION/
// SERVICE/aws4_request, SignedHeaders=a;b, Signature=HEX".
func parseAuthorization(h string) (*sigV4Auth, *apiError) {
	alg, rest, _ := strings.Cut(strings.TrimSpace(h), " ")
	if alg != sigV4Algorithm {
		return nil, incomplete("unsupported authorization type %q: only %s (Signature Version 4) is accepted", alg, sigV4Algorithm)
	}
	fields := map[string]string{}
	for _, f := range strings.Split(rest, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		k, v, ok := strings.Cut(f, "=")
		if !ok {
			return nil, incomplete("Authorization header component %q is not KEY=VALUE", f)
		}
		if _, dup := fields[k]; dup {
			return nil, incomplete("Authorization header has %s twice", k)
		}
		fields[k] = v
	}
	var missing []string
	for _, k := range []string{"Credential", "SignedHeaders", "Signature"} {
		if fields[k] == "" {
			missing = append(missing, fmt.Sprintf("Authorization header requires '%s' parameter.", k))
		}
	}
	if len(missing) > 0 {
		return nil, incomplete("%s", strings.Join(missing, " "))
	}
	scope := strings.Split(fields["Credential"], "/")
	if len(scope) != 5 || scope[0] == "" {
		return nil, incomplete("Credential must have exactly 5 slash-delimited elements, e.g. keyid/date/region/service/term, got '%s'", fields["Credential"])
	}
	if scope[4] != "aws4_request" {
		return nil, incomplete("Credential should be scoped with a valid terminator: 'aws4_request', not '%s'.", scope[4])
	}
	a := &sigV4Auth{AccessKeyID: scope[0], Date: scope[1], Region: scope[2], Service: scope[3],
		SignedHeaders: strings.Split(fields["SignedHeaders"], ";"), Signature: fields["Signature"]}
	for i, s := range a.SignedHeaders {
		if s == "" || s != strings.ToLower(s) || (i > 0 && s <= a.SignedHeaders[i-1]) {
			return nil, incomplete("SignedHeaders %q is not a sorted list of distinct lower-case header names", fields["SignedHeaders"])
		}
	}
	for _, need := range []string{"host", "x-amz-date"} {
		if !slices.Contains(a.SignedHeaders, need) {
			return nil, incomplete("'%s' must be a 'SignedHeader' in the AWS Authorization.", need)
		}
	}
	return a, nil
}

// verifySigV4 authenticates a TCP request: its SigV4 signature over body
// must be that of a configured principal, scoped to this server's region
// and kms, made within maxClockSkew of now.
func (s *Server) verifySigV4(r *http.Request, body []byte, now time.Time) (*Principal, *apiError) {
	h := r.Header.Get("Authorization")
	if h == "" {
		if r.URL.Query().Has("X-Amz-Signature") {
			return nil, &apiError{Type: "MissingAuthenticationTokenException", Message: "Missing Authentication Token: presigned (query string) requests are not accepted; sign the Authorization header"}
		}
		return nil, &apiError{Type: "MissingAuthenticationTokenException", Message: "Missing Authentication Token"}
	}
	a, aerr := parseAuthorization(h)
	if aerr != nil {
		return nil, aerr
	}
	date := r.Header.Get("X-Amz-Date")
	if date == "" {
		return nil, incomplete("Authorization header requires existence of a 'X-Amz-Date' header.")
	}
	t, err := time.Parse(amzDateLayout, date)
	if err != nil || len(date) != len(amzDateLayout) {
		return nil, incomplete("Date must be in ISO-8601 'basic format'. Got '%s'.", date)
	}
	p := s.principal(a.AccessKeyID)
	if p == nil || r.Header.Get("X-Amz-Security-Token") != "" {
		// hemd's principals have long-term keys only: a session token
		// names credentials it cannot know.
		return nil, &apiError{Type: "UnrecognizedClientException", Message: "The security token included in the request is invalid."}
	}
	switch region := s.region(); {
	case a.Date != date[:8]:
		return nil, invalidSig("Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '%s' != '%s', from '%s'.", a.Date, date[:8], date)
	case a.Region != region:
		return nil, invalidSig("Credential should be scoped to a valid region, not '%s'. This KMS serves region '%s'.", a.Region, region)
	case a.Service != kmsService:
		return nil, invalidSig("Credential should be scoped to correct service: '%s'. ", kmsService)
	}
	want := signature(p.SecretAccessKey, a, date, canonicalRequest(r, a.SignedHeaders, body))
	got, err := hex.DecodeString(a.Signature)
	if err != nil || !hmac.Equal(got, want) {
		return nil, invalidSig("The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details.")
	}
	switch {
	case t.Before(now.Add(-maxClockSkew)):
		return nil, invalidSig("Signature expired: %s is now earlier than %s (%s - 5 min.)", date,
			now.Add(-maxClockSkew).UTC().Format(amzDateLayout), now.UTC().Format(amzDateLayout))
	case t.After(now.Add(maxClockSkew)):
		return nil, invalidSig("Signature not yet current: %s is still later than %s (%s + 5 min.)", date,
			now.Add(maxClockSkew).UTC().Format(amzDateLayout), now.UTC().Format(amzDateLayout))
	}
	return p, nil
}

// principal returns the principal with access key id akid, or nil.
func (s *Server) principal(akid string) *Principal {
	for i := range s.Principals {
		if s.Principals[i].AccessKeyID == akid {
			return &s.Principals[i]
		}
	}
	return nil
}

// signature is the request signature: HMAC-SHA256 of the string to sign
// under the key derived from the secret and the credential scope.
func signature(secret string, a *sigV4Auth, date, creq string) []byte {
	sum := sha256.Sum256([]byte(creq))
	scope := a.Date + "/" + a.Region + "/" + a.Service + "/aws4_request"
	sts := sigV4Algorithm + "\n" + date + "\n" + scope + "\n" + hex.EncodeToString(sum[:])
	key := []byte("AWS4" + secret)
	for _, part := range []string{a.Date, a.Region, a.Service, "aws4_request"} {
		key = hmacSHA256(key, part)
	}
	return hmacSHA256(key, sts)
}

func hmacSHA256(key []byte, data string) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(data))
	return m.Sum(nil)
}

// canonicalRequest is the SigV4 canonical request of r as received:
// method, canonical URI, canonical query string, the signed headers with
// their values, the signed header list and the payload's SHA-256.
func canonicalRequest(r *http.Request, signed []string, body []byte) string {
	var b strings.Builder
	b.WriteString(r.Method + "\n")
	b.WriteString(canonicalURI(receivedPath(r)) + "\n")
	b.WriteString(canonicalQuery(r.URL.RawQuery) + "\n")
	for _, name := range signed {
		b.WriteString(name + ":" + headerValue(r, name) + "\n")
	}
	b.WriteString("\n" + strings.Join(signed, ";") + "\n")
	sum := sha256.Sum256(body)
	b.WriteString(hex.EncodeToString(sum[:]))
	return b.String()
}

// receivedPath is the request's path exactly as it came in the request
// line (r.URL.Path has it decoded, EscapedPath may re-encode it).
func receivedPath(r *http.Request) string {
	if p, _, _ := strings.Cut(r.RequestURI, "?"); strings.HasPrefix(p, "/") {
		return p
	}
	return r.URL.EscapedPath()
}

// headerValue is a signed header's canonical value: every value the request
// has for it, each trimmed with inner runs of spaces made one, joined by
// commas. Go's server moves Host out of the header map and may drop
// Content-Length; they are taken from the request.
func headerValue(r *http.Request, name string) string {
	vals := r.Header.Values(name)
	switch {
	case name == "host":
		vals = []string{r.Host}
	case name == "content-length" && len(vals) == 0 && r.ContentLength >= 0:
		vals = []string{strconv.FormatInt(r.ContentLength, 10)}
	}
	out := make([]string, len(vals))
	for i, v := range vals {
		out[i] = strings.Join(strings.Fields(v), " ")
	}
	return strings.Join(out, ",")
}

// canonicalURI normalizes the path as received (empty and "." segments
// dropped, ".." segments resolved, as in the SigV4 test suite's
// normalize-path cases) and URI-encodes each segment, as SigV4 does for
// every service but S3: a path that arrived percent-encoded is encoded a
// second time.
func canonicalURI(path string) string {
	var segs []string
	for _, p := range strings.Split(path, "/") {
		switch p {
		case "", ".":
		case "..":
			if len(segs) > 0 {
				segs = segs[:len(segs)-1]
			}
		default:
			segs = append(segs, uriEncode(p))
		}
	}
	out := "/" + strings.Join(segs, "/")
	if len(segs) > 0 && strings.HasSuffix(path, "/") {
		out += "/"
	}
	return out
}

// canonicalQuery sorts the query's parameters by name, then value, each
// URI-encoded.
func canonicalQuery(raw string) string {
	if raw == "" {
		return ""
	}
	type kv struct{ k, v string }
	var ps []kv
	for _, p := range strings.Split(raw, "&") {
		if p == "" {
			continue
		}
		k, v, _ := strings.Cut(p, "=")
		if uk, err := url.QueryUnescape(k); err == nil {
			k = uk
		}
		if uv, err := url.QueryUnescape(v); err == nil {
			v = uv
		}
		ps = append(ps, kv{uriEncode(k), uriEncode(v)})
	}
	sort.Slice(ps, func(i, j int) bool {
		if ps[i].k != ps[j].k {
			return ps[i].k < ps[j].k
		}
		return ps[i].v < ps[j].v
	})
	out := make([]string, len(ps))
	for i, p := range ps {
		out[i] = p.k + "=" + p.v
	}
	return strings.Join(out, "&")
}

// uriEncode percent-encodes every byte but the unreserved characters
// A-Z a-z 0-9 - _ . ~, with upper-case hex digits.
func uriEncode(s string) string {
	const hexDigits = "0123456789ABCDEF"
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if 'A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_' || c == '.' || c == '~' {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('%')
		b.WriteByte(hexDigits[c>>4])
		b.WriteByte(hexDigits[c&15])
	}
	return b.String()
}
