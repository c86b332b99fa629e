package awsjson

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
)

// The AWS SigV4 test suite's credentials (docs.aws.amazon.com, "Signature
// Version 4 test suite", aws-sig-v4-test-suite).
const (
	suiteKey    = "AKIDEXAMPLE"
	suiteSecret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
)

// readRequest parses a raw HTTP request as a server receives it.
func readRequest(t *testing.T, raw string) *http.Request {
	t.Helper()
	r, err := http.ReadRequest(bufio.NewReader(strings.NewReader(strings.ReplaceAll(raw, "\n", "\r\n") + "\r\n\r\n")))
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// TestSigV4Suite checks the canonical request and the signature against
// cases of the AWS SigV4 test suite (20150830T123600Z, us-east-1, service
// "service"): the .sreq requests, their .creq canonical requests and the
// signatures of their .authz files.
func TestSigV4Suite(t *testing.T) {
	for _, tc := range []struct {
		name, sreq, creq, signed, sig string
	}{
		{
			name: "get-utf8",
			sreq: "GET /ሴ HTTP/1.1\nHost:example.amazonaws.com\nX-Amz-Date:20150830T123600Z",
			creq: "GET\n/%E1%88%B4\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\n" +
				"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
			signed: "host;x-amz-date",
			sig:    "8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85",
		},
		{
			name: "post-vanilla-query",
			sreq: "POST /?Param1=value1 HTTP/1.1\nHost:example.amazonaws.com\nX-Amz-Date:20150830T123600Z",
			creq: "POST\n/\nParam1=value1\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\n" +
				"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
			signed: "host;x-amz-date",
			sig:    "28038455d6de14eafc1f9222cf5aa6f1a96197d7deb8263271d420d138af7f11",
		},
		{
			name: "get-header-value-order",
			sreq: "GET / HTTP/1.1\nHost:example.amazonaws.com\nMy-Header1:value4\nMy-Header1:value1\nMy-Header1:value3\n" +
				"My-Header1:value2\nX-Amz-Date:20150830T123600Z",
			creq: "GET\n/\n\nhost:example.amazonaws.com\nmy-header1:value4,value1,value3,value2\nx-amz-date:20150830T123600Z\n\n" +
				"host;my-header1;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
			signed: "host;my-header1;x-amz-date",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := readRequest(t, tc.sreq)
			signed := strings.Split(tc.signed, ";")
			creq := canonicalRequest(r, signed, nil)
			if creq != tc.creq {
				t.Fatalf("canonical request:\n%s\nwant:\n%s", creq, tc.creq)
			}
			if tc.sig == "" {
				return
			}
			a := &sigV4Auth{AccessKeyID: suiteKey, Date: "20150830", Region: "us-east-1", Service: "service", SignedHeaders: signed}
			if got := hex.EncodeToString(signature(suiteSecret, a, "20150830T123600Z", creq)); got != tc.sig {
				t.Fatalf("signature %s, want %s", got, tc.sig)
			}
		})
	}
}

func TestCanonicalURI(t *testing.T) {
	for in, want := range map[string]string{
		"":              "/",
		"/":             "/",
		"//example//":   "/example/",
		"/./a/../b/":    "/b/",
		"/a b":          "/a%20b",
		"/%7Efoo":       "/%257Efoo", // as received, encoded again
		"/kms/v1":       "/kms/v1",
		"/a/b/c/../../": "/a/",
	} {
		if got := canonicalURI(in); got != want {
			t.Errorf("canonicalURI(%q) = %q, want %q", in, got, want)
		}
	}
}

// sdkSign signs r as the AWS SDK for Go v2 does (an implementation we did
// not write), for body at t.
func sdkSign(t testing.TB, r *http.Request, body []byte, akid, secret, region, service string, at time.Time) {
	t.Helper()
	sum := sha256.Sum256(body)
	creds := aws.Credentials{AccessKeyID: akid, SecretAccessKey: secret}
	if err := v4.NewSigner().SignHTTP(context.Background(), creds, r, hex.EncodeToString(sum[:]), service, region, at); err != nil {
		t.Fatal(err)
	}
}

// received is r as hemd's server sees it: written on the wire and read back.
func received(t testing.TB, r *http.Request, body []byte) *http.Request {
	t.Helper()
	var wire bytes.Buffer
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))
	if err := r.Write(&wire); err != nil {
		t.Fatal(err)
	}
	got, err := http.ReadRequest(bufio.NewReader(&wire))
	if err != nil {
		t.Fatal(err)
	}
	return got
}

var sigServer = &Server{Region: "eu-west-1", Principals: []Principal{{AccessKeyID: "AKIDSIG", SecretAccessKey: "sigsecret", Name: "sig"}}}

