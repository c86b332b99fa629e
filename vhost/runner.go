package vhost

import (
	"fmt"
	"log/slog"

	"github.com/hemd/hemd/vhost/virtq"
	"golang.org/x/sys/unix"
)

// runner is the goroutine of one running queue. It owns the queue and its
// handler until stopAndWait returns.
type runner struct {
	stop int // eventfd: written to ask the goroutine to end
	done chan struct{}
}

// pollIntervalMs is how often a ring without a kick fd (polling mode) is
// looked at.
const pollIntervalMs = 1

// batchLimit bounds how many chains are completed before the used index is
// published and the driver notified, so that a full ring does not delay
// every completion until the end.
const batchLimit = 64

func startRunner(idx int, q *virtq.Queue, h Handler, kick, call int, log *slog.Logger, fatal func(error)) (*runner, error) {
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	r := &runner{stop: efd, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		var err error
		shielded(func() { err = r.loop(q, h, kick, call) })
		if err != nil {
			log.Error("queue stopped: ring corrupt", "queue", idx, "err", err)
			fatal(fmt.Errorf("queue %d: %w", idx, err))
		}
	}()
	return r, nil
}

func (r *runner) stopAndWait() {
	var one = [8]byte{1}
	_, _ = unix.Write(r.stop, one[:])
	<-r.done
	unix.Close(r.stop)
}

func (r *runner) loop(q *virtq.Queue, h Handler, kick, call int) error {
	var chain virtq.Chain
	chain.Segs = make([]virtq.Seg, 0, q.Size())
	fds := []unix.PollFd{{Fd: int32(r.stop), Events: unix.POLLIN}, {Fd: int32(kick), Events: unix.POLLIN}}
	timeout := -1
	if kick < 0 {
		fds = fds[:1]
		timeout = pollIntervalMs
	}
	var buf [8]byte
	for {
		// Serve everything available, then re-enable notifications and look
		// again: a request added meanwhile may come without a kick.
		for {
			q.DisableNotify()
			n := 0
			for {
				ok, err := q.Next(&chain)
				if err != nil {
					return err
				}
				if !ok {
					break
				}
				q.Push(chain.Head, h.Handle(&chain))
				if n++; n == batchLimit {
					r.publish(q, call)
					n = 0
				}
			}
			r.publish(q, call)
			more, err := q.EnableNotify()
			if err != nil {
				return err
			}
			if !more {
				break
			}
		}
		for {
			_, err := unix.Poll(fds, timeout)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return fmt.Errorf("poll: %w", err)
			}
			break
		}
		if fds[0].Revents != 0 {
			return nil
		}
		if len(fds) > 1 && fds[1].Revents != 0 {
			if fds[1].Revents&(unix.POLLERR|unix.POLLNVAL) != 0 {
				return fmt.Errorf("kick fd: poll events %#x", fds[1].Revents)
			}
			_, _ = unix.Read(kick, buf[:])
		}
	}
}

func (r *runner) publish(q *virtq.Queue, call int) {
	q.Publish()
	if q.NeedNotify() && call >= 0 {
		var one = [8]byte{1}
		_, _ = unix.Write(call, one[:])
	}
}
