package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/hemd/hemd/hem/datakey"
	"github.com/hemd/hemd/hem/volume"
	"github.com/hemd/hemd/vhost/blk"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// monitor exposes what hemd serves: Prometheus metrics on /metrics and the
// state of every volume as JSON on /status (what hemd status prints).
type monitor struct {
	reg *prometheus.Registry
	kms *prometheus.HistogramVec
	// vols returns the volumes served now (they come and go).
	vols func() []*served
}

func newMonitor() *monitor {
	m := &monitor{reg: prometheus.NewRegistry(), vols: func() []*served { return nil }}
	m.kms = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "hemd_kms_request_duration_seconds",
		Help:    "KMS calls made by hemd (Decrypt at attach, DescribeKey at connect), by operation and outcome.",
		Buckets: []float64{0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5},
	}, []string{"op", "outcome"})
	m.reg.MustRegister(m.kms, volumeCollector{m},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// timeKMS wraps a KMS so that every call is timed.
func (m *monitor) timeKMS(k volume.KMS) volume.KMS { return timedKMS{k, m.kms} }

type timedKMS struct {
	volume.KMS
	h *prometheus.HistogramVec
}

func (t timedKMS) observe(op string, start time.Time, err error) {
	outcome := "ok"
	if err != nil {
		outcome = "error"
	}
	t.h.WithLabelValues(op, outcome).Observe(time.Since(start).Seconds())
}

func (t timedKMS) GenerateDataKeyWithoutPlaintext(ctx context.Context, keyID string, ectx map[string]string) ([]byte, string, error) {
	start := time.Now()
	b, arn, err := t.KMS.GenerateDataKeyWithoutPlaintext(ctx, keyID, ectx)
	t.observe("GenerateDataKeyWithoutPlaintext", start, err)
	return b, arn, err
}

func (t timedKMS) Decrypt(ctx context.Context, blob []byte, ectx map[string]string, dst []byte) (string, error) {
	start := time.Now()
	arn, err := t.KMS.Decrypt(ctx, blob, ectx, dst)
	t.observe("Decrypt", start, err)
	return arn, err
}

// CheckKey implements keyChecker when the wrapped KMS does.
func (t timedKMS) CheckKey(ctx context.Context, keyID string) error {
	c, ok := t.KMS.(keyChecker)
	if !ok {
		return nil
	}
	start := time.Now()
	err := c.CheckKey(ctx, keyID)
	t.observe("DescribeKey", start, err)
	return err
}

var (
	descInfo = prometheus.NewDesc("hemd_volume_info", "A served volume (value 1).",
		[]string{"volume", "socket", "path", "key", "encrypted", "io"}, nil)
	descAttached = prometheus.NewDesc("hemd_volume_attached",
		"1 while the volume's data key is unwrapped (a front-end runs the device), else 0.", []string{"volume"}, nil)
	descSize     = prometheus.NewDesc("hemd_volume_size_bytes", "Size the guest sees.", []string{"volume"}, nil)
	descSessions = prometheus.NewDesc("hemd_sessions_total", "Front-end connections served.", []string{"volume"}, nil)
	descResub    = prometheus.NewDesc("hemd_resubmitted_requests_total",
		"Requests served again after a back-end restart (inflight tracking).", []string{"volume"}, nil)
	descRequests = prometheus.NewDesc("hemd_requests_total", "Requests completed, by queue and type.",
		[]string{"volume", "queue", "op"}, nil)
	descBytes = prometheus.NewDesc("hemd_bytes_total", "Bytes read or written for the guest, by queue.",
		[]string{"volume", "queue", "direction"}, nil)
	descErrors = prometheus.NewDesc("hemd_request_errors_total",
		"Requests that failed: io (storage or attach), bad_request (malformed chain), unsupported.",
		[]string{"volume", "queue", "kind"}, nil)
	descLatency = prometheus.NewDesc("hemd_request_duration_seconds",
		"Time hemd took per request, from the ring to the status, by queue and class (read, write, other).",
		[]string{"volume", "queue", "class"}, nil)
	descConnected = prometheus.NewDesc("hemd_volume_connected", "1 while a front-end is connected, else 0.", []string{"volume"}, nil)
	descLimit     = prometheus.NewDesc("hemd_volume_limit",
		"Provisioned performance in force: iops (requests/s), throughput (bytes/s), iops_burst (requests), throughput_burst (bytes); absent: unlimited.",
		[]string{"volume", "kind"}, nil)
	descThrottled = prometheus.NewDesc("hemd_volume_throttled_seconds_total",
		"Time the volume's requests waited for their IOPS or throughput tokens, summed over requests.", []string{"volume"}, nil)
	descThrottledReqs = prometheus.NewDesc("hemd_volume_throttled_requests_total",
		"Requests that waited for IOPS or throughput tokens.", []string{"volume"}, nil)
	descResizePending = prometheus.NewDesc("hemd_volume_resize_pending",
		"1 while the connected guest was not told of the last resize (it sees the new size when its disk is set up anew), else 0.", []string{"volume"}, nil)
	descDetachPending = prometheus.NewDesc("hemd_volume_detach_pending",
		"1 while the volume, gone from the config, waits for its front-end to disconnect before it is detached, else 0.", []string{"volume"}, nil)
)

// volumeCollector reads the served volumes' counters at scrape time: the
// data path only bumps its own per-queue atomics.
type volumeCollector struct{ m *monitor }

func (volumeCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descInfo, descAttached, descSize, descSessions, descResub,
		descRequests, descBytes, descErrors, descLatency, descConnected, descLimit, descThrottled, descThrottledReqs,
		descResizePending, descDetachPending} {
		ch <- d
	}
}

