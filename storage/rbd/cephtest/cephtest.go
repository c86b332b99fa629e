// Package cephtest starts a throwaway one-node Ceph cluster for tests: one
// monitor, one manager and one BlueStore OSD on a sparse file, cephx on,
// every file under one directory, no systemd. It is shared by the storage
// tests and the VM tests; no product package imports it.
//
// A cluster takes 15–25 s to come up and idles under 1 % CPU: start one per
// test package (TestMain) and stop it at the end. Stop stops the OSD and the
// manager before the monitor (a monitor stopped first leaves them waiting
// for it).
package cephtest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Tools are the programs a cluster needs (Debian 12: ceph-mon ceph-mgr
// ceph-osd ceph-common; make deps installs them).
var Tools = []string{"ceph-mon", "ceph-mgr", "ceph-osd", "ceph", "ceph-authtool", "monmaptool", "rados", "rbd"}

// Missing returns the tools that are not installed.
func Missing() []string {
	var m []string
	for _, t := range Tools {
		if _, err := exec.LookPath(t); err != nil {
			m = append(m, t)
		}
	}
	return m
}

// Cluster is a running one-node cluster.
type Cluster struct {
	Dir  string // everything lives here
	Conf string // ceph.conf for clients and daemons
	// Pool is a replicated pool (size 1) initialised for RBD.
	Pool string
	// ClientID and Keyring are a cephx user with the rbd profile on Pool
	// (as an operator would make for hemd): client.ClientID.
	ClientID string
	Keyring  string
	// AdminKeyring holds client.admin.
	AdminKeyring string
	// MonAddr is the monitor's address (127.0.0.1:PORT, msgr2).
	MonAddr string

	logf func(string, ...any)

	mu      sync.Mutex
	daemons map[string]*daemon // "mon", "mgr", "osd"
}

type daemon struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// Options tune Start.
type Options struct {
	// OSDSize is the size of the OSD's sparse block file (default 4 GiB).
	OSDSize int64
	// Logf gets progress lines (default none).
	Logf func(string, ...any)
	// Timeout bounds the bring-up (default 2 minutes).
	Timeout time.Duration
}

// Start brings a cluster up in dir (which should be empty) and waits until
// an object can be written to its pool.
func Start(ctx context.Context, dir string, o Options) (*Cluster, error) {
	if m := Missing(); len(m) > 0 {
		return nil, fmt.Errorf("cephtest: not installed: %s (make deps installs ceph-mon ceph-mgr ceph-osd ceph-common)", strings.Join(m, " "))
	}
	if o.OSDSize == 0 {
		o.OSDSize = 4 << 30
	}
	if o.Logf == nil {
		o.Logf = func(string, ...any) {}
	}
	if o.Timeout == 0 {
		o.Timeout = 2 * time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	c := &Cluster{
		Dir: dir, Conf: filepath.Join(dir, "ceph.conf"), Pool: "rbd", ClientID: "hemd",
		Keyring: filepath.Join(dir, "client.hemd.keyring"), AdminKeyring: filepath.Join(dir, "admin.keyring"),
		logf: o.Logf, daemons: map[string]*daemon{},
	}
	t0 := time.Now()
	if err := c.bringUp(ctx, o); err != nil {
		c.Stop()
		return nil, fmt.Errorf("cephtest: start cluster in %s: %w%s", dir, err, c.logTail())
	}
	c.logf("cephtest: cluster up in %v (%s, mon %s)", time.Since(t0).Round(100*time.Millisecond), dir, c.MonAddr)
	return c, nil
}

func (c *Cluster) bringUp(ctx context.Context, o Options) error {
	for _, d := range []string{"mon/ceph-a", "mgr/ceph-x", "osd", "run", "log"} {
		if err := os.MkdirAll(filepath.Join(c.Dir, d), 0o755); err != nil {
			return err
		}
	}
	port, err := freePort()
	if err != nil {
		return err
	}
	c.MonAddr = "127.0.0.1:" + strconv.Itoa(port)
	fsid := uuid()
	if err := os.WriteFile(c.Conf, []byte(conf(c.Dir, fsid, c.MonAddr, o.OSDSize)), 0o644); err != nil {
		return err
	}
	monKeyring := filepath.Join(c.Dir, "mon.keyring")
	steps := [][]string{
		{"ceph-authtool", "--create-keyring", monKeyring, "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"},
		{"ceph-authtool", "--create-keyring", c.AdminKeyring, "--gen-key", "-n", "client.admin",
			"--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *", "--cap", "mds", "allow *"},
		{"ceph-authtool", monKeyring, "--import-keyring", c.AdminKeyring},
		{"monmaptool", "--create", "--addv", "a", "[v2:" + c.MonAddr + "]", "--fsid", fsid, filepath.Join(c.Dir, "monmap")},
		{"ceph-mon", "-c", c.Conf, "--mkfs", "-i", "a", "--monmap", filepath.Join(c.Dir, "monmap"), "--keyring", monKeyring},
	}
	for _, s := range steps {
		if _, err := c.run(ctx, s[0], s[1:]...); err != nil {
			return err
		}
	}
	if err := c.startDaemon("mon", "ceph-mon", "-c", c.Conf, "-i", "a", "-f"); err != nil {
		return err
	}
	if _, err := c.Ceph(ctx, "auth", "get-or-create", "mgr.x", "mon", "allow profile mgr", "osd", "allow *", "mds", "allow *",
		"-o", filepath.Join(c.Dir, "mgr/ceph-x/keyring")); err != nil {
		return err
	}
	if err := c.startDaemon("mgr", "ceph-mgr", "-c", c.Conf, "-i", "x", "-f"); err != nil {
		return err
	}
	// The OSD: its cephx key is made here and given to the monitor with
	// "osd new"; pacific's ceph-osd --mkfs --key writes no keyring file, so
	// ceph-authtool writes it.
	key, err := c.run(ctx, "ceph-authtool", "--gen-print-key")
	if err != nil {
		return err
	}
	secret := filepath.Join(c.Dir, "osd-secret.json")
	if err := os.WriteFile(secret, []byte(`{"cephx_secret": "`+strings.TrimSpace(string(key))+`"}`), 0o600); err != nil {
		return err
	}
	osdUUID := uuid()
	id, err := c.Ceph(ctx, "osd", "new", osdUUID, "-i", secret)
	if err != nil {
		return err
	}
	if strings.TrimSpace(string(id)) != "0" {
		return fmt.Errorf("osd new gave id %q, want 0", id)
	}
	osdDir := filepath.Join(c.Dir, "osd/ceph-0")
	if err := os.MkdirAll(osdDir, 0o755); err != nil {
		return err
	}
	if _, err := c.run(ctx, "ceph-authtool", "--create-keyring", filepath.Join(osdDir, "keyring"), "--name", "osd.0", "--add-key", strings.TrimSpace(string(key))); err != nil {
		return err
	}
	if _, err := c.run(ctx, "ceph-osd", "-c", c.Conf, "-i", "0", "--mkfs", "--osd-uuid", osdUUID); err != nil {
		return err
	}
	if err := c.StartOSD(); err != nil {
		return err
	}
	for _, s := range [][]string{
		{"osd", "pool", "create", c.Pool, "8"},
		{"osd", "pool", "application", "enable", c.Pool, "rbd"},
		{"auth", "get-or-create", "client." + c.ClientID, "mon", "profile rbd", "osd", "profile rbd pool=" + c.Pool,
			"mgr", "profile rbd pool=" + c.Pool, "-o", c.Keyring},
	} {
		if _, err := c.Ceph(ctx, s...); err != nil {
			return err
		}
	}
	if _, err := c.run(ctx, "rbd", "-c", c.Conf, "pool", "init", c.Pool); err != nil {
		return err
	}
	// "ceph -s" may say the cluster is up before a write can land: wait for
	// a real one.
	return c.WaitWritable(ctx)
}

// WaitWritable waits until an object can be written to the pool.
func (c *Cluster) WaitWritable(ctx context.Context) error {
	for {
		pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err := c.run(pctx, "rados", "-c", c.Conf, "-p", c.Pool, "put", "cephtest-probe", c.Conf)
		cancel()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("pool %s not writable: %w (last: %v)", c.Pool, ctx.Err(), err)
		case <-time.After(300 * time.Millisecond):
		}
	}
}

// conf is the cluster's ceph.conf. No global admin socket: concurrent
// clients would collide on it; each daemon gets its own.
func conf(dir, fsid, mon string, osdSize int64) string {
	return fmt.Sprintf(`[global]
fsid = %[2]s
mon host = v2:%[3]s
public addr = 127.0.0.1
ms bind msgr1 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = %[1]s/run
log file = %[1]s/log/$name.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
osd crush chooseleaf type = 0
osd client watch timeout = 10
mon data = %[1]s/mon/$cluster-$id
mgr data = %[1]s/mgr/$cluster-$id
osd data = %[1]s/osd/$cluster-$id

[mon]
admin socket = %[1]s/run/$name.asok
keyring = %[1]s/mon.keyring

[mgr]
admin socket = %[1]s/run/$name.asok
keyring = %[1]s/mgr/$cluster-$id/keyring

[osd]
admin socket = %[1]s/run/$name.asok
keyring = %[1]s/osd/$cluster-$id/keyring
osd objectstore = bluestore
bluestore block create = true
bluestore block size = %[4]d
osd memory target = 1073741824

[client.admin]
keyring = %[1]s/admin.keyring

[client.hemd]
keyring = %[1]s/client.hemd.keyring
`, dir, fsid, mon, osdSize)
}

// env is the environment of every Ceph program: without CEPH_ARGS,
// CEPH_KEYRING and CEPH_CONF, which daemons take over ceph.conf.
func env() []string {
	var e []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "CEPH_ARGS=") || strings.HasPrefix(kv, "CEPH_KEYRING=") || strings.HasPrefix(kv, "CEPH_CONF=") {
			continue
		}
		e = append(e, kv)
	}
	return e
}

