package blk

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/hemd/hemd/vhost/frontend"
)

// fakeClock is a Throttle's time in tests. In auto mode a sleep jumps the
// clock to its end at once (unless woken first); otherwise a sleep blocks
// until the test advances the clock past its end or a wake channel closes.
type fakeClock struct {
	mu   sync.Mutex
	t    time.Time
	auto bool
	tick chan struct{} // closed and replaced by advance
}

func newFakeClock(auto bool) *fakeClock {
	return &fakeClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), auto: auto, tick: make(chan struct{})}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
	close(c.tick)
	c.tick = make(chan struct{})
}

func (c *fakeClock) SleepUntil(until time.Time, wake ...<-chan struct{}) {
	var w [2]<-chan struct{}
	copy(w[:], wake)
	for {
		select {
		case <-w[0]:
			return
		case <-w[1]:
			return
		default:
		}
		c.mu.Lock()
		if !until.After(c.t) {
			c.mu.Unlock()
			return
		}
		if c.auto {
			c.t = until
			c.mu.Unlock()
			return
		}
		tick := c.tick
		c.mu.Unlock()
		select {
		case <-tick:
		case <-w[0]:
			return
		case <-w[1]:
			return
		}
	}
}

func mustThrottle(t *testing.T, l Limits, clk clock) *Throttle {
	t.Helper()
	th, err := newThrottle(l, clk)
	if err != nil {
		t.Fatal(err)
	}
	return th
}

// wantWait reserves a request of n bytes and checks when it may go,
// relative to now.
func wantWait(t *testing.T, th *Throttle, clk *fakeClock, n uint64, want time.Duration) {
	t.Helper()
	until, wait, _ := th.reserve(n)
	got := until.Sub(clk.Now())
	if wait != (want > 0) || got < want-time.Microsecond || got > want+time.Microsecond {
		t.Fatalf("request of %d bytes: wait %v (%v), want %v", n, got, wait, want)
	}
}

func TestThrottleBuckets(t *testing.T) {
	t.Run("iops", func(t *testing.T) {
		clk := newFakeClock(true)
		th := mustThrottle(t, Limits{IOPS: 100, IOPSBurst: 10}, clk)
		for i := 0; i < 10; i++ {
			wantWait(t, th, clk, 4096, 0) // the full bucket: a burst of 10
		}
		wantWait(t, th, clk, 4096, 10*time.Millisecond)
		wantWait(t, th, clk, 4096, 20*time.Millisecond)
		// A second later the bucket is full again (not fuller).
		clk.advance(time.Second)
		for i := 0; i < 10; i++ {
			wantWait(t, th, clk, 1<<20, 0)
		}
		wantWait(t, th, clk, 0, 10*time.Millisecond)
	})
	t.Run("throughput", func(t *testing.T) {
		clk := newFakeClock(true)
		th := mustThrottle(t, Limits{BPS: 1_000_000, BPSBurst: 100_000}, clk)
		wantWait(t, th, clk, 65536, 0)                        // 34464 left
		wantWait(t, th, clk, 65536, 31072*time.Microsecond)   // 31072 bytes short
		wantWait(t, th, clk, 0, 31072*time.Microsecond)       // takes no bytes: waits for the debt
		clk.advance(time.Hour)                                // full again: 100000
		wantWait(t, th, clk, 1_000_000, 900*time.Millisecond) // larger than the bucket: goes once it is paid
	})
	t.Run("both", func(t *testing.T) {
		clk := newFakeClock(true)
		th := mustThrottle(t, Limits{IOPS: 1000, IOPSBurst: 1, BPS: 1_000_000, BPSBurst: 100_000}, clk)
		wantWait(t, th, clk, 524288, 424288*time.Microsecond) // the bytes are short, not the requests
		clk.advance(time.Hour)
		wantWait(t, th, clk, 512, 0)
		wantWait(t, th, clk, 512, time.Millisecond) // the requests are short, not the bytes
	})
	t.Run("default burst", func(t *testing.T) {
		th := mustThrottle(t, Limits{IOPS: 3000, BPS: 125_000_000}, newFakeClock(true))
		if l := th.Limits(); l.IOPSBurst != 300 || l.BPSBurst != 12_500_000 {
			t.Fatalf("default bursts %d requests, %d bytes; want a tenth of a second's worth", l.IOPSBurst, l.BPSBurst)
		}
		if l := mustThrottle(t, Limits{IOPS: 3}, newFakeClock(true)).Limits(); l.IOPSBurst != 1 {
			t.Fatalf("default burst of 3 IOPS: %d, want 1", l.IOPSBurst)
		}
	})
}

