package rbd

import (
	"strings"
	"testing"
)

func TestParseName(t *testing.T) {
	good := map[string]Name{
		"rbd:rbd/vol1":           {Pool: "rbd", Image: "vol1"},
		"rbd:pool/ns/vol1":       {Pool: "pool", Namespace: "ns", Image: "vol1"},
		"rbd:rbd/vol1@snap-0a":   {Pool: "rbd", Image: "vol1", Snap: "snap-0a"},
		"rbd:p/n/i@s":            {Pool: "p", Namespace: "n", Image: "i", Snap: "s"},
		"rbd:rbd/with.dots_and-": {Pool: "rbd", Image: "with.dots_and-"},
	}
	for s, want := range good {
		n, err := ParseName(s)
		if err != nil || n != want {
			t.Errorf("ParseName(%q) = %+v, %v; want %+v", s, n, err, want)
			continue
		}
		if n.String() != s {
			t.Errorf("%+v.String() = %q, want %q", n, n.String(), s)
		}
	}
	bad := map[string]string{
		"/var/lib/vol.img":     "not an RBD image name",
		"rbd:":                 "want rbd:POOL/IMAGE",
		"rbd:rbd":              "want rbd:POOL/IMAGE",
		"rbd:/vol":             "empty",
		"rbd:rbd/":             "empty",
		"rbd:a/b/c/d":          "want rbd:POOL/IMAGE",
		"rbd:rbd/vol@":         "empty snapshot",
		"rbd:rbd/vol@a@b":      "holds",
		"rbd:rbd/v\x00l":       "holds",
		"rbd:rbd/v\nl":         "holds",
		"rbd:p//i":             "empty",
		"rbd:rbd/" + long(256): "longer than 255",
	}
	for s, want := range bad {
		if n, err := ParseName(s); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseName(%q) = %+v, %v; want an error with %q", s, n, err, want)
		}
	}
	if !IsName("rbd:x/y") || IsName("x.img") || IsName("./rbd:x/y") {
		t.Error("IsName")
	}
	n, _ := ParseName("rbd:rbd/vol")
	if s := n.AtSnap("snap-1").String(); s != "rbd:rbd/vol@snap-1" {
		t.Errorf("AtSnap: %s", s)
	}
}

func long(n int) string { return strings.Repeat("x", n) }

func TestClusterDefaults(t *testing.T) {
	c := Cluster{ID: "client.hemd"}.WithDefaults()
	if c.Conf != DefaultConf || c.ID != "hemd" || c.Timeout != DefaultTimeout {
		t.Fatalf("%+v", c)
	}
	if s := (Cluster{Conf: "/etc/x.conf"}).String(); s != "cluster of /etc/x.conf as client.admin" {
		t.Fatal(s)
	}
}
