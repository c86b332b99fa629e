package blk

import (
	"bytes"
	"testing"
	"time"
)

// A queue that served a request keeps looking at its ring for PollTime: a
// request made available meanwhile is served without a kick. With polling
// off it waits for the kick.
func TestPollServesWithoutKick(t *testing.T) {
	for _, tc := range []struct {
		poll   time.Duration
		served bool
	}{{2 * time.Second, true}, {-1, false}} {
		r := newRig(t, rigOpts{pollTime: tc.poll})
		want := pattern(4096, 9)
		if st, _, _ := r.do(0, blkIO{typ: TypeOut, sector: 8, data: want}); st != StatusOK {
			t.Fatalf("poll %v: write status %d", tc.poll, st)
		}
		qu := r.c.Queues[0]
		if !tc.served {
			// Long enough for the queue to look once more and sleep.
			time.Sleep(100 * time.Millisecond)
		}
		io := blkIO{typ: TypeIn, sector: 8, data: make([]byte, 4096), write: true}
		bufs, st, data := r.build(io)
		head, err := qu.Add(bufs) // available, and no kick
		if err != nil {
			t.Fatal(err)
		}
		served := false
		for end := time.Now().Add(500 * time.Millisecond); time.Now().Before(end) && !served; time.Sleep(time.Millisecond) {
			for _, u := range qu.Poll(nil) {
				if u.Head != head {
					t.Fatalf("poll %v: completion of head %d, want %d", tc.poll, u.Head, head)
				}
				served = true
				if s, _, got := r.result(io, st, data, u); s != StatusOK || !bytes.Equal(got, want) {
					t.Fatalf("poll %v: read while polling: status %d, data equal %v", tc.poll, s, bytes.Equal(got, want))
				}
			}
		}
		if served != tc.served {
			t.Fatalf("poll %v: request served without a kick: %v, want %v", tc.poll, served, tc.served)
		}
		if !served {
			u := r.kickWait(qu, head)
			if s, _, got := r.result(io, st, data, u); s != StatusOK || !bytes.Equal(got, want) {
				t.Fatalf("after the kick: status %d, data equal %v", s, bytes.Equal(got, want))
			}
		}
		start := time.Now()
		r.stop()
		if d := time.Since(start); d > time.Second {
			t.Errorf("poll %v: stopping took %v: a spin must end when the ring stops", tc.poll, d)
		}
	}
}
