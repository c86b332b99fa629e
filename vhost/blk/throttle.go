package blk

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// Provisioned performance: a volume's reads and writes are held to an IOPS
// and a throughput limit, each a token bucket shared by all of the volume's
// queues, as EBS provisions gp3 and io2 volumes and as QEMU's throttle
// groups do. A bucket fills at the limit's rate up to its burst; a request
// takes its tokens (one per request, its length in bytes) and goes at once
// while the bucket holds any, else waits until the bucket would be back at
// zero. Over any span T a volume so does at most rate×T + burst (+ one
// request), and an idle volume may burst.
//
// A request that must wait makes its queue wait: the guest's requests stay
// in its ring, as on a disk that is busy. What the queue had gathered
// before it goes to storage first (the hook in worker.begin calls runBatch).

// Limits are a volume's provisioned performance. The zero value is
// unlimited.
type Limits struct {
	// IOPS is the most reads and writes per second; 0: unlimited.
	IOPS uint64
	// BPS is the most bytes read and written per second; 0: unlimited.
	BPS uint64
	// IOPSBurst is the IOPS bucket's size: how many requests may go at
	// once after an idle spell. 0: a tenth of a second's worth (QEMU's
	// default), at least 1.
	IOPSBurst uint64
	// BPSBurst is the throughput bucket's size in bytes. 0: a tenth of a
	// second's worth.
	BPSBurst uint64
}

// Unlimited reports whether l limits nothing.
func (l Limits) Unlimited() bool { return l.IOPS == 0 && l.BPS == 0 }

// maxRate bounds a limit: far beyond what any host serves, and small
// enough for the bucket arithmetic to stay exact.
const maxRate = 1 << 40

// ErrLimits is a limit that makes no sense.
var ErrLimits = errors.New("invalid limits")

// normalized checks l and fills in the default bursts.
func (l Limits) normalized() (Limits, error) {
	switch {
	case l.IOPS > maxRate || l.BPS > maxRate || l.IOPSBurst > maxRate || l.BPSBurst > maxRate:
		return l, fmt.Errorf("%w: a limit or burst above %d", ErrLimits, uint64(maxRate))
	case l.IOPS == 0 && l.IOPSBurst != 0:
		return l, fmt.Errorf("%w: an IOPS burst without an IOPS limit", ErrLimits)
	case l.BPS == 0 && l.BPSBurst != 0:
		return l, fmt.Errorf("%w: a throughput burst without a throughput limit", ErrLimits)
	}
	if l.IOPS > 0 && l.IOPSBurst == 0 {
		l.IOPSBurst = max(1, (l.IOPS+9)/10)
	}
	if l.BPS > 0 && l.BPSBurst == 0 {
		l.BPSBurst = max(1, (l.BPS+9)/10)
	}
	return l, nil
}

// bucket is one token bucket. level may go below zero: the debt of requests
// admitted but not yet paid for, which later ones wait out.
type bucket struct {
	rate  float64 // tokens per nanosecond; 0: off
	size  float64
	level float64
}

// take refills b for elapsed nanoseconds, takes n tokens and returns how
// long the taker must wait until b is back at zero.
func (b *bucket) take(elapsed, n float64) time.Duration {
	if b.rate == 0 {
		return 0
	}
	b.level = min(b.size, b.level+b.rate*elapsed)
	b.level -= n
	if b.level >= 0 {
		return 0
	}
	return time.Duration(-b.level/b.rate + 0.5)
}

// set gives b a new rate and size. A bucket switched on starts full; debts
// are forgiven (the requests waiting on them go now).
func (b *bucket) set(perSecond, size uint64) {
	wasOff := b.rate == 0
	b.rate, b.size = float64(perSecond)/1e9, float64(size)
	switch {
	case b.rate == 0:
		b.level = 0
	case wasOff:
		b.level = b.size
	default:
		b.level = max(0, min(b.level, b.size))
	}
}

// clock is the time a Throttle goes by: the real one, or a test's.
type clock interface {
	Now() time.Time
	// SleepUntil waits until t, or until one of wake is closed.
	SleepUntil(t time.Time, wake ...<-chan struct{})
}

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }

