package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/hemd/hemd/hem/volume"
)

// defaultMetricsAddr is where hemd status looks when neither --metrics nor
// --config says: the address config.toml.example and the systemd unit use.
const defaultMetricsAddr = "127.0.0.1:9465"

// statusCommand asks a running hemd serve for its volumes and prints them:
// at its metrics endpoint (GET /status) when one is named (--metrics, or
// the config's metrics), else at its control socket (op "status"), else at
// the default metrics address.
func statusCommand(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("metrics", "", "hemd serve's metrics address, HOST:PORT or unix:PATH (default: the config's metrics, else "+defaultMetricsAddr+")")
	cfgPath := fs.String("config", "", "read the metrics address (or control socket) from this config file")
	control := fs.String("control", "", "hemd serve's control socket (default $HEMD_CONTROL, else "+defaultControlPath()+"), asked when no metrics address is named")
	asJSON := fs.Bool("json", false, "print the JSON status")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("status: unexpected argument %q", fs.Arg(0))
	}
	if *addr == "" && *cfgPath != "" {
		c, err := loadConfig(*cfgPath)
		if err != nil {
			return err
		}
		*addr = c.Metrics
		if *control == "" {
			*control = c.ControlSocket
		}
	}
	var st *statusReply
	var raw []byte
	if *addr == "" {
		// The control socket, there by default; the default metrics
		// address if no hemd answers there and none was named.
		path, explicit := controlPath(*control)
		var rep statusReply
		err := errNoControl
		if path != controlNone {
			err = controlCall(ctx, path, map[string]string{"op": "status"}, &rep)
		}
		switch {
		case err == nil:
			st = &rep
			raw, _ = json.Marshal(rep)
			raw = append(raw, '\n')
		case errors.Is(err, errNoControl) && !explicit:
			*addr = defaultMetricsAddr
		default:
			return fmt.Errorf("status: %w", err)
		}
	}
	if st == nil {
		var err error
		st, raw, err = fetchStatus(ctx, *addr)
		if err != nil {
			return fmt.Errorf("status: %w (is hemd serve running with --metrics %s?)", err, *addr)
		}
	}
	if *asJSON {
		_, err := stdout.Write(raw)
		return err
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	// STATE is the attachment; VOLSTATE the volume's own state as its
	// header on disk says (available, creating, error), read here.
	// LIMITS are the provisioned IOPS and MB/s; THROTTLED the time
	// requests waited for them; PENDING a resize the connected guest was
	// not told of, or a detach waiting for the front-end to leave.
	fmt.Fprintln(tw, "VOLUME\tSTATE\tKEY\tSOCKET\tSIZE\tIO\tSESSIONS\tREADS\tWRITES\tERRORS\tCONNECTED\tLIMITS\tTHROTTLED\tPENDING\tVOLSTATE")
	for _, v := range st.Volumes {
		state, key := "plaintext", "-"
		if v.Encrypted {
			state, key = "detached", v.Key
			if v.Attached {
				state = "attached"
			}
		}
		limits := "-"
		if v.IOPS > 0 || v.Throughput > 0 {
			var l []string
			if v.IOPS > 0 {
				l = append(l, fmt.Sprintf("%diops", v.IOPS))
			}
			if v.Throughput > 0 {
				l = append(l, fmt.Sprintf("%gMB/s", v.Throughput))
			}
			limits = strings.Join(l, ",")
		}
		var pending []string
		if v.ResizePending != "" {
			pending = append(pending, "resize")
		}
		if v.DetachPending {
			pending = append(pending, "detach")
		}
		if len(pending) == 0 {
			pending = []string{"-"}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%d\t%d\t%s\t%s\t%.1fs\t%s\t%s\n", v.Volume, state, key, v.Socket,
			humanBytes(v.SizeBytes), v.IO, v.Sessions, v.Reads, v.Writes, v.Errors, yesNo(v.Connected), limits, v.ThrottledSeconds,
			strings.Join(pending, ","), volumeState(v))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, v := range st.Volumes {
		if v.ResizePending != "" {
			fmt.Fprintf(stdout, "%s: resize pending: %s\n", v.Volume, v.ResizePending)
		}
		if v.DetachPending {
			fmt.Fprintf(stdout, "%s: detach pending: gone from the config, detached once its front-end disconnects\n", v.Volume)
		}
	}
	return nil
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// volumeState reads a served volume's state from its header: "-" for a raw
// file, "?" when the header cannot be read from here.
func volumeState(v volumeStatus) string {
	if !v.Encrypted || v.Path == "" {
		return "-"
	}
	f, err := os.Open(v.Path)
	if err != nil {
		return "?"
	}
	defer f.Close()
	h, err := volume.Read(f)
	if err != nil {
		return "?"
	}
	return string(h.State)
}

type statusReply struct {
	Volumes []volumeStatus `json:"volumes"`
}

func fetchStatus(ctx context.Context, addr string) (*statusReply, []byte, error) {
	tr := &http.Transport{}
	url := "http://" + addr + "/status"
	if p, ok := strings.CutPrefix(addr, "unix:"); ok {
		tr.DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", p)
		}
		url = "http://hemd/status"
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, nil, err
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, nil, fmt.Errorf("%s: %s", url, resp.Status)
	}
	var st statusReply
	if err := json.Unmarshal(raw, &st); err != nil {
		return nil, nil, fmt.Errorf("%s: %w", url, err)
	}
	return &st, raw, nil
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
