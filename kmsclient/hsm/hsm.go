// Package hsm is hemd's key management service on a PKCS#11 HSM, with the
// semantics of AWS KMS for the operations volumes need: customer master keys
// (CMKs) are AES-256 objects inside the HSM that never leave it, data keys
// come from the HSM's random generator and are wrapped inside the HSM with
// AES-GCM whose AAD binds the blob header and the encryption context. By
// default it runs on an embedded SoftHSM2 token under hemd's state
// directory, initialised on first use.
package hsm

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"
	"golang.org/x/sys/unix"
)

// Config says which HSM to use. Empty fields take the embedded defaults.
type Config struct {
	Module     string `toml:"module"`      // PKCS#11 module (default: SoftHSM2)
	TokenLabel string `toml:"token_label"` // token (default "hemd")
	PIN        string `toml:"pin"`         // user PIN (default: generated, in the state dir)
	Region     string `toml:"region"`      // for ARNs (default "local")
	Account    string `toml:"account"`     // for ARNs (default "000000000000")
}

// DefaultModule is Debian's SoftHSM2.
const DefaultModule = "/usr/lib/softhsm/libsofthsm2.so"

// Key states.
const (
	Enabled         = "Enabled"
	Disabled        = "Disabled"
	PendingDeletion = "PendingDeletion"
)

// KeyMetadata is what DescribeKey returns (AWS's KeyMetadata, in part).
type KeyMetadata struct {
	KeyID        string    `json:"KeyId"`
	Arn          string    `json:"Arn"`
	KeyState     string    `json:"KeyState"`
	Enabled      bool      `json:"Enabled"`
	Description  string    `json:"Description"`
	CreationDate time.Time `json:"CreationDate"`
	KeyUsage     string    `json:"KeyUsage"`
	KeySpec      string    `json:"KeySpec"`
	Origin       string    `json:"Origin"`
	Versions     uint32    `json:"BackingKeyVersions"`
	// RotationEnabled is EnableKeyRotation's flag. hemd does not rotate on
	// a timer: RotateKey (RotateKeyOnDemand) adds a version.
	RotationEnabled bool     `json:"KeyRotationEnabled"`
	Aliases         []string `json:"Aliases,omitempty"`
	// DeletionDate is when a key PendingDeletion is due to be deleted.
	DeletionDate *time.Time `json:"DeletionDate,omitempty"`
}

// KMS is the PKCS#11-backed KMS. It is safe for concurrent use.
type KMS struct {
	cfg      Config
	stateDir string
	p        *pkcs11.Ctx
	slot     uint
	pin      string
	login    pkcs11.SessionHandle // keeps the token logged in
	pool     chan pkcs11.SessionHandle
	mu       sync.Mutex // metadata
	sess     sessionState
	meta     map[string]*KeyMetadata
	aliases  map[string]string // alias name → key id
	grants   []*Grant
	metaTime time.Time // keys.json as last read or written
	metaSize int64
	audit    *auditLog
	caller   string
	raw      *rawOps
	keys     *keyOps
	dec      *lockedDecrypt
	ws       *workspaces                 // locked memory for Decrypt for a recipient
	log      atomic.Pointer[slog.Logger] // SetLogger
	// sessionHook, when set (by tests, before any operation), is told
	// which pooled session serves each operation.
	sessionHook func(pkcs11.SessionHandle)
}

const poolSize = 4

// Open opens the HSM, initialising the embedded SoftHSM2 token under
// stateDir on first use.
func Open(cfg Config, stateDir string) (*KMS, error) {
	if cfg.Module == "" {
		cfg.Module = DefaultModule
	}
	if cfg.TokenLabel == "" {
		cfg.TokenLabel = "hemd"
	}
	if cfg.Region == "" {
		cfg.Region = "local"
	}
	if cfg.Account == "" {
		cfg.Account = "000000000000"
	}
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return nil, fmt.Errorf("kms: state dir: %w", err)
	}
	k := &KMS{cfg: cfg, stateDir: stateDir, meta: map[string]*KeyMetadata{}, aliases: map[string]string{},
		caller: fmt.Sprintf("uid:%d", os.Getuid())}
	embedded := cfg.Module == DefaultModule
	// hemd processes sharing a state dir (hemd@ instances starting at boot)
	// set up the token one at a time: SoftHSM2 reads its configuration and
	// token files while another process may be writing them.
	unlock, err := lockStateDir(stateDir)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if embedded {
		if err := k.softhsmConf(); err != nil {
			return nil, err
		}
	}
	if _, err := os.Stat(cfg.Module); err != nil {
		return nil, fmt.Errorf("kms: PKCS#11 module %s: %w (apt-get install softhsm2)", cfg.Module, err)
	}
	k.p = pkcs11.New(cfg.Module)
	if k.p == nil {
		return nil, fmt.Errorf("kms: cannot load PKCS#11 module %s", cfg.Module)
	}
	if err := k.p.Initialize(); err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		return nil, fmt.Errorf("kms: initialize %s: %w", cfg.Module, err)
	}
	pins, err := k.pins(embedded)
	if err != nil {
		k.p.Finalize()
		return nil, err
	}
	if err := k.findOrInitToken(pins, embedded); err != nil {
		k.p.Finalize()
		return nil, err
	}
	if err := k.openSessions(); err != nil {
		k.p.Finalize()
		return nil, err
	}
	info, err := k.p.GetInfo()
	if err != nil {
		k.Close()
		return nil, fmt.Errorf("kms: C_GetInfo of %s: %w", cfg.Module, err)
	}
	if k.raw, err = newRawOps(cfg.Module, info.CryptokiVersion.Major >= 3); err != nil {
		k.Close()
		return nil, err
	}
	if k.keys, err = newKeyOps(cfg.Module); err != nil {
		k.Close()
		return nil, err
	}
	if k.dec, err = newLockedDecrypt(k.raw); err != nil {
		k.Close()
		return nil, err
	}
	k.ws = newWorkspaces(poolSize)
	if err := k.loadMeta(); err != nil {
		k.Close()
		return nil, err
	}
	if k.audit, err = openAudit(filepath.Join(stateDir, "audit.log")); err != nil {
		k.Close()
		return nil, err
	}
	// Keys whose deletion window has ended go now; a failure is retried at
	// the next Open rather than keeping the KMS from opening.
	k.DeleteDueKeys(context.Background(), time.Now())
	return k, nil
}

