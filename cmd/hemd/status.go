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

// statusCommand asks a running hemd serve for its volumes (GET /status on
// its metrics endpoint) and prints them.
func statusCommand(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("metrics", "", "hemd serve's metrics address, HOST:PORT or unix:PATH (default: the config's metrics, else "+defaultMetricsAddr+")")
	cfgPath := fs.String("config", "", "read the metrics address from this config file")
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
	}
	if *addr == "" {
		*addr = defaultMetricsAddr
	}
	st, raw, err := fetchStatus(ctx, *addr)
	if err != nil {
		return fmt.Errorf("status: %w (is hemd serve running with --metrics %s?)", err, *addr)
	}
	if *asJSON {
		_, err := stdout.Write(raw)
		return err
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	// STATE is the attachment; VOLSTATE the volume's own state as its
	// header on disk says (available, creating, error), read here.
	fmt.Fprintln(tw, "VOLUME\tSTATE\tKEY\tSOCKET\tSIZE\tIO\tSESSIONS\tREADS\tWRITES\tERRORS\tVOLSTATE")
	for _, v := range st.Volumes {
		state, key := "plaintext", "-"
		if v.Encrypted {
			state, key = "detached", v.Key
			if v.Attached {
				state = "attached"
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%d\t%d\t%s\n", v.Volume, state, key, v.Socket,
			humanBytes(v.SizeBytes), v.IO, v.Sessions, v.Reads, v.Writes, v.Errors, volumeState(v))
	}
	return tw.Flush()
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
