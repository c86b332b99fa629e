package main

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hemd/hemd/vhost"
)

// A client that closes the connection cancels its operation; one that only
// shuts down its sending side gets the answer. A second server on a live
// socket is refused; a stale one is replaced.
func TestControlCancelAndSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "run", "control.sock")
	log := slog.New(slog.DiscardHandler)
	srv, err := listenControl(path, log)
	if err != nil {
		t.Fatal(err)
	}
	canceled := make(chan struct{}, 1)
	srv.handle("wait", func(ctx context.Context, raw json.RawMessage) (any, error) {
		var req struct {
			Op string `json:"op"`
			MS int    `json:"ms"`
		}
		if err := decodeRequest(raw, &req); err != nil {
			return nil, err
		}
		select {
		case <-ctx.Done():
			canceled <- struct{}{}
			return nil, ctx.Err()
		case <-time.After(time.Duration(req.MS) * time.Millisecond):
			return map[string]int{"waited_ms": req.MS}, nil
		}
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.serve(ctx)
	}()
	defer func() {
		cancel()
		<-done
	}()
	if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("control socket %v mode %v, want 0600", err, st.Mode())
	}
	if _, err := listenControl(path, log); !errors.Is(err, vhost.ErrSocketInUse) {
		t.Fatalf("second server on a live control socket: %v", err)
	}

	// Closed before the answer: canceled.
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte(`{"op":"wait","ms":60000}`))
	time.Sleep(50 * time.Millisecond)
	c.Close()
	select {
	case <-canceled:
	case <-time.After(5 * time.Second):
		t.Fatal("closing the connection did not cancel the operation")
	}

	// Sending side shut down: answered.
	c, err = net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte(`{"op":"wait","ms":300}`))
	c.(*net.UnixConn).CloseWrite()
	var ans map[string]any
	if err := json.NewDecoder(c).Decode(&ans); err != nil || ans["ok"] != true || ans["waited_ms"] != float64(300) {
		t.Fatalf("answer %v, %v", ans, err)
	}

	// The client side: an error answer keeps its code.
	err = controlCall(context.Background(), path, map[string]any{"op": "wait", "ms": "soon"}, nil)
	var ce *controlError
	if !errors.As(err, &ce) || ce.code != codeBadRequest {
		t.Fatalf("bad request: %v", err)
	}
	if err := controlCall(context.Background(), filepath.Join(filepath.Dir(path), "nobody.sock"), map[string]any{"op": "wait"}, nil); !errors.Is(err, errNoControl) {
		t.Fatalf("no server: %v", err)
	}

	// Stopped: the socket goes; a new server replaces a stale one.
	cancel()
	<-done
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("control socket left behind: %v", err)
	}
	ln, err := net.Listen("unix", path) // a socket no one will accept on
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	srv2, err := listenControl(path, log)
	if err != nil {
		t.Fatalf("stale control socket: %v", err)
	}
	srv2.ln.Close()
}