// lockStateDir takes the state dir's KMS lock (flock on kms.lock, waited
// for) and returns its release.
func lockStateDir(dir string) (func(), error) {
	f, err := os.OpenFile(filepath.Join(dir, "kms.lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("kms: lock state dir: %w", err)
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("kms: lock state dir %s: %w", dir, err)
	}
	return func() { f.Close() }, nil
}

// softhsmConf points SoftHSM2 at a token directory under the state dir,
// unless SOFTHSM2_CONF already names a configuration.
func (k *KMS) softhsmConf() error {
	if os.Getenv("SOFTHSM2_CONF") != "" {
		return nil
	}
	tokens := filepath.Join(k.stateDir, "tokens")
	if err := os.MkdirAll(tokens, 0o700); err != nil {
		return fmt.Errorf("kms: %w", err)
	}
	conf := filepath.Join(k.stateDir, "softhsm2.conf")
	body := "directories.tokendir = " + tokens + "\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
	if old, err := os.ReadFile(conf); err != nil || string(old) != body {
		// Written aside and renamed: a reader never sees half a file.
		tmp := conf + ".tmp"
		if err := os.WriteFile(tmp, []byte(body), 0o600); err != nil {
			return fmt.Errorf("kms: %w", err)
		}
		if err := os.Rename(tmp, conf); err != nil {
			return fmt.Errorf("kms: %w", err)
		}
	}
	return os.Setenv("SOFTHSM2_CONF", conf)
}

type pinFile struct {
	SOPIN   string `json:"so_pin"`
	UserPIN string `json:"user_pin"`
}

// pins returns the token's PINs: from the config or HEMD_PKCS11_PIN, else
// the generated ones stored 0600 in the state dir (made on first use).
func (k *KMS) pins(embedded bool) (pinFile, error) {
	if pin := firstNonEmpty(k.cfg.PIN, os.Getenv("HEMD_PKCS11_PIN")); pin != "" {
		return pinFile{UserPIN: pin, SOPIN: os.Getenv("HEMD_PKCS11_SO_PIN")}, nil
	}
	path := filepath.Join(k.stateDir, "pins.json")
	var p pinFile
	if b, err := os.ReadFile(path); err == nil {
		if err := json.Unmarshal(b, &p); err != nil || p.UserPIN == "" {
			return p, fmt.Errorf("kms: %s is corrupt", path)
		}
		return p, nil
	}
	if !embedded {
		return p, errors.New("kms: no PIN for the PKCS#11 token (set pin in [kms] or HEMD_PKCS11_PIN)")
	}
	p = pinFile{SOPIN: randomHex(16), UserPIN: randomHex(16)}
	b, _ := json.Marshal(p)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return p, fmt.Errorf("kms: %w", err)
	}
	return p, nil
}

