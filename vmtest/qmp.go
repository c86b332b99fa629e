package vmtest

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
)

// QMP is a connection to a VM's QEMU monitor (every VM has one, on a unix
// socket in its directory). Events are buffered from the moment it connects,
// so WaitEvent sees an event that arrived before it was called.
//
// The wire is spoken here, with go-qemu's message types: go-qemu's
// SocketMonitor hands a command's reply over in the line scanner's buffer,
// which its reader overwrites with the next line (an event arriving just
// after a reply turned query-status's "paused" into ""). Each message is
// decoded here into memory of its own, and replies are matched by id.
type QMP struct {
	conn net.Conn
	// Timeout bounds each command (QEMU can block a command, e.g. stop,
	// while a vhost-user back-end does not answer). Default 60 s.
	Timeout time.Duration

	logf func(format string, args ...any) // events are logged here if set

	cmdMu  sync.Mutex // one command at a time
	nextID uint64
	reply  chan qmpReply // replies, in the order QEMU sent them

	mu      sync.Mutex
	events  []qmp.Event
	taken   []bool // events[i] was returned by a WaitEvent
	changed chan struct{}
	done    chan struct{} // closed when the event stream ends
}

// qmpMessage is any message QEMU sends: a greeting, an event or a reply.
type qmpMessage struct {
	QMP    json.RawMessage `json:"QMP"`
	Event  string          `json:"event"`
	Data   map[string]any  `json:"data"`
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
	ID        any `json:"id"`
	Timestamp struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
}

type qmpReply struct {
	id     string
	ret    json.RawMessage
	errMsg string
}

// DialQMP connects to the QMP socket at path and starts its event stream.
func DialQMP(path string) (*QMP, error) { return dialQMP(path, nil) }

func dialQMP(path string, logf func(string, ...any)) (*QMP, error) {
	conn, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		return nil, fmt.Errorf("qmp: dial %s: %w", path, err)
	}
	q := &QMP{conn: conn, Timeout: time.Minute, logf: logf, reply: make(chan qmpReply, 16),
		changed: make(chan struct{}, 1), done: make(chan struct{})}
	dec := json.NewDecoder(conn)
	var greeting qmpMessage
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if err := dec.Decode(&greeting); err != nil || greeting.QMP == nil {
		conn.Close()
		return nil, fmt.Errorf("qmp: handshake on %s: no greeting: %v", path, err)
	}
	_ = conn.SetReadDeadline(time.Time{})
	go q.read(dec)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := q.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		q.Close()
		return nil, fmt.Errorf("qmp: handshake on %s: %w", path, err)
	}
	return q, nil
}

// read takes every message QEMU sends: events into the buffer, replies to
// the command waiting for them.
func (q *QMP) read(dec *json.Decoder) {
	defer close(q.done)
	for {
		var m qmpMessage
		if err := dec.Decode(&m); err != nil {
			return
		}
		switch {
		case m.Event != "":
			e := qmp.Event{Event: m.Event, Data: m.Data}
			e.Timestamp.Seconds, e.Timestamp.Microseconds = m.Timestamp.Seconds, m.Timestamp.Microseconds
			if q.logf != nil {
				q.logf("qmp event %s %v", e.Event, e.Data)
			}
			q.mu.Lock()
			q.events = append(q.events, e)
			q.taken = append(q.taken, false)
			q.mu.Unlock()
			select {
			case q.changed <- struct{}{}:
			default:
			}
		case m.QMP == nil:
			r := qmpReply{id: fmt.Sprint(m.ID), ret: m.Return}
			if m.Error != nil {
				r.errMsg = m.Error.Class + ": " + m.Error.Desc
			}
			select {
			case q.reply <- r:
			default: // a reply nobody waits for any more (its command timed out)
			}
		}
	}
}

// Close ends the connection.
func (q *QMP) Close() error {
	err := q.conn.Close()
	<-q.done
	return err
}

