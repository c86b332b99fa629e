package blk

import (
	"testing"
	"time"
)

func TestHistogram(t *testing.T) {
	var h Histogram
	for _, d := range []time.Duration{time.Microsecond, 10 * time.Microsecond, 11 * time.Microsecond, time.Millisecond, 3 * time.Second} {
		h.Observe(d)
	}
	b, n, sum := h.Snapshot()
	if n != 5 || sum != time.Microsecond+21*time.Microsecond+time.Millisecond+3*time.Second {
		t.Fatalf("count %d sum %v", n, sum)
	}
	// ≤10 µs: 2; ≤25 µs: 1; ≤1 ms: 1; +Inf: 1.
	want := map[int]uint64{0: 2, 1: 1, 6: 1, len(LatencyBounds): 1}
	for i, c := range b {
		if c != want[i] {
			t.Errorf("bucket %d: %d, want %d", i, c, want[i])
		}
	}
}

// Every request is timed into its class's histogram.
func TestRequestLatencyRecorded(t *testing.T) {
	r := newRig(t, rigOpts{})
	r.do(0, blkIO{typ: TypeOut, sector: 0, data: pattern(4096, 1)})
	r.do(0, blkIO{typ: TypeIn, sector: 0, data: make([]byte, 4096), write: true})
	r.do(0, blkIO{typ: TypeFlush})
	st := r.dev.Stats(0)
	for name, h := range map[string]*Histogram{"read": &st.ReadLatency, "write": &st.WriteLatency, "other": &st.OtherLatency} {
		if _, n, sum := h.Snapshot(); n != 1 || sum <= 0 {
			t.Errorf("%s latency: %d observed, sum %v", name, n, sum)
		}
	}
}