func (c volumeCollector) Collect(ch chan<- prometheus.Metric) {
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	b2f := func(b bool) float64 {
		if b {
			return 1
		}
		return 0
	}
	for _, s := range c.m.vols() {
		id := s.cfg.ID
		st := s.status()
		gauge(descInfo, 1, id, s.cfg.Socket, s.cfg.Path, st.Key, strconv.FormatBool(st.Encrypted), st.IO)
		gauge(descSize, float64(st.SizeBytes), id)
		gauge(descConnected, b2f(st.Connected), id)
		l := s.dev.Limits()
		for _, k := range []struct {
			kind string
			v    uint64
		}{{"iops", l.IOPS}, {"throughput", l.BPS}, {"iops_burst", l.IOPSBurst}, {"throughput_burst", l.BPSBurst}} {
			if k.v != 0 {
				gauge(descLimit, float64(k.v), id, k.kind)
			}
		}
		waited, waits := s.dev.Throttled()
		ch <- prometheus.MustNewConstMetric(descThrottled, prometheus.CounterValue, waited.Seconds(), id)
		counter(descThrottledReqs, waits, id)
		gauge(descResizePending, b2f(st.ResizePending != ""), id)
		gauge(descDetachPending, b2f(st.DetachPending), id)
		if st.Encrypted {
			v := 0.0
			if st.Attached {
				v = 1
			}
			gauge(descAttached, v, id)
		}
		counter(descSessions, uint64(s.srv.Sessions.Load()), id)
		counter(descResub, uint64(s.srv.Resubmitted.Load()), id)
		for q := 0; q < s.dev.MaxQueues(); q++ {
			qs := s.dev.Stats(q)
			if !queueUsed(qs) {
				continue
			}
			ql := strconv.Itoa(q)
			for _, r := range []struct {
				op string
				v  uint64
			}{{"read", qs.Reads.Load()}, {"write", qs.Writes.Load()}, {"flush", qs.Flushes.Load()},
				{"discard", qs.Discards.Load()}, {"write_zeroes", qs.WriteZeroes.Load()}, {"get_id", qs.GetIDs.Load()}} {
				counter(descRequests, r.v, id, ql, r.op)
			}
			counter(descBytes, qs.BytesRead.Load(), id, ql, "read")
			counter(descBytes, qs.BytesWritten.Load(), id, ql, "write")
			counter(descErrors, qs.IOErrors.Load(), id, ql, "io")
			counter(descErrors, qs.BadRequests.Load(), id, ql, "bad_request")
			counter(descErrors, qs.Unsupported.Load(), id, ql, "unsupported")
			for _, h := range []struct {
				class string
				h     *blk.Histogram
			}{{"read", &qs.ReadLatency}, {"write", &qs.WriteLatency}, {"other", &qs.OtherLatency}} {
				buckets, n, sum := h.h.Snapshot()
				cum := make(map[float64]uint64, len(blk.LatencyBounds))
				var acc uint64
				for i, b := range blk.LatencyBounds {
					acc += buckets[i]
					cum[b.Seconds()] = acc
				}
				ch <- prometheus.MustNewConstHistogram(descLatency, n, sum.Seconds(), cum, id, ql, h.class)
			}
		}
	}
}

func queueUsed(qs *blk.Stats) bool {
	return qs.Reads.Load()+qs.Writes.Load()+qs.Flushes.Load()+qs.Discards.Load()+qs.WriteZeroes.Load()+
		qs.GetIDs.Load()+qs.BadRequests.Load()+qs.Unsupported.Load() > 0
}

