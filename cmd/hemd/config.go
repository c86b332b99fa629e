package main

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"path/filepath"

	"github.com/BurntSushi/toml"
	"github.com/hemd/hemd/vhost/blk"
)

// fileConfig is hemd's TOML configuration file (config.toml.example).
type fileConfig struct {
	// StateDir overrides the state directory.
	StateDir string `toml:"state_dir"`
	// Metrics is where hemd serve answers /metrics (Prometheus) and
	// /status: HOST:PORT or unix:PATH; empty for none.
	Metrics string `toml:"metrics"`
	// ControlSocket is hemd serve's control socket (snapshots of served
	// volumes); "none" for none. Default: $HEMD_CONTROL, else
	// /run/hemd/control.sock (root) or $XDG_RUNTIME_DIR/hemd/control.sock.
	ControlSocket string `toml:"control_socket"`
	// KMS configures the key management service.
	KMS kmsSettings `toml:"kms"`
	// Volumes are served each on its own socket.
	Volumes []volumeConfig `toml:"volume"`
}

// volumeConfig is one served volume.
type volumeConfig struct {
	Socket    string `toml:"socket"`     // vhost-user socket path (created 0600)
	Path      string `toml:"path"`       // backing file or block device
	ID        string `toml:"id"`         // serial the guest reads (GET_ID); default from the path
	Queues    int    `toml:"queues"`     // most virtqueues offered (default 64)
	ReadOnly  bool   `toml:"read_only"`  // refuse writes
	Discard   bool   `toml:"discard"`    // let the guest discard (punch holes)
	Direct    bool   `toml:"direct"`     // O_DIRECT for aligned I/O
	IO        string `toml:"io"`         // "uring" (default, falls back to "sync" where refused) or "sync"
	BlockSize uint32 `toml:"block_size"` // logical block size, 512 or 4096
	// Incoming: the destination of a live migration; the volume is taken
	// when the source hemd hands it off at switchover.
	Incoming bool `toml:"incoming"`
	// Performance limits and socket access (volume_settings.go).
	volumeExtra
	// How a volume on Ceph RBD (path rbd:POOL/IMAGE) reaches its cluster
	// (ceph.go).
	cephSettings
}

func loadConfig(path string) (*fileConfig, error) {
	var c fileConfig
	md, err := toml.DecodeFile(path, &c)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	if und := md.Undecoded(); len(und) > 0 {
		return nil, fmt.Errorf("config %s: unknown key %q", path, und[0].String())
	}
	if len(c.Volumes) == 0 {
		return nil, fmt.Errorf("config %s: no [[volume]]", path)
	}
	seen := map[string]bool{}
	for i := range c.Volumes {
		v := &c.Volumes[i]
		if err := v.fill(); err != nil {
			return nil, fmt.Errorf("config %s: volume %d: %w", path, i+1, err)
		}
		if seen[v.Socket] {
			return nil, fmt.Errorf("config %s: socket %s used twice", path, v.Socket)
		}
		seen[v.Socket] = true
	}
	return &c, nil
}

// The ways a volume's reads and writes reach the kernel.
const (
	ioUring = "uring" // a queue's batch of requests in one io_uring submission
	ioSync  = "sync"  // one preadv or pwritev per request
)

// fill checks a volume's settings and fills in defaults.
func (v *volumeConfig) fill() error {
	if v.Socket == "" {
		return fmt.Errorf("no socket")
	}
	if v.Path == "" {
		return fmt.Errorf("no path")
	}
	if v.Queues == 0 {
		v.Queues = blk.MaxQueues
	}
	if v.BlockSize == 0 {
		v.BlockSize = 512
	}
	switch v.IO {
	case "":
		v.IO = ioUring
	case ioUring, ioSync:
	default:
		return fmt.Errorf("io %q: want %q or %q", v.IO, ioUring, ioSync)
	}
	if v.ID == "" {
		v.ID = defaultVolumeID(v.Path)
	}
	return v.volumeExtra.check()
}

// defaultVolumeID derives a stable id in the EBS form (vol- and 17 hex
// digits) from a backing file's absolute path.
func defaultVolumeID(path string) string {
	abs, err := filepath.Abs(path)
	if err != nil {
		abs = path
	}
	h := sha256.Sum256([]byte(abs))
	return "vol-" + hex.EncodeToString(h[:])[:17]
}
