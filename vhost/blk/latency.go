package blk

import (
	"sync/atomic"
	"time"
)

// LatencyBounds are the upper bounds of a Histogram's buckets: from 10 µs to
// 1 s, roughly three per decade. Past the last one is the +Inf bucket.
var LatencyBounds = [...]time.Duration{
	10 * time.Microsecond, 25 * time.Microsecond, 50 * time.Microsecond,
	100 * time.Microsecond, 250 * time.Microsecond, 500 * time.Microsecond,
	time.Millisecond, 2500 * time.Microsecond, 5 * time.Millisecond,
	10 * time.Millisecond, 25 * time.Millisecond, 50 * time.Millisecond,
	100 * time.Millisecond, 250 * time.Millisecond, 500 * time.Millisecond,
	time.Second,
}

// Histogram counts request latencies (time in hemd, from the chain taken off
// the ring to its status written) in LatencyBounds' buckets. One queue
// writes it; readers load it atomically at any time.
type Histogram struct {
	counts [len(LatencyBounds) + 1]atomic.Uint64
	sumNs  atomic.Uint64
}

// Observe records one request of duration d.
func (h *Histogram) Observe(d time.Duration) {
	i := 0
	for i < len(LatencyBounds) && d > LatencyBounds[i] {
		i++
	}
	h.counts[i].Add(1)
	h.sumNs.Add(uint64(d))
}

// Snapshot returns the count in each bucket (not cumulative; the last is
// +Inf), the total count and the sum of the observed durations.
func (h *Histogram) Snapshot() (buckets []uint64, count uint64, sum time.Duration) {
	buckets = make([]uint64, len(h.counts))
	for i := range h.counts {
		buckets[i] = h.counts[i].Load()
		count += buckets[i]
	}
	return buckets, count, time.Duration(h.sumNs.Load())
}