// volumeStatus is one volume in /status and hemd status.
type volumeStatus struct {
	Volume      string `json:"volume"`
	Socket      string `json:"socket"`
	Path        string `json:"path"`
	Encrypted   bool   `json:"encrypted"`
	IO          string `json:"io"` // "uring" or "sync": how reads and writes reach the kernel
	Key         string `json:"key,omitempty"`
	Attached    bool   `json:"attached"`
	SizeBytes   int64  `json:"size_bytes"`
	Sessions    int64  `json:"sessions"`
	Resubmitted int64  `json:"resubmitted"`
	Reads       uint64 `json:"reads"`
	Writes      uint64 `json:"writes"`
	Errors      uint64 `json:"errors"`
	// Connected: a front-end is connected now.
	Connected bool `json:"connected"`
	// Origin: "config" (the config file) or "attach" (hemd volume attach).
	Origin string `json:"origin,omitempty"`
	// Access: the socket's mode, owner and group.
	Access string `json:"access,omitempty"`
	// Limits in force; 0: unlimited. Throughput in MB/s, its burst in MB.
	IOPS            uint64  `json:"iops"`
	Throughput      float64 `json:"throughput"`
	IOPSBurst       uint64  `json:"iops_burst,omitempty"`
	ThroughputBurst float64 `json:"throughput_burst,omitempty"`
	// ThrottledSeconds: time requests waited for tokens, summed;
	// ThrottledRequests: requests that waited.
	ThrottledSeconds  float64 `json:"throttled_seconds"`
	ThrottledRequests uint64  `json:"throttled_requests"`
	// ResizePending says why the connected guest was not told of the last
	// resize; DetachPending: the config no longer has the volume, which is
	// detached once its front-end disconnects.
	ResizePending string `json:"resize_pending,omitempty"`
	DetachPending bool   `json:"detach_pending,omitempty"`
}

func (s *served) status() volumeStatus {
	st := volumeStatus{
		Volume: s.cfg.ID, Socket: s.cfg.Socket, Path: s.cfg.Path, IO: s.io, SizeBytes: int64(s.dev.Capacity()),
		Sessions: s.srv.Sessions.Load(), Resubmitted: s.srv.Resubmitted.Load(),
		Connected: s.srv.Connected(), Origin: s.origin, ResizePending: s.pending(), DetachPending: s.detachPending.Load(),
	}
	if s.ln != nil {
		st.Access = s.ln.Access()
	}
	l := limitsOf(s)
	st.IOPS, st.Throughput, st.IOPSBurst, st.ThroughputBurst = l.IOPS, l.Throughput, l.IOPSBurst, l.ThroughputBurst
	waited, waits := s.dev.Throttled()
	st.ThrottledSeconds, st.ThrottledRequests = waited.Seconds(), waits
	if s.keys != nil {
		st.Encrypted, st.Key = true, s.keys.head.KeyID
		st.Attached = s.keys.key.State() == datakey.Attached
	}
	for q := 0; q < s.dev.MaxQueues(); q++ {
		qs := s.dev.Stats(q)
		st.Reads += qs.Reads.Load()
		st.Writes += qs.Writes.Load()
		st.Errors += qs.IOErrors.Load() + qs.BadRequests.Load()
	}
	return st
}

// handler serves /metrics and /status.
func (m *monitor) handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/status", func(w http.ResponseWriter, r *http.Request) {
		vols := m.vols()
		out := make([]volumeStatus, 0, len(vols))
		for _, s := range vols {
			out = append(out, s.status())
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{"volumes": out})
	})
	return mux
}

// listenMonitor listens on addr: HOST:PORT, or unix:PATH (mode 0600).
func listenMonitor(addr string) (net.Listener, error) {
	if p, ok := strings.CutPrefix(addr, "unix:"); ok {
		ln, err := net.Listen("unix", p)
		if err != nil {
			return nil, err
		}
		ln.(*net.UnixListener).SetUnlinkOnClose(true)
		return ln, nil
	}
	return net.Listen("tcp", addr)
}

// serveMonitor serves m on addr until ctx ends.
func (m *monitor) serve(ctx context.Context, addr string, log *slog.Logger) (func(), error) {
	ln, err := listenMonitor(addr)
	if err != nil {
		return nil, fmt.Errorf("metrics %s: %w", addr, err)
	}
	srv := &http.Server{Handler: m.handler(), ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics endpoint stopped", "err", err)
		}
	}()
	log.Info("metrics and status", "addr", ln.Addr().String())
	stop := context.AfterFunc(ctx, func() { srv.Close() })
	return func() { stop(); srv.Close() }, nil
}
