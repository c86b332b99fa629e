package blk

import (
	"bytes"
	"context"
	"errors"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hemd/hemd/vhost/frontend"
)

// testClaim is a volume lock that another process may hold (busy).
type testClaim struct {
	mu                 sync.Mutex
	held, busy         bool
	acquires, releases int
	refusals           []time.Duration // how long each refused Acquire waited
}

func (c *testClaim) Acquire(ctx context.Context) error {
	began := time.Now()
	for {
		c.mu.Lock()
		if c.held {
			c.mu.Unlock()
			return nil
		}
		if !c.busy {
			c.held = true
			c.acquires++
			c.mu.Unlock()
			return nil
		}
		c.mu.Unlock()
		select {
		case <-ctx.Done():
			c.mu.Lock()
			c.refusals = append(c.refusals, time.Since(began))
			c.mu.Unlock()
			return errors.New("in use by hemd pid 4242 (socket /run/src.sock)")
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func (c *testClaim) Release() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.held {
		c.held = false
		c.releases++
	}
}

func (c *testClaim) state() (held bool, acquires, releases int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.held, c.acquires, c.releases
}

func (c *testClaim) setBusy(b bool) {
	c.mu.Lock()
	c.busy = b
	c.mu.Unlock()
}

// lockedLog is a device log read while the device writes it.
type lockedLog struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// A pause keeps the volume; the switchover of a migration (rings stopped
// while dirty logging) hands it off; the source that runs again (a failed
// migration) takes it back and serves.
func TestHandOffAtSwitchover(t *testing.T) {
	claim := &testClaim{held: true}
	log := &lockedLog{}
	r := newRig(t, rigOpts{cfg: Config{Claim: claim}, fe: frontend.Options{Log: true}, logTo: log})
	if st, _, _ := r.do(0, blkIO{typ: TypeOut, sector: 1, data: pattern(512, 1)}); st != StatusOK {
		t.Fatalf("write: %d", st)
	}
	base, err := r.c.StopQueue(0)
	if err != nil {
		t.Fatal(err)
	}
	if held, _, rel := claim.state(); !held || rel != 0 {
		t.Fatalf("a pause without dirty logging let go of the volume (held %v, releases %d)", held, rel)
	}
	if err := r.c.Queues[0].Restart(uint16(base)); err != nil {
		t.Fatal(err)
	}
	if st, _, _ := r.do(0, blkIO{typ: TypeOut, sector: 2, data: pattern(512, 2)}); st != StatusOK {
		t.Fatalf("write after cont: %d", st)
	}

	if _, err := r.c.SetLogBase(16 << 20 / 4096 / 8); err != nil {
		t.Fatal(err)
	}
	if err := r.c.SetLogAll(true); err != nil {
		t.Fatal(err)
	}
	if base, err = r.c.StopQueue(0); err != nil {
		t.Fatal(err)
	}
	if held, _, rel := claim.state(); held || rel != 1 {
		t.Fatalf("switchover: held %v, releases %d; want handed off once", held, rel)
	}
	if !strings.Contains(log.String(), "event=hand-off") {
		t.Fatal("no hand-off event logged")
	}

	if err := r.c.SetLogAll(false); err != nil {
		t.Fatal(err)
	}
	if err := r.c.Queues[0].Restart(uint16(base)); err != nil {
		t.Fatal(err)
	}
	st, _, got := r.do(0, blkIO{typ: TypeIn, sector: 1, data: make([]byte, 1024), write: true})
	if st != StatusOK || !bytes.Equal(got, append(pattern(512, 1), pattern(512, 2)...)) {
		t.Fatalf("read on the resumed source: status %d", st)
	}
	if held, acq, _ := claim.state(); !held || acq != 1 {
		t.Fatalf("resumed source: held %v, acquires %d; want the volume taken back", held, acq)
	}
	if !strings.Contains(log.String(), "event=take-over") {
		t.Fatal("no take-over event logged")
	}
}

// The destination of a migration waits for the source to let go, at most
// ClaimWait in all: past it the device does not start, its rings stay
// stopped and the log names the holder; a later start tries once and
// succeeds when the holder is gone.
func TestIncomingWaitsForHandOff(t *testing.T) {
	claim := &testClaim{busy: true}
	log := &lockedLog{}
	const wait = 300 * time.Millisecond
	r := newRig(t, rigOpts{cfg: Config{Claim: claim, Incoming: true, ClaimWait: wait}, noDial: true, logTo: log})

	// The source lets go while the destination waits.
	go func() {
		time.Sleep(100 * time.Millisecond)
		claim.setBusy(false)
	}()
	began := time.Now()
	r.c = r.dial(frontend.Options{})
	if d := time.Since(began); d < 100*time.Millisecond {
		t.Fatalf("started after %v, before the source let go", d)
	}
	if st, _, _ := r.do(0, blkIO{typ: TypeOut, data: pattern(512, 3)}); st != StatusOK {
		t.Fatalf("write after the take-over: %d", st)
	}
	if held, acq, _ := claim.state(); !held || acq != 1 {
		t.Fatalf("held %v, acquires %d", held, acq)
	}
	if !strings.Contains(log.String(), "event=take-over") {
		t.Fatal("no take-over event logged")
	}
}

func TestIncomingFailsClosed(t *testing.T) {
	claim := &testClaim{busy: true}
	log := &lockedLog{}
	const wait = 300 * time.Millisecond
	r := newRig(t, rigOpts{cfg: Config{Claim: claim, Incoming: true, ClaimWait: wait, Queues: 2}, noDial: true, logTo: log})
	began := time.Now()
	r.c = r.dial(frontend.Options{Queues: 2})
	if d := time.Since(began); d < wait {
		t.Fatalf("setup took %v, less than the wait of %v", d, wait)
	}
	claim.mu.Lock()
	refusals := claim.refusals
	claim.mu.Unlock()
	// Each queue's start tried; only the first waited.
	if len(refusals) != 2 || refusals[0] < wait*9/10 || refusals[1] > wait/2 {
		t.Fatalf("refused acquires waited %v: want %v once, then a single try", refusals, wait)
	}
	if !strings.Contains(log.String(), "device start failed") || !strings.Contains(log.String(), "pid 4242") {
		t.Fatalf("the refused start does not name the holder:\n%s", log)
	}
	// The rings stay stopped: the request is not served, nothing written.
	bufs, _, _ := r.build(blkIO{typ: TypeOut, data: pattern(512, 4)})
	q := r.c.Queues[0]
	if _, err := q.Add(bufs); err != nil {
		t.Fatal(err)
	}
	q.Kick()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if used, _ := q.Wait(ctx, nil); len(used) != 0 {
		t.Fatalf("a request was served without the volume: %+v", used)
	}
	if b, err := os.ReadFile(r.path); err != nil || !bytes.Equal(b[:512], make([]byte, 512)) {
		t.Fatal("a write reached the volume without its claim")
	}

	// The holder goes away; the front-end reconnects (a new start): the
	// wait is spent, the start tries once and gets the volume.
	claim.setBusy(false)
	r.c.Close()
	r.c = r.dial(frontend.Options{})
	if st, _, _ := r.do(0, blkIO{typ: TypeOut, sector: 8, data: pattern(512, 5)}); st != StatusOK {
		t.Fatalf("write once the holder left: %d", st)
	}
}
