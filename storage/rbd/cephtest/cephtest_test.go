package cephtest

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestCluster brings a cluster up, writes and reads an object and an RBD
// image as the hemd client (its own keyring, the rbd profile), restarts the
// OSD, and stops everything: no daemon is left.
func TestCluster(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	t.Setenv("CEPH_ARGS", "--id nobody") // the cluster must not take it
	c, err := Start(ctx, t.TempDir(), Options{Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	stopped := false
	defer func() {
		if !stopped {
			c.Stop()
		}
	}()
	if err := c.Alive(); err != nil {
		t.Fatal(err)
	}
	asHemd := []string{"-c", c.Conf, "--id", c.ClientID, "--keyring", c.Keyring}
	if _, err := c.run(ctx, "rbd", append(asHemd, "create", "--size", "16M", c.Pool+"/t1")...); err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(t.TempDir(), "in")
	data := bytes.Repeat([]byte("cephtest "), 1000)
	os.WriteFile(src, data, 0o644)
	if _, err := c.run(ctx, "rbd", append(asHemd, "import", src, c.Pool+"/t2")...); err != nil {
		t.Fatal(err)
	}
	out, err := c.RBD(ctx, "ls", c.Pool)
	if err != nil || !strings.Contains(string(out), "t1") || !strings.Contains(string(out), "t2") {
		t.Fatalf("rbd ls: %q %v", out, err)
	}
	// A client without the pool's caps is refused.
	if _, err := c.run(ctx, "rbd", "-c", c.Conf, "--id", "nobody", "--keyring", c.Keyring, "ls", c.Pool); err == nil {
		t.Fatal("an unknown client listed the pool")
	}

	c.StopOSD()
	if err := c.StartOSD(); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitWritable(ctx); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), "out")
	if _, err := c.run(ctx, "rbd", append(asHemd, "export", c.Pool+"/t2", dst)...); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(dst); !bytes.Equal(got, data) {
		t.Fatal("the image read after the OSD restart differs")
	}
	c.Stop()
	stopped = true
	if err := c.Alive(); err == nil {
		t.Fatal("a daemon runs after Stop")
	}
}