// TestSigV4CrossCheck: requests the AWS SDK signs, with random headers,
// paths and queries, verify; each changed in one signed place does not.
func TestSigV4CrossCheck(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	now := time.Now()
	words := []string{"a", "B", "x y", "  padded  ", "a  b   c", "ü", "%", "=", "&", "~", "+", "/"}
	pick := func() string { return words[rng.IntN(len(words))] }
	for i := range 200 {
		body := []byte(fmt.Sprintf(`{"KeyId":"%s","n":%d}`, pick(), i))
		path := "/"
		if i%3 == 1 {
			path = "/" + uriEncode(pick()) + "/" + uriEncode(pick())
		}
		query := ""
		if i%4 == 1 {
			query = "?" + uriEncode(pick()) + "=" + uriEncode(pick()) + "&z=1"
		}
		r, _ := http.NewRequest("POST", "http://kms.example:7788"+path+query, bytes.NewReader(body))
		r.Header.Set("Content-Type", "application/x-amz-json-1.1")
		r.Header.Set("X-Amz-Target", "TrentService.ListKeys")
		for j := range rng.IntN(4) {
			r.Header.Add(fmt.Sprintf("X-Extra-%d", j%2), pick())
		}
		sdkSign(t, r, body, "AKIDSIG", "sigsecret", "eu-west-1", "kms", now)
		got := received(t, r, body)
		if _, err := sigServer.verifySigV4(got, body, now); err != nil {
			t.Fatalf("request %d (%s%s, headers %v) refused: %v", i, path, query, got.Header, err)
		}
		// Changed body, header value, path: each refused.
		changed := append(bytes.Clone(body), ' ')
		if _, err := sigServer.verifySigV4(got, changed, now); err == nil || err.Type != "InvalidSignatureException" {
			t.Fatalf("changed body: %v", err)
		}
		got.Header.Set("X-Amz-Target", "TrentService.Decrypt")
		if _, err := sigServer.verifySigV4(got, body, now); err == nil || err.Type != "InvalidSignatureException" {
			t.Fatalf("changed X-Amz-Target: %v", err)
		}
	}
}

// TestSigV4Refused breaks one part of a good request at a time and expects
// exactly AWS's error for it.
func TestSigV4Refused(t *testing.T) {
	now := time.Now()
	body := []byte(`{}`)
	good := func(mod func(r *http.Request)) *http.Request {
		r, _ := http.NewRequest("POST", "http://127.0.0.1:7788/", bytes.NewReader(body))
		r.Header.Set("Content-Type", "application/x-amz-json-1.1")
		r.Header.Set("X-Amz-Target", "TrentService.ListKeys")
		sdkSign(t, r, body, "AKIDSIG", "sigsecret", "eu-west-1", "kms", now)
		if mod != nil {
			mod(r)
		}
		return received(t, r, body)
	}
	editAuth := func(old, new string) func(r *http.Request) {
		return func(r *http.Request) {
			r.Header.Set("Authorization", strings.Replace(r.Header.Get("Authorization"), old, new, 1))
		}
	}
	signedAt := func(at time.Time, akid, secret, region, service string) func(r *http.Request) {
		return func(r *http.Request) {
			r.Header.Del("Authorization")
			r.Header.Del("X-Amz-Date")
			sdkSign(t, r, body, akid, secret, region, service, at)
		}
	}
	if _, err := sigServer.verifySigV4(good(nil), body, now); err != nil {
		t.Fatalf("the good request: %v", err)
	}
	if _, err := sigServer.verifySigV4(good(signedAt(now.Add(-4*time.Minute), "AKIDSIG", "sigsecret", "eu-west-1", "kms")), body, now); err != nil {
		t.Fatalf("signed 4 minutes ago: %v", err)
	}
	for _, tc := range []struct {
		name string
		mod  func(r *http.Request)
		typ  string
		msg  string
	}{
		{"unsigned", func(r *http.Request) { r.Header.Del("Authorization") }, "MissingAuthenticationTokenException", "Missing Authentication Token"},
		{"presigned", func(r *http.Request) {
			r.Header.Del("Authorization")
			r.URL.RawQuery = "X-Amz-Signature=00"
		}, "MissingAuthenticationTokenException", "presigned"},
		{"SigV2-style", func(r *http.Request) { r.Header.Set("Authorization", "AWS AKIDSIG:abc=") }, "IncompleteSignatureException", "unsupported authorization type"},
		{"SigV4a", editAuth("AWS4-HMAC-SHA256", "AWS4-ECDSA-P256-SHA256"), "IncompleteSignatureException", "unsupported authorization type"},
		{"no Credential", editAuth("Credential=", "Cred="), "IncompleteSignatureException", "requires 'Credential'"},
		{"no SignedHeaders", editAuth("SignedHeaders=", "Signed="), "IncompleteSignatureException", "requires 'SignedHeaders'"},
		{"no Signature", editAuth("Signature=", "Sig="), "IncompleteSignatureException", "requires 'Signature'"},
		{"Signature twice", func(r *http.Request) { r.Header.Set("Authorization", r.Header.Get("Authorization")+", Signature=00") }, "IncompleteSignatureException", "twice"},
		{"short Credential", editAuth("/eu-west-1/kms/", "/eu-west-1/"), "IncompleteSignatureException", "exactly 5"},
		{"bad terminator", editAuth("aws4_request", "aws5_request"), "IncompleteSignatureException", "terminator"},
		{"host not signed", editAuth("SignedHeaders=content-length;content-type;host;", "SignedHeaders=content-length;content-type;"), "IncompleteSignatureException", "'host' must be a 'SignedHeader'"},
		{"x-amz-date not signed", editAuth(";x-amz-date", ""), "IncompleteSignatureException", "'x-amz-date' must be a 'SignedHeader'"},
		{"SignedHeaders unsorted", editAuth("content-length;content-type", "content-type;content-length"), "IncompleteSignatureException", "sorted"},
		{"SignedHeaders upper case", editAuth(";host;", ";Host;"), "IncompleteSignatureException", "lower-case"},
		{"no X-Amz-Date", func(r *http.Request) { r.Header.Del("X-Amz-Date") }, "IncompleteSignatureException", "X-Amz-Date"},
		{"X-Amz-Date not ISO 8601 basic", func(r *http.Request) { r.Header.Set("X-Amz-Date", now.UTC().Format(time.RFC3339)) }, "IncompleteSignatureException", "ISO-8601"},
		{"unknown access key", signedAt(now, "AKIDNOBODY", "sigsecret", "eu-west-1", "kms"), "UnrecognizedClientException", "security token"},
		{"session token", func(r *http.Request) { r.Header.Set("X-Amz-Security-Token", "tok") }, "UnrecognizedClientException", "security token"},
		{"wrong secret", signedAt(now, "AKIDSIG", "wrong", "eu-west-1", "kms"), "InvalidSignatureException", "does not match"},
		{"other region", signedAt(now, "AKIDSIG", "sigsecret", "us-east-1", "kms"), "InvalidSignatureException", "valid region, not 'us-east-1'"},
		{"other service", signedAt(now, "AKIDSIG", "sigsecret", "eu-west-1", "s3"), "InvalidSignatureException", "correct service: 'kms'"},
		{"scope date not the request's", editAuth("/"+now.UTC().Format("20060102")+"/", "/19990101/"), "InvalidSignatureException", "Date in Credential scope"},
		{"signature changed", func(r *http.Request) {
			a := r.Header.Get("Authorization")
			last := a[len(a)-1]
			r.Header.Set("Authorization", a[:len(a)-1]+map[bool]string{true: "1", false: "0"}[last == '0'])
		}, "InvalidSignatureException", "does not match"},
		{"signature not hex", editAuth("Signature=", "Signature=zz"), "InvalidSignatureException", "does not match"},
		{"signed header changed", func(r *http.Request) { r.Header.Set("Content-Type", "application/json") }, "InvalidSignatureException", "does not match"},
		{"host changed", func(r *http.Request) { r.Host = "other:7788" }, "InvalidSignatureException", "does not match"},
		{"signed 6 minutes ago", signedAt(now.Add(-6*time.Minute), "AKIDSIG", "sigsecret", "eu-west-1", "kms"), "InvalidSignatureException", "Signature expired"},
		{"signed 6 minutes ahead", signedAt(now.Add(6*time.Minute), "AKIDSIG", "sigsecret", "eu-west-1", "kms"), "InvalidSignatureException", "not yet current"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := sigServer.verifySigV4(good(tc.mod), body, now)
			if err == nil || err.Type != tc.typ || !strings.Contains(err.Message, tc.msg) {
				t.Fatalf("got %v, want %s (%q)", err, tc.typ, tc.msg)
			}
		})
	}
}

