package main

import (
	"bytes"
	"encoding/xml"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// The shipped systemd units pass systemd-analyze verify without a warning
// (an unknown or misspelt directive is only a warning there).
func TestSystemdUnits(t *testing.T) {
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Fatalf("systemd-analyze not found (make test installs systemd): %v", err)
	}
	dir := t.TempDir()
	for _, u := range []struct{ src, name string }{{"hemd.service", "hemd.service"}, {"hemd@.service", "hemd@web.service"}} {
		b, err := os.ReadFile(filepath.Join("dist", u.src))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Contains(b, []byte("ExecStart=/usr/local/bin/hemd serve --config /etc/hemd/")) {
			t.Fatalf("%s: unexpected ExecStart", u.src)
		}
		// verify wants the binary to exist.
		b = bytes.ReplaceAll(b, []byte("/usr/local/bin/hemd"), []byte("/bin/true"))
		p := filepath.Join(dir, u.name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		var out bytes.Buffer
		cmd := exec.Command("systemd-analyze", "verify", p)
		cmd.Stdout, cmd.Stderr = &out, &out
		err = cmd.Run()
		if err != nil || strings.TrimSpace(out.String()) != "" {
			t.Errorf("systemd-analyze verify %s: %v\n%s", u.src, err, out.String())
		}
	}
}

// The libvirt example validates against libvirt's own domain schema and
// has what vhost-user needs: shared memfd memory and a vhostuser disk on a
// hemd socket that reconnects.
func TestLibvirtDomainXML(t *testing.T) {
	const schema = "/usr/share/libvirt/schemas/domain.rng"
	if _, err := os.Stat(schema); err != nil {
		t.Fatalf("%s not found (make test installs libvirt0): %v", schema, err)
	}
	if out, err := exec.Command("xmllint", "--noout", "--relaxng", schema, "dist/libvirt-domain.xml").CombinedOutput(); err != nil {
		t.Fatalf("xmllint: %v\n%s", err, out)
	}
	b, err := os.ReadFile("dist/libvirt-domain.xml")
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Memory struct {
			Source struct {
				Type string `xml:"type,attr"`
			} `xml:"source"`
			Access struct {
				Mode string `xml:"mode,attr"`
			} `xml:"access"`
		} `xml:"memoryBacking"`
		Disks []struct {
			Type   string `xml:"type,attr"`
			Source struct {
				Type      string `xml:"type,attr"`
				Path      string `xml:"path,attr"`
				Reconnect struct {
					Enabled string `xml:"enabled,attr"`
				} `xml:"reconnect"`
			} `xml:"source"`
		} `xml:"devices>disk"`
	}
	if err := xml.Unmarshal(b, &d); err != nil {
		t.Fatal(err)
	}
	if d.Memory.Source.Type != "memfd" || d.Memory.Access.Mode != "shared" {
		t.Errorf("memory backing %+v: vhost-user needs shared memfd memory", d.Memory)
	}
	if len(d.Disks) != 1 || d.Disks[0].Type != "vhostuser" || d.Disks[0].Source.Type != "unix" ||
		!strings.HasPrefix(d.Disks[0].Source.Path, "/run/hemd/") || d.Disks[0].Source.Reconnect.Enabled != "yes" {
		t.Errorf("disks %+v: want one vhostuser disk on a /run/hemd socket with reconnect", d.Disks)
	}
}
