package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/hemd/hemd/kmsclient"
	"github.com/hemd/hemd/kmsclient/awsjson"
)

// kmsSettings is the [kms] section: the embedded HSM's settings, a remote
// KMS to use instead, and (for hemd kms serve) who may call.
type kmsSettings struct {
	kmsclient.Config
	// Principals may call hemd kms serve over TCP (SigV4).
	Principals []awsjson.Principal `toml:"principal"`
	// UnixUIDs may call hemd kms serve over a unix socket (default: root
	// and hemd's own uid).
	UnixUIDs []int `toml:"unix_uids"`
}

const kmsUsage = "usage: hemd kms serve --listen HOST:PORT|unix:PATH [--config FILE] [--tls-cert FILE --tls-key FILE [--client-ca FILE]]"

// kmsCommand runs `hemd kms serve --listen ADDR [--config FILE] [TLS]`.
func kmsCommand(ctx context.Context, g globalFlags, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] != "serve" {
		return errors.New(kmsUsage)
	}
	fs := flag.NewFlagSet("kms serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1:7788", "TCP address or unix:PATH")
	cfgPath := fs.String("config", "", "config file with [kms] and its [[kms.principal]] entries")
	tlsCert := fs.String("tls-cert", "", "serve TLS 1.3 with this certificate (PEM; with --tls-key)")
	tlsKey := fs.String("tls-key", "", "the certificate's private key (PEM)")
	clientCA := fs.String("client-ca", "", "require client certificates from these CAs (PEM): mutual TLS, "+
		"a certificate's name must be the principal that signs")
	if err := parse(fs, args[1:], 0, "no arguments"); err != nil {
		return err
	}
	settings := g.KMS
	if *cfgPath != "" {
		var c fileConfig
		md, err := toml.DecodeFile(*cfgPath, &c)
		if err != nil {
			return fmt.Errorf("kms serve: %w", err)
		}
		if und := md.Undecoded(); len(und) > 0 {
			return fmt.Errorf("kms serve: config %s: unknown key %q", *cfgPath, und[0].String())
		}
		settings = c.KMS
		if c.StateDir != "" && os.Getenv("HEMD_STATE_DIR") == "" {
			g.StateDir = c.StateDir
		}
	}
	if err := checkPrincipals(settings.Principals); err != nil {
		return fmt.Errorf("kms serve: %w", err)
	}
	g.KMS = settings
	k, err := openHSM(g)
	if err != nil {
		return err
	}
	defer k.Close()
	var tc *tls.Config
	if *tlsCert != "" || *tlsKey != "" || *clientCA != "" {
		if tc, err = awsjson.TLSServer(*tlsCert, *tlsKey, *clientCA); err != nil {
			return err
		}
	}
	var ln net.Listener
	if path, ok := strings.CutPrefix(*listen, "unix:"); ok {
		if tc != nil {
			return errors.New("kms serve: TLS is for TCP; a unix socket's callers are known by their uid")
		}
		os.Remove(path)
		ln, err = net.Listen("unix", path)
		if err == nil {
			os.Chmod(path, 0o660)
		}
	} else {
		if len(settings.Principals) == 0 {
			return errors.New("kms serve: no [[kms.principal]] in the config: nobody could call over TCP")
		}
		if tc == nil && !loopbackListen(*listen) {
			if !settings.InsecureHTTP {
				return fmt.Errorf("kms serve: --listen %s without TLS: give --tls-cert and --tls-key, or set [kms] insecure_http = true", *listen)
			}
			g.Log.Warn("kms serve: plain HTTP on a network address (insecure_http): requests, and the plaintext of Decrypts without a Recipient, cross the network unencrypted",
				"listen", *listen)
		}
		ln, err = net.Listen("tcp", *listen)
	}
	if err != nil {
		return fmt.Errorf("kms serve: %w", err)
	}
	if tc != nil {
		ln = tls.NewListener(ln, tc)
	}
	// Requests are signed for the region the keys' ARNs name ([kms] region,
	// HEMD_KMS_REGION, default "local").
	handler := &awsjson.Server{KMS: k, Principals: settings.Principals, UnixUIDs: settings.UnixUIDs, Log: g.Log}
	srv := &http.Server{
		Handler:           handler,
		ConnContext:       awsjson.ConnContext,
		ReadHeaderTimeout: 10 * time.Second,
		// HTTP/1.1 only: the way responses with plaintext are written
		// relies on it (awsjson/secret.go).
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
		ErrorLog:     slog.NewLogLogger(g.Log.Handler(), slog.LevelWarn),
	}
	g.Log.Info("kms serving", "listen", *listen, "region", handler.SigningRegion(), "principals", len(settings.Principals),
		"state_dir", g.StateDir, "tls", tc != nil, "mutual_tls", tc != nil && tc.ClientCAs != nil)
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("kms serve: %w", err)
	}
	return nil
}

// loopbackListen reports whether a listen address is on loopback only.
func loopbackListen(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// checkPrincipals refuses [[kms.principal]] entries that could never sign a
// request, or that another entry shadows.
func checkPrincipals(ps []awsjson.Principal) error {
	seen := map[string]bool{}
	for i, p := range ps {
		switch {
		case p.AccessKeyID == "" || p.SecretAccessKey == "":
			return fmt.Errorf("[[kms.principal]] %d (%q): access_key_id and secret_access_key are required", i+1, p.Name)
		case strings.ContainsAny(p.AccessKeyID, "/ ,="):
			return fmt.Errorf("[[kms.principal]] %d (%q): access_key_id %q has a character SigV4 credentials cannot carry", i+1, p.Name, p.AccessKeyID)
		case seen[p.AccessKeyID]:
			return fmt.Errorf("[[kms.principal]] %d (%q): access_key_id %s is used twice", i+1, p.Name, p.AccessKeyID)
		}
		seen[p.AccessKeyID] = true
	}
	return nil
}