// Saturated for 10 s, a limited volume does its rate for 10 s and its burst
// once: the token bucket's promise.
func TestThrottleRateOverTenSeconds(t *testing.T) {
	for _, tc := range []struct {
		name  string
		l     Limits
		bytes uint64 // per request
		want  uint64 // requests in 10 s
	}{
		{"gp3 baseline iops", Limits{IOPS: 3000}, 4096, 30000 + 300},
		{"gp3 baseline throughput", Limits{BPS: 125_000_000}, 1 << 20, (1_250_000_000 + 12_500_000) / (1 << 20)},
		{"iops with a burst", Limits{IOPS: 500, IOPSBurst: 2000}, 4096, 5000 + 2000},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clk := newFakeClock(true)
			th := mustThrottle(t, tc.l, clk)
			end := clk.Now().Add(10 * time.Second)
			var n uint64
			for {
				until, _, _ := th.reserve(tc.bytes)
				if until.After(end) {
					break
				}
				clk.SleepUntil(until)
				n++
			}
			// The last request admitted may be off by one against the
			// arithmetic (a request larger than what is left goes once
			// its debt is paid).
			if n < tc.want-1 || n > tc.want+1 {
				t.Fatalf("%d requests of %d bytes in 10 s, want %d", n, tc.bytes, tc.want)
			}
		})
	}
}

func TestThrottleSetAndStop(t *testing.T) {
	clk := newFakeClock(true)
	th := mustThrottle(t, Limits{}, clk)
	if th.on.Load() {
		t.Fatal("an unlimited throttle is on")
	}
	if d := th.Wait(1<<20, nil); d != 0 {
		t.Fatalf("unlimited: waited %v", d)
	}
	// Switched on: the bucket starts full.
	if err := th.Set(Limits{IOPS: 10, IOPSBurst: 2}); err != nil {
		t.Fatal(err)
	}
	wantWait(t, th, clk, 0, 0)
	wantWait(t, th, clk, 0, 0)
	_, wait, changed := th.reserve(0) // in debt now: 100 ms
	if !wait {
		t.Fatal("third request did not wait")
	}
	// A change of limits wakes the waiters and forgives the debt.
	if err := th.Set(Limits{IOPS: 20, IOPSBurst: 1}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-changed:
	default:
		t.Fatal("Set did not wake the waiters")
	}
	// The woken went unpaid; the next one finds the bucket empty, not in
	// debt.
	wantWait(t, th, clk, 0, 50*time.Millisecond)
	wantWait(t, th, clk, 0, 100*time.Millisecond)
	// A stopping ring ends a wait at once.
	stop := make(chan struct{})
	close(stop)
	start := clk.Now()
	th.Wait(0, stop)
	if clk.Now() != start {
		t.Fatalf("a wait with stop closed took %v", clk.Now().Sub(start))
	}
	// Waits are counted.
	th.Wait(0, nil)
	if d, n := th.Waited(); n < 2 || d < 50*time.Millisecond {
		t.Fatalf("waited %v in %d waits", d, n)
	}
	// Unlimited again: off.
	if err := th.Set(Limits{}); err != nil || th.on.Load() {
		t.Fatalf("unlimited again: on %v, %v", th.on.Load(), err)
	}
}

func TestLimitsInvalid(t *testing.T) {
	for _, l := range []Limits{
		{IOPSBurst: 10},
		{BPSBurst: 10},
		{IOPS: maxRate + 1},
		{BPS: 1, BPSBurst: maxRate + 1},
	} {
		if _, err := NewThrottle(l); !errors.Is(err, ErrLimits) {
			t.Errorf("%+v: %v, want ErrLimits", l, err)
		}
	}
}

