package hsm

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"

	"github.com/miekg/pkcs11"
)

// sessionState guards the session pool against being rebuilt under a
// running operation. SoftHSM2 reuses session handle numbers and crashes when
// a session is closed while another thread is inside C_Decrypt on it, so
// sessions are only ever closed when no operation holds one.
type sessionState struct {
	gate     sync.RWMutex  // operations hold it shared; rebuilding holds it exclusively
	gen      atomic.Uint64 // bumped by every rebuild
	replaced atomic.Uint64 // sessions replaced because an operation could not be ended
}

// sessionAttempts bounds how often one operation rebuilds the pool when its
// session keeps dying (an HSM restarting, a flapping network HSM).
const sessionAttempts = 4

// withSession runs fn on a pooled session. If the session turns out to be
// dead (CKR_SESSION_HANDLE_INVALID, CKR_DEVICE_ERROR, logged out…), every
// session is closed and the login session and pool are opened afresh, then fn
// is run again; objects are found again by label. fn must not call
// withSession.
//
// A session goes back to the pool only with no operation active on it: fn
// validates its input before any C_*Init and ends every operation it
// initialises (endOp); when it cannot, it returns a *spoiledError and the
// session is closed and replaced by a new one here, as it is when fn panics.
func (k *KMS) withSession(ctx context.Context, fn func(sh pkcs11.SessionHandle) error) error {
	var err error
	for range sessionAttempts {
		if err := ctx.Err(); err != nil {
			return err
		}
		var gen uint64
		if gen, err = k.runOnSession(ctx, fn); err == nil || !recoverable(err) {
			return err
		}
		if rerr := k.rebuildSessions(gen); rerr != nil {
			return kmsErr(ErrInternal, "HSM session lost and not recovered: %v (first: %v)", rerr, err)
		}
	}
	return kmsErr(ErrInternal, "HSM sessions lost %d times in a row: %v", sessionAttempts, err)
}

// runOnSession runs fn once on a session taken from the pool and gives the
// session (or its replacement) back, and the pool generation it ran in.
func (k *KMS) runOnSession(ctx context.Context, fn func(sh pkcs11.SessionHandle) error) (gen uint64, err error) {
	k.sess.gate.RLock()
	defer k.sess.gate.RUnlock()
	gen = k.sess.gen.Load()
	var sh pkcs11.SessionHandle
	select {
	case sh = <-k.pool:
	case <-ctx.Done():
		return gen, ctx.Err()
	}
	finished := false
	defer func() {
		var spoiled *spoiledError
		switch {
		case !finished:
			sh = k.replaceSession(sh, errors.New("the operation panicked"))
		case errors.As(err, &spoiled) && !recoverable(err): // a lost session is rebuilt with the pool
			sh = k.replaceSession(sh, spoiled.why)
		}
		k.pool <- sh
		if s, ok := err.(*spoiledError); ok {
			err = s.err // the session is taken care of: the caller sees the operation's error
		}
	}()
	if k.sessionHook != nil {
		k.sessionHook(sh)
	}
	err = fn(sh)
	finished = true
	return gen, err
}

// spoiledError is an operation's error after which its session may still
// hold an active PKCS#11 operation (one that could not be ended): the
// session is replaced rather than returned to the pool. It reads and
// unwraps as the operation's error.
type spoiledError struct {
	err error // the operation's error, for the caller
	why error // why the session may still be busy
}

func (e *spoiledError) Error() string { return e.err.Error() }
func (e *spoiledError) Unwrap() error { return e.err }

// abandon ends the operation of kind that the failed call (err) left on sh,
// if it is still active, and returns err; a *spoiledError when it cannot.
func (k *KMS) abandon(sh pkcs11.SessionHandle, kind opKind, err error) error {
	if eerr := k.raw.endOp(sh, kind); eerr != nil {
		return &spoiledError{err: err, why: eerr}
	}
	return err
}

// replaceSession closes sh, which holds an operation that could not be
// ended (or ran an operation that panicked), and opens a new session for
// the pool. The caller owns sh and holds the gate shared: no other thread
// uses sh, and the pool is not being rebuilt.
func (k *KMS) replaceSession(sh pkcs11.SessionHandle, why error) pkcs11.SessionHandle {
	k.sess.replaced.Add(1)
	k.p.CloseSession(sh) // a dead handle is replaced all the same
	ns, err := k.p.OpenSession(k.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if log := k.log.Load(); log != nil {
		log.Warn("kms: PKCS#11 session replaced: an operation could not be ended on it", "reason", why, "reopen_err", err)
	}
	if err != nil {
		// 0 is no session: the next operation on it fails with
		// CKR_SESSION_HANDLE_INVALID and rebuilds the pool.
		return 0
	}
	return ns
}

// SetLogger makes the KMS log what it recovers from on its own (a session
// replaced because an operation on it could not be ended). nil: no log.
func (k *KMS) SetLogger(l *slog.Logger) { k.log.Store(l) }

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
