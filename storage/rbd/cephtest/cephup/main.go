// Command cephup runs a throwaway one-node Ceph cluster (package cephtest)
// for scripts such as make bench: it brings the cluster up in DIR, writes
// DIR/env (shell assignments: CEPH_CONF_FILE, CEPH_CLIENT_ID,
// CEPH_KEYRING_FILE, CEPH_POOL) once a write to the pool works, and stops
// the cluster on SIGINT or SIGTERM.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/hemd/hemd/storage/rbd/cephtest"
)

func main() {
	dir := flag.String("dir", "", "directory for the cluster (created; must be empty)")
	size := flag.Int64("osd-size", 8<<30, "size of the OSD's sparse block file in bytes")
	flag.Parse()
	if *dir == "" {
		fmt.Fprintln(os.Stderr, "usage: cephup --dir DIR [--osd-size BYTES]")
		os.Exit(2)
	}
	if err := run(*dir, *size); err != nil {
		fmt.Fprintln(os.Stderr, "cephup:", err)
		os.Exit(1)
	}
}

func run(dir string, size int64) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	logf := func(f string, a ...any) { fmt.Fprintf(os.Stderr, f+"\n", a...) }
	c, err := cephtest.Start(ctx, dir, cephtest.Options{OSDSize: size, Logf: logf})
	if err != nil {
		return err
	}
	defer c.Stop()
	env := fmt.Sprintf("CEPH_CONF_FILE=%s\nCEPH_CLIENT_ID=%s\nCEPH_KEYRING_FILE=%s\nCEPH_POOL=%s\n", c.Conf, c.ClientID, c.Keyring, c.Pool)
	tmp := filepath.Join(dir, "env.tmp")
	if err := os.WriteFile(tmp, []byte(env), 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(dir, "env")); err != nil {
		return err
	}
	<-ctx.Done()
	logf("cephup: stopping the cluster")
	return nil
}