// Execute runs command with args (nil or a JSON-marshalable value) and
// decodes its "return" into ret (may be nil). ctx and q.Timeout bound the
// wait for the reply.
func (q *QMP) Execute(ctx context.Context, command string, args, ret any) error {
	q.cmdMu.Lock()
	defer q.cmdMu.Unlock()
	q.nextID++
	id := fmt.Sprintf("hemd-%d", q.nextID)
	cmd, err := json.Marshal(struct {
		qmp.Command
		ID string `json:"id"`
	}{qmp.Command{Execute: command, Args: args}, id})
	if err != nil {
		return fmt.Errorf("qmp %s: %w", command, err)
	}
	ctx, cancel := context.WithTimeout(ctx, q.Timeout)
	defer cancel()
	if _, err := q.conn.Write(append(cmd, '\n')); err != nil {
		return fmt.Errorf("qmp %s: %w", command, err)
	}
	for {
		select {
		case r := <-q.reply:
			if r.id != id {
				continue // the late reply of a command that timed out
			}
			if r.errMsg != "" {
				return fmt.Errorf("qmp %s: %s", command, r.errMsg)
			}
			if ret == nil {
				return nil
			}
			if err := json.Unmarshal(r.ret, ret); err != nil {
				return fmt.Errorf("qmp %s: reply %s: %w", command, r.ret, err)
			}
			return nil
		case <-q.done:
			return fmt.Errorf("qmp %s: connection closed", command)
		case <-ctx.Done():
			return fmt.Errorf("qmp %s: no reply: %w", command, ctx.Err())
		}
	}
}

func (q *QMP) run(command string, args any) error {
	return q.Execute(context.Background(), command, args, nil)
}

// Status is the VM's run state from query-status: "running", "paused",
// "inmigrate", "postmigrate", "shutdown", ...
func (q *QMP) Status() (string, error) {
	var st struct {
		Status string `json:"status"`
	}
	if err := q.Execute(context.Background(), "query-status", nil, &st); err != nil {
		return "", err
	}
	return st.Status, nil
}

// Stop pauses the VM (QEMU stops its vhost-user devices).
func (q *QMP) Stop() error { return q.run("stop", nil) }

// Cont resumes a paused VM.
func (q *QMP) Cont() error { return q.run("cont", nil) }

// SystemReset resets the machine; with WithReboot the guest boots again in
// the same QEMU.
func (q *QMP) SystemReset() error { return q.run("system_reset", nil) }

// Quit makes QEMU exit.
func (q *QMP) Quit() error { return q.run("quit", nil) }

// Migrate starts an outgoing migration to uri ("tcp:127.0.0.1:PORT").
func (q *QMP) Migrate(uri string) error {
	return q.run("migrate", map[string]any{"uri": uri})
}

// MigrateIncoming starts listening on uri in a VM started WithIncoming("defer").
func (q *QMP) MigrateIncoming(uri string) error {
	return q.run("migrate-incoming", map[string]any{"uri": uri})
}

// MigrateCancel cancels the outgoing migration.
func (q *QMP) MigrateCancel() error { return q.run("migrate_cancel", nil) }

// SetMigrateParameters sets migration parameters, e.g.
// {"max-bandwidth": 1<<30, "downtime-limit": 300}.
func (q *QMP) SetMigrateParameters(p map[string]any) error {
	return q.run("migrate-set-parameters", p)
}

// SetMigrateCapabilities sets migration capabilities, e.g. {"events": true}
// (QEMU then sends MIGRATION events with data {"status": ...}). It must be
// set on both sides.
func (q *QMP) SetMigrateCapabilities(caps map[string]bool) error {
	var list []map[string]any
	for name, on := range caps {
		list = append(list, map[string]any{"capability": name, "state": on})
	}
	return q.run("migrate-set-capabilities", map[string]any{"capabilities": list})
}

// MigrationInfo is query-migrate's reply; Raw holds all of it.
type MigrationInfo struct {
	Status    string         `json:"status"` // "none", "setup", "active", "device", "completed", "failed", "cancelled", ...
	TotalTime int64          `json:"total-time"`
	Downtime  int64          `json:"downtime"`
	ErrorDesc string         `json:"error-desc"`
	RAM       map[string]any `json:"ram"`
	Raw       map[string]any `json:"-"`
}