func firstNonEmpty(s ...string) string {
	for _, x := range s {
		if x != "" {
			return x
		}
	}
	return ""
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func (k *KMS) findToken() (uint, bool, error) {
	slots, err := k.p.GetSlotList(true)
	if err != nil {
		return 0, false, fmt.Errorf("kms: slot list: %w", err)
	}
	for _, s := range slots {
		ti, err := k.p.GetTokenInfo(s)
		if err == nil && strings.TrimRight(ti.Label, " \x00") == k.cfg.TokenLabel && ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED != 0 {
			return s, true, nil
		}
	}
	return 0, false, nil
}

func (k *KMS) findOrInitToken(pins pinFile, embedded bool) error {
	slot, ok, err := k.findToken()
	if err != nil {
		return err
	}
	if !ok {
		if !embedded {
			return fmt.Errorf("kms: no initialised token labelled %q in %s", k.cfg.TokenLabel, k.cfg.Module)
		}
		slots, err := k.p.GetSlotList(true)
		if err != nil {
			return fmt.Errorf("kms: slot list: %w", err)
		}
		free := -1
		for _, s := range slots {
			if ti, err := k.p.GetTokenInfo(s); err == nil && ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED == 0 {
				free = int(s)
				break
			}
		}
		if free < 0 {
			return errors.New("kms: SoftHSM2 has no free slot for a new token")
		}
		if err := k.p.InitToken(uint(free), pins.SOPIN, k.cfg.TokenLabel); err != nil {
			return fmt.Errorf("kms: init token: %w", err)
		}
		// SoftHSM2 gives the new token a new slot id: look again.
		if slot, ok, err = k.findToken(); err != nil || !ok {
			return fmt.Errorf("kms: token %q not found after init: %v", k.cfg.TokenLabel, err)
		}
		sh, err := k.p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			return fmt.Errorf("kms: %w", err)
		}
		if err := k.p.Login(sh, pkcs11.CKU_SO, pins.SOPIN); err != nil {
			k.p.CloseSession(sh)
			return fmt.Errorf("kms: SO login: %w", err)
		}
		err = k.p.InitPIN(sh, pins.UserPIN)
		k.p.Logout(sh)
		k.p.CloseSession(sh)
		if err != nil {
			return fmt.Errorf("kms: init PIN: %w", err)
		}
	}
	k.slot, k.pin = slot, pins.UserPIN
	return nil
}

// openSessions opens the logged-in session and the pool of operation
// sessions (login state is per token, shared by all of them).
func (k *KMS) openSessions() error {
	sh, err := k.p.OpenSession(k.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return fmt.Errorf("kms: open session: %w", err)
	}
	if err := k.p.Login(sh, pkcs11.CKU_USER, k.pin); err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN)) {
		k.p.CloseSession(sh)
		if errors.Is(err, pkcs11.Error(pkcs11.CKR_PIN_INCORRECT)) {
			return errors.New("kms: wrong PIN for the PKCS#11 token")
		}
		return fmt.Errorf("kms: login: %w", err)
	}
	k.login = sh
	k.pool = make(chan pkcs11.SessionHandle, poolSize)
	for i := 0; i < poolSize; i++ {
		s, err := k.p.OpenSession(k.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			return fmt.Errorf("kms: open session: %w", err)
		}
		k.pool <- s
	}
	return nil
}

// Close logs out and unloads the module.
func (k *KMS) Close() error {
	if k.p == nil {
		return nil
	}
	k.p.CloseAllSessions(k.slot)
	k.dec.close()
	k.ws.close()
	k.p.Finalize()
	k.p.Destroy()
	k.p = nil
	if k.audit != nil {
		k.audit.close()
	}
	return nil
}

// recoverable reports whether a PKCS#11 error means the session (or the
// token's login) is gone, so that a new session may succeed.
func recoverable(err error) bool {
	var e pkcs11.Error
	if !errors.As(err, &e) {
		return false
	}
	switch e {
	case pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED, pkcs11.CKR_DEVICE_ERROR,
		pkcs11.CKR_USER_NOT_LOGGED_IN, pkcs11.CKR_TOKEN_NOT_PRESENT, pkcs11.CKR_DEVICE_REMOVED:
		return true
	}
	return false
}

func label(id string, version uint32) string { return fmt.Sprintf("hemd-cmk/%s/v%d", id, version) }

// findKey finds a backing-key object by label.
func (k *KMS) findKey(sh pkcs11.SessionHandle, id string, version uint32) (pkcs11.ObjectHandle, error) {
	tmpl := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label(id, version)),
	}
	if err := k.p.FindObjectsInit(sh, tmpl); err != nil {
		return 0, err
	}
	objs, _, err := k.p.FindObjects(sh, 2)
	// C_FindObjectsFinal ends the search whatever C_FindObjects returned;
	// if it fails, the search may still be active on sh.
	if ferr := k.p.FindObjectsFinal(sh); ferr != nil && !errors.Is(ferr, pkcs11.Error(pkcs11.CKR_OPERATION_NOT_INITIALIZED)) {
		return 0, &spoiledError{err: ferr, why: fmt.Errorf("C_FindObjectsFinal: %w", ferr)}
	}
	if err != nil {
		return 0, err
	}
	if len(objs) != 1 {
		return 0, kmsErr(ErrNotFound, "backing key %s version %d is not in the HSM (%d found)", id, version, len(objs))
	}
	return objs[0], nil
}

// generateBackingKey makes a new AES-256 CMK version inside the HSM: a token
// object that is sensitive and not extractable.
func (k *KMS) generateBackingKey(ctx context.Context, id string, version uint32) error {
	return k.withSession(ctx, func(sh pkcs11.SessionHandle) error {
		tmpl := []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
			// Version 2 blobs' key-encryption keys are derived from it.
			pkcs11.NewAttribute(pkcs11.CKA_DERIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, label(id, version)),
		}
		_, err := k.p.GenerateKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, tmpl)
		return err
	})
}
