package main

// SIGHUP: hemd serve --config reads its config file again and applies the
// difference to the volumes that came from it, matched by socket:
//   - a [[volume]] new to the file is attached;
//   - one gone from it is detached, or, while its front-end is connected,
//     once it disconnects (detach pending);
//   - one whose limits changed gets them at once;
//   - one whose other settings changed is detached and attached again with
//     them, unless its front-end is connected: then nothing changes, and
//     the log says so.
// Volumes attached with hemd volume attach are left alone. A file that does
// not load changes nothing. state_dir, metrics, control_socket and [kms]
// take a restart.

import (
	"context"
	"fmt"
	"path/filepath"
	"reflect"
	"strings"
)

// reload applies the config file at path.
func (vs *volumeSet) reload(ctx context.Context, path string) {
	log := vs.log
	c, err := loadConfig(path)
	if err != nil {
		log.Error("SIGHUP: config not applied, nothing changed", "config", path, "err", err)
		return
	}
	vs.change.Lock()
	defer vs.change.Unlock()
	want := map[string]volumeConfig{}
	var order []string
	for _, v := range c.Volumes {
		k := socketKey(v.Socket)
		want[k] = v
		order = append(order, k)
	}
	var attached, detached, changed, pending, failed int
	for _, s := range vs.list() {
		k := socketKey(s.want.Socket)
		w, inFile := want[k]
		if s.origin != originConfig {
			if inFile {
				log.Error("SIGHUP: a [[volume]]'s socket is served by a volume attached with hemd volume attach: not applied",
					"socket", w.Socket, "served", s.cfg.ID, "config_path", w.Path)
				delete(want, k)
				failed++
			}
			continue
		}
		delete(want, k)
		switch {
		case !inFile:
			if s.srv.Connected() {
				if !s.detachPending.Swap(true) {
					log.Warn("volume gone from the config: its front-end is connected; detached once it disconnects (detach pending)",
						"volume", s.cfg.ID, "socket", s.cfg.Socket)
				}
				pending++
				continue
			}
			if _, err := vs.detach(s, false); err != nil {
				log.Error("SIGHUP: detach failed", "volume", s.cfg.ID, "err", err)
				failed++
				continue
			}
			detached++
		case w == s.want:
			if s.detachPending.Swap(false) {
				log.Info("volume back in the config: pending detach cancelled", "volume", s.cfg.ID)
			}
		case sameButLimits(w, s.want):
			s.detachPending.Store(false)
			if err := s.dev.SetLimits(w.limits()); err != nil {
				log.Error("SIGHUP: limits not applied", "volume", s.cfg.ID, "err", err)
				failed++
				continue
			}
			s.want = w
			changed++
		default:
			s.detachPending.Store(false)
			diff := configDiff(s.want, w)
			if s.srv.Connected() {
				log.Error("SIGHUP: volume settings changed but not applied: its front-end is connected; remove the disk from the VM (or stop it), then send SIGHUP again",
					"volume", s.cfg.ID, "changed", diff)
				failed++
				continue
			}
			if _, err := vs.detach(s, false); err != nil {
				log.Error("SIGHUP: detach to apply new settings failed", "volume", s.cfg.ID, "changed", diff, "err", err)
				failed++
				continue
			}
			ns, err := vs.open(ctx, w, originConfig)
			if err != nil {
				log.Error("SIGHUP: attach with new settings failed: the volume is no longer served", "volume", s.cfg.ID, "changed", diff, "err", err)
				failed++
				continue
			}
			vs.start(ns)
			log.Info("volume attached again with new settings", "volume", ns.cfg.ID, "changed", diff)
			changed++
		}
	}
	for _, k := range order {
		w, ok := want[k]
		if !ok {
			continue
		}
		s, err := vs.open(ctx, w, originConfig)
		if err != nil {
			log.Error("SIGHUP: attach failed", "volume", w.ID, "path", w.Path, "socket", w.Socket, "err", err)
			failed++
			continue
		}
		vs.start(s)
		attached++
	}
	log.Info("config applied (SIGHUP); state_dir, metrics, control_socket and [kms] take a restart", "config", path,
		"attached", attached, "detached", detached, "changed", changed, "detach_pending", pending, "failed", failed)
}

// socketKey is a socket path as volumes are matched by.
func socketKey(p string) string {
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return filepath.Clean(p)
}

// sameButLimits reports whether a and b differ in their limits only.
func sameButLimits(a, b volumeConfig) bool {
	a.IOPS, a.Throughput, a.IOPSBurst, a.ThroughputBurst = 0, 0, 0, 0
	b.IOPS, b.Throughput, b.IOPSBurst, b.ThroughputBurst = 0, 0, 0, 0
	return a == b
}

// configDiff names the keys in which a and b differ.
func configDiff(a, b volumeConfig) string {
	var out []string
	var walk func(x, y reflect.Value)
	walk = func(x, y reflect.Value) {
		t := x.Type()
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			if f.Anonymous {
				walk(x.Field(i), y.Field(i))
				continue
			}
			// fmt reads fields of the unexported embedded struct, which
			// Interface would refuse.
			if fmt.Sprint(x.Field(i)) != fmt.Sprint(y.Field(i)) {
				name, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
				out = append(out, name)
			}
		}
	}
	walk(reflect.ValueOf(a), reflect.ValueOf(b))
	return strings.Join(out, ",")
}