// run runs a program to completion and returns its standard output.
func (c *Cluster) run(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = env()
	cmd.Dir = c.Dir
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.Bytes(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.Bytes(), nil
}

// Ceph runs the ceph command as client.admin and returns its output.
func (c *Cluster) Ceph(ctx context.Context, args ...string) ([]byte, error) {
	return c.run(ctx, "ceph", append([]string{"-c", c.Conf, "--connect-timeout", "20"}, args...)...)
}

// RBD runs the rbd command as client.admin and returns its output.
func (c *Cluster) RBD(ctx context.Context, args ...string) ([]byte, error) {
	return c.run(ctx, "rbd", append([]string{"-c", c.Conf}, args...)...)
}

// startDaemon runs a daemon in the foreground (-f), its output in
// log/NAME.out.
func (c *Cluster) startDaemon(name, bin string, args ...string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if d := c.daemons[name]; d != nil {
		select {
		case <-d.done:
		default:
			return fmt.Errorf("%s runs already", name)
		}
	}
	out, err := os.OpenFile(filepath.Join(c.Dir, "log", name+".out"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = env()
	cmd.Dir = c.Dir
	cmd.Stdout, cmd.Stderr = out, out
	// Its own process group: a test's ^C reaches the test, which stops the
	// cluster in order.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		out.Close()
		return fmt.Errorf("start %s: %w", name, err)
	}
	d := &daemon{name: name, cmd: cmd, done: make(chan struct{})}
	go func() {
		d.err = cmd.Wait()
		out.Close()
		close(d.done)
	}()
	c.daemons[name] = d
	c.logf("cephtest: %s started (pid %d)", name, cmd.Process.Pid)
	return nil
}

// stopDaemon stops a daemon with SIGTERM (SIGKILL after 20 s) and waits.
func (c *Cluster) stopDaemon(name string, sig syscall.Signal) {
	c.mu.Lock()
	d := c.daemons[name]
	c.mu.Unlock()
	if d == nil {
		return
	}
	d.cmd.Process.Signal(sig)
	select {
	case <-d.done:
	case <-time.After(20 * time.Second):
		d.cmd.Process.Kill()
		<-d.done
	}
}

// StartOSD starts the OSD (again).
func (c *Cluster) StartOSD() error {
	return c.startDaemon("osd", "ceph-osd", "-c", c.Conf, "-i", "0", "-f")
}

// StopOSD stops the OSD: I/O to the pool stalls until StartOSD.
func (c *Cluster) StopOSD() { c.stopDaemon("osd", syscall.SIGTERM) }

// KillOSD kills the OSD with SIGKILL, as a crash would.
func (c *Cluster) KillOSD() { c.stopDaemon("osd", syscall.SIGKILL) }

// Stop stops the OSD and the manager, then the monitor, and waits for them.
// The directory stays (the caller owns it).
func (c *Cluster) Stop() {
	var wg sync.WaitGroup
	for _, n := range []string{"osd", "mgr"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.stopDaemon(n, syscall.SIGTERM)
		}()
	}
	wg.Wait()
	c.stopDaemon("mon", syscall.SIGTERM)
}

// ConfigArgs are the settings a client of the cluster gives hemd: its
// ceph.conf, its client id and its keyring.
func (c *Cluster) ConfigArgs() []string {
	return []string{"--ceph-conf", c.Conf, "--ceph-id", c.ClientID, "--ceph-keyring", c.Keyring}
}

// logTail returns the end of each daemon's log, for a failed start.
func (c *Cluster) logTail() string {
	var b strings.Builder
	for _, n := range []string{"mon.a.log", "mgr.x.log", "osd.0.log", "mon.out", "mgr.out", "osd.out"} {
		data, err := os.ReadFile(filepath.Join(c.Dir, "log", n))
		if err != nil || len(data) == 0 {
			continue
		}
		lines := strings.Split(strings.TrimSpace(string(data)), "\n")
		lines = lines[max(0, len(lines)-8):]
		fmt.Fprintf(&b, "\n--- %s:\n%s", n, strings.Join(lines, "\n"))
	}
	return b.String()
}

// freePort returns a TCP port on 127.0.0.1 nothing listens on now.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func uuid() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// ErrStopped is returned by Alive for a daemon that exited.
var ErrStopped = errors.New("daemon exited")

// Alive reports whether every daemon still runs.
func (c *Cluster) Alive() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, n := range []string{"mon", "mgr", "osd"} {
		d := c.daemons[n]
		if d == nil {
			return fmt.Errorf("%s: %w", n, ErrStopped)
		}
		select {
		case <-d.done:
			return fmt.Errorf("%s: %w (%v)", n, ErrStopped, d.err)
		default:
		}
	}
	return nil
}

// Main runs a test package's tests against a cluster in a new temporary
// directory, for TestMain: it starts the cluster (with o; progress goes to
// stderr unless o.Logf is set), calls run with it, then stops it and
// removes the directory, returning run's exit code. A cluster that does not
// start is reported on stderr and fails the package (code 1).
func Main(o Options, run func(c *Cluster) int) int {
	dir, err := os.MkdirTemp("", "cephtest-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "cephtest:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	if o.Logf == nil {
		o.Logf = func(f string, a ...any) { fmt.Fprintf(os.Stderr, f+"\n", a...) }
	}
	c, err := Start(context.Background(), dir, o)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer c.Stop()
	return run(c)
}
