package hsm

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"

	"github.com/miekg/pkcs11"
)

// sessionState guards the session pool against being rebuilt under a
// running operation. SoftHSM2 reuses session handle numbers and crashes when
// a session is closed while another thread is inside C_Decrypt on it, so
// sessions are only ever closed when no operation holds one.
type sessionState struct {
	gate sync.RWMutex  // operations hold it shared; rebuilding holds it exclusively
	gen  atomic.Uint64 // bumped by every rebuild
}

// sessionAttempts bounds how often one operation rebuilds the pool when its
// session keeps dying (an HSM restarting, a flapping network HSM).
const sessionAttempts = 4

// withSession runs fn on a pooled session. If the session turns out to be
// dead (CKR_SESSION_HANDLE_INVALID, CKR_DEVICE_ERROR, logged out…), every
// session is closed and the login session and pool are opened afresh, then fn
// is run again; objects are found again by label. fn must not call
// withSession.
func (k *KMS) withSession(ctx context.Context, fn func(sh pkcs11.SessionHandle) error) error {
	var err error
	for range sessionAttempts {
		k.sess.gate.RLock()
		gen := k.sess.gen.Load()
		var sh pkcs11.SessionHandle
		select {
		case sh = <-k.pool:
		case <-ctx.Done():
			k.sess.gate.RUnlock()
			return ctx.Err()
		}
		err = fn(sh)
		k.pool <- sh
		k.sess.gate.RUnlock()
		if err == nil || !recoverable(err) {
			return err
		}
		if rerr := k.rebuildSessions(gen); rerr != nil {
			return kmsErr(ErrInternal, "HSM session lost and not recovered: %v (first: %v)", rerr, err)
		}
	}
	return kmsErr(ErrInternal, "HSM sessions lost %d times in a row: %v", sessionAttempts, err)
}

// rebuildSessions closes every session of the token and opens the login
// session and the pool again, unless another caller already did since gen.
// The pool is always left full (with dead handles if the HSM is gone, so
// that the next operation fails and tries again).
func (k *KMS) rebuildSessions(gen uint64) error {
	k.sess.gate.Lock()
	defer k.sess.gate.Unlock()
	if k.sess.gen.Load() != gen {
		return nil
	}
	k.sess.gen.Add(1)
	for len(k.pool) > 0 { // every handle is in the pool: no operation runs
		<-k.pool
	}
	k.p.CloseAllSessions(k.slot)
	var first error
	sh, err := k.p.OpenSession(k.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err == nil {
		err = k.p.Login(sh, pkcs11.CKU_USER, k.pin)
		if errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN)) {
			err = nil
		}
		k.login = sh
	}
	first = err
	for range cap(k.pool) {
		s, err := k.p.OpenSession(k.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil && first == nil {
			first = err
		}
		k.pool <- s // 0 when the open failed: invalid, so retried later
	}
	return first
}
