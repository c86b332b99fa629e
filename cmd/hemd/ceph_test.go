package main

import (
	"errors"
	"flag"
	"io"
	"strings"
	"testing"

	"github.com/hemd/hemd/hem/volume"
	"github.com/hemd/hemd/storage/rbd"
)

func TestRBDTarget(t *testing.T) {
	vol, _ := rbd.ParseName("rbd:rbd/vol1")
	const id = "snap-0123456789abcdef0"
	for _, tc := range []struct {
		arg, flag, want, err string
	}{
		{"", id, id, ""},
		{id, "", id, ""},
		{"rbd:rbd/vol1@" + id, "", id, ""},
		{"rbd:rbd/vol1@" + id, id, id, ""},
		{"rbd:rbd/other@" + id, "", "", "lives in its image"},
		{"rbd:rbd/vol1", "", "", "lives in its image"},
		{"daily", "", "", "not snap- and 17 hex digits"},
		{id, "snap-1111111111111111f", "", "name two snapshots"},
		{"rbd:rbd/vol1@" + id, "snap-1111111111111111f", "", "name two snapshots"},
	} {
		got, err := rbdTarget(vol, tc.arg, tc.flag)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("rbdTarget(%q, %q) = %q, %v; want error %q", tc.arg, tc.flag, got, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("rbdTarget(%q, %q) = %q, %v; want %q", tc.arg, tc.flag, got, err, tc.want)
		}
	}
	got, err := rbdTarget(vol, "", "")
	if err != nil || !volume.ValidSnapshotID(got) {
		t.Fatalf("a new id: %q %v", got, err)
	}
}

func TestCephSettings(t *testing.T) {
	t.Setenv(cephConfEnv, "/env/ceph.conf")
	t.Setenv(cephIDEnv, "envid")
	t.Setenv(cephKeyringEnv, "")
	var c cephSettings
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	c.flags(fs)
	if err := fs.Parse([]string{"--ceph-id", "hemd", "--ceph-keyring", "/k"}); err != nil {
		t.Fatal(err)
	}
	if cl := c.cluster(); cl.Conf != "/env/ceph.conf" || cl.ID != "hemd" || cl.Keyring != "/k" {
		t.Fatalf("flags over the environment: %+v", cl)
	}
	// A config file's volume: what it leaves unset comes from the
	// environment.
	v := cephSettings{CephKeyring: "/cfg.keyring"}
	v.fillFromEnv()
	if v.CephConf != "/env/ceph.conf" || v.CephID != "envid" || v.CephKeyring != "/cfg.keyring" {
		t.Fatalf("fillFromEnv: %+v", v)
	}
	// A path is a file; a bad RBD name is an error; a good one is an RBD
	// location, or the error of a hemd without RBD.
	if loc, err := locate("/var/lib/vol.img", v); err != nil || loc.String() != "/var/lib/vol.img" {
		t.Fatalf("locate a file: %v %v", loc, err)
	}
	if _, err := locate("rbd:pool", v); err == nil {
		t.Fatal("locate rbd:pool")
	}
	loc, err := locate("rbd:pool/img@snap-0123456789abcdef0", v)
	if !rbdBuilt {
		if !errors.Is(err, rbd.ErrNotBuilt) {
			t.Fatalf("a hemd without RBD: %v", err)
		}
		return
	}
	if err != nil || loc.String() != "rbd:pool/img@snap-0123456789abcdef0" {
		t.Fatalf("locate an RBD snapshot: %v %v", loc, err)
	}
	if sl, ok := loc.(volume.SnapshotLocation); !ok || sl.SnapshotID() != "snap-0123456789abcdef0" {
		t.Fatal("an RBD snapshot is not a snapshot location")
	}
}