func (realClock) SleepUntil(until time.Time, wake ...<-chan struct{}) {
	d := time.Until(until)
	if d <= 0 {
		return
	}
	t := time.NewTimer(d)
	defer t.Stop()
	var w0, w1 <-chan struct{}
	if len(wake) > 0 {
		w0 = wake[0]
	}
	if len(wake) > 1 {
		w1 = wake[1]
	}
	select {
	case <-t.C:
	case <-w0:
	case <-w1:
	}
}

// Throttle enforces a volume's Limits across all of its queues.
type Throttle struct {
	on  atomic.Bool // any limit set: the fast path of an unlimited volume
	clk clock

	mu      sync.Mutex
	lim     Limits
	ops     bucket
	bytes   bucket
	last    time.Time
	changed chan struct{} // closed (and replaced) when the limits change

	waited atomic.Int64 // nanoseconds requests waited, in all
	waits  atomic.Uint64
}

// NewThrottle returns a throttle enforcing l.
func NewThrottle(l Limits) (*Throttle, error) { return newThrottle(l, realClock{}) }

func newThrottle(l Limits, clk clock) (*Throttle, error) {
	t := &Throttle{clk: clk, changed: make(chan struct{}), last: clk.Now()}
	if err := t.Set(l); err != nil {
		return nil, err
	}
	return t, nil
}

// Set changes the limits at once. Requests waiting under the old ones go
// now; the next ones wait under the new.
func (t *Throttle) Set(l Limits) error {
	l, err := l.normalized()
	if err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.refill(t.clk.Now())
	t.lim = l
	t.ops.set(l.IOPS, l.IOPSBurst)
	t.bytes.set(l.BPS, l.BPSBurst)
	close(t.changed)
	t.changed = make(chan struct{})
	t.on.Store(!l.Unlimited())
	return nil
}

// refill brings both buckets to now (t.mu held).
func (t *Throttle) refill(now time.Time) {
	elapsed := float64(max(0, now.Sub(t.last)))
	t.last = now
	t.ops.take(elapsed, 0)
	t.bytes.take(elapsed, 0)
}

// Limits returns the limits in force, with their bursts.
func (t *Throttle) Limits() Limits {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.lim
}

// Waited returns how long requests waited for tokens, in all, and how many
// requests waited.
func (t *Throttle) Waited() (time.Duration, uint64) {
	return time.Duration(t.waited.Load()), t.waits.Load()
}

// reserve takes the tokens of a request of n bytes and returns when it may
// go (wait false: now), and the channel that is closed if the limits change
// meanwhile.
func (t *Throttle) reserve(n uint64) (until time.Time, wait bool, changed <-chan struct{}) {
	t.mu.Lock()
	defer t.mu.Unlock()
	now := t.clk.Now()
	elapsed := float64(max(0, now.Sub(t.last)))
	t.last = now
	d := t.ops.take(elapsed, 1)
	d = max(d, t.bytes.take(elapsed, float64(n)))
	return now.Add(d), d > 0, t.changed
}

// Wait holds the caller until a request of n bytes may go under the limits,
// or until stop is closed or the limits change. It returns the time it
// waited.
func (t *Throttle) Wait(n uint64, stop <-chan struct{}) time.Duration {
	if !t.on.Load() {
		return 0
	}
	until, wait, changed := t.reserve(n)
	if !wait {
		return 0
	}
	return t.sleep(until, changed, stop)
}

// sleep waits until until (or until changed or stop is closed) and records
// the wait.
func (t *Throttle) sleep(until time.Time, changed, stop <-chan struct{}) time.Duration {
	start := t.clk.Now()
	t.clk.SleepUntil(until, changed, stop)
	waited := max(0, t.clk.Now().Sub(start))
	t.waited.Add(int64(waited))
	t.waits.Add(1)
	return waited
}

// throttle is the hook in the request path (worker.begin): a read or write
// waits for its tokens. Before a wait, what the queue gathered so far goes
// to storage, so it is not held back by a request after it.
func (w *worker) throttle(r *request) {
	t := w.dev.throttle
	if !t.on.Load() || (r.typ != TypeIn && r.typ != TypeOut) {
		return
	}
	until, wait, changed := t.reserve(r.length)
	if !wait {
		return
	}
	w.runBatch()
	t.sleep(until, changed, w.stop)
}

// interrupt ends the worker's wait for tokens, now and from now on: its
// ring is stopping.
func (w *worker) interrupt() { w.stopOnce.Do(func() { close(w.stop) }) }
