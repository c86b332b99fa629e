//go:build cgo && !norbd

package rbd

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

// An image whose cluster has no OSD up is found unreachable at once, the
// error naming the image and the cluster, instead of a read that would wait
// for the OSD; with the OSD back it is reachable again.
func TestReachable(t *testing.T) {
	n := newImage(t, 4<<20)
	m := open(t, n, Options{})
	ctx := context.Background()
	if err := m.Reachable(ctx); err != nil {
		t.Fatalf("with the cluster up: %v", err)
	}
	cluster.StopOSD()
	t.Cleanup(func() {
		// Later tests need the OSD: start it if the test ended early.
		if err := cluster.Alive(); err != nil {
			_ = cluster.StartOSD()
		}
		wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		defer cancel()
		if err := cluster.WaitWritable(wctx); err != nil {
			t.Errorf("the pool after the OSD restart: %v", err)
		}
	})
	// The monitor learns of the OSD's shutdown from the OSD itself; give
	// it a moment, but no more than the time a refusal may take.
	var err error
	start := time.Now()
	for time.Since(start) < 20*time.Second {
		if err = m.Reachable(ctx); err != nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), n.String()) {
		t.Fatalf("with the OSD stopped: %v (after %v)", err, time.Since(start).Round(time.Millisecond))
	}
	t.Logf("refused %v after the OSD stopped: %v", time.Since(start).Round(time.Millisecond), err)
	if err := cluster.StartOSD(); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	for time.Since(start) < time.Minute {
		if err = m.Reachable(ctx); err == nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("with the OSD started again: %v", err)
	}
}
