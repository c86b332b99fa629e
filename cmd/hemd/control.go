package main

// The control socket of hemd serve: operations on the volumes a running hemd
// serves, asked by hemd's own commands or by an orchestrator.
//
// A unix socket, mode 0600 (and only peers running as root or as hemd's own
// user are answered). One request per connection: a JSON object naming its
// op, {"op":"snapshot",...}; one JSON answer, {"ok":true,...} or
// {"ok":false,"error":"...","code":"..."}, then the connection closes. A
// client that closes the connection before the answer cancels the
// operation (hemd snapshot create interrupted by ^C leaves no snapshot);
// shutting down only its sending side does not.
// Each op is one handler in a map: snapshot (snapshot_online.go); attach,
// detach, resize, modify and status (control_ops.go).

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/hemd/hemd/vhost"
	"golang.org/x/sys/unix"
)

// controlEnv names the control socket for hemd serve and the commands that
// ask it, where no flag (or config key) does.
const controlEnv = "HEMD_CONTROL"

// controlNone as the control socket path turns the control socket off.
const controlNone = "none"

// defaultControlPath is /run/hemd/control.sock for root and
// $XDG_RUNTIME_DIR/hemd/control.sock otherwise (without XDG_RUNTIME_DIR,
// TMPDIR/hemd-UID/control.sock).
func defaultControlPath() string {
	if os.Geteuid() == 0 {
		return "/run/hemd/control.sock"
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "hemd", "control.sock")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("hemd-%d", os.Geteuid()), "control.sock")
}

// controlPath resolves the control socket a command uses: the flag, else
// $HEMD_CONTROL, else the default. explicit reports whether the path was
// asked for rather than defaulted.
func controlPath(flag string) (path string, explicit bool) {
	switch {
	case flag != "":
		return flag, true
	case os.Getenv(controlEnv) != "":
		return os.Getenv(controlEnv), true
	}
	return defaultControlPath(), false
}

// Control answer codes a client acts on.
const (
	codeNotServed  = "NotServed"  // this hemd does not serve the volume named
	codeBadRequest = "BadRequest" // the request is malformed
	codeFailed     = "Failed"     // the operation failed
	codeInUse      = "InUse"      // the volume's front-end is connected (detach without force)
	codeBusy       = "Busy"       // an operation on the volume is in progress
	codeExists     = "Exists"     // the volume or its socket is served already
)

// controlError is an error with the code the answer carries.
type controlError struct {
	code string
	err  error
}

func (e *controlError) Error() string { return e.err.Error() }
func (e *controlError) Unwrap() error { return e.err }

// controlHandler carries out one op. req is the whole request object; the
// handler decodes it (decodeRequest) into its own type. What it returns is
// encoded as a JSON object and answered with "ok": true.
type controlHandler func(ctx context.Context, req json.RawMessage) (any, error)

// controlServer answers the control socket.
type controlServer struct {
	path     string
	ln       net.Listener
	handlers map[string]controlHandler
	log      *slog.Logger
	wg       sync.WaitGroup // connections being answered
}

// maxControlRequest bounds a request.
const maxControlRequest = 1 << 20

// listenControl creates the control socket at path (its directory made 0700
// if missing). A stale socket is replaced; one a live process serves is
// refused with vhost.ErrSocketInUse.
func listenControl(path string, log *slog.Logger) (*controlServer, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	ln, err := vhost.Listen(path)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	return &controlServer{path: path, ln: ln, handlers: map[string]controlHandler{}, log: log}, nil
}

// handle adds the handler of op.
func (s *controlServer) handle(op string, h controlHandler) { s.handlers[op] = h }

// serve answers connections until ctx ends, then closes the socket and
// waits for the operations in progress, which see ctx end.
func (s *controlServer) serve(ctx context.Context) {
	// Accept returns as soon as the listener is closed, before its Close
	// has removed the socket: serve returns only once that is done (a
	// second Do waits for the first).
	var once sync.Once
	closeLn := func() { once.Do(func() { s.ln.Close() }) }
	go func() {
		<-ctx.Done()
		closeLn()
	}()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			if ctx.Err() == nil {
				s.log.Error("control socket: accept", "socket", s.path, "err", err)
			}
			closeLn()
			break
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.answer(ctx, c)
		}()
	}
	s.wg.Wait()
}

