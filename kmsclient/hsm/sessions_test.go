package hsm

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestDecryptWhileSessionsClosed: 8 goroutines decrypt (and wrap) while
// another calls C_CloseAllSessions on the module every 10 ms (between
// operations, as an HSM restart would), the login session included. Every operation succeeds with the right key: the pool reopens
// sessions, logs in again and finds the CMK again by label.
//
// It runs in a child process of its own: after other tests have opened and
// finalized SoftHSM2 in the same process, sessions opened by the rebuilt pool
// are sometimes refused at once (seen only then, never in a fresh process,
// which is what hemd is).
func TestDecryptWhileSessionsClosed(t *testing.T) {
	if os.Getenv("HEMD_TEST_SESSIONS_CHILD") != "1" {
		if _, err := os.Stat(DefaultModule); err != nil {
			t.Skipf("SoftHSM2 is not installed (%v): make test installs softhsm2", err)
		}
		cmd := exec.Command(os.Args[0], "-test.run=^TestDecryptWhileSessionsClosed$", "-test.count=1", "-test.v")
		cmd.Env = append(os.Environ(), "HEMD_TEST_SESSIONS_CHILD=1")
		out, err := cmd.CombinedOutput()
		t.Logf("child:\n%s", out)
		if err != nil {
			t.Fatalf("child: %v", err)
		}
		return
	}
	k, _ := open(t)
	ctx := context.Background()
	m, _ := k.CreateKey(ctx, "")
	want := make([]byte, 32)
	for i := range want {
		want[i] = byte(i)
	}
	blob, _, err := k.Encrypt(ctx, m.KeyID, vol, want)
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var closes atomic.Int64
	var killer sync.WaitGroup
	killer.Add(1)
	go func() {
		defer killer.Done()
		for {
			select {
			case <-stop:
				return
			// Every 40 ms: an operation under the race detector on a busy
			// 2-core machine can take over 10 ms, and sessions closed faster
			// than one operation completes are not an HSM restart but a
			// livelock that sessionAttempts rightly gives up on.
			case <-time.After(40 * time.Millisecond):
			}
			k.sess.gate.Lock() // between operations, as an HSM restart would
			k.p.CloseAllSessions(k.slot)
			k.sess.gate.Unlock()
			closes.Add(1)
		}
	}()
	var wg sync.WaitGroup
	var fails atomic.Int64
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dst := make([]byte, 64)
			for i := 0; i < 50 || closes.Load() < 5; i++ {
				n, _, err := k.DecryptN(ctx, blob, vol, dst)
				if err != nil || !bytes.Equal(dst[:n], want) {
					fails.Add(1)
					t.Errorf("Decrypt during session loss: %v", err)
					return
				}
				if _, _, err := k.GenerateDataKeyWithoutPlaintext(ctx, m.KeyID, vol); err != nil {
					fails.Add(1)
					t.Errorf("GenerateDataKeyWithoutPlaintext during session loss: %v", err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	killer.Wait()
	t.Logf("%d C_CloseAllSessions during the operations", closes.Load())
	// And afterwards the KMS works as before.
	dst := make([]byte, 64)
	if n, _, err := k.DecryptN(ctx, blob, vol, dst); err != nil || !bytes.Equal(dst[:n], want) {
		t.Fatalf("after: %v", err)
	}
}