// The limit holds across all of a volume's queues: two queues share one
// bucket, and the requests of both together take (N - burst) / rate, on a
// fake clock (no wall time is measured). Both request paths: batched and
// one system call per request.
func TestThrottleAcrossQueues(t *testing.T) {
	for _, syncIO := range []bool{false, true} {
		name := "batched"
		if syncIO {
			name = "sync"
		}
		t.Run(name, func(t *testing.T) {
			const rate, burst, perQueue = 500, 50, 200
			r := newRig(t, rigOpts{sync: syncIO, cfg: Config{Queues: 2}, fe: frontend.Options{Queues: 2}, noDial: true})
			clk := newFakeClock(true)
			r.dev.throttle = mustThrottle(t, Limits{IOPS: rate, IOPSBurst: burst}, clk)
			r.c = r.dial(frontend.Options{Queues: 2})
			start := clk.Now()
			var reqs [2][]frontend.Buf
			for q := range reqs {
				reqs[q], _, _ = r.build(blkIO{typ: TypeIn, sector: uint64(q * 8), data: make([]byte, 4096), write: true})
			}
			var wg sync.WaitGroup
			errs := make(chan error, 2)
			for q := 0; q < 2; q++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					qu := r.c.Queues[q]
					ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
					defer cancel()
					for i := 0; i < perQueue; i++ {
						if _, err := qu.Add(reqs[q]); err != nil {
							errs <- err
							return
						}
						if err := qu.Kick(); err != nil {
							errs <- err
							return
						}
						if _, err := qu.Wait(ctx, nil); err != nil {
							errs <- err
							return
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			want := time.Duration(2*perQueue-burst) * time.Second / rate
			if got := clk.Now().Sub(start); got < want-time.Microsecond || got > want+time.Microsecond {
				t.Fatalf("%d requests on 2 queues took %v of the fake clock, want %v", 2*perQueue, got, want)
			}
			if r.dev.Stats(0).Reads.Load() != perQueue || r.dev.Stats(1).Reads.Load() != perQueue {
				t.Fatalf("reads %d and %d", r.dev.Stats(0).Reads.Load(), r.dev.Stats(1).Reads.Load())
			}
			// Every request after the burst waited; the waits of the two
			// queues overlap, so their sum is at least the time taken.
			if d, n := r.dev.Throttled(); n != 2*perQueue-burst || d < want {
				t.Fatalf("throttled %v in %d requests, want at least %v in %d", d, n, want, 2*perQueue-burst)
			}
		})
	}
}

// A ring stops at once while its handler waits for tokens (the session
// interrupts the wait): GET_VRING_BASE is not held up by a throttled
// request, however low the limit.
func TestThrottledRingStops(t *testing.T) {
	r := newRig(t, rigOpts{noDial: true})
	clk := newFakeClock(false) // a sleep lasts until the test advances the clock: never here
	r.dev.throttle = mustThrottle(t, Limits{IOPS: 1, IOPSBurst: 1}, clk)
	r.c = r.dial(frontend.Options{})
	if st, _, _ := r.do(0, blkIO{typ: TypeIn, data: make([]byte, 512), write: true}); st != StatusOK {
		t.Fatalf("first read: status %d", st)
	}
	bufs, st, _ := r.build(blkIO{typ: TypeIn, data: make([]byte, 512), write: true})
	qu := r.c.Queues[0]
	if _, err := qu.Add(bufs); err != nil {
		t.Fatal(err)
	}
	if err := qu.Kick(); err != nil {
		t.Fatal(err)
	}
	// Wait for the request to be taken and waiting.
	for i := 0; ; i++ {
		r.dev.throttle.mu.Lock()
		taken := r.dev.throttle.ops.level < 0
		r.dev.throttle.mu.Unlock()
		if taken {
			break
		}
		if i == 1000 {
			t.Fatal("the second request never reached the throttle")
		}
		time.Sleep(5 * time.Millisecond)
	}
	done := make(chan error, 1)
	go func() { _, err := r.c.StopQueue(0); done <- err }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("GET_VRING_BASE held up by a throttled request")
	}
	// The interrupted request completed (it went without its tokens).
	if r.c.Mem[st] != StatusOK {
		t.Fatalf("the interrupted request's status %d", r.c.Mem[st])
	}
}