// TestSigV4OverHTTP: the server's answer to a refused signature is AWS's
// JSON error with HTTP 400, and the request never reaches the KMS.
func TestSigV4OverHTTP(t *testing.T) {
	srv := httptest.NewServer(sigServer) // no KMS: a request that got through would panic
	defer srv.Close()
	body := []byte(`{}`)
	r, _ := http.NewRequest("POST", srv.URL+"/", bytes.NewReader(body))
	r.Header.Set("X-Amz-Target", "TrentService.ListKeys")
	sdkSign(t, r, body, "AKIDSIG", "wrong", "eu-west-1", "kms", time.Now())
	resp, err := http.DefaultClient.Do(r)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 400 || resp.Header.Get("Content-Type") != "application/x-amz-json-1.1" ||
		!strings.HasPrefix(string(raw), `{"__type":"InvalidSignatureException","message":"The request signature we calculated`) {
		t.Fatalf("HTTP %d %s: %s", resp.StatusCode, resp.Header.Get("Content-Type"), raw)
	}
}

// FuzzParseAuthorization: any Authorization header parses or is refused
// with IncompleteSignatureException, never a crash.
func FuzzParseAuthorization(f *testing.F) {
	f.Add("AWS4-HMAC-SHA256 Credential=AKID/20150830/us-east-1/kms/aws4_request, SignedHeaders=host;x-amz-date, Signature=00")
	f.Add("AWS4-HMAC-SHA256 Credential=,,=,SignedHeaders=;;")
	f.Add("AWS4-HMAC-SHA256")
	f.Fuzz(func(t *testing.T, h string) {
		a, err := parseAuthorization(h)
		if (a == nil) == (err == nil) {
			t.Fatalf("%q: %v %v", h, a, err)
		}
		if err != nil && err.Type != "IncompleteSignatureException" {
			t.Fatalf("%q: %v", h, err)
		}
	})
}