// answer reads one request from c, carries it out and writes the answer.
func (s *controlServer) answer(ctx context.Context, c net.Conn) {
	defer c.Close()
	if err := allowedPeer(c); err != nil {
		s.log.Warn("control socket: peer refused", "socket", s.path, "err", err)
		writeAnswer(c, nil, &controlError{codeBadRequest, err})
		return
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	var raw json.RawMessage
	dec := json.NewDecoder(io.LimitReader(c, maxControlRequest))
	if err := dec.Decode(&raw); err != nil {
		writeAnswer(c, nil, &controlError{codeBadRequest, fmt.Errorf("read request: %w", err)})
		return
	}
	c.SetReadDeadline(time.Time{})
	var env struct {
		Op string `json:"op"`
	}
	if err := json.Unmarshal(raw, &env); err != nil {
		writeAnswer(c, nil, &controlError{codeBadRequest, fmt.Errorf("request: %w", err)})
		return
	}
	h, ok := s.handlers[env.Op]
	if !ok {
		writeAnswer(c, nil, &controlError{codeBadRequest, fmt.Errorf("unknown op %q", env.Op)})
		return
	}
	// The client closing its end cancels the operation.
	opCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	go watchHangup(opCtx, c, cancel)
	start := time.Now()
	res, err := h(opCtx, raw)
	s.log.Debug("control request", "op", env.Op, "took", time.Since(start), "err", err)
	writeAnswer(c, res, err)
}

// watchHangup calls hangup when the peer of c has closed the connection
// (not merely its sending side: a client such as socat shuts that down after
// its request and waits for the answer), until ctx ends.
func watchHangup(ctx context.Context, c net.Conn, hangup func()) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		return
	}
	for ctx.Err() == nil {
		gone := false
		if err := rc.Control(func(fd uintptr) {
			// No events asked: poll reports only POLLHUP and POLLERR,
			// which a unix stream socket shows once its peer is closed.
			p := []unix.PollFd{{Fd: int32(fd)}}
			if n, err := unix.Poll(p, 100); err == nil && n > 0 {
				gone = p[0].Revents&(unix.POLLHUP|unix.POLLERR|unix.POLLNVAL) != 0
			}
		}); err != nil || gone {
			hangup()
			return
		}
	}
}

// allowedPeer accepts a peer that runs as root or as this process's user.
func allowedPeer(c net.Conn) error {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return nil
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return err
	}
	if cerr != nil {
		return fmt.Errorf("peer credentials: %w", cerr)
	}
	if cred.Uid != 0 && int(cred.Uid) != os.Geteuid() {
		return fmt.Errorf("peer pid %d runs as uid %d: only root and uid %d may use the control socket", cred.Pid, cred.Uid, os.Geteuid())
	}
	return nil
}

// writeAnswer writes res as {"ok":true,...}, or err as
// {"ok":false,"error":...,"code":...}.
func writeAnswer(w io.Writer, res any, err error) {
	out := map[string]any{}
	if err == nil && res != nil {
		b, merr := json.Marshal(res)
		if merr == nil {
			dec := json.NewDecoder(bytes.NewReader(b))
			dec.UseNumber()
			merr = dec.Decode(&out)
		}
		if merr != nil {
			err = fmt.Errorf("encode answer: %w", merr)
		}
	}
	if err != nil {
		code := codeFailed
		var ce *controlError
		if errors.As(err, &ce) {
			code = ce.code
		}
		out = map[string]any{"error": err.Error(), "code": code}
	}
	out["ok"] = err == nil
	b, _ := json.Marshal(out)
	w.Write(append(b, '\n'))
}

// decodeRequest decodes a request into req, refusing unknown fields (req
// has an Op field for "op").
func decodeRequest(raw json.RawMessage, req any) error {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(req); err != nil {
		return &controlError{codeBadRequest, fmt.Errorf("request: %w", err)}
	}
	return nil
}

// errNoControl means no hemd answers at the control socket path.
var errNoControl = errors.New("no hemd listens there")

// controlAnswer is an answer's common part.
type controlAnswer struct {
	OK    bool   `json:"ok"`
	Error string `json:"error"`
	Code  string `json:"code"`
}

// controlCall sends req to the control socket at path and decodes the
// answer into res (which may embed controlAnswer). An error answer is a
// *controlError with its code; no hemd at path is errNoControl. ctx ending
// closes the connection, which cancels the operation.
func controlCall(ctx context.Context, path string, req, res any) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOTDIR) {
			return fmt.Errorf("control socket %s: %w", path, errNoControl)
		}
		return fmt.Errorf("control socket %s: %w", path, err)
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	if _, err := c.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("control socket %s: %w", path, err)
	}
	var raw json.RawMessage
	if err := json.NewDecoder(io.LimitReader(c, maxControlRequest)).Decode(&raw); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("control socket %s: read answer: %w", path, err)
	}
	var ans controlAnswer
	if err := json.Unmarshal(raw, &ans); err != nil {
		return fmt.Errorf("control socket %s: answer: %w", path, err)
	}
	if !ans.OK {
		if ans.Error == "" {
			ans.Error = "failed without a reason"
		}
		return &controlError{code: ans.Code, err: errors.New(ans.Error)}
	}
	if res != nil {
		if err := json.Unmarshal(raw, res); err != nil {
			return fmt.Errorf("control socket %s: answer: %w", path, err)
		}
	}
	return nil
}