// QueryMigrate returns the migration's status and details.
func (q *QMP) QueryMigrate() (string, MigrationInfo, error) {
	var raw json.RawMessage
	if err := q.Execute(context.Background(), "query-migrate", nil, &raw); err != nil {
		return "", MigrationInfo{}, err
	}
	var mi MigrationInfo
	if err := json.Unmarshal(raw, &mi); err != nil {
		return "", mi, fmt.Errorf("qmp query-migrate: %w", err)
	}
	if err := json.Unmarshal(raw, &mi.Raw); err != nil {
		return "", mi, fmt.Errorf("qmp query-migrate: %w", err)
	}
	if mi.Status == "" {
		mi.Status = "none"
	}
	return mi.Status, mi, nil
}

// WaitMigration polls query-migrate until the migration completed (nil) or
// failed or was cancelled (an error with QEMU's description).
func (q *QMP) WaitMigration(ctx context.Context) (MigrationInfo, error) {
	for {
		st, mi, err := q.QueryMigrate()
		if err != nil {
			return mi, err
		}
		switch st {
		case "completed":
			return mi, nil
		case "failed", "cancelled":
			return mi, fmt.Errorf("migration %s: %s", st, mi.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			return mi, fmt.Errorf("migration still %s: %w", st, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// WaitEvent returns the oldest event called name (e.g. "STOP", "RESUME",
// "RESET", "MIGRATION") that no earlier WaitEvent returned, waiting for it
// if none has arrived yet.
func (q *QMP) WaitEvent(ctx context.Context, name string) (qmp.Event, error) {
	return q.WaitEventMatch(ctx, name, nil)
}

// WaitEventMatch is WaitEvent for an event that also satisfies match, e.g.
// a MIGRATION event whose data status is "completed".
func (q *QMP) WaitEventMatch(ctx context.Context, name string, match func(qmp.Event) bool) (qmp.Event, error) {
	for {
		if e, ok := q.take(name, match); ok {
			return e, nil
		}
		select {
		case <-q.changed:
		case <-q.done:
			// The stream ended: look once more at what arrived before.
			if e, ok := q.take(name, match); ok {
				return e, nil
			}
			return qmp.Event{}, fmt.Errorf("qmp: connection closed before event %s", name)
		case <-ctx.Done():
			return qmp.Event{}, fmt.Errorf("qmp: waiting for event %s: %w", name, ctx.Err())
		}
	}
}

// take returns the oldest event called name satisfying match that no
// earlier call returned, and marks it returned.
func (q *QMP) take(name string, match func(qmp.Event) bool) (qmp.Event, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for i, e := range q.events {
		if !q.taken[i] && e.Event == name && (match == nil || match(e)) {
			q.taken[i] = true
			return e, true
		}
	}
	return qmp.Event{}, false
}

// Events returns every event received so far, oldest first.
func (q *QMP) Events() []qmp.Event {
	q.mu.Lock()
	defer q.mu.Unlock()
	return append([]qmp.Event(nil), q.events...)
}

// QMP returns the VM's monitor connection, connecting on first use (QEMU
// serves one connection at a time, so there is one per VM). It is closed
// when the VM is killed.
func (vm *VM) QMP() (*QMP, error) {
	vm.qmpMu.Lock()
	defer vm.qmpMu.Unlock()
	if vm.qmp != nil {
		return vm.qmp, nil
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		q, err := dialQMP(vm.qmpPath, vm.logf)
		if err == nil {
			vm.qmp = q
			return q, nil
		}
		select {
		case <-vm.con.Exited():
			return nil, fmt.Errorf("QEMU exited before its monitor answered: %w", err)
		default:
		}
		if time.Now().After(deadline) {
			return nil, err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// QMPT is QMP for tests: it fails the test on error.
func (vm *VM) QMPT() *QMP {
	vm.t.Helper()
	q, err := vm.QMP()
	if err != nil {
		vm.t.Fatalf("vmtest: %v", err)
	}
	return q
}

func (vm *VM) closeQMP() {
	vm.qmpMu.Lock()
	defer vm.qmpMu.Unlock()
	if vm.qmp != nil {
		vm.qmp.Close()
		vm.qmp = nil
	}
}

// FreeTCPAddr returns a 127.0.0.1:PORT nobody listens on now, for a
// migration's "tcp:" URI.
func FreeTCPAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("vmtest: %v", err)
	}
	defer l.Close()
	return l.Addr().String()
}
