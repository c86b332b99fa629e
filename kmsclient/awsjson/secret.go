package awsjson

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"strconv"
	"sync"

	"github.com/hemd/hemd/hem/datakey"
)

// A response that carries a plaintext key (Decrypt or GenerateDataKey
// without a Recipient) is made in locked memory: the plaintext comes from
// the HSM into it, the JSON is written around it there, and it is wiped
// once sent. encoding/json would leave base64 copies in its pooled
// buffers, and net/http copies what it is given into its connection
// buffers, which nobody wipes: the body is laid out so that it does not.
//
// net/http (HTTP/1.1) buffers the first bytes of a response after its
// header in a 4 KiB bufio.Writer and writes a large remainder straight to
// the connection. So the body starts with leadingSpace bytes of JSON
// whitespace (all that is copied) and is at least minBody long, so that
// the rest, plaintext included, goes directly to the connection: a TLS
// connection encrypts records in place, a plain one hands them to the
// kernel.
const (
	leadingSpace = 4096
	minBody      = 8192 + 1
	// secretSize holds a plaintext of 4096 bytes, then the largest body:
	// the padding, base64 of 4096 bytes and of a ciphertext blob, the
	// fields, an ARN.
	secretPT   = 4096
	secretSize = 32 << 10
	// secretBuffers bounds the locked memory responses use at once.
	secretBuffers = 8
)

// secretPool lends locked buffers for secret responses.
type secretPool struct {
	sem  chan struct{}
	mu   sync.Mutex
	free []*datakey.Locked
}

func (p *secretPool) get(ctx context.Context) (*datakey.Locked, error) {
	select {
	case p.sem <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	p.mu.Lock()
	if n := len(p.free); n > 0 {
		l := p.free[n-1]
		p.free = p.free[:n-1]
		p.mu.Unlock()
		return l, nil
	}
	p.mu.Unlock()
	l, err := datakey.NewLocked(secretSize)
	if err != nil {
		<-p.sem
		return nil, err
	}
	return l, nil
}

func (p *secretPool) put(l *datakey.Locked) {
	clear(l.Bytes())
	p.mu.Lock()
	p.free = append(p.free, l)
	p.mu.Unlock()
	<-p.sem
}

// secretResponse is a JSON object with one secret field, built in locked
// memory.
type secretResponse struct {
	pool *secretPool
	mem  *datakey.Locked
	body []byte
}

// newSecret takes a locked buffer for a response; pt is where the HSM
// should write the plaintext.
func (s *Server) newSecret(ctx context.Context) (*secretResponse, []byte, error) {
	s.secretsOnce.Do(func() { s.secrets = &secretPool{sem: make(chan struct{}, secretBuffers)} })
	l, err := s.secrets.get(ctx)
	if err != nil {
		return nil, nil, &apiError{Type: "KMSInternalException", Message: "locked memory for the response: " + err.Error()}
	}
	return &secretResponse{pool: s.secrets, mem: l}, l.Bytes()[:secretPT], nil
}

// build lays out {public fields…, "Plaintext": base64(pt)} after the
// leading whitespace; pt is a slice of the response's locked memory.
func (r *secretResponse) build(public map[string]any, pt []byte) error {
	b := r.mem.Bytes()[secretPT:]
	n := leadingSpace
	for i := range n {
		b[i] = ' '
	}
	b[n] = '{'
	n++
	for _, name := range []string{"CiphertextBlob", "KeyId", "EncryptionAlgorithm"} {
		v, ok := public[name]
		if !ok {
			continue
		}
		enc, err := json.Marshal(v)
		if err != nil {
			return err
		}
		n += copy(b[n:], `"`+name+`":`)
		n += copy(b[n:], enc)
		b[n] = ','
		n++
	}
	n += copy(b[n:], `"Plaintext":"`)
	base64.StdEncoding.Encode(b[n:], pt)
	n += base64.StdEncoding.EncodedLen(len(pt))
	n += copy(b[n:], `"}`)
	for ; n < minBody; n++ {
		b[n] = ' '
	}
	r.body = b[:n]
	return nil
}

// write sends the response and wipes its memory.
func (r *secretResponse) write(w http.ResponseWriter) {
	defer r.release()
	w.Header().Set("Content-Type", "application/x-amz-json-1.1")
	w.Header().Set("Content-Length", strconv.Itoa(len(r.body)))
	w.Write(r.body)
}

// release wipes the memory and gives it back; safe to call twice.
func (r *secretResponse) release() {
	if r.mem != nil {
		r.pool.put(r.mem)
		r.mem = nil
	}
}
